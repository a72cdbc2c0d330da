"""NumPy reference ops (runtime/reference) against brute force written from docs/onnx-ops.md."""

from __future__ import annotations

import inspect
import math

import numpy as np
import onnx
import pytest

from runtime.packing import pack_rows
from runtime.reference import ALL_OPS, run_reference
from runtime.reference.graphs import run_single, single_op_model
from runtime.schema import DOMAIN, OPS, OPS_BY_NAME, attribute_defaults, register_onnx_schemas

BITS = (2, 3, 4, 8)
KERNELS = ((1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (2, 3), (3, 2))
RTOL = 1e-5
THR = np.array([0.5, 1.5], np.float32)


# ----------------------------------------------------------------------------- brute force


def _brute_conv(x, w, scale, bias, strides, pads, dilations, group):
    """Direct convolution, one output position at a time, float64, no padding copy."""
    n, c, h, wd = x.shape
    m, g, kh, kw = w.shape
    top, left, bottom, right = pads
    oh = (h + top + bottom - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wd + left + right - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    acc = np.zeros((n, m, oh, ow))
    mg = m // group
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    for grp in range(group):
        ms = slice(grp * mg, (grp + 1) * mg)
        cs = slice(grp * g, (grp + 1) * g)
        for p in range(oh):
            for q in range(ow):
                for i in range(kh):
                    r = p * strides[0] + i * dilations[0] - top
                    if not 0 <= r < h:
                        continue
                    for j in range(kw):
                        s = q * strides[1] + j * dilations[1] - left
                        if not 0 <= s < wd:
                            continue
                        # [N, G] x [Mg, G] -> [N, Mg]
                        acc[:, ms, p, q] += x64[:, cs, r, s] @ w64[ms, :, i, j].T
    sc = np.asarray(scale, dtype=np.float64).reshape(1, -1, 1, 1)
    b = 0.0 if bias is None else np.asarray(bias, dtype=np.float64).reshape(1, -1, 1, 1)
    return sc * acc + b, np.abs(sc * acc) + np.abs(b)


def _brute_threshold(x, scale, thresholds):
    out = np.zeros(x.shape, np.uint8)
    s = np.float32(scale.reshape(()))
    for idx in np.ndindex(x.shape):
        v = s * np.float32(x[idx])  # one float32 multiply
        out[idx] = sum(1 for t in thresholds.tolist() if v >= t)  # NaN >= t is False
    return out


def _assert_close(y, ref, mag):
    """max |y - ref| / (|Scale*acc| + |Bias|) <= RTOL, elementwise."""
    assert y.dtype == np.float32 and y.shape == ref.shape
    err = np.abs(y.astype(np.float64) - ref)
    rel = np.max(err / np.maximum(mag, 1e-30), initial=0.0)
    assert rel <= RTOL, rel


def _codebook(rng, bits):
    k = int(rng.integers(1, (1 << bits) + 1))
    return rng.standard_normal(k).astype(np.float32), k


def _scale_bias(rng, m):
    scale = rng.uniform(0.1, 2.0, size=m if rng.random() < 0.6 else 1).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32) if rng.random() < 0.5 else None
    return scale, bias


# ----------------------------------------------------------------------------- random cases


def _conv_case(rng):
    bits = int(rng.choice(BITS))
    kh, kw = KERNELS[int(rng.integers(len(KERNELS)))]
    strides = tuple(int(v) for v in rng.integers(1, 3, size=2))
    dilations = tuple(int(v) for v in rng.integers(1, 3, size=2))
    pads = tuple(int(v) for v in rng.integers(0, 3, size=4))
    kind = rng.choice(["dense", "group2", "depthwise"])
    if kind == "dense":
        group, c = 1, int(rng.integers(1, 6))
        m = int(rng.integers(1, 6))
    elif kind == "group2":
        group, c = 2, 2 * int(rng.integers(1, 4))
        m = 2 * int(rng.integers(1, 4))
    else:
        c = int(rng.integers(1, 6))
        group, m = c, c * int(rng.integers(1, 3))
    n = int(rng.integers(1, 4))
    # spatial sizes with a non-empty output
    h = max(2, dilations[0] * (kh - 1) + 1 - pads[0] - pads[2]) + int(rng.integers(0, 6))
    w = max(2, dilations[1] * (kw - 1) + 1 - pads[1] - pads[3]) + int(rng.integers(0, 6))
    levels = 1 << int(rng.integers(2, 9))
    x = rng.integers(0, levels, size=(n, c, h, w)).astype(np.uint8)
    codebook, k = _codebook(rng, bits)
    codes = rng.integers(0, k, size=(m, c // group, kh, kw))
    scale, bias = _scale_bias(rng, m)
    attrs = {"bits": bits, "kernel_shape": [kh, kw]}
    # leave defaults out sometimes so the declared defaults are exercised
    for name, value, default in (
        ("strides", strides, (1, 1)),
        ("pads", pads, (0, 0, 0, 0)),
        ("dilations", dilations, (1, 1)),
        ("group", group, 1),
    ):
        if value != default or rng.random() < 0.5:
            attrs[name] = list(value) if isinstance(value, tuple) else value
    inputs = {
        "X": x,
        "Codes": pack_rows(codes, bits),
        "Codebook": codebook,
        "Scale": scale,
        "Bias": bias,
    }
    return inputs, attrs, codebook[codes], (strides, pads, dilations, group)


def test_lut_conv_random():
    rng = np.random.default_rng(2024)
    seen = set()
    for _ in range(160):
        inputs, attrs, w, (strides, pads, dilations, group) = _conv_case(rng)
        y = run_single("LutConv", inputs, attrs)
        ref, mag = _brute_conv(
            inputs["X"], w, inputs["Scale"], inputs["Bias"], strides, pads, dilations, group
        )
        _assert_close(y, ref, mag)
        assert np.any(y != 0)
        c = inputs["X"].shape[1]
        seen.add(("group", "dense" if group == 1 else "dw" if group == c else "grouped"))
        seen.update({("k", w.shape[2:]), ("bits", attrs["bits"]), ("s", strides)})
        seen.update({("d", dilations), ("pad", any(pads)), ("bias", inputs["Bias"] is None)})
        seen.update({("scale", inputs["Scale"].shape[0] == 1), ("n", inputs["X"].shape[0])})
    # the random cases cover the whole grid the spec describes
    assert {("group", g) for g in ("dense", "dw", "grouped")} <= seen
    assert {("k", k) for k in KERNELS} <= seen and {("bits", b) for b in BITS} <= seen
    assert {("s", (2, 2)), ("s", (1, 2)), ("d", (2, 2)), ("d", (2, 1))} <= seen
    assert {("pad", True), ("pad", False), ("bias", True), ("bias", False)} <= seen
    assert {("scale", True), ("scale", False), ("n", 1), ("n", 3)} <= seen


def test_lut_gemm_random():
    rng = np.random.default_rng(7)
    for _ in range(60):
        bits = int(rng.choice(BITS))
        n, kin, m = (int(v) for v in rng.integers(1, 20, size=3))
        x = rng.integers(0, 256, size=(n, kin)).astype(np.uint8)
        codebook, k = _codebook(rng, bits)
        codes = rng.integers(0, k, size=(m, kin))
        scale, bias = _scale_bias(rng, m)
        inputs = dict(X=x, Codes=pack_rows(codes, bits), Codebook=codebook, Scale=scale, Bias=bias)
        y = run_single("LutGemm", inputs, {"bits": bits})
        # brute force: one output at a time, float64
        ref = np.zeros((n, m))
        mag = np.zeros((n, m))
        for i in range(n):
            for j in range(m):
                acc = math.fsum(float(x[i, t]) * float(codebook[codes[j, t]]) for t in range(kin))
                s = float(scale[j if scale.shape[0] == m else 0])
                b = 0.0 if bias is None else float(bias[j])
                ref[i, j] = s * acc + b
                mag[i, j] = abs(s * acc) + abs(b)
        _assert_close(y, ref, mag)
        assert np.any(y != 0)


def test_lut_dequant_random():
    rng = np.random.default_rng(11)
    for _ in range(40):
        bits = int(rng.choice(BITS + (1, 5, 7)))
        shape = [int(rng.integers(1, 6))] + [
            int(v) for v in rng.integers(1, 5, size=rng.integers(0, 4))
        ]
        codebook, k = _codebook(rng, bits)
        codes = rng.integers(0, k, size=shape)
        w = run_single(
            "LutDequant",
            {"Codes": pack_rows(codes, bits), "Codebook": codebook},
            {"bits": bits, "shape": shape},
        )
        assert w.dtype == np.float32 and list(w.shape) == shape
        ref = np.empty(shape, np.float32)
        for idx in np.ndindex(*shape):
            ref[idx] = codebook[codes[idx]]
        np.testing.assert_array_equal(w, ref)


def test_threshold_quant_random():
    rng = np.random.default_rng(5)
    for case in range(40):
        t = int(rng.integers(1, 256)) if case % 4 == 0 else int(rng.integers(1, 16))
        shape = tuple(int(v) for v in rng.integers(1, 6, size=rng.integers(0, 4)))
        scale = np.array(rng.uniform(0.5, 2.0), np.float32).reshape(() if case % 2 else (1,))
        x = (rng.standard_normal(shape) * 1.5).astype(np.float32)
        flat = x.reshape(-1)
        if flat.size > 1:
            flat[1] = np.nan
        if flat.size > 4:
            flat[4] = rng.choice([np.inf, -np.inf])
        # thresholds: random, with duplicates, and some exactly equal to a product Scale * X
        products = np.float32(scale.reshape(())) * flat[np.isfinite(flat)]
        k = min(t // 2, products.size)
        thr = np.concatenate([rng.standard_normal(t - k), rng.choice(products, k)])
        thr = np.sort(thr.astype(np.float32))
        if t > 2:
            thr[1] = thr[2]
        q = run_single("ThresholdQuant", {"X": x, "Scale": scale, "Thresholds": thr})
        assert q.dtype == np.uint8 and q.shape == x.shape
        np.testing.assert_array_equal(q, _brute_threshold(x, scale, thr))


def test_threshold_quant_exact_edges():
    thr = np.array([-1.0, 0.0, 0.0, 0.5, 2.0], np.float32)
    x = np.array([-2, -1, -0.5, -0.0, 0.0, 0.25, 0.5, 1.0, 3.0, np.nan, np.inf, -np.inf])
    q = run_single(
        "ThresholdQuant",
        {"X": x.astype(np.float32), "Scale": np.array([1.0], np.float32), "Thresholds": thr},
    )
    np.testing.assert_array_equal(q, [0, 1, 1, 3, 3, 3, 4, 4, 5, 0, 5, 0])
    assert q.any()


def test_threshold_quant_rounds_product_to_float32():
    """A value whose float32 product hits a threshold that its exact product is below."""
    rng = np.random.default_rng(3)
    for _ in range(10_000):
        s, x = rng.uniform(0.1, 3.0, size=2).astype(np.float32)
        t = np.float32(s * x)
        if float(s) * float(x) < float(t):
            break
    else:
        pytest.fail("no witness found")
    thr = np.array([t], np.float32)
    q = run_single("ThresholdQuant", {"X": np.array([x]), "Scale": np.array(s), "Thresholds": thr})
    assert q.tolist() == [1]


# ----------------------------------------------------------------------------- fused epilogue


def _epilogue_case(rng, case):
    """A _conv_case with a Residual (or None) and relu 0/1, and its brute-force float64 Z
    (``Scale*acc + Bias [+ Residual]``, relu applied) with its magnitude for the tolerance."""
    inputs, attrs, w, (strides, pads, dilations, group) = _conv_case(rng)
    z, mag = _brute_conv(
        inputs["X"], w, inputs["Scale"], inputs["Bias"], strides, pads, dilations, group
    )
    residual = None
    if case % 3:
        spread = float(np.abs(z).max()) or 1.0
        residual = (rng.standard_normal(z.shape) * spread).astype(np.float32)
        z, mag = z + residual, mag + np.abs(residual)
    relu = case % 2
    if relu or rng.random() < 0.5:
        attrs["relu"] = relu  # else the default, 0
    if relu:
        z = np.maximum(z, 0)
    return {**inputs, "Residual": residual}, attrs, z, mag


def test_lut_conv_residual_relu_random():
    """Y = relu(Z + Residual): against brute force, and bit for bit the float32 Z of the plain
    op plus one float32 add, then max(., 0)."""
    rng = np.random.default_rng(31)
    clipped = 0
    for case in range(60):
        inputs, attrs, z, mag = _epilogue_case(rng, case)
        y = run_single("LutConv", inputs, attrs)
        _assert_close(y, z, mag)
        plain = run_single("LutConv", {**inputs, "Residual": None}, {**attrs, "relu": 0})
        if inputs["Residual"] is not None:
            plain = plain + inputs["Residual"]
        if attrs.get("relu"):
            clipped += int((plain < 0).sum())
            plain = np.maximum(plain, np.float32(0))
        np.testing.assert_array_equal(y, plain)
    assert clipped > 0


def test_lut_conv_relu_and_residual_specials():
    """NaN stays NaN through relu, -inf becomes 0, +inf stays; the residual is added as is."""
    inputs, attrs = _valid()["LutConv"]
    z = run_single("LutConv", inputs, attrs)  # -18 inside, -8 .. -12 on the border
    r = np.full(z.shape, 20.0, np.float32)
    r.flat[:4] = [np.nan, -np.inf, np.inf, -100.0]
    y = run_single("LutConv", {**inputs, "Residual": r}, {**attrs, "relu": 1})
    assert np.isnan(y.flat[0]) and y.flat[1] == 0 and y.flat[2] == np.inf and y.flat[3] == 0
    np.testing.assert_array_equal(y.flat[4:], (z + r).flat[4:])
    assert (y.flat[4:] > 0).all()


def test_lut_conv_quant_random():
    """Q = ThresholdQuant(LutConv(...)): levels of the brute-force float64 output (equal except
    within rounding of a threshold, rarely), and exactly the two reference ops in sequence."""
    rng = np.random.default_rng(41)
    near_diffs = total = 0
    seen = set()
    for case in range(60):
        inputs, attrs, z, mag = _epilogue_case(rng, case)
        qscale = np.float32(rng.uniform(0.5, 2.0) * (-1 if case % 7 == 0 else 1))
        t = int(rng.choice([1, 3, 7, 15, 255]))
        v = np.float64(qscale) * z
        thr = np.sort(np.quantile(v, rng.random(t)).astype(np.float32))
        quant = {"QScale": np.array(qscale).reshape(() if case % 2 else (1,)), "QThresholds": thr}
        q = run_single("LutConvQuant", {**inputs, **quant}, attrs)
        assert q.dtype == np.uint8 and q.shape == z.shape
        expect = (v[..., None] >= thr.astype(np.float64)).sum(-1)
        tol = 2e-5 * np.abs(np.float64(qscale)) * mag
        near = (np.abs(v[..., None] - thr) <= tol[..., None]).any(-1)
        assert not ((q != expect) & ~near).any()
        near_diffs += int((q != expect).sum())
        total += q.size
        y = run_single("LutConv", inputs, attrs)
        tq = run_single("ThresholdQuant", {"X": y, "Scale": quant["QScale"], "Thresholds": thr})
        np.testing.assert_array_equal(q, tq)
        seen.add(len(np.unique(q)) > 2)
        seen.update({("residual", inputs["Residual"] is None), ("relu", attrs.get("relu", 0))})
    assert near_diffs <= 1e-3 * total
    assert seen >= {True, ("residual", True), ("residual", False), ("relu", 0), ("relu", 1)}


def _quant_params(rng, z, case):
    """QScale and QThresholds (T of 1..255, from quantiles of QScale * z) for an output z."""
    qscale = np.float32(rng.uniform(0.5, 2.0) * (-1 if case % 7 == 0 else 1))
    thr = np.quantile(np.float64(qscale) * z, rng.random(int(rng.choice([1, 3, 7, 255]))))
    shape = () if case % 2 else (1,)
    return {"QScale": np.array(qscale).reshape(shape), "QThresholds": np.sort(thr.astype("f4"))}


def test_lut_conv_levels_output_random():
    """LutConv with output Q: Y as without it, and Q bit for bit ThresholdQuant of Y and
    LutConvQuant's output."""
    rng = np.random.default_rng(43)
    many_levels = 0
    for case in range(30):
        inputs, attrs, z, _ = _epilogue_case(rng, case)
        quant = _quant_params(rng, z, case)
        y, q = run_single("LutConv", {**inputs, **quant}, attrs, outputs=("Y", "Q"))
        assert q.dtype == np.uint8 and q.shape == y.shape == z.shape
        np.testing.assert_array_equal(y, run_single("LutConv", inputs, attrs))
        tq = {"X": y, "Scale": quant["QScale"], "Thresholds": quant["QThresholds"]}
        np.testing.assert_array_equal(q, run_single("ThresholdQuant", tq))
        np.testing.assert_array_equal(q, run_single("LutConvQuant", {**inputs, **quant}, attrs))
        many_levels += len(np.unique(q)) > 2
    assert many_levels >= 10


# ----------------------------------------------------------------------------- wiring


def test_classes_match_schema_declarations():
    assert [cls.__name__ for cls in ALL_OPS] == [op.name for op in OPS]
    for cls in ALL_OPS:
        decl = OPS_BY_NAME[cls.__name__]
        assert cls.op_domain == DOMAIN
        snake = "".join("_" + ch.lower() if ch.isupper() else ch for ch in decl.name).lstrip("_")
        assert cls.__module__ == f"runtime.reference.op_{snake}"
        params = list(inspect.signature(cls._run).parameters.values())[1:]  # drop self
        n_in = len(decl.inputs)
        for k, (p, io) in enumerate(zip(params[:n_in], decl.inputs, strict=True)):
            assert p.name == io.name
            # an optional input followed by a required one is always listed ("" -> None)
            trailing = all(later.optional for later in decl.inputs[k:])
            assert p.default is (None if trailing else inspect.Parameter.empty)
        attrs = {p.name: p.default for p in params[n_in:]}
        assert attrs == attribute_defaults(decl.name)
        assert list(attrs) == [a.name for a in decl.attrs]


def test_single_op_models_pass_onnx_checker(tmp_path):
    register_onnx_schemas()
    rng = np.random.default_rng(0)
    inputs, attrs, *_ = _conv_case(rng)
    model = single_op_model("LutConv", inputs, attrs)
    onnx.checker.check_model(model, full_check=True)
    assert {(o.domain, o.version) for o in model.opset_import} >= {(DOMAIN, 1), ("", 21)}
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    path = tmp_path / "conv.onnx"
    onnx.save(model, path)
    feeds = {k: v for k, v in inputs.items() if v is not None}
    (y,) = run_reference(path, feeds)
    np.testing.assert_array_equal(y, run_reference(model, feeds)[0])

    q_model = single_op_model(
        "ThresholdQuant",
        {"X": np.zeros((2, 3), np.float32), "Scale": np.ones(1, np.float32), "Thresholds": THR},
        {},
    )
    onnx.checker.check_model(q_model, full_check=True)
    assert q_model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_lut_conv_levels_output_passes_onnx_checker():
    """LutConv lists Q only when asked (by default its required output Y): both nodes pass
    the checker, "" for absent Bias / Residual; shape inference gives Q uint8 of Y's shape."""
    register_onnx_schemas()
    inputs, attrs = _valid()["LutConvQuant"]
    inputs = {**inputs, "Bias": None, "Residual": None}
    plain = {k: v for k, v in inputs.items() if not k.startswith("Q")}
    one = single_op_model("LutConv", plain, attrs)
    onnx.checker.check_model(one, full_check=True)
    assert list(one.graph.node[0].output) == ["Y"] and len(one.graph.output) == 1
    two = single_op_model("LutConv", inputs, attrs, outputs=("Y", "Q"))
    onnx.checker.check_model(two, full_check=True)
    node = two.graph.node[0]
    assert list(node.input) == ["X", "Codes", "Codebook", "Scale", "", "", "QScale", "QThresholds"]
    assert list(node.output) == ["Y", "Q"]
    inferred = onnx.shape_inference.infer_shapes(two, strict_mode=True).graph.output
    types = [(o.name, o.type.tensor_type.elem_type, _dims(o)) for o in inferred]
    elems = onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8
    assert types == [("Y", elems[0], [1, 6, 3, 3]), ("Q", elems[1], [1, 6, 3, 3])]
    y, q = run_single("LutConv", inputs, attrs, outputs=("Y", "Q"))
    assert y.dtype == np.float32 and q.dtype == np.uint8 and y.shape == q.shape == (1, 6, 3, 3)


def test_single_op_model_outputs_argument():
    """outputs: declared names only, required ones included; one array back for one output."""
    inputs, attrs = _valid()["LutConv"]
    with pytest.raises(ValueError, match="unknown outputs"):
        single_op_model("LutConv", inputs, attrs, outputs=("Y", "Z"))
    with pytest.raises(ValueError, match="required outputs"):
        single_op_model("LutConv", inputs, attrs, outputs=("Q",))
    y = run_single("LutConv", inputs, attrs, outputs=("Y",))
    np.testing.assert_array_equal(y, run_single("LutConv", inputs, attrs))


@pytest.mark.parametrize("residual", [False, True])
def test_lut_conv_quant_lists_absent_inputs_as_empty(residual):
    """A LutConvQuant node without Bias (and Residual) names them "": onnx.checker accepts it."""
    register_onnx_schemas()
    inputs, attrs = _valid()["LutConvQuant"]
    inputs = {**inputs, "Bias": None, "Residual": inputs["Residual"] if residual else None}
    model = single_op_model("LutConvQuant", inputs, attrs)
    onnx.checker.check_model(model, full_check=True)
    names = list(model.graph.node[0].input)
    assert len(names) == 8 and names[4] == "" and (names[5] == "") != residual
    q = run_single("LutConvQuant", inputs, attrs)
    assert q.dtype == np.uint8 and q.shape == (1, 6, 3, 3)
    assert q.any() == residual  # relu(-18 + 20) = 2 has level 2, relu(-18) level 0


def _dims(value):
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in dims]


def _inferred_dims(model):
    out = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output[0]
    t = out.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in t.shape.dim]
    return t.elem_type, dims


@pytest.mark.parametrize(
    "op", ["ThresholdQuant", "LutDequant", "LutConv", "LutConvQuant", "LutGemm"]
)
def test_shape_inference_gives_the_output_shape(op):
    """The registered schemas infer the output's type and shape the reference computes."""
    register_onnx_schemas()
    inputs, attrs = _valid()[op]
    model = single_op_model(op, inputs, attrs)
    y = run_single(op, inputs, attrs)
    elem, dims = _inferred_dims(model)
    assert elem == onnx.helper.np_dtype_to_tensor_dtype(y.dtype) and dims == list(y.shape)
    if op.startswith("LutConv"):  # strided, padded, dilated: OH / OW from the attributes
        attrs = {**attrs, "strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}
        inputs = {**inputs, "Residual": None}
        elem, dims = _inferred_dims(single_op_model(op, inputs, attrs))
        assert dims == list(run_single(op, inputs, attrs).shape) == [1, 6, 3, 2]


def test_shape_inference_keeps_symbols_and_unknowns():
    """A symbolic batch is kept, an unknown H gives an unknown OH; the rest is computed."""
    register_onnx_schemas()
    inputs, attrs = _valid()["LutConv"]
    model = single_op_model("LutConv", inputs, attrs)
    x_dims = model.graph.input[0].type.tensor_type.shape.dim
    x_dims[0].dim_param = "batch"
    x_dims[2].Clear()
    n, m, oh, ow = _inferred_dims(model)[1]
    assert (n, m, ow) == ("batch", 6, 3)
    assert oh is None or oh.startswith("unk__")  # onnx names unknown output dims itself


# ----------------------------------------------------------------------------- errors


def _valid():
    f = np.float32
    conv = dict(
        X=np.ones((1, 4, 5, 5), np.uint8),
        Codes=pack_rows(np.ones((6, 2, 3, 3), np.int64), 3),
        Codebook=np.array([0.5, -1.0, 2.0], f),
        Scale=np.ones(6, f),
        Bias=np.zeros(6, f),
    )
    conv_attrs = dict(bits=3, kernel_shape=[3, 3], group=2)
    # Y = 20 - 18 = 2 inside (levels 2), the residual makes the quantized output non-zero
    quant = dict(conv, Residual=np.full((1, 6, 3, 3), 20, f), QScale=np.ones(1, f), QThresholds=THR)
    gemm = dict(
        X=np.ones((2, 5), np.uint8),
        Codes=pack_rows(np.ones((3, 5), np.int64), 4),
        Codebook=np.array([0.5, -1.0], f),
        Scale=np.ones(1, f),
        Bias=np.zeros(3, f),
    )
    deq = dict(Codes=pack_rows(np.ones((3, 2, 2), np.int64), 2), Codebook=np.array([1, 2], f))
    tq = dict(X=np.ones((2, 2), f), Scale=np.array(1, f), Thresholds=THR)
    return {
        "LutConv": (conv, conv_attrs),
        "LutGemm": (gemm, dict(bits=4)),
        "LutDequant": (deq, dict(bits=2, shape=[3, 2, 2])),
        "ThresholdQuant": (tq, {}),
        "LutConvQuant": (quant, dict(conv_attrs, relu=1)),
    }


def _f(*a):
    return np.array(a, np.float32)


ERRORS = [
    # ThresholdQuant
    ("ThresholdQuant", {"X": np.ones(3, np.float64)}, {}),
    ("ThresholdQuant", {"X": np.ones(3, np.uint8)}, {}),
    ("ThresholdQuant", {"Scale": _f(1, 2)}, {}),
    ("ThresholdQuant", {"Scale": np.ones((1, 1), np.float32)}, {}),
    ("ThresholdQuant", {"Scale": np.ones(1, np.float64)}, {}),
    ("ThresholdQuant", {"Thresholds": np.zeros(0, np.float32)}, {}),
    ("ThresholdQuant", {"Thresholds": np.zeros(256, np.float32)}, {}),
    ("ThresholdQuant", {"Thresholds": _f(1, 0.5)}, {}),
    ("ThresholdQuant", {"Thresholds": _f(0, np.nan)}, {}),
    ("ThresholdQuant", {"Thresholds": np.zeros((1, 2), np.float32)}, {}),
    ("ThresholdQuant", {"Thresholds": np.zeros(2, np.float16)}, {}),
    # LutDequant
    ("LutDequant", {}, {"bits": 0}),
    ("LutDequant", {}, {"bits": 9}),
    ("LutDequant", {}, {"bits": None}),
    ("LutDequant", {}, {"shape": None}),
    ("LutDequant", {}, {"shape": [3, 2, 0]}),
    ("LutDequant", {}, {"shape": [4, 2, 2]}),  # M mismatch
    ("LutDequant", {}, {"shape": [3, 2, 5]}),  # B mismatch
    ("LutDequant", {"Codes": np.ones((3, 1), np.int8)}, {}),
    ("LutDequant", {"Codes": np.ones((3, 1, 1), np.uint8)}, {}),
    ("LutDequant", {"Codes": np.full((3, 1), 0xFF, np.uint8)}, {}),  # code 3 >= K = 2
    ("LutDequant", {"Codebook": np.zeros(0, np.float32)}, {}),
    ("LutDequant", {"Codebook": np.zeros(5, np.float32)}, {}),  # K > 2^bits
    ("LutDequant", {"Codebook": np.zeros(2, np.float64)}, {}),
    # LutGemm
    ("LutGemm", {"X": np.ones((2, 5), np.float32)}, {}),
    ("LutGemm", {"X": np.ones((1, 2, 5), np.uint8)}, {}),
    ("LutGemm", {"X": np.ones((2, 7), np.uint8)}, {}),  # Kin 7 needs 4 bytes
    ("LutGemm", {"Codes": pack_rows(np.full((3, 5), 2), 4)}, {}),  # code 2 >= K
    ("LutGemm", {"Scale": _f(1, 1)}, {}),
    ("LutGemm", {"Scale": np.ones((), np.float32)}, {}),
    ("LutGemm", {"Bias": _f(0)}, {}),
    ("LutGemm", {"Bias": np.zeros(3, np.float64)}, {}),
    ("LutGemm", {}, {"bits": 9}),
    ("LutGemm", {}, {"bits": None}),
    # LutConv
    ("LutConv", {"X": np.ones((4, 5, 5), np.uint8)}, {}),
    ("LutConv", {"X": np.ones((1, 4, 5, 5), np.float32)}, {}),
    ("LutConv", {"X": np.ones((1, 6, 5, 5), np.uint8)}, {}),  # C/group = 3: Codes mismatch
    ("LutConv", {"X": np.ones((1, 5, 5, 5), np.uint8)}, {}),  # C % group
    ("LutConv", {"Codes": pack_rows(np.ones((5, 2, 3, 3), np.int64), 3)}, {}),  # M % group
    ("LutConv", {"Codes": pack_rows(np.full((6, 2, 3, 3), 3), 3)}, {}),  # code 3 >= K
    ("LutConv", {"Codes": np.ones((6, 8), np.uint8)}, {}),  # 18 codes * 3 bits = 7 bytes
    ("LutConv", {"Codebook": np.zeros(9, np.float32)}, {}),  # K > 2^3
    ("LutConv", {"Scale": np.ones(3, np.float32)}, {}),
    ("LutConv", {"Bias": np.zeros(1, np.float32)}, {}),
    ("LutConv", {}, {"bits": 0}),
    ("LutConv", {}, {"kernel_shape": None}),
    ("LutConv", {}, {"kernel_shape": [3]}),
    ("LutConv", {}, {"strides": [0, 1]}),
    ("LutConv", {}, {"strides": [1, -1]}),
    ("LutConv", {}, {"dilations": [0, 1]}),
    ("LutConv", {}, {"strides": [1, 1 << 24]}),  # window attributes stay below 2^24
    ("LutConv", {}, {"pads": [0, 0, 0, 1 << 24]}),
    ("LutConv", {}, {"pads": [0, -1, 0, 0]}),
    ("LutConv", {}, {"pads": [1, 1]}),
    ("LutConv", {}, {"group": 0}),
    ("LutConv", {}, {"group": 4}),  # C/group = 1: Codes mismatch
    ("LutConv", {}, {"dilations": [3, 1]}),  # effective kernel 7 > 5: empty output
    ("LutConv", {"X": np.ones((1, 4, 2, 9), np.uint8)}, {}),  # empty output
    ("LutConv", {"Residual": np.zeros((1, 6, 3, 4), np.float32)}, {}),  # not Y's shape
    ("LutConv", {"Residual": np.zeros((1, 6, 1, 1), np.float32)}, {}),  # would broadcast
    ("LutConv", {"Residual": np.zeros((6, 3, 3), np.float32)}, {}),
    ("LutConv", {"Residual": np.zeros((1, 6, 3, 3), np.float64)}, {}),
    ("LutConv", {"Residual": np.zeros((1, 6, 3, 3), np.uint8)}, {}),
    ("LutConv", {}, {"relu": 2}),
    ("LutConv", {}, {"relu": -1}),
    # LutConvQuant: its own inputs, and LutConv's errors reported under its name
    ("LutConvQuant", {"QThresholds": np.zeros(0, np.float32)}, {}),
    ("LutConvQuant", {"QThresholds": np.zeros(256, np.float32)}, {}),
    ("LutConvQuant", {"QThresholds": _f(1, 0.5)}, {}),
    ("LutConvQuant", {"QThresholds": _f(0, np.nan)}, {}),
    ("LutConvQuant", {"QThresholds": np.zeros((1, 2), np.float32)}, {}),
    ("LutConvQuant", {"QThresholds": THR.astype(np.float64)}, {}),
    ("LutConvQuant", {"QScale": _f(1, 2)}, {}),
    ("LutConvQuant", {"QScale": np.ones((1, 1), np.float32)}, {}),
    ("LutConvQuant", {"QScale": np.ones(1, np.float64)}, {}),
    ("LutConvQuant", {"Residual": np.zeros((1, 6, 3, 4), np.float32)}, {}),
    ("LutConvQuant", {"Residual": np.zeros((1, 6, 3, 3), np.float64)}, {}),
    ("LutConvQuant", {}, {"relu": 2}),
    ("LutConvQuant", {"Bias": np.zeros(1, np.float32)}, {}),
    ("LutConvQuant", {"X": np.ones((1, 4, 5, 5), np.float32)}, {}),
    ("LutConvQuant", {}, {"kernel_shape": None}),
]


LEVEL_ERRORS = [
    # (inputs changed, outputs, error)
    ({"QScale": None, "QThresholds": None}, ("Y", "Q"), "output Q needs inputs QScale and"),
    ({"QThresholds": None}, ("Y", "Q"), "output Q needs inputs QScale and"),
    ({"QScale": None}, ("Y", "Q"), "output Q needs inputs QScale and"),
    ({}, None, "QScale and QThresholds need output Q"),
    ({"QScale": None}, None, "QScale and QThresholds need output Q"),
    ({"QThresholds": _f(1, 0.5)}, ("Y", "Q"), "QThresholds must be non-decreasing"),
    ({"QThresholds": np.zeros(256, np.float32)}, ("Y", "Q"), "QThresholds length"),
    ({"QScale": _f(1, 2)}, ("Y", "Q"), "QScale must be a scalar"),
    ({"QScale": np.ones(1, np.float64)}, ("Y", "Q"), "input QScale must be float"),
]


@pytest.mark.parametrize("bad_inputs, outputs, message", LEVEL_ERRORS)
def test_lut_conv_levels_output_errors(bad_inputs, outputs, message):
    """Q without QScale and QThresholds, those without Q, or invalid ones: ValueError."""
    inputs, attrs = _valid()["LutConvQuant"]  # as LutConv's with Q: Y = 2, levels 2
    assert run_single("LutConv", inputs, attrs, outputs=("Y", "Q"))[1].any()
    with pytest.raises(ValueError, match=f"LutConv: {message}"):
        run_single("LutConv", {**inputs, **bad_inputs}, attrs, outputs=outputs)


@pytest.mark.parametrize("op, bad_inputs, bad_attrs", ERRORS)
def test_errors_raise_value_error(op, bad_inputs, bad_attrs):
    inputs, attrs = _valid()[op]
    y = run_single(op, inputs, attrs)  # the base case is valid
    assert np.any(y != 0)
    inputs = {**inputs, **bad_inputs}
    attrs = {k: v for k, v in {**attrs, **bad_attrs}.items() if v is not None}
    with pytest.raises(ValueError, match=op):
        run_single(op, inputs, attrs)
