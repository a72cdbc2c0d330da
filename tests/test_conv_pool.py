"""ConvPoolQuant (runtime/cpp/conv_pool.cc, runtime/reference/op_conv_pool_quant.py): the
reference against onnxruntime's standard Conv, Relu, MaxPool and Transpose (the graph the op
replaces), the C++ kernel against the
reference on seeded random cases (every instruction-set path), Q exactly ThresholdQuant of the
Y the kernel writes, and malformed inputs as errors."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from runtime.library import ORT_ERRORS, build_library
from runtime.library import session_options as adq_session_options
from runtime.reference.graphs import run_single, single_op_model
from runtime.reference.op_threshold_quant import quantize

OP = "ConvPoolQuant"


@pytest.fixture(scope="module")
def library():
    """Build (if needed) the op library; a build failure is a test failure."""
    return build_library()


def session_options(threads: int = 2) -> ort.SessionOptions:
    return adq_session_options(num_threads=threads)


def run_ort(so, inputs, attrs, constants=("W", "B", "QScale", "QThresholds")):
    """(Y, Q) of one ConvPoolQuant node in onnxruntime (weights as initializers, as exported)."""
    model = single_op_model(OP, inputs, attrs, constants=constants)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {k: v for k, v in inputs.items() if v is not None and k not in constants}
    return sess.run(None, feeds)


def random_case(rng, n=None, m=None, stem=False):
    """Random shapes, strides, pads, ReLU, pooling (none in about a quarter), bias (or not) and
    1-15 thresholds spread over the output's range (so that the levels vary)."""
    if stem:  # ResNet's first layer on a small image
        c, m, k, s, p, h, w = 3, 64, 7, 2, 3, 40, 36
        pool = ([3, 3], [2, 2], [1, 1, 1, 1])
    else:
        c = int(rng.integers(1, 6))
        m = int(m or rng.choice([1, 5, 8, 16, 24, 32, 48, 64, 80, 128]))
        k = int(rng.integers(1, 8))
        s = int(rng.integers(1, 4))
        p = int(rng.integers(0, 4))
        h, w = int(rng.integers(k, 30)), int(rng.integers(k, 30))
        pool = None
        if rng.random() < 0.75:
            pk = [int(rng.integers(1, 4)), int(rng.integers(1, 4))]
            pp = [int(rng.integers(0, v)) for v in pk * 2]
            pool = (pk, [int(rng.integers(1, 3)), int(rng.integers(1, 3))], pp)
    n = int(n or rng.integers(1, 4))
    inputs = {
        "X": rng.normal(size=(n, c, h, w)).astype(np.float32),
        "W": rng.normal(size=(m, c, k, k)).astype(np.float32),
        "B": rng.normal(size=m).astype(np.float32) if rng.random() < 0.8 else None,
    }
    attrs = {"kernel_shape": [k, k], "strides": [s, int(rng.integers(1, 3))], "pads": [p] * 4}
    attrs["pads"] = [p, int(rng.integers(0, 3)), int(rng.integers(0, 3)), p]
    attrs["relu"] = int(rng.random() < 0.7)
    if pool is not None:
        attrs.update(pool_kernel_shape=pool[0], pool_strides=pool[1], pool_pads=pool[2])
    unit = {"QScale": np.ones(1, np.float32), "QThresholds": np.zeros(1, np.float32)}
    try:
        y = run_single(OP, {**inputs, **unit}, attrs)[0]
    except ValueError:  # an empty output: draw again
        return random_case(rng, n, m, stem)
    qscale = np.float32(rng.uniform(0.5, 2.0))
    lo, hi = float(qscale * y.min()), float(qscale * y.max())
    t = int(rng.choice([1, 3, 7, 15]))
    inputs["QScale"] = np.array([qscale], np.float32)
    inputs["QThresholds"] = np.sort(rng.uniform(lo, hi + 1e-3, size=t)).astype(np.float32)
    return inputs, attrs


