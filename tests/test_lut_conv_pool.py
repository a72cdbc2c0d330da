"""LutConvPoolQuant (runtime/cpp/conv_pool.cc, runtime/reference/op_lut_conv_pool_quant.py): the
reference against onnxruntime's standard ops composed (Cast, Sub of the zero point, Conv on the
decoded weights, Mul, Add, Relu, MaxPool, Transpose), the C++ kernel against the reference on
seeded random cases on every instruction-set path (the int8 VNNI tiles, the float tiles,
scalar), exact integer sums on the int8 path, Q exactly ThresholdQuant of the Y the kernel
writes, kept weights, and malformed inputs as errors."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from runtime.library import ORT_ERRORS, build_library
from runtime.library import session_options as adq_session_options
from runtime.packing import pack_rows, unpack_rows
from runtime.reference.graphs import run_single, single_op_model
from runtime.reference.op_threshold_quant import quantize

OP = "LutConvPoolQuant"
CONSTANTS = ("Codes", "Codebook", "Scale", "Bias", "QScale", "QThresholds")


@pytest.fixture(scope="module")
def library():
    """Build (if needed) the op library; a build failure is a test failure."""
    return build_library()


def session_options(threads: int = 2) -> ort.SessionOptions:
    return adq_session_options(num_threads=threads)


def run_ort(so, inputs, attrs, constants=CONSTANTS):
    """(Y, Q) of one node in onnxruntime (weights as initializers, as exported)."""
    model = single_op_model(OP, inputs, attrs, constants=constants)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {k: v for k, v in inputs.items() if v is not None and k not in constants}
    return sess.run(None, feeds)


def codes_and_codebook(rng, bits, m, row_len, integer, lo=-128, hi=127):
    """Packed random codes and a codebook of K <= 2^bits levels that they all index; integer:
    levels integers in lo..hi (the int8 path), with the extremes of the range."""
    full = 1 << bits
    k = int(rng.choice([full, rng.integers(1, full + 1)]))
    codes = rng.integers(0, k, size=(m, row_len))
    if integer:
        codebook = rng.integers(lo, hi + 1, size=k).astype(np.float32)
        codebook[: min(k, 2)] = [lo, hi][: min(k, 2)]
    else:
        codebook = rng.normal(size=k).astype(np.float32)
    return pack_rows(codes, bits), codebook


def random_case(rng, n=None, m=None, stem=False, integer=None, zp=None, t=None):
    """Random shapes, strides, pads, zero point, ReLU, pooling (none in about a quarter),
    Scale [M] or [1], Bias or not, integer or float codebooks, and 1-255 thresholds spread over
    the output's range (so that the levels vary)."""
    if stem:  # ResNet's first layer on a small image
        c, m, kh, kw, s, p, h, w = 3, 64, 7, 7, (2, 2), [3] * 4, 40, 36
        pool = ([3, 3], [2, 2], [1, 1, 1, 1])
    else:
        c = int(rng.integers(1, 6))
        m = int(m or rng.choice([1, 8, 16, 48, 64, 80]))
        kh = int(rng.integers(1, 8))
        kw = kh if rng.random() < 0.7 else int(rng.integers(1, 8))
        s = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        p = [int(v) for v in rng.integers(0, 4, size=4)]
        h, w = int(rng.integers(kh, 30)), int(rng.integers(kw, 30))
        pool = None
        if rng.random() < 0.75:
            pk = [int(rng.integers(1, 4)), int(rng.integers(1, 4))]
            pp = [int(rng.integers(0, v)) for v in pk * 2]
            pool = (pk, [int(rng.integers(1, 3)), int(rng.integers(1, 3))], pp)
    n = int(n or rng.integers(1, 4))
    integer = bool(rng.random() < 0.7) if integer is None else integer
    bits = int(rng.integers(2, 9))
    if zp is None:
        zp = int(rng.choice([0, int(rng.integers(1, 255)), 255]))
    codes, codebook = codes_and_codebook(rng, bits, m, c * kh * kw, integer)
    scale = rng.uniform(0.001, 0.02, size=m if rng.random() < 0.7 else 1)
    if rng.random() < 0.3:  # some negative (batch-norm folding gives them)
        scale *= rng.choice([1.0, -1.0], size=scale.shape, p=[0.7, 0.3])
    inputs = {
        "X": rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8),
        "Codes": codes,
        "Codebook": codebook,
        "Scale": scale.astype(np.float32),
        "Bias": rng.normal(size=m).astype(np.float32) if rng.random() < 0.8 else None,
    }
    attrs = {"bits": bits, "kernel_shape": [kh, kw], "strides": list(s), "pads": p}
    attrs["x_zero_point"] = zp
    attrs["relu"] = int(rng.random() < 0.7)
    if pool is not None:
        attrs.update(pool_kernel_shape=pool[0], pool_strides=pool[1], pool_pads=pool[2])
    unit = {"QScale": np.ones(1, np.float32), "QThresholds": np.zeros(1, np.float32)}
    try:
        y = run_single(OP, {**inputs, **unit}, attrs)[0]
    except ValueError:  # an empty output: draw again
        return random_case(rng, n, m, stem, integer, zp, t)
    qscale = np.float32(rng.uniform(0.5, 2.0))
    lo, hi = float(qscale * y.min()), float(qscale * y.max())
    t = int(t or rng.choice([1, 3, 7, 15, 16, 255]))
    inputs["QScale"] = np.array([qscale], np.float32)
    if t == 255 and rng.random() < 0.5:  # evenly spaced, as an 8-bit quantizer's
        inputs["QThresholds"] = np.linspace(lo, hi, t).astype(np.float32)
    else:
        inputs["QThresholds"] = np.sort(rng.uniform(lo, hi + 1e-3, size=t)).astype(np.float32)
    return inputs, attrs


