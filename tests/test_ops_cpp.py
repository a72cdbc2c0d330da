"""The C++ ai.adq kernels (runtime/cpp) in onnxruntime against the NumPy reference ops.

Builds the op library once if it is missing or stale (a failed build fails these tests: the
library is part of the product, it is never skipped). Thousands of seeded random one-node cases
over bits, strides, pads, dilations, groups (depthwise included), batch sizes, Scale [M] / [1]
and optional Bias, each compared with ``runtime.reference``; malformed inputs must give an
onnxruntime error, never a crash.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from export_helpers import MODEL_CASES, case_input, onnx_model, run_onnx

from runtime.library import ORT_ERRORS, OpLibraryError, build_library, get_library_path, op_names
from runtime.library import session_options as adq_session_options
from runtime.packing import pack_rows
from runtime.reference.graphs import run_single, single_op_model
from runtime.schema import OPS

ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
MAIN_BITS = (2, 3, 4, 8)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def library():
    """Build (if needed) and return the library path; a build failure is a test failure."""
    return build_library()


@pytest.fixture(scope="session")
def so2(library):
    """Session options with the ops registered and 2 intra-op threads (parallel paths)."""
    return adq_session_options(num_threads=2)


def run_ort(so, op, inputs, attrs, constants=(), outputs=None):
    """The op in onnxruntime: its one output, or the list of ``outputs`` (see single_op_model)."""
    model = single_op_model(op, inputs, attrs, constants=constants, outputs=outputs)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {k: v for k, v in inputs.items() if v is not None and k not in constants}
    results = sess.run(None, feeds)
    return results[0] if outputs is None else results


def compare(so, op, inputs, attrs, exact=False, constants=()):
    """Run op in onnxruntime and in the reference: (error message or None, reference output).

    Floats agree when max |got - ref| <= 1e-5 * max(1, max |ref|); integer outputs exactly.
    ``constants`` are passed as initializers (the kernels cache repacked constant codes).
    """
    ref = run_single(op, inputs, attrs)
    got = run_ort(so, op, inputs, attrs, constants)
    if got.dtype != ref.dtype or got.shape != ref.shape:
        return f"dtype/shape {got.dtype}{got.shape} != reference {ref.dtype}{ref.shape}", ref
    if exact:
        if not np.array_equal(got, ref):
            return f"{int((got != ref).sum())} of {ref.size} entries differ", ref
        return None, ref
    if ref.size == 0:
        return None, ref
    err = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    tol = 1e-5 * max(1.0, float(np.abs(ref).max()))
    return (None if err <= tol else f"max abs error {err:.3g} > {tol:.3g}"), ref


def check_cases(so, op, cases, exact=False, constants=()):
    """Run every case; fail with the first mismatches (and their parameters)."""
    failures, nonzero = [], 0
    for inputs, attrs in cases:
        msg, ref = compare(so, op, inputs, attrs, exact, constants)
        if msg:
            shapes = {k: None if v is None else v.shape for k, v in inputs.items()}
            failures.append(f"{msg}: attrs={attrs} shapes={shapes}")
        nonzero += bool(np.any(ref != 0))
    assert not failures, f"{len(failures)}/{len(cases)} {op} cases fail:\n" + "\n".join(
        failures[:5]
    )
    # Guard against vacuous agreement (everything zero).
    assert nonzero >= 0.9 * len(cases), f"only {nonzero}/{len(cases)} {op} outputs are non-zero"


# ----------------------------------------------------------------------------- case generators


def _codes(rng, bits, rows, row_len, integer=False):
    """Packed random codes and a codebook of K <= 2^bits levels that the codes all index.

    integer=True: levels are integers in -128..127 (LutConv's exact int8 path)."""
    full = 1 << bits
    k = int(rng.choice([full, rng.integers(1, full + 1)]))
    codes = rng.integers(0, k, size=(rows, row_len))
    if integer:
        codebook = rng.integers(-128, 128, size=k).astype(np.float32)
        codebook[: min(k, 2)] = [-128, 127][: min(k, 2)]  # the extremes of the int8 range
    else:
        codebook = rng.normal(size=k).astype(np.float32)
    return pack_rows(codes, bits), codebook


def _affine(rng, m):
    scale = rng.uniform(0.01, 2.0, size=m if rng.random() < 0.7 else 1).astype(np.float32)
    bias = rng.normal(size=m).astype(np.float32) if rng.random() < 0.6 else None
    return scale, bias


def _levels(rng, shape):
    hi = int(rng.choice([2, 4, 16, 256]))
    return rng.integers(0, hi, size=shape, dtype=np.uint8)


def conv_cases(seed, count, big_every=40):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        bits = int(rng.choice(MAIN_BITS)) if rng.random() < 0.8 else int(rng.choice(ALL_BITS))
        kind = rng.choice(["dense", "grouped", "depthwise", "depthwise2"])
        if kind == "dense":
            group, c, m = 1, int(rng.integers(1, 9)), int(rng.integers(1, 14))
            if rng.random() < 0.25:  # several 16-channel blocks, a last panel of one block
                m = int(rng.choice([16, 17, 32, 33, 48, 70]))
        elif kind == "grouped":
            group = int(rng.integers(2, 4))
            c, m = group * int(rng.integers(1, 4)), group * int(rng.integers(1, 8))
        else:  # depthwise: M/group = 1 or 2 (the direct-convolution path)
            group = c = int(rng.integers(1, 9))
            m = c * (1 if kind == "depthwise" else 2)
        kh, kw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        # stride 1 (padded-plane paths) in about half the cases, im2col paths otherwise
        sh, sw = (
            (1, 1) if rng.random() < 0.5 else (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        )
        dh, dw = (
            (1, 1) if rng.random() < 0.6 else (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
        )
        pads = [int(v) for v in rng.integers(0, 3, size=4)] if rng.random() < 0.7 else [0, 0, 0, 0]
        h = max(1, dh * (kh - 1) + 1 - pads[0] - pads[2]) + int(rng.integers(0, 9))
        w = max(1, dw * (kw - 1) + 1 - pads[1] - pads[3]) + int(rng.integers(0, 9))
        n = int(rng.integers(1, 4))
        if i % big_every == 0:  # several K blocks (R > 256) and column tiles (P > 256)
            group, c, m, kh, kw, sh, sw, dh, dw = 1, 32, 20, 3, 3, 1, 1, 1, 1
            h, w, n, pads = 18, 17, 1, [1, 1, 1, 1]
            if i % (2 * big_every) == 0:  # more than 256 channels per group, 1x1 or strided
                c, m, kh, kw, h, w, pads = 264, 8, 1, 1, 5, 6, [0, 0, 0, 0]
                sh = sw = int(rng.integers(1, 3))
        x = _levels(rng, (n, c, h, w))
        integer = rng.random() < 0.3
        packed, codebook = _codes(rng, bits, m, (c // group) * kh * kw, integer)
        scale, bias = _affine(rng, m)
        attrs = {"bits": bits, "kernel_shape": [kh, kw]}
        # Leave defaults out sometimes so the kernels' attribute defaults are exercised too.
        if (sh, sw) != (1, 1) or rng.random() < 0.5:
            attrs["strides"] = [sh, sw]
        if pads != [0, 0, 0, 0] or rng.random() < 0.5:
            attrs["pads"] = pads
        if (dh, dw) != (1, 1) or rng.random() < 0.5:
            attrs["dilations"] = [dh, dw]
        if group != 1 or rng.random() < 0.5:
            attrs["group"] = group
        inputs = {"X": x, "Codes": packed, "Codebook": codebook, "Scale": scale, "Bias": bias}
        cases.append((inputs, attrs))
    return cases


def gemm_cases(seed, count):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        bits = int(rng.choice(MAIN_BITS)) if rng.random() < 0.8 else int(rng.choice(ALL_BITS))
        n = int(rng.choice([1, 1, 2, 3, 7, 13, 20]))
        kin = int(rng.integers(1, 80)) if i % 10 else int(rng.integers(250, 600))
        m = int(rng.integers(1, 70))
        packed, codebook = _codes(rng, bits, m, kin)
        scale, bias = _affine(rng, m)
        inputs = {
            "X": _levels(rng, (n, kin)),
            "Codes": packed,
            "Codebook": codebook,
            "Scale": scale,
            "Bias": bias,
        }
        cases.append((inputs, {"bits": bits}))
    return cases


def dequant_cases(seed, count):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        bits = int(rng.choice(ALL_BITS))
        rank = int(rng.integers(1, 5))
        shape = [int(rng.integers(1, 9))] + [int(rng.integers(1, 6)) for _ in range(rank - 1)]
        row_len = int(np.prod(shape[1:], dtype=np.int64))
        packed, codebook = _codes(rng, bits, shape[0], row_len)
        cases.append(({"Codes": packed, "Codebook": codebook}, {"bits": bits, "shape": shape}))
    return cases


def threshold_cases(seed, count):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        t = (
            int(rng.choice([1, 2, 3, 4, 7, 8, 15, 24, 63, 255]))
            if i % 5
            else int(rng.integers(1, 256))
        )
        thr = np.sort(rng.normal(size=t)).astype(np.float32)
        if rng.random() < 0.3 and t > 2:  # repeated thresholds
            thr[1] = thr[0]
        rank = int(rng.integers(0, 5))
        shape = tuple(int(v) for v in rng.integers(1, 7, size=rank))
        if i == 0:
            shape = (3, 40000)  # several parallel chunks
        x = np.asarray(rng.normal(size=shape) * 1.5, dtype=np.float32)
        flat = x.reshape(-1)
        if flat.size >= 4:  # values exactly at thresholds, NaN and infinities
            flat[0] = thr[int(rng.integers(0, t))]
            flat[1:4] = [np.nan, np.inf, -np.inf]
        scale = np.float32(rng.uniform(0.2, 3.0)) if i % 3 else np.float32(1.0)
        scale = np.array(scale) if rng.random() < 0.5 else np.array([scale])
        cases.append(({"X": x, "Scale": scale, "Thresholds": thr}, {}))
    return cases


# ----------------------------------------------------------------------------- tests


def test_registry_lists_the_schema_ops(library):
    names = op_names(library)
    assert len(names) == len(set(names)), names
    assert sorted(names) == sorted(op.name for op in OPS)


def test_missing_library_error_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.delenv("ADQ_OPS_LIBRARY", raising=False)
    monkeypatch.setenv("ADQ_BUILD_DIR", str(tmp_path))
    with pytest.raises(OpLibraryError, match="build-ops.sh"):
        get_library_path()


def test_session_options_sets_parity_config(library):
    so = adq_session_options(num_threads=1)
    assert so.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
    assert so.intra_op_num_threads == 1


def test_lut_conv_matches_reference(so2):
    check_cases(so2, "LutConv", conv_cases(seed=1, count=1200))


def test_lut_conv_with_constant_codes_matches_reference(so2):
    """Codes and Codebook as initializers, as exported: the repacked copy made on first use."""
    check_cases(
        so2, "LutConv", conv_cases(seed=5, count=300), constants=("Codes", "Codebook", "Scale")
    )


def wide_strided_cases(seed, count):
    """Wide rows (30-90 columns) at strides 1-3 and kernels 1-3: the vectorized phase-plane
    builds (16 columns at a time) with their row ends, pads and channel counts not a multiple
    of 4; integer codebooks (the int8 path) in most cases."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        sh, sw = [(2, 2), (2, 1), (1, 2), (3, 3), (1, 1), (2, 3)][i % 6]
        k = int(rng.choice([1, 3])) if i % 4 else 2
        pads = [int(v) for v in rng.integers(0, k, size=4)] if k > 1 else [0, 0, 0, 0]
        c, m = int(rng.choice([3, 4, 5, 8, 13])), int(rng.choice([7, 16, 33]))
        n, h, w = int(rng.integers(1, 3)), int(rng.integers(3, 9)), int(rng.integers(30, 91))
        bits = int(rng.choice([2, 3, 4]))
        packed, codebook = _codes(rng, bits, m, c * k * k, integer=i % 5 != 0)
        scale, bias = _affine(rng, m)
        attrs = {"bits": bits, "kernel_shape": [k, k], "strides": [sh, sw], "pads": pads}
        inputs = {"X": _levels(rng, (n, c, h, w)), "Codes": packed, "Codebook": codebook}
        cases.append(({**inputs, "Scale": scale, "Bias": bias}, attrs))
    return cases


def test_lut_conv_wide_strided_rows_match_reference(so2):
    check_cases(
        so2, "LutConv", wide_strided_cases(seed=11, count=120), constants=("Codes", "Codebook")
    )


def _thresholds_between(rng, v):
    """1-30 sorted thresholds (repeats allowed) halfway between distinct values of v: levels
    vary, and no value sits on a threshold unless two values are within rounding of each other."""
    vals = np.unique(v.astype(np.float64))
    mids = (vals[:-1] + vals[1:]) / 2 if vals.size > 1 else vals + 1.0
    t = int(rng.choice([1, 2, 3, 4, 7, 8, 15, 30]))  # powers of two: the search's first step
    return np.sort(rng.choice(mids, size=t)).astype(np.float32)


def with_epilogue(rng, cases, quant):
    """The (inputs, attrs) cases with the fused epilogue: a Residual (in about half), relu 0/1,
    and with ``quant`` QScale and thresholds placed between output values (levels vary)."""
    out = []
    for inputs, attrs in cases:
        y = run_single("LutConv", inputs, attrs)
        inputs = {**inputs, "Residual": None}
        if rng.random() < 0.5:
            spread = float(np.abs(y).max()) or 1.0
            inputs["Residual"] = (rng.normal(size=y.shape) * spread).astype(np.float32)
        attrs = {**attrs, "relu": int(rng.integers(0, 2))}
        if quant:
            qscale = np.float32(rng.uniform(0.5, 2.0))
            thr = _thresholds_between(rng, qscale * run_single("LutConv", inputs, attrs))
            inputs["QScale"] = np.array(qscale if rng.random() < 0.5 else [qscale], np.float32)
            inputs["QThresholds"] = thr
        out.append((inputs, attrs))
    return out


def fused_cases(seed, count, quant):
    """conv_cases with the fused epilogue (with_epilogue)."""
    return with_epilogue(np.random.default_rng(seed + 1000), conv_cases(seed, count, 25), quant)


def without_levels(inputs):
    """The inputs without QScale and QThresholds (LutConv writing Y only)."""
    return {k: v for k, v in inputs.items() if k not in ("QScale", "QThresholds")}


def _level_mismatches(inputs, attrs, got, ref):
    """(levels that differ beyond threshold rounding, levels that differ within it): the float
    output may differ from the reference's by a few ulps, so a level may differ by at most the
    number of thresholds within rounding of its value."""
    z = run_single("LutConv", without_levels(inputs), attrs).astype(np.float64)
    v = np.float64(inputs["QScale"].reshape(())) * z
    tol = 2e-5 * max(1.0, float(np.abs(v).max()))
    near = (np.abs(v[..., None] - inputs["QThresholds"].astype(np.float64)) <= tol).sum(-1)
    diff = np.abs(got.astype(np.int64) - ref.astype(np.int64))
    return int((diff > near).sum()), int(((near > 0) & (diff > 0)).sum())


def check_levels(so, cases, constants=()):
    """LutConvQuant against the reference: equal levels up to threshold rounding (above), such
    outputs rare."""
    failures, exempt, total = [], 0, 0
    for inputs, attrs in cases:
        ref = run_single("LutConvQuant", inputs, attrs)
        got = run_ort(so, "LutConvQuant", inputs, attrs, constants)
        bad, near = _level_mismatches(inputs, attrs, got, ref)
        if got.dtype != np.uint8 or got.shape != ref.shape or bad:
            failures.append(f"{bad} levels differ: attrs={attrs} x={inputs['X'].shape}")
        exempt += near
        total += ref.size
    assert not failures, f"{len(failures)}/{len(cases)} cases fail:\n" + "\n".join(failures[:5])
    assert exempt <= 1e-3 * total, f"{exempt} of {total} levels differ at thresholds"


def check_y_and_levels(so, cases, constants=()):
    """LutConv with output Q: Y as LutConv's reference, Q as LutConvQuant's (up to rounding)."""
    failures, exempt, total = [], 0, 0
    for inputs, attrs in cases:
        y_ref = run_single("LutConv", without_levels(inputs), attrs)
        q_ref = run_single("LutConvQuant", inputs, attrs)
        y, q = run_ort(so, "LutConv", inputs, attrs, constants, outputs=("Y", "Q"))
        err = float(np.abs(y.astype(np.float64) - y_ref).max()) if y.shape == y_ref.shape else 1e9
        bad, near = _level_mismatches(inputs, attrs, q, q_ref) if q.shape == q_ref.shape else (1, 0)
        if err > 1e-5 * max(1.0, float(np.abs(y_ref).max())) or q.dtype != np.uint8 or bad:
            failures.append(f"Y error {err:.3g}, {bad} levels differ: attrs={attrs}")
        exempt += near
        total += q_ref.size
    assert not failures, f"{len(failures)}/{len(cases)} cases fail:\n" + "\n".join(failures[:5])
    assert exempt <= 1e-3 * total, f"{exempt} of {total} levels differ at thresholds"


def with_quantizer(rng, cases, suffix=""):
    """The cases with QScale{suffix} and QThresholds{suffix}: a random scale and thresholds
    between the output values (suffix "2": LutConvQuant's second quantizer)."""
    out = []
    for inputs, attrs in cases:
        qscale = np.float32(rng.uniform(0.5, 2.0))
        y = run_single("LutConv", without_levels(inputs), attrs)
        thr = _thresholds_between(rng, qscale * y)
        quant = {f"QScale{suffix}": np.array([qscale]), f"QThresholds{suffix}": thr}
        out.append(({**inputs, **quant}, attrs))
    return out


def check_two_levels(so, cases, constants=()):
    """LutConvQuant with outputs Q and Q2: each against the reference (up to threshold rounding
    of its own quantizer)."""
    failures, exempt, total = [], 0, 0
    for inputs, attrs in cases:
        refs = run_single("LutConvQuant", inputs, attrs, outputs=("Q", "Q2"))
        gots = run_ort(so, "LutConvQuant", inputs, attrs, constants, outputs=("Q", "Q2"))
        first = {k: v for k, v in inputs.items() if not k.endswith("2")}
        second = {**first, "QScale": inputs["QScale2"], "QThresholds": inputs["QThresholds2"]}
        for quant, got, ref in zip((first, second), gots, refs, strict=True):
            bad, near = (
                _level_mismatches(quant, attrs, got, ref) if got.shape == ref.shape else (1, 0)
            )
            if got.dtype != np.uint8 or bad:
                failures.append(f"{bad} levels differ: attrs={attrs} x={inputs['X'].shape}")
            exempt += near
            total += ref.size
    assert not failures, f"{len(failures)}/{len(cases)} cases fail:\n" + "\n".join(failures[:5])
    assert exempt <= 1e-3 * total, f"{exempt} of {total} levels differ at thresholds"


def test_lut_conv_quant_second_quantizer_matches_reference(so2):
    """Q2 (a second reader's quantizer of the same output) on every path: the panel kernels
    (float and int8, channel- and pixel-lane tiles), with and without residual and relu."""
    rng = np.random.default_rng(31)
    cases = with_quantizer(rng, fused_cases(seed=32, count=120, quant=True), "2")
    check_two_levels(so2, cases)
    check_two_levels(so2, cases[:40], constants=("Codes", "Codebook", "Scale"))
    pix = with_epilogue(rng, pixel_lane_cases(seed=33, count=24), True)
    check_two_levels(so2, with_quantizer(rng, pix, "2"), constants=("Codes", "Codebook"))


def test_lut_conv_quant_second_output_and_its_inputs_go_together(so2):
    inputs, attrs = _conv_ok()
    quant = {"QScale": np.array(1.0, np.float32), "QThresholds": np.array([0.5], np.float32)}
    second = {"QScale2": np.array(1.0, np.float32), "QThresholds2": np.array([0.5], np.float32)}
    inputs = {**inputs, "Residual": None, **quant}
    with pytest.raises(ORT_ERRORS, match="output Q2 needs inputs QScale2 and QThresholds2"):
        run_ort(so2, "LutConvQuant", inputs, attrs, outputs=("Q", "Q2"))
    with pytest.raises(ORT_ERRORS, match="QScale2 and QThresholds2 need output Q2"):
        run_ort(so2, "LutConvQuant", {**inputs, **second}, attrs)
    for outputs, extra in [(("Q", "Q2"), {}), (None, second)]:  # the reference agrees
        with pytest.raises(ValueError, match="Q2"):
            run_single("LutConvQuant", {**inputs, **extra}, attrs, outputs=outputs)


@pytest.mark.parametrize(
    "second, reason",
    [
        ({"QThresholds2": np.array([1.0, 0.0], np.float32)}, "QThresholds2 must be non-decreasing"),
        ({"QThresholds2": np.zeros(0, np.float32)}, "1..255 entries"),
        ({"QScale2": np.ones(2, np.float32)}, "QScale2 must be a scalar"),
    ],
)
def test_lut_conv_quant_bad_second_quantizer_is_an_error(so2, second, reason):
    inputs, attrs = _conv_ok()
    inputs = {**inputs, "Residual": None, "QScale": np.array(1.0, np.float32)}
    inputs.update(QThresholds=np.array([0.5], np.float32), QScale2=np.array(1.0, np.float32))
    inputs.update(QThresholds2=np.array([0.5], np.float32))
    inputs.update(second)
    with pytest.raises(ValueError):  # the reference agrees the case is malformed
        run_single("LutConvQuant", inputs, attrs, outputs=("Q", "Q2"))
    with pytest.raises(ORT_ERRORS, match=reason):
        run_ort(so2, "LutConvQuant", inputs, attrs, outputs=("Q", "Q2"))


def test_lut_conv_fused_residual_relu_matches_reference(so2):
    cases = fused_cases(seed=21, count=250, quant=False)
    check_cases(so2, "LutConv", cases)
    check_cases(so2, "LutConv", cases[:100], constants=("Codes", "Codebook", "Scale"))


def test_lut_conv_quant_matches_reference(so2):
    cases = fused_cases(seed=22, count=250, quant=True)
    check_levels(so2, cases)
    check_levels(so2, cases[:100], constants=("Codes", "Codebook", "Scale"))


_ACTIVATIONS = ("X", "Residual", "ShortcutX")


def _channels_last(case):
    """A case with channels_last = 1: X, Residual and ShortcutX transposed to NHWC."""
    inputs, attrs = case
    nhwc = {
        k: v.transpose(0, 2, 3, 1).copy() if k in _ACTIVATIONS and v is not None else v
        for k, v in inputs.items()
    }
    return nhwc, {**attrs, "channels_last": 1}


def test_channels_last_matches_reference(so2):
    """channels_last = 1 (X, Residual, Y, Q, Q2 in NHWC) on every path: the int8 kernel's own
    channels-last tiles (integer codebooks) and the others (through NCHW copies)."""
    rng = np.random.default_rng(41)
    last = [_channels_last(c) for c in fused_cases(seed=42, count=160, quant=False)]
    check_cases(so2, "LutConv", last)
    check_cases(so2, "LutConv", last[:60], constants=("Codes", "Codebook", "Scale"))
    quant = with_quantizer(rng, fused_cases(seed=43, count=160, quant=True), "2")
    check_two_levels(so2, [_channels_last(c) for c in quant])
    check_levels(so2, [_channels_last(c) for c in fused_cases(seed=44, count=80, quant=True)])
    check_y_and_levels(so2, [_channels_last(c) for c in fused_cases(seed=45, count=60, quant=True)])
    wide = with_epilogue(rng, wide_strided_cases(seed=46, count=60), True)
    check_levels(so2, [_channels_last(c) for c in wide], constants=("Codes", "Codebook"))
    check_cases(so2, "LutConv", [_channels_last((without_levels(i), a)) for i, a in wide])


def test_channels_last_int8_kernel_equals_its_nchw_form(so2):
    """The int8 kernel in both layouts computes the same exact sums and epilogue: outputs equal
    bit for bit after the transpose (Y with levels; levels alone, counted on the int32 sums;
    two quantizers), including batches run in chunks of images."""
    rng = np.random.default_rng(47)
    cases = []
    for c, m, k, stride, hw, n in [
        (64, 64, 3, 1, 14, 2),
        (64, 128, 3, 2, 15, 3),
        (64, 128, 1, 2, 14, 2),
        (13, 40, 3, 1, 9, 1),
        (32, 32, 3, 1, 40, 9),
    ]:
        packed = pack_rows(rng.integers(0, 8, size=(m, c * k * k)), 3)
        inputs = {
            "X": _levels(rng, (n, c, hw, hw)),
            "Codes": packed,
            "Codebook": np.arange(-4, 4).astype(np.float32),
        }
        scale, bias = _affine(rng, m)
        inputs.update(Scale=scale, Bias=bias)
        attrs = {
            "bits": 3,
            "kernel_shape": [k, k],
            "strides": [stride, stride],
            "pads": [k // 2] * 4,
            "relu": 1,
        }
        cases.append((inputs, attrs))
    cases = with_quantizer(rng, with_epilogue(rng, cases, True), "2")
    for inputs, attrs in cases:
        for op, outputs, drop in [
            ("LutConv", ("Y", "Q"), ("QScale2", "QThresholds2")),
            ("LutConvQuant", ("Q", "Q2"), ("Residual",)),
            ("LutConvQuant", ("Q", "Q2"), ()),
        ]:
            case = ({k: v for k, v in inputs.items() if k not in drop}, attrs)
            if op == "LutConvQuant":
                case[0].setdefault("Residual", None)
            nchw = run_ort(so2, op, *case, ("Codes", "Codebook"), outputs)
            nhwc = run_ort(so2, op, *_channels_last(case), ("Codes", "Codebook"), outputs)
            for a, b in zip(nchw, nhwc, strict=True):
                assert b.shape == a.transpose(0, 2, 3, 1).shape
                np.testing.assert_array_equal(b, a.transpose(0, 2, 3, 1), err_msg=f"{op} {attrs}")


def shortcut_cases(seed, count):
    """3x3 layers with a 1x1 shortcut in place of the Residual (a downsampling block's second
    convolution and its shortcut) at shortcut strides 1-3: integer codebooks for both in most
    cases (channels last with shortcut channels a multiple of 4 and codes of at most 4 bits:
    the int8 kernel adds the shortcut tile by tile), the others through a buffer."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        n, c, m = int(rng.integers(1, 4)), int(rng.choice([4, 8, 13])), int(rng.choice([7, 16, 40]))
        h, w, s2 = int(rng.integers(2, 10)), int(rng.integers(2, 30)), int(rng.choice([1, 2, 3]))
        c2 = int(rng.choice([4, 8, 16, 5]))
        h2, w2 = s2 * h - int(rng.integers(0, s2)), s2 * w - int(rng.integers(0, s2))
        integer = i % 4 != 3
        bits, bits2 = int(rng.choice([2, 3, 4])), int(rng.choice([2, 3, 4, 4, 8]))
        packed, codebook = _codes(rng, bits, m, c * 9, integer)
        packed2, codebook2 = _codes(rng, bits2, m, c2, integer)
        scale, bias = _affine(rng, m)
        scale2, bias2 = _affine(rng, m)
        inputs = {"X": _levels(rng, (n, c, h, w)), "Codes": packed, "Codebook": codebook}
        inputs.update(Scale=scale, Bias=bias, ShortcutX=_levels(rng, (n, c2, h2, w2)))
        inputs.update(ShortcutCodes=packed2, ShortcutCodebook=codebook2, ShortcutScale=scale2)
        inputs.update(ShortcutBias=bias2)
        attrs = {"bits": bits, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
        attrs.update(relu=int(rng.integers(0, 2)), shortcut_bits=bits2)
        attrs["shortcut_strides"] = [s2, s2]
        cases.append((inputs, attrs))
    return cases


@pytest.mark.parametrize("last", [False, True])
def test_shortcut_matches_reference(so2, last):
    """LutConv / LutConvQuant with a 1x1 shortcut: Y, Q and Q2 against the reference, in both
    layouts (NHWC: the int8 kernel's fused path where it applies)."""
    rng = np.random.default_rng(52)
    layout = _channels_last if last else (lambda case: case)
    cases = [layout(c) for c in shortcut_cases(seed=51, count=80)]
    check_cases(so2, "LutConv", cases)
    check_cases(so2, "LutConv", cases[:30], constants=("ShortcutCodes", "ShortcutCodebook"))
    quant = with_quantizer(rng, cases[:50])
    check_y_and_levels(so2, quant)
    quant = [({**i, "Residual": None}, a) for i, a in quant]
    check_two_levels(so2, with_quantizer(rng, quant, "2"))
    check_levels(so2, quant, constants=("Codes", "Codebook", "ShortcutCodes", "ShortcutCodebook"))


def test_shortcut_int8_kernel_equals_the_two_nodes(so2):
    """The fused shortcut changes no bit: the int8 kernel's Y and levels equal those of the
    shortcut run as its own LutConv and added as the Residual (batches in chunks included)."""
    rng = np.random.default_rng(53)
    cases = []
    for c, m, hw, s2, n in [(64, 128, 14, 2, 2), (16, 32, 28, 2, 9), (32, 64, 7, 1, 3)]:
        packed = pack_rows(rng.integers(0, 8, size=(m, c * 9)), 3)
        packed2 = pack_rows(rng.integers(0, 16, size=(m, c // 2)), 4)
        inputs = {"X": _levels(rng, (n, c, hw, hw)), "Codes": packed}
        inputs.update(Codebook=np.arange(-4, 4).astype(np.float32), Scale=_affine(rng, m)[0])
        inputs.update(Bias=rng.normal(size=m).astype(np.float32))
        inputs["ShortcutX"] = _levels(rng, (n, c // 2, hw * s2, hw * s2))
        inputs.update(ShortcutCodes=packed2, ShortcutCodebook=np.arange(-8, 8).astype(np.float32))
        inputs.update(
            ShortcutScale=_affine(rng, m)[0], ShortcutBias=rng.normal(size=m).astype(np.float32)
        )
        attrs = {"bits": 3, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "relu": 1}
        attrs.update(shortcut_bits=4, shortcut_strides=[s2, s2])
        cases.append(_channels_last((inputs, attrs)))
    for inputs, attrs in with_quantizer(rng, cases):
        fused = run_ort(so2, "LutConv", inputs, attrs, ("Codes",), ("Y", "Q"))
        short = {k[len("Shortcut") :]: v for k, v in inputs.items() if k.startswith("Shortcut")}
        s_attrs = {"bits": 4, "kernel_shape": [1, 1], "strides": attrs["shortcut_strides"]}
        s = run_ort(so2, "LutConv", short, {**s_attrs, "channels_last": 1})
        main = {k: v for k, v in inputs.items() if not k.startswith("Shortcut")}
        plain = {k: v for k, v in attrs.items() if not k.startswith("shortcut")}
        two = run_ort(so2, "LutConv", {**main, "Residual": s}, plain, ("Codes",), ("Y", "Q"))
        for a, b in zip(fused, two, strict=True):
            np.testing.assert_array_equal(a, b)


def test_lut_conv_quant_exact_ties(so2):
    """Integer codebook, unit scale, integer residual and thresholds: every output is an exact
    integer, many equal a threshold (0 after relu above all), and levels count t <= value."""
    rng = np.random.default_rng(25)
    for k, relu in [(1, 1), (3, 0), (3, 1)]:
        packed = pack_rows(rng.integers(0, 4, size=(20, 6 * k * k)), 2)
        codebook = np.array([-2, -1, 1, 2], np.float32)  # integers: the exact int8 path
        x = rng.integers(0, 2, size=(2, 6, 9, 40), dtype=np.uint8)
        inputs = {"X": x, "Codes": packed, "Codebook": codebook, "Scale": np.ones(1, np.float32)}
        attrs = {"bits": 2, "kernel_shape": [k, k], "pads": [k // 2] * 4, "relu": relu}
        shape = run_single("LutConv", {**inputs, "Bias": None}, attrs).shape
        inputs["Bias"] = np.zeros(20, np.float32)
        inputs["Residual"] = rng.integers(-5, 6, size=shape).astype(np.float32)
        inputs["QScale"] = np.array(1.0, np.float32)
        inputs["QThresholds"] = np.array([-3, 0, 0, 1, 2, 5], np.float32)
        ref = run_single("LutConvQuant", inputs, attrs)
        y = run_single("LutConv", without_levels(inputs), attrs)
        assert np.isin(y, inputs["QThresholds"]).mean() > 0.1  # ties do occur
        for constants in ((), ("Codes", "Codebook")):
            got = run_ort(so2, "LutConvQuant", inputs, attrs, constants)
            np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(
    "relu, qscale, t, width",
    [
        (0, 1.0, 3, 30),
        (1, 0.5, 7, 30),
        (0, -1.0, 3, 9),
        (1, -2.0, 15, 30),
        (0, 0.0, 2, 30),
        (1, 1.0, 40, 9),
    ],
)
def test_lut_conv_quant_levels_from_integer_sums(so2, relu, qscale, t, width):
    """Without a residual the int8 path counts the levels on the exact sums, against integer
    thresholds derived from Scale, Bias, relu, QScale and QThresholds (IntLevels). With exact
    products (power-of-two scales of both signs and zero, integer biases) every level equals the
    reference's, ties at thresholds included: values that rise, fall or stay constant with the
    sum, 40 input channels (channel-lane tiles), 2 to 15 thresholds (40 take the float
    epilogue, which must agree too)."""
    rng = np.random.default_rng(34 + t)
    m, c = 40, 40
    inputs = {
        "X": rng.integers(0, 4, size=(2, c, 7, width), dtype=np.uint8),
        "Codes": pack_rows(rng.integers(0, 8, size=(m, c * 9)), 3),
        "Codebook": np.arange(-4, 4).astype(np.float32),  # integers: the exact int8 path
        "Scale": rng.choice([-2, -1, -0.5, 0, 0.5, 1, 2], size=m).astype(np.float32),
        "Bias": rng.integers(-6, 7, size=m).astype(np.float32),
    }
    attrs = {"bits": 3, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "relu": relu}
    v = np.float32(qscale) * run_single("LutConv", inputs, attrs)
    ties = rng.choice(v.ravel(), size=t - t // 2)  # values that occur, often ones likelier
    between = rng.choice(v.ravel(), size=t // 2) + np.float32(0.25)
    thr = np.sort(np.concatenate([ties, between])).astype(np.float32)
    assert np.isin(v, thr).sum() >= 10  # ties do occur
    inputs.update(Residual=None, QScale=np.array(qscale, np.float32), QThresholds=thr)
    ref = run_single("LutConvQuant", inputs, attrs)
    for constants in ((), ("Codes", "Codebook", "Scale", "Bias", "QScale", "QThresholds")):
        got = run_ort(so2, "LutConvQuant", inputs, attrs, constants)
        np.testing.assert_array_equal(got, ref)


def test_lut_conv_quant_levels_from_sums_match_the_float_epilogue(so2):
    """The levels counted on the int8 sums (LutConvQuant without a residual) equal, bit for bit,
    those the float epilogue counts on the kernel's own float outputs (LutConv's output Q), with
    any scales and thresholds placed exactly on output values: the integer thresholds follow the
    epilogue's float32 arithmetic (one fused multiply-add), not just the real-number map."""
    rng = np.random.default_rng(35)
    m, c = 48, 40
    inputs = {
        "X": rng.integers(0, 16, size=(2, c, 8, 30), dtype=np.uint8),
        "Codes": pack_rows(rng.integers(0, 8, size=(m, c * 9)), 3),
        "Codebook": np.arange(-4, 4).astype(np.float32),
        "Scale": rng.uniform(-1, 1, size=m).astype(np.float32),
        "Bias": rng.normal(size=m).astype(np.float32),
    }
    for relu in (0, 1):
        attrs = {"bits": 3, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "relu": relu}
        y = run_ort(so2, "LutConv", inputs, attrs)
        qscale = np.float32(0.75)
        thr = np.sort(rng.choice((qscale * y).ravel(), size=7)).astype(np.float32)
        quant = {**inputs, "Residual": None, "QScale": np.array(qscale), "QThresholds": thr}
        _, q_float = run_ort(so2, "LutConv", quant, attrs, outputs=("Y", "Q"))
        q_sums = run_ort(so2, "LutConvQuant", quant, attrs)
        assert np.isin(qscale * y, thr).sum() >= 7
        np.testing.assert_array_equal(q_sums, q_float)


def test_lut_conv_with_levels_output_matches_reference(so2):
    """LutConv writing Y and its levels Q (a residual block's output): every path."""
    cases = fused_cases(seed=27, count=200, quant=True)
    check_y_and_levels(so2, cases)
    check_y_and_levels(so2, cases[:80], constants=("Codes", "Codebook", "Scale"))


def test_lut_conv_levels_output_and_its_inputs_go_together(so2):
    inputs, attrs = _conv_ok()
    levels = {"QScale": np.array(1.0, np.float32), "QThresholds": np.array([0.5], np.float32)}
    with pytest.raises(ORT_ERRORS, match="output Q needs inputs QScale and QThresholds"):
        run_ort(so2, "LutConv", inputs, attrs, outputs=("Y", "Q"))
    with pytest.raises(ORT_ERRORS, match="QScale and QThresholds need output Q"):
        run_ort(so2, "LutConv", {**inputs, **levels}, attrs)
    for outputs, extra in [(("Y", "Q"), {}), (None, levels)]:  # the reference agrees
        with pytest.raises(ValueError):
            run_single("LutConv", {**inputs, **extra}, attrs, outputs=outputs)


def test_lut_conv_quant_on_wide_strided_rows(so2):
    cases = with_epilogue(np.random.default_rng(23), wide_strided_cases(seed=24, count=40), True)
    check_levels(so2, cases, constants=("Codes", "Codebook"))


def check_with_residual_and_levels(so, rng, inputs, attrs):
    """The layer with a random Residual: Y against the reference, then its levels for
    thresholds between the output values."""
    z = run_single("LutConv", inputs, attrs)
    inputs = {**inputs, "Residual": rng.normal(size=z.shape).astype(np.float32)}
    check_cases(so, "LutConv", [(inputs, attrs)], constants=("Codes", "Codebook"))
    thr = _thresholds_between(rng, run_single("LutConv", inputs, attrs))
    quant = {**inputs, "QScale": np.array(1.0, np.float32), "QThresholds": thr}
    check_levels(so, [(quant, attrs)], constants=("Codes", "Codebook"))


def test_lut_conv_batch_in_chunks_matches_reference(so2):
    """Large batches run in chunks of images (planes of about 512 KB, at least 2^28
    multiply-adds): this layer's chunks hold 4 images, so 9 images make 3 chunks."""
    rng = np.random.default_rng(26)
    for integer in (True, False):
        packed = pack_rows(rng.integers(0, 8, size=(128, 64 * 9)), 3)
        levels = np.arange(-4, 4) if integer else rng.normal(size=8)  # outputs of both signs
        codebook = levels.astype(np.float32)
        scale, bias = _affine(rng, 128)
        inputs = {"X": _levels(rng, (9, 64, 40, 40)), "Codes": packed, "Codebook": codebook}
        inputs.update(Scale=scale, Bias=bias)
        attrs = {"bits": 3, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "relu": int(integer)}
        check_with_residual_and_levels(so2, rng, inputs, attrs)


def pixel_lane_cases(seed, count):
    """Layers the int8 kernel runs in pixel-lane tiles (few channels: at most 72 channel quads x
    taps; rows of the padded grid at least 16 wide, at most 1/8 of it unused): 1x1 and 3x3,
    strides 1 and 2, channel counts not a multiple of 4 and output channels not of 8, batches
    of 1-3."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        k, stride = [(3, 1), (3, 2), (1, 1), (1, 2)][i % 4]
        c = int(rng.choice([3, 8, 13, 16, 29, 32]))
        m = int(rng.choice([5, 8, 13, 16, 24, 33]))
        n, h, w = int(rng.integers(1, 4)), int(rng.integers(3, 10)), int(rng.integers(16, 49))
        bits = int(rng.choice([2, 3, 4]))
        packed, codebook = _codes(rng, bits, m, c * k * k, integer=True)
        scale, bias = _affine(rng, m)
        attrs = {
            "bits": bits,
            "kernel_shape": [k, k],
            "strides": [stride] * 2,
            "pads": [k // 2] * 4,
        }
        inputs = {"X": _levels(rng, (n, c, h, w)), "Codes": packed, "Codebook": codebook}
        cases.append(({**inputs, "Scale": scale, "Bias": bias}, attrs))
    return cases


def test_lut_conv_pixel_lane_tiles_match_reference(so2):
    """Y, the levels alone and both, with residuals and relu, on pixel-lane layers."""
    cases = with_epilogue(np.random.default_rng(30), pixel_lane_cases(seed=28, count=48), True)
    plain = [(without_levels(inputs), attrs) for inputs, attrs in cases]
    check_cases(so2, "LutConv", plain, constants=("Codes", "Codebook"))
    check_levels(so2, cases, constants=("Codes", "Codebook"))
    check_y_and_levels(so2, cases[:24])


def test_lut_conv_pixel_lane_tiles_in_batch_chunks(so2):
    """A layer of the pixel-lane tiles (32 channels, 3x3) over 40 images: 3 batch chunks of 18
    (at least 2^28 multiply-adds each), with residual, relu and levels."""
    rng = np.random.default_rng(29)
    c, m = 32, 29
    inputs = {
        "X": rng.integers(0, 4, (40, c, 40, 40), dtype=np.uint8),
        "Codes": pack_rows(rng.integers(0, 8, size=(m, c * 9)), 3),
        "Codebook": np.arange(-4, 4).astype(np.float32),
        "Scale": rng.uniform(0.1, 1, m).astype(np.float32),
        "Bias": rng.normal(size=m).astype(np.float32),
    }
    attrs = {"bits": 3, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "relu": 1}
    check_with_residual_and_levels(so2, rng, inputs, attrs)


@pytest.mark.parametrize(
    "name, int_codebooks, nchw",
    [(n, False, False) for n in MODEL_CASES]
    + [(n, True, False) for n in MODEL_CASES]
    + [("resnet18", True, True)],
)
def test_exported_models_run_like_the_reference(so2, name, int_codebooks, nchw):
    """Whole exported adq graphs through the op library (every fusion the writer makes: residual
    and relu epilogues, levels outputs Q and Q2, integer codebooks with channels-last
    convolutions and fused shortcuts, or NCHW) give the NumPy reference evaluator's logits, on
    inputs away from activation thresholds."""
    model = onnx_model(name, "adq", int_codebooks=int_codebooks, nchw=nchw)
    x = case_input(name, batch=3, seed=7)
    ref = run_onnx(model, x)
    sess = ort.InferenceSession(model.SerializeToString(), so2, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))


def test_lut_conv_constant_codes_run_twice(so2):
    """The cached repacking gives the same result on later runs and other inputs."""
    (inputs, attrs), (other, _) = conv_cases(seed=6, count=2)
    other = dict(inputs, X=np.ascontiguousarray(np.resize(other["X"], inputs["X"].shape)))
    model = single_op_model("LutConv", inputs, attrs, constants=("Codes", "Codebook"))
    sess = ort.InferenceSession(model.SerializeToString(), so2, providers=["CPUExecutionProvider"])
    feeds = {k: v for k, v in inputs.items() if v is not None and k not in ("Codes", "Codebook")}
    for x in (inputs["X"], other["X"], inputs["X"]):
        got = sess.run(None, dict(feeds, X=x))[0]
        ref = run_single("LutConv", dict(inputs, X=x), attrs)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1, np.abs(ref).max()))


def test_concurrent_first_runs_share_one_packing(so2):
    """Several threads run a fresh session at once (the first runs repack the constant codes):
    every result equals the reference."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(7)
    packed, codebook = _codes(rng, 3, 40, 24 * 9)
    inputs = {
        "X": _levels(rng, (2, 24, 9, 10)),
        "Codes": packed,
        "Codebook": codebook,
        "Scale": np.full(40, 0.5, np.float32),
        "Bias": None,
    }
    attrs = {"bits": 3, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    ref = run_single("LutConv", inputs, attrs)
    for integer in (False, True):
        if integer:
            inputs["Codebook"] = np.arange(-4, len(codebook) - 4, dtype=np.float32)
            ref = run_single("LutConv", inputs, attrs)
        consts = ("Codes", "Codebook", "Scale")
        model = single_op_model("LutConv", inputs, attrs, constants=consts)
        sess = ort.InferenceSession(
            model.SerializeToString(), so2, providers=["CPUExecutionProvider"]
        )
        with ThreadPoolExecutor(4) as pool:
            feeds = [{"X": inputs["X"]}] * 8
            outs = [o[0] for o in pool.map(lambda f, s=sess: s.run(None, f), feeds)]
        for out in outs:
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * max(1, np.abs(ref).max()))


def test_invalid_constant_code_is_an_error(so2):
    inputs, attrs = _conv_ok(bits=3)
    inputs["Codes"] = pack_rows(np.full((6, 36), 5), 3)
    inputs["Codebook"] = np.arange(4, dtype=np.float32)  # code 5 >= K = 4
    with pytest.raises(ORT_ERRORS, match="invalid code"):
        run_ort(so2, "LutConv", inputs, attrs, constants=("Codes", "Codebook"))


def test_lut_gemm_matches_reference(so2):
    check_cases(so2, "LutGemm", gemm_cases(seed=2, count=600))


def test_lut_dequant_matches_reference(so2):
    check_cases(so2, "LutDequant", dequant_cases(seed=3, count=400), exact=True)


def test_threshold_quant_matches_reference(so2):
    check_cases(so2, "ThresholdQuant", threshold_cases(seed=4, count=400), exact=True)


@pytest.mark.parametrize(
    "op, attrs, x_shape",
    [
        ("LutConv", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, (2, 8, 6, 7)),
        (
            "LutConv",
            {"kernel_shape": [3, 3], "pads": [1, 0, 2, 1], "strides": [2, 1]},
            (1, 8, 6, 7),
        ),
        ("LutConv", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": 8}, (1, 8, 6, 7)),
        (
            "LutConv",
            {"kernel_shape": [3, 2], "pads": [2, 1, 0, 1], "strides": [2, 2], "group": 8},
            (1, 8, 6, 7),
        ),
        ("LutGemm", {}, (1, 40)),
        ("LutGemm", {}, (9, 40)),
    ],
)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_codebook_propagates_like_reference(op, attrs, x_shape, so2):
    """inf / NaN levels: padding (level 0) times inf is NaN in every path, as in the reference."""
    rng = np.random.default_rng(7)
    bits, k = 3, 8
    m = x_shape[1] if op == "LutConv" else 6
    row_len = x_shape[1] // attrs.get("group", 1) * int(np.prod(attrs.get("kernel_shape", [1])))
    if op == "LutGemm":
        row_len = x_shape[1]
    codes = rng.integers(3, k, size=(m, row_len))  # finite levels, but in half of the rows
    codes[: m // 2, 0] = np.arange(m // 2) % 3  # one +inf, -inf or NaN at the first (padded) tap
    codebook = np.array([np.inf, -np.inf, np.nan, 1.0, -2.0, 0.5, 3.0, 0.0], np.float32)
    inputs = {
        "X": _levels(rng, x_shape),
        "Codes": pack_rows(codes, bits),
        "Codebook": codebook,
        "Scale": np.ones(m, np.float32),
    }
    attrs = {"bits": bits, **attrs}
    ref = run_single(op, inputs, attrs)
    got = run_ort(so2, op, inputs, attrs)
    assert np.isnan(ref).any() and np.isfinite(ref).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(
        got[fin], ref[fin], rtol=0, atol=1e-5 * max(1, np.abs(ref[fin]).max())
    )


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_other_isa_paths_match_reference(isa, library, monkeypatch):
    """ADQ_ISA caps the instruction set (read when a kernel is created): the portable and AVX2
    code paths, besides the best one of this CPU that the tests above use."""
    monkeypatch.setenv("ADQ_ISA", isa)
    so = adq_session_options(num_threads=1)
    check_cases(so, "LutConv", conv_cases(seed=11, count=150, big_every=50))
    check_cases(so, "LutConv", fused_cases(seed=15, count=60, quant=False))
    check_levels(so, fused_cases(seed=16, count=60, quant=True))
    check_y_and_levels(so, fused_cases(seed=17, count=40, quant=True))
    rng = np.random.default_rng(18)
    check_two_levels(so, with_quantizer(rng, fused_cases(seed=19, count=30, quant=True), "2"))
    last = [_channels_last(c) for c in fused_cases(seed=20, count=40, quant=True)]
    check_levels(so, last)
    check_cases(so, "LutConv", [(without_levels(i), a) for i, a in last])
    shortcut = shortcut_cases(seed=21, count=30)
    check_cases(so, "LutConv", shortcut[:15] + [_channels_last(c) for c in shortcut[15:]])
    check_cases(so, "LutGemm", gemm_cases(seed=12, count=100))
    check_cases(so, "LutDequant", dequant_cases(seed=13, count=60), exact=True)
    check_cases(so, "ThresholdQuant", threshold_cases(seed=14, count=60), exact=True)


def test_bad_isa_setting_is_an_error(library, monkeypatch):
    monkeypatch.setenv("ADQ_ISA", "sse9")
    inputs, attrs = _gemm_ok()
    with pytest.raises(ORT_ERRORS, match="ADQ_ISA must be"):
        run_ort(adq_session_options(num_threads=1), "LutGemm", inputs, attrs)


# ----------------------------------------------------------------------------- errors


def _conv_ok(bits=2, c=4, m=6, group=1, k=3):
    rng = np.random.default_rng(0)
    packed, codebook = _codes(rng, bits, m, (c // group) * k * k)
    inputs = {
        "X": _levels(rng, (1, c, 6, 6)),
        "Codes": packed,
        "Codebook": codebook,
        "Scale": np.ones(m, np.float32),
        "Bias": np.zeros(m, np.float32),
    }
    return inputs, {"bits": bits, "kernel_shape": [k, k], "group": group}


def _gemm_ok(bits=3, n=2, kin=10, m=5):
    rng = np.random.default_rng(0)
    packed, codebook = _codes(rng, bits, m, kin)
    return (
        {
            "X": _levels(rng, (n, kin)),
            "Codes": packed,
            "Codebook": codebook,
            "Scale": np.ones(1, np.float32),
        },
        {"bits": bits},
    )


def _with(case, **changes):
    inputs, attrs = case
    inputs, attrs = dict(inputs), dict(attrs)
    for key, value in changes.items():
        (inputs if key[0].isupper() else attrs)[key] = value
    return inputs, attrs


def _code_too_big(case, bits, row_len):
    inputs, attrs = case
    rng = np.random.default_rng(5)
    k = 1 << bits
    codes = rng.integers(0, k - 1, size=(inputs["Codes"].shape[0], row_len))
    codes[-1, row_len - 1] = k - 1  # only the last code of the last row (in its last byte)
    return _with(case, Codes=pack_rows(codes, bits), Codebook=np.zeros(k - 1, np.float32))


def _code_in_middle(case, bits, row_len):
    """Codes all < K-1 but one, in the middle of a long row (the vectorized decode path)."""
    k = 1 << bits
    codes = np.random.default_rng(6).integers(0, k - 1, size=(case[0]["Codes"].shape[0], row_len))
    codes[3, 57] = k - 1
    return _with(case, Codes=pack_rows(codes, bits), Codebook=np.zeros(k - 1, np.float32))


def _error_cases():
    conv, gemm = _conv_ok(), _gemm_ok()
    dq_inputs = {"Codes": conv[0]["Codes"], "Codebook": conv[0]["Codebook"]}
    dq_ok = (dq_inputs, {"bits": 2, "shape": [6, 4, 3, 3]})
    tq_ok = (
        {
            "X": np.zeros((2, 3), np.float32),
            "Scale": np.array(1.0, np.float32),
            "Thresholds": np.array([0.5, 1.5], np.float32),
        },
        {},
    )

    def cv(**kw):
        return ("LutConv", *_with(conv, **kw))

    y_shape = run_single("LutConv", *conv).shape
    codes2, book2 = _codes(np.random.default_rng(5), 2, y_shape[1], 3)
    shortcut = {"ShortcutX": _levels(np.random.default_rng(6), (1, 3, 4, 4))}
    shortcut.update(ShortcutCodes=codes2, ShortcutCodebook=book2)
    shortcut.update(ShortcutScale=np.ones(1, np.float32), shortcut_bits=2)
    quant_ok = (
        {
            **conv[0],
            "Residual": np.zeros(y_shape, np.float32),
            "QScale": np.array(1.0, np.float32),
            "QThresholds": np.array([0.0, 1.0], np.float32),
        },
        {**conv[1], "relu": 1},
    )

    def cq(**kw):
        return ("LutConvQuant", *_with(quant_ok, **kw))

    def gm(**kw):
        return ("LutGemm", *_with(gemm, **kw))

    def dq(**kw):
        return ("LutDequant", *_with(dq_ok, **kw))

    def tq(**kw):
        return ("ThresholdQuant", *_with(tq_ok, **kw))

    x = conv[0]["X"]
    codes = conv[0]["Codes"]
    return {
        "conv X float": (cv(X=x.astype(np.float32)), "Type Error"),
        "conv X rank 3": (cv(X=x[0]), "'X' must have rank 4"),
        "conv Codes int8": (cv(Codes=codes.view(np.int8)), "Type Error"),
        "conv Codes rank 1": (cv(Codes=codes.reshape(-1)), "'Codes' must have rank 2"),
        "conv Codes one byte too many": (
            cv(Codes=np.pad(codes, ((0, 0), (0, 1)))),
            "Codes must have shape",
        ),
        "conv code >= K": (("LutConv", *_code_too_big(conv, 2, 36)), "invalid code 3 >= K=3"),
        "conv Codebook longer than 2^bits": (
            cv(Codebook=np.zeros(5, np.float32)),
            "Codebook length",
        ),
        "conv Codebook empty": (cv(Codebook=np.zeros(0, np.float32)), "Codebook length"),
        "conv Codebook float64": (
            cv(Codebook=conv[0]["Codebook"].astype(np.float64)),
            "Type Error",
        ),
        "conv Scale length 3": (cv(Scale=np.ones(3, np.float32)), "Scale must have shape"),
        "conv Scale rank 2": (cv(Scale=np.ones((6, 1), np.float32)), "'Scale' must have rank 1"),
        "conv Bias length 5": (cv(Bias=np.zeros(5, np.float32)), "Bias must have shape"),
        "conv group 3 does not divide C=4": (
            ("LutConv", *_with(_conv_ok(c=4, m=6), group=3)),
            "not divisible by group",
        ),
        "conv group 2 does not divide M=3": (
            ("LutConv", *_with(_conv_ok(c=4, m=3), group=2)),
            "not divisible by group",
        ),
        "conv bits 0": (cv(bits=0), "'bits' must be in 1..8"),
        "conv bits 9": (cv(bits=9), "'bits' must be in 1..8"),
        "conv stride 0": (cv(strides=[0, 1]), "strides must be positive"),
        "conv dilation 0": (cv(dilations=[1, 0]), "dilations must be positive"),
        "conv negative pad": (cv(pads=[0, -1, 0, 0]), "pads must be non-negative"),
        "conv stride 2^24": (cv(strides=[1, 1 << 24]), "strides must be positive and below 2"),
        "conv pad 2^24": (cv(pads=[0, 0, 1 << 24, 0]), "pads must be non-negative and below 2"),
        "conv 3 pads": (cv(pads=[0, 0, 0]), "pads must have 4 values"),
        "conv empty output": (cv(kernel_shape=[7, 3]), "empty output"),
        "conv kernel_shape missing": (
            ("LutConv", conv[0], {"bits": 2}),
            "missing required attribute 'kernel_shape'",
        ),
        "conv Residual wrong shape": (
            cv(Residual=np.zeros((1, *y_shape[1:-1], y_shape[-1] + 1), np.float32)),
            "Residual must have the output's shape",
        ),
        "conv Residual uint8": (cv(Residual=np.zeros(y_shape, np.uint8)), "Type Error"),
        "conv relu 2": (cv(relu=2), "'relu' must be 0 or 1"),
        "conv channels_last 2": (cv(channels_last=2), "'channels_last' must be 0 or 1"),
        "shortcut without its scale": (
            cv(**{k: v for k, v in shortcut.items() if k != "ShortcutScale"}),
            "ShortcutX, ShortcutCodes, ShortcutCodebook and ShortcutScale go together",
        ),
        "shortcut beside a Residual": (
            cv(**shortcut, Residual=np.zeros(y_shape, np.float32)),
            "a Residual or a shortcut, not both",
        ),
        "shortcut without bits": (
            cv(**{**shortcut, "shortcut_bits": 0}),
            "the shortcut needs shortcut_bits",
        ),
        "shortcut output of another shape": (
            cv(**shortcut, shortcut_strides=[2, 2]),
            "the shortcut's output must have Y's shape",
        ),
        "shortcut strides 0": (cv(**shortcut, shortcut_strides=[0, 1]), "shortcut_strides must be"),
        "conv channels_last Residual in NCHW": (
            (
                "LutConv",
                {**_channels_last(conv)[0], "Residual": np.zeros(y_shape, np.float32)},
                _channels_last(conv)[1],
            ),
            "Residual must have the output's shape",
        ),
        "quant QThresholds decreasing": (
            cq(QThresholds=np.array([1.0, 0.0], np.float32)),
            "QThresholds must be non-decreasing",
        ),
        "quant QThresholds empty": (cq(QThresholds=np.zeros(0, np.float32)), "1..255 entries"),
        "quant QThresholds NaN": (
            cq(QThresholds=np.array([0.0, np.nan], np.float32)),
            "non-decreasing and not NaN",
        ),
        "quant QScale [2]": (cq(QScale=np.ones(2, np.float32)), "QScale must be a scalar"),
        "quant Residual wrong shape": (
            cq(Residual=np.zeros((2, *y_shape[1:]), np.float32)),
            "Residual must have the output's shape",
        ),
        "gemm X rank 3": (gm(X=gemm[0]["X"][None]), "'X' must have rank 2"),
        "gemm X float": (gm(X=gemm[0]["X"].astype(np.float32)), "Type Error"),
        "gemm Codes for another Kin": (gm(X=np.zeros((2, 11), np.uint8)), "Codes must have shape"),
        "gemm code >= K": (("LutGemm", *_code_too_big(gemm, 3, 10)), "invalid code 7 >= K=7"),
        "gemm code >= K mid long row": (
            ("LutGemm", *_code_in_middle(_gemm_ok(bits=3, kin=200, m=5), 3, 200)),
            "invalid code 7 >= K=7 .* row 3, index 57",
        ),
        "gemm Scale length 2": (gm(Scale=np.ones(2, np.float32)), "Scale must have shape"),
        "gemm bits 9": (gm(bits=9), "'bits' must be in 1..8"),
        "dequant shape mismatch": (dq(shape=[6, 4, 3, 4]), "Codes must have shape"),
        "dequant M mismatch": (dq(shape=[5, 4, 3, 3]), "Codes must have shape"),
        "dequant bits 0": (dq(bits=0), "'bits' must be in 1..8"),
        "dequant code >= K": (
            (
                "LutDequant",
                *_with(
                    _code_too_big((dq_inputs, {"bits": 2, "shape": [6, 36]}), 2, 36), shape=[6, 36]
                ),
            ),
            "invalid code 3 >= K=3",
        ),
        "threshold 256 thresholds": (
            tq(Thresholds=np.arange(256, dtype=np.float32)),
            "1..255 entries",
        ),
        "threshold no thresholds": (tq(Thresholds=np.zeros(0, np.float32)), "1..255 entries"),
        "threshold decreasing": (tq(Thresholds=np.array([1.0, 0.0], np.float32)), "non-decreasing"),
        "threshold Scale [2]": (tq(Scale=np.ones(2, np.float32)), "Scale must be a scalar"),
        "threshold X uint8": (tq(X=np.zeros((2, 3), np.uint8)), "Type Error"),
    }


ERROR_CASES = _error_cases()


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_malformed_inputs_raise(name, so2):
    (op, inputs, attrs), reason = ERROR_CASES[name]
    with pytest.raises(ValueError):  # the reference agrees the case is malformed
        run_single(op, inputs, attrs)
    with pytest.raises(ORT_ERRORS, match=reason):
        run_ort(so2, op, inputs, attrs)


def test_process_still_healthy_after_errors(so2):
    """Errors leave the library usable (runs after the error tests in file order)."""
    inputs, attrs = _conv_ok()
    assert compare(so2, "LutConv", inputs, attrs)[0] is None