def check_against_reference(so, cases):
    """Y within 1e-5 of the reference (relative to its largest value), Q exactly ThresholdQuant
    of the kernel's own Y, and the levels not all equal across the cases."""
    failures, varied = [], 0
    for inputs, attrs in cases:
        y_ref, q_ref = run_single(OP, inputs, attrs)
        y, q = run_ort(so, inputs, attrs)
        if y.shape != y_ref.shape or q.shape != q_ref.shape or q.dtype != np.uint8:
            failures.append(f"shapes {y.shape} {q.shape} != {y_ref.shape}: {attrs}")
            continue
        err = float(np.abs(y.astype(np.float64) - y_ref).max())
        tol = 1e-5 * max(1.0, float(np.abs(y_ref).max()))
        own = quantize(y, inputs["QScale"][0], inputs["QThresholds"])
        if err > tol or not np.array_equal(q, own):
            failures.append(
                f"Y error {err:.3g} (tol {tol:.3g}), {int((q != own).sum())} levels: {attrs}"
            )
        varied += len(np.unique(q_ref)) > 1
    assert not failures, f"{len(failures)}/{len(cases)} cases fail:\n" + "\n".join(failures[:5])
    assert varied >= 0.8 * len(cases), f"levels vary in only {varied}/{len(cases)} cases"


def standard_ops_model(inputs, attrs):
    """The op as standard Conv, Relu, MaxPool and Transpose nodes (the unfused graph)."""
    names = ["X", "W"] + (["B"] if inputs["B"] is not None else [])
    conv = {k: attrs[k] for k in ("kernel_shape", "strides", "pads")}
    nodes = [oh.make_node("Conv", names, ["z"], **conv)]
    z = "z"
    if attrs["relu"]:
        nodes.append(oh.make_node("Relu", ["z"], ["r"]))
        z = "r"
    if "pool_kernel_shape" in attrs:
        pool = dict(kernel_shape=attrs["pool_kernel_shape"], strides=attrs["pool_strides"])
        nodes.append(oh.make_node("MaxPool", [z], ["p"], pads=attrs["pool_pads"], **pool))
        z = "p"
    nodes.append(oh.make_node("Transpose", [z], ["Y"], perm=[0, 2, 3, 1]))
    inits = [numpy_helper.from_array(inputs[k], k) for k in names[1:]]
    x = oh.make_tensor_value_info("X", TensorProto.FLOAT, list(inputs["X"].shape))
    y = oh.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    graph = oh.make_graph(nodes, "standard", [x], [y], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=8)


def test_reference_is_the_standard_ops_composed():
    rng = np.random.default_rng(1)
    for case in [random_case(rng) for _ in range(40)] + [random_case(rng, stem=True)]:
        inputs, attrs = case
        y_ref, q_ref = run_single(OP, inputs, attrs)
        # onnx.reference's MaxPool fails on some padded windows (onnx 1.23), so onnxruntime
        model = standard_ops_model(inputs, attrs).SerializeToString()
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        (y_onnx,) = sess.run(None, {"X": inputs["X"]})
        np.testing.assert_allclose(y_ref, y_onnx, rtol=0, atol=1e-5 * max(1, np.abs(y_onnx).max()))
        np.testing.assert_array_equal(
            q_ref, quantize(y_ref, inputs["QScale"][0], inputs["QThresholds"])
        )


def test_kernel_matches_reference(library):
    rng = np.random.default_rng(2)
    cases = [random_case(rng) for _ in range(600)]
    cases += [random_case(rng, n=1, stem=True), random_case(rng, n=3, stem=True)]
    check_against_reference(session_options(2), cases)


def test_kernel_single_thread_and_bands(library):
    """One image split into bands (the pooled rows of one image over several tasks) and one
    thread: the same results."""
    rng = np.random.default_rng(3)
    cases = [random_case(rng, n=1) for _ in range(60)] + [random_case(rng, n=1, stem=True)]
    check_against_reference(session_options(1), cases)
    check_against_reference(session_options(2), cases)


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_other_isa_paths_match_reference(isa, library, monkeypatch):
    monkeypatch.setenv("ADQ_ISA", isa)
    rng = np.random.default_rng(4)
    cases = [random_case(rng) for _ in range(200)] + [random_case(rng, stem=True)]
    check_against_reference(session_options(2), cases)