def check_against_reference(so, cases, constants=CONSTANTS):
    """Y within 1e-5 of the reference (relative to its largest value), Q exactly ThresholdQuant
    of the kernel's own Y, and the levels not all equal across the cases."""
    failures, varied = [], 0
    for inputs, attrs in cases:
        y_ref, q_ref = run_single(OP, inputs, attrs)
        y, q = run_ort(so, inputs, attrs, constants)
        if y.shape != y_ref.shape or q.shape != q_ref.shape or q.dtype != np.uint8:
            failures.append(f"shapes {y.shape} {q.shape} != {y_ref.shape}: {attrs}")
            continue
        err = float(np.abs(y.astype(np.float64) - y_ref).max())
        tol = 1e-5 * max(1.0, float(np.abs(y_ref).max()))
        own = quantize(y, inputs["QScale"][0], inputs["QThresholds"])
        if err > tol or not np.array_equal(q, own):
            m = inputs["Codes"].shape[0]
            failures.append(
                f"Y error {err:.3g} (tol {tol:.3g}), {int((q != own).sum())} levels: M={m} "
                f"X {inputs['X'].shape} {attrs}"
            )
        varied += len(np.unique(q_ref)) > 1
    assert not failures, f"{len(failures)}/{len(cases)} cases fail:\n" + "\n".join(failures[:5])
    assert varied >= 0.8 * len(cases), f"levels vary in only {varied}/{len(cases)} cases"


def decoded_weights(inputs, attrs):
    """Codebook[unpack(Codes)] as float32 [M, C, kH, kW]."""
    m = inputs["Codes"].shape[0]
    c = inputs["X"].shape[1]
    kh, kw = attrs["kernel_shape"]
    idx = unpack_rows(inputs["Codes"], attrs["bits"], c * kh * kw)
    return inputs["Codebook"][idx].reshape(m, c, kh, kw).astype(np.float32)


def standard_ops_model(inputs, attrs):
    """The op as standard ops: Cast, Sub(zero point), Conv on the decoded weights, Mul(Scale),
    Add(Bias), Relu, MaxPool, Transpose."""
    m = inputs["Codes"].shape[0]
    inits = {
        "zp": np.array(attrs["x_zero_point"], np.float32),
        "W": decoded_weights(inputs, attrs),
        "S": np.broadcast_to(inputs["Scale"], (m,)).reshape(1, m, 1, 1).astype(np.float32),
    }
    nodes = [
        oh.make_node("Cast", ["X"], ["xf"], to=TensorProto.FLOAT),
        oh.make_node("Sub", ["xf", "zp"], ["xc"]),
        oh.make_node(
            "Conv",
            ["xc", "W"],
            ["acc"],
            kernel_shape=attrs["kernel_shape"],
            strides=attrs["strides"],
            pads=attrs["pads"],
        ),
        oh.make_node("Mul", ["acc", "S"], ["z"]),
    ]
    z = "z"
    if inputs["Bias"] is not None:
        inits["B"] = inputs["Bias"].reshape(1, m, 1, 1)
        nodes.append(oh.make_node("Add", ["z", "B"], ["zb"]))
        z = "zb"
    if attrs["relu"]:
        nodes.append(oh.make_node("Relu", [z], ["r"]))
        z = "r"
    if "pool_kernel_shape" in attrs:
        pool = dict(kernel_shape=attrs["pool_kernel_shape"], strides=attrs["pool_strides"])
        nodes.append(oh.make_node("MaxPool", [z], ["p"], pads=attrs["pool_pads"], **pool))
        z = "p"
    nodes.append(oh.make_node("Transpose", [z], ["Y"], perm=[0, 2, 3, 1]))
    x = oh.make_tensor_value_info("X", TensorProto.UINT8, list(inputs["X"].shape))
    y = oh.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    tensors = [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in inits.items()]
    graph = oh.make_graph(nodes, "standard", [x], [y], tensors)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=8)


def test_reference_is_the_standard_ops_composed():
    rng = np.random.default_rng(1)
    cases = [random_case(rng) for _ in range(60)] + [random_case(rng, stem=True)]
    for inputs, attrs in cases:
        y_ref, q_ref = run_single(OP, inputs, attrs)
        model = standard_ops_model(inputs, attrs).SerializeToString()
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        (y_onnx,) = sess.run(None, {"X": inputs["X"]})
        np.testing.assert_allclose(y_ref, y_onnx, rtol=0, atol=1e-5 * max(1, np.abs(y_onnx).max()))
        np.testing.assert_array_equal(
            q_ref, quantize(y_ref, inputs["QScale"][0], inputs["QThresholds"])
        )


def test_reference_pads_with_the_zero_point():
    """A constant input at level zp convolves to exactly Bias everywhere, padding included."""
    rng = np.random.default_rng(2)
    inputs, attrs = random_case(rng, m=16, zp=77)
    inputs["X"] = np.full_like(inputs["X"], 77)
    attrs["relu"] = 0
    y, _ = run_single(OP, inputs, attrs)
    bias = inputs["Bias"] if inputs["Bias"] is not None else np.zeros(16, np.float32)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, y.shape))


def test_kernel_matches_reference(library):
    rng = np.random.default_rng(3)
    cases = [random_case(rng) for _ in range(500)]
    cases += [random_case(rng, n=1, stem=True), random_case(rng, n=3, stem=True)]
    cases += [random_case(rng, stem=True, integer=False), random_case(rng, stem=True, t=255)]
    check_against_reference(session_options(2), cases)


def test_int8_path_on_every_channel_count(library):
    """Integer codebooks with M a multiple of 16 (the int8 tiles: blocks of 64 channels, the
    last one narrower) and not (the float tiles), every zero point kind, kernels 1..7."""
    rng = np.random.default_rng(4)
    cases = []
    for i in range(240):
        m = [16, 32, 48, 64, 80, 128, 8, 24][i % 8]
        zp = [0, 255, None][i % 3]
        cases.append(random_case(rng, m=m, integer=True, zp=zp))
    check_against_reference(session_options(2), cases)


@pytest.mark.parametrize("zp", [0, 128, 255])
def test_int8_sums_are_exact(zp, library):
    """Scale 1, no Bias, no ReLU, no pooling: Y is the exact integer sum of level - zp times the
    integer weights (float32 of it), padding included, on the int8 tiles and on the float ones
    (whose float sums of these integers are exact too)."""
    rng = np.random.default_rng(5 + zp)
    for i in range(40):
        inputs, attrs = random_case(rng, m=[16, 64, 80, 8][i % 4], integer=True, zp=zp)
        for k in ("pool_kernel_shape", "pool_strides", "pool_pads"):
            attrs.pop(k, None)
        attrs["relu"] = 0
        m = inputs["Codes"].shape[0]
        inputs.update(Scale=np.ones(m, np.float32), Bias=None)
        w = decoded_weights(inputs, attrs).astype(np.int64)
        top, left, bottom, right = attrs["pads"]
        x = inputs["X"].astype(np.int64) - zp
        xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        (sh, sw), (kh, kw) = attrs["strides"], attrs["kernel_shape"]
        oh_, ow_ = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
        want = np.zeros((x.shape[0], oh_, ow_, m), np.int64)
        for i_ in range(kh):
            for j in range(kw):
                patch = xp[:, :, i_ : i_ + sh * (oh_ - 1) + 1 : sh, j : j + sw * (ow_ - 1) + 1 : sw]
                want += np.einsum("nchw,mc->nhwm", patch, w[:, :, i_, j])
        y, q = run_ort(session_options(2), inputs, attrs)
        np.testing.assert_array_equal(y, want.astype(np.float32))
        np.testing.assert_array_equal(q, quantize(y, inputs["QScale"][0], inputs["QThresholds"]))