def test_packed_weights_kept_only_for_constant_w(library):
    """A constant W is packed on the first run and kept: later runs with other inputs still
    match the reference. A W fed as an input is packed on every run: a session fed two W's
    gives each one's result."""
    rng = np.random.default_rng(6)
    inputs, attrs = random_case(rng, n=2, m=32)
    constants = ("W", "B", "QScale", "QThresholds")
    model = single_op_model(OP, inputs, attrs, constants=constants).SerializeToString()
    kept = ort.InferenceSession(model, session_options(2), providers=["CPUExecutionProvider"])
    fed = single_op_model(OP, inputs, attrs, constants=("B", "QScale", "QThresholds"))
    fresh = ort.InferenceSession(
        fed.SerializeToString(), session_options(2), providers=["CPUExecutionProvider"]
    )
    for _ in range(3):
        x = rng.normal(size=inputs["X"].shape).astype(np.float32)
        w = rng.normal(size=inputs["W"].shape).astype(np.float32)
        runs = [
            (kept.run(None, {"X": x}), {**inputs, "X": x}),
            (fresh.run(None, {"X": x, "W": w}), {**inputs, "X": x, "W": w}),
        ]
        for (y, q), case in runs:
            y_ref, _ = run_single(OP, case, attrs)
            tol = 1e-5 * max(1.0, float(np.abs(y_ref).max()))
            assert float(np.abs(y.astype(np.float64) - y_ref).max()) <= tol
            np.testing.assert_array_equal(q, quantize(y, case["QScale"][0], case["QThresholds"]))


def test_non_finite_input_runs_and_levels_follow_y(library):
    """NaN and infinities in X: results unspecified (docs/onnx-ops.md), but the kernel runs and
    Q is still ThresholdQuant of its Y."""
    inputs, attrs = random_case(np.random.default_rng(5), stem=True)
    x = inputs["X"].copy()
    x[0, 0, :3, :5] = np.nan
    x[-1, 2, 7, 7] = np.inf
    y, q = run_ort(session_options(2), {**inputs, "X": x}, attrs)
    assert y.shape == q.shape == run_single(OP, inputs, attrs)[0].shape
    np.testing.assert_array_equal(q, quantize(y, inputs["QScale"][0], inputs["QThresholds"]))


def _ok():
    inputs = {
        "X": np.zeros((1, 3, 8, 8), np.float32),
        "W": np.ones((16, 3, 3, 3), np.float32),
        "B": np.zeros(16, np.float32),
        "QScale": np.ones(1, np.float32),
        "QThresholds": np.array([0.5, 1.5], np.float32),
    }
    attrs = {"kernel_shape": [3, 3], "pool_kernel_shape": [2, 2], "pool_strides": [2, 2]}
    return inputs, attrs


def _with(**changes):
    inputs, attrs = _ok()
    for key, value in changes.items():
        (inputs if key[0].isupper() else attrs)[key] = value
    return inputs, attrs


ERROR_CASES = {
    "X rank 3": (_with(X=np.zeros((3, 8, 8), np.float32)), "'X' must have rank 4"),
    "X uint8": (_with(X=np.zeros((1, 3, 8, 8), np.uint8)), "Type Error"),
    "W of other channels": (_with(W=np.ones((16, 2, 3, 3), np.float32)), "W must have shape"),
    "W of another kernel": (_with(W=np.ones((16, 3, 5, 5), np.float32)), "W must have shape"),
    "B length 15": (_with(B=np.zeros(15, np.float32)), "B must have shape"),
    "QThresholds decreasing": (
        _with(QThresholds=np.array([1.0, 0.0], np.float32)),
        "QThresholds must be non-decreasing",
    ),
    "QScale [2]": (_with(QScale=np.ones(2, np.float32)), "QScale must be a scalar"),
    "kernel larger than the padded input": (
        _with(W=np.ones((16, 3, 9, 9), np.float32), kernel_shape=[9, 9]),
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
    "pool stride 2^24": (_with(pool_strides=[1 << 24, 1]), "pool_strides must be positive and"),
    "relu 2": (_with(relu=2), "'relu' must be 0 or 1"),
    "X too large for int32 offsets (no images)": (
        _with(X=np.zeros((0, 3, 30000, 30000), np.float32)),
        "X is too large",
    ),
    "kernel_shape missing": (
        (_ok()[0], {"pool_kernel_shape": [2, 2]}),
        "missing required attribute 'kernel_shape'",
    ),
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_malformed_inputs_raise(name, library):
    (inputs, attrs), reason = ERROR_CASES[name]
    with pytest.raises(ValueError):  # the reference agrees the case is malformed
        run_single(OP, inputs, attrs)
    with pytest.raises(ORT_ERRORS, match=reason):
        run_ort(session_options(1), inputs, attrs, constants=())