def test_kernel_single_thread_and_bands(library):
    """One image split into bands (the pooled rows of one image over several tasks) and one
    thread: the same results."""
    rng = np.random.default_rng(6)
    cases = [random_case(rng, n=1) for _ in range(60)] + [random_case(rng, n=1, stem=True)]
    check_against_reference(session_options(1), cases)
    check_against_reference(session_options(2), cases)


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_other_isa_paths_match_reference(isa, library, monkeypatch):
    monkeypatch.setenv("ADQ_ISA", isa)
    rng = np.random.default_rng(7)
    cases = [random_case(rng) for _ in range(150)] + [random_case(rng, stem=True)]
    check_against_reference(session_options(2), cases)


def test_weights_kept_only_for_constant_codes(library):
    """Constant Codes and Codebook are packed on the first run and kept: later runs with other
    inputs still match the reference. Codes fed as an input are packed on every run: a session
    fed several give each one's result (on the int8 and the float paths)."""
    rng = np.random.default_rng(8)
    for integer, m in ((True, 64), (False, 64), (True, 8)):
        inputs, attrs = random_case(rng, n=2, m=m, integer=integer)
        kept = single_op_model(OP, inputs, attrs, constants=CONSTANTS).SerializeToString()
        kept = ort.InferenceSession(kept, session_options(2), providers=["CPUExecutionProvider"])
        fed = single_op_model(OP, inputs, attrs, constants=CONSTANTS[1:]).SerializeToString()
        fresh = ort.InferenceSession(fed, session_options(2), providers=["CPUExecutionProvider"])
        row_len = inputs["X"].shape[1] * int(np.prod(attrs["kernel_shape"]))
        for _ in range(3):
            x = rng.integers(0, 256, size=inputs["X"].shape, dtype=np.uint8)
            codes, _ = codes_and_codebook(rng, attrs["bits"], m, row_len, integer)
            k = len(inputs["Codebook"])
            idx = unpack_rows(codes, attrs["bits"], row_len) % k  # valid for this codebook
            codes = pack_rows(idx, attrs["bits"])
            runs = [
                (kept.run(None, {"X": x}), {**inputs, "X": x}),
                (fresh.run(None, {"X": x, "Codes": codes}), {**inputs, "X": x, "Codes": codes}),
            ]
            for (y, q), case in runs:
                y_ref, _ = run_single(OP, case, attrs)
                tol = 1e-5 * max(1.0, float(np.abs(y_ref).max()))
                assert float(np.abs(y.astype(np.float64) - y_ref).max()) <= tol
                qs, thr = case["QScale"][0], case["QThresholds"]
                np.testing.assert_array_equal(q, quantize(y, qs, thr))


def _ok(m=16, integer=True):
    rng = np.random.default_rng(0)
    codes, codebook = codes_and_codebook(rng, 4, m, 3 * 9, integer)
    inputs = {
        "X": np.zeros((1, 3, 8, 8), np.uint8),
        "Codes": codes,
        "Codebook": codebook,
        "Scale": np.ones(m, np.float32),
        "Bias": np.zeros(m, np.float32),
        "QScale": np.ones(1, np.float32),
        "QThresholds": np.array([0.5, 1.5], np.float32),
    }
    attrs = {"bits": 4, "kernel_shape": [3, 3], "pool_kernel_shape": [2, 2], "pool_strides": [2, 2]}
    return inputs, attrs


def _with(base=None, **changes):
    inputs, attrs = base or _ok()
    inputs, attrs = dict(inputs), dict(attrs)
    for key, value in changes.items():
        (inputs if key[0].isupper() else attrs)[key] = value
    return inputs, attrs


def _bad_code(m, integer):
    """A code 15 where the codebook has 12 levels (the last row's last code)."""
    inputs, attrs = _ok(m, integer)
    idx = unpack_rows(inputs["Codes"], 4, 27) % 12
    idx[-1, -1] = 15
    return _with((inputs, attrs), Codes=pack_rows(idx, 4), Codebook=inputs["Codebook"][:12].copy())


ERROR_CASES = {
    "X rank 3": (_with(X=np.zeros((3, 8, 8), np.uint8)), "'X' must have rank 4"),
    "X float": (_with(X=np.zeros((1, 3, 8, 8), np.float32)), "Type Error"),
    "Codes of another kernel": (
        _with(kernel_shape=[5, 5]),
        "Codes must have shape",
    ),
    "Codes of other channels": (_with(X=np.zeros((1, 2, 8, 8), np.uint8)), "Codes must have"),
    "code >= K, int8 path": (_bad_code(16, True), "code 15"),
    "code >= K, float path": (_bad_code(16, False), "code 15"),
    "code >= K, M 8": (_bad_code(8, True), "code 15"),
    "Codes without rows": (_with(Codes=np.zeros((0, 14), np.uint8)), "at least one row"),
    "Codebook too long": (_with(Codebook=np.zeros(17, np.float32)), "Codebook length"),
    "Scale length 15": (_with(Scale=np.ones(15, np.float32)), "Scale must have shape"),
    "Bias length 15": (_with(Bias=np.zeros(15, np.float32)), "Bias must have shape"),
    "bits 9": (_with(bits=9), "'bits' must be in 1..8"),
    "bits 0": (_with(bits=0), "'bits' must be in 1..8"),
    "bits missing": ((_ok()[0], {"kernel_shape": [3, 3]}), "missing required attribute 'bits'"),
    "x_zero_point 256": (_with(x_zero_point=256), "'x_zero_point' must be in 0..255"),
    "x_zero_point -1": (_with(x_zero_point=-1), "'x_zero_point' must be in 0..255"),
    "QThresholds decreasing": (
        _with(QThresholds=np.array([1.0, 0.0], np.float32)),
        "QThresholds must be non-decreasing",
    ),
    "QThresholds 256": (_with(QThresholds=np.zeros(256, np.float32)), "1..255 entries"),
    "QScale [2]": (_with(QScale=np.ones(2, np.float32)), "QScale must be a scalar"),
    "kernel larger than the padded input": (
        _with(kernel_shape=[9, 9], Codes=np.zeros((16, (3 * 81 * 4 + 7) // 8), np.uint8)),
        "smaller than the kernel",
    ),
    "pooling window larger than the output": (
        _with(pool_kernel_shape=[7, 7]),
        "smaller than the pooling window",
    ),
    "pool pads not below the window": (
        _with(pool_pads=[2, 0, 0, 0]),
        "'pool_pads' must be below 'pool_kernel_shape'",
    ),
    "pool window 65": (
        _with(pool_kernel_shape=[65, 1], pool_strides=[1, 1]),
        "'pool_kernel_shape' must be at most 64",
    ),
    "strides 0": (_with(strides=[0, 1]), "strides must be positive"),
    "negative pad": (_with(pads=[0, -1, 0, 0]), "pads must be non-negative"),
    "kernel 2^24": (_with(kernel_shape=[1 << 24, 1]), "kernel_shape must be positive and"),
    "relu 2": (_with(relu=2), "'relu' must be 0 or 1"),
    "X too large for int32 offsets (no images)": (
        _with(X=np.zeros((0, 3, 30000, 30000), np.uint8)),
        "X is too large",
    ),
    "kernel_shape missing": (
        (_ok()[0], {"bits": 4, "pool_kernel_shape": [2, 2]}),
        "missing required attribute 'kernel_shape'",
    ),
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
@pytest.mark.parametrize("constant", [False, True])
def test_malformed_inputs_raise(name, constant, library):
    (inputs, attrs), reason = ERROR_CASES[name]
    with pytest.raises(ValueError):  # the reference agrees the case is malformed
        run_single(OP, inputs, attrs)
    constants = ("Codes", "Codebook") if constant else ()
    if constant and name.startswith(("X ", "Codes of other")):
        constants = ()  # (shapes of X: the session would still load)
    with pytest.raises(ORT_ERRORS, match=reason):
        run_ort(session_options(1), inputs, attrs, constants=constants)


def test_process_still_healthy_after_errors(library):
    rng = np.random.default_rng(9)
    check_against_reference(session_options(2), [random_case(rng, stem=True)])


def test_schema_checker_and_shape_inference():
    """The registered schema: onnx.checker accepts a node without Bias (listed as ""), and
    shape inference gives Y (float) and Q (uint8) of the reference's shape [N, PH, PW, M]."""
    import onnx

    from runtime.schema import register_onnx_schemas

    register_onnx_schemas()
    inputs, attrs = random_case(np.random.default_rng(10), n=2, m=48)
    inputs["Bias"] = None
    model = single_op_model(OP, inputs, attrs)
    onnx.checker.check_model(model, full_check=True)
    assert list(model.graph.node[0].input)[4] == ""
    y, q = run_single(OP, inputs, attrs)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output
    dims = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in inferred]
    assert dims == [list(y.shape), list(q.shape)]
    elems = [o.type.tensor_type.elem_type for o in inferred]
    assert elems == [TensorProto.FLOAT, TensorProto.UINT8]
