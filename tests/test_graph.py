"""exporters.graph: the Relu that cannot change ThresholdQuant levels is dropped, others kept;
the LutConv fusion pass fuses what it can prove equal and nothing else (LutConvQuant where only
quantizers read the float output, LutConv's levels output Q where something else does too)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

from exporters.graph import (
    FOLD_MAX_ELEMENTS,
    Fusions,
    drop_relu_before_thresholds,
    fold_constants,
    fuse_conv_pool_quant,
    fuse_lut_conv,
    fuse_lut_conv_pool_quant,
    fuse_shortcut,
    known_shapes,
    to_channels_last,
)
from runtime.packing import pack_rows
from runtime.reference import run_reference
from runtime.reference.op_threshold_quant import quantize
from runtime.schema import DOMAIN, VERSION, register_onnx_schemas


def relu_then_thresholds(scale: float, thresholds: list[float], extra_reader: bool = False):
    """x -> Relu -> ThresholdQuant (and optionally -> Neg too)."""
    nodes = [
        oh.make_node("Relu", ["x"], ["r"]),
        oh.make_node("ThresholdQuant", ["r", "s", "t"], ["q"], domain=DOMAIN),
    ]
    outputs = [oh.make_tensor_value_info("q", TensorProto.UINT8, [None])]
    if extra_reader:
        nodes.append(oh.make_node("Neg", ["r"], ["n"]))
        outputs.append(oh.make_tensor_value_info("n", TensorProto.FLOAT, [None]))
    inits = [
        numpy_helper.from_array(np.array([scale], np.float32), "s"),
        numpy_helper.from_array(np.array(thresholds, np.float32), "t"),
    ]
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [None])], outputs, inits
    )
    opsets = [oh.make_opsetid("", 20), oh.make_opsetid(DOMAIN, VERSION)]
    return oh.make_model(graph, opset_imports=opsets)


def test_drops_relu_and_keeps_the_levels():
    model = relu_then_thresholds(0.7, [0.1, 0.5, 2.0])
    x = np.concatenate([np.linspace(-4, 4, 401), [-0.0, 0.0, np.nan, -np.inf, np.inf]])
    x = x.astype(np.float32)
    before = run_reference(model, {"x": x})[0]
    assert drop_relu_before_thresholds(model.graph, DOMAIN) == 1
    assert [n.op_type for n in model.graph.node] == ["ThresholdQuant"]
    assert model.graph.node[0].input[0] == "x"
    np.testing.assert_array_equal(run_reference(model, {"x": x})[0], before)
    assert before.min() == 0 and before.max() == 3  # all levels occur


@pytest.mark.parametrize(
    "scale, thresholds, extra",
    [(0.7, [0.0, 0.5], False), (0.7, [-0.2, 0.5], False), (-1.0, [0.5], False), (1, [1], True)],
)
def test_keeps_relu_that_matters(scale, thresholds, extra):
    """A threshold <= 0, a negative scale, or another reader of the Relu: kept."""
    model = relu_then_thresholds(scale, thresholds, extra)
    assert drop_relu_before_thresholds(model.graph, DOMAIN) == 0
    assert "Relu" in [n.op_type for n in model.graph.node]
    onnx.checker.check_model(model)


# ----------------------------------------------------------------------------- LutConv fusion

N, C, H, M = "N", 4, 5, 3  # LutConv: X [N, 4, 5, 5] -> Y [N, 3, 5, 5] (3x3, pads 1)
Y_SHAPE = [N, M, H, H]


def lut_conv_model(tail, extra_inputs=(), outputs=(("out", TensorProto.FLOAT, Y_SHAPE),)):
    """x -> LutConv -> y, then the `tail` nodes; `extra_inputs` are (name, shape) float inputs,
    `outputs` (name, elem type, shape) the graph outputs. Constants: Codes, Codebook, Scale,
    Bias, and ThresholdQuant parameters s, t (and t2, s2: other thresholds, another scale)."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(M, C, 3, 3))
    inits = {
        "codes": pack_rows(codes, 2),
        "book": np.array([-1.5, -0.5, 0.5, 1.5], np.float32),
        "scale": rng.uniform(0.05, 0.1, M).astype(np.float32),
        "bias": rng.standard_normal(M).astype(np.float32),
        "s": np.array([1.0], np.float32),
        "t": np.array([-0.5, 0.0, 0.5, 1.0], np.float32),
        "t2": np.array([0.25], np.float32),
        "s2": np.array([0.5], np.float32),
    }
    conv = oh.make_node(
        "LutConv",
        ["x", "codes", "book", "scale", "bias"],
        ["y"],
        domain=DOMAIN,
        bits=2,
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
    )
    inputs = [oh.make_tensor_value_info("x", TensorProto.UINT8, [N, C, H, H])]
    inputs += [oh.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in extra_inputs]
    if any("shape" in n.input for n in tail):
        inputs.append(oh.make_tensor_value_info("shape", TensorProto.INT64, [4]))
    graph = oh.make_graph(
        [conv, *tail],
        "g",
        inputs,
        [oh.make_tensor_value_info(*o) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    opsets = [oh.make_opsetid("", 20), oh.make_opsetid(DOMAIN, VERSION)]
    return oh.make_model(graph, opset_imports=opsets)


def feeds(model, batch=2):
    """Random inputs of a lut_conv_model (negative values included, so a Relu matters): a
    declared dim that is not a value takes Y's run-time size at its position; the input 'shape'
    of a Reshape is Y's run-time shape."""
    rng = np.random.default_rng(1)
    y_shape = (batch, M, H, H)
    out = {"x": rng.integers(0, 8, size=(batch, C, H, H)).astype(np.uint8)}
    for v in model.graph.input[1:]:
        if v.name == "shape":
            out[v.name] = np.array(y_shape, np.int64)
            continue
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        if len(dims) == 4:
            dims = [d or y for d, y in zip(dims, y_shape, strict=True)]
        else:
            dims = [int(np.prod(y_shape))]
        out[v.name] = rng.standard_normal(dims).astype(np.float32) * 2
    return out


def fused(model):
    """(fusions, fused copy, outputs before, outputs after) of fuse_lut_conv on a copy."""
    after = copy.deepcopy(model)
    counts = fuse_lut_conv(after, DOMAIN)
    register_onnx_schemas()
    onnx.checker.check_model(after, full_check=True)
    x = feeds(model)
    return counts, after, run_reference(model, x), run_reference(after, x)


def assert_same(before, after):
    for b, a in zip(before, after, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def ops(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("swap", [False, True])
def test_fuses_residual_add_and_relu(swap):
    """The ResNet block end: LutConv -> Add(y, r) -> Relu is one LutConv(Residual=r, relu=1)."""
    add = oh.make_node("Add", ["r", "y"] if swap else ["y", "r"], ["z"])
    model = lut_conv_model([add, oh.make_node("Relu", ["z"], ["out"])], [("r", Y_SHAPE)])
    counts, after, before, now = fused(model)
    assert counts == Fusions(residual_adds=1, relus=1, threshold_quants=0)
    (node,) = after.graph.node
    assert node.op_type == "LutConv" and list(node.input) == [
        "x",
        "codes",
        "book",
        "scale",
        "bias",
        "r",
    ]
    assert list(node.output) == ["out"]
    assert {a.name: oh.get_attribute_value(a) for a in node.attribute}["relu"] == 1
    assert_same(before, now)
    assert (before[0] == 0).any() and (before[0] > 0).any()  # the Relu clipped something


def test_fuses_relu_alone_and_add_alone():
    model = lut_conv_model([oh.make_node("Relu", ["y"], ["out"])])
    counts, after, before, now = fused(model)
    assert counts == Fusions(0, 1, 0) and ops(after) == ["LutConv"]
    assert_same(before, now)

    model = lut_conv_model([oh.make_node("Add", ["y", "r"], ["out"])], [("r", Y_SHAPE)])
    counts, after, before, now = fused(model)
    assert counts == Fusions(1, 0, 0) and ops(after) == ["LutConv"]
    assert not [a for a in after.graph.node[0].attribute if a.name == "relu"]
    assert_same(before, now)


def test_fuses_threshold_quant_after_the_epilogue():
    """Add + Relu + ThresholdQuant after a LutConv: one LutConvQuant with all 8 inputs."""
    tail = [
        oh.make_node("Add", ["y", "r"], ["z"]),
        oh.make_node("Relu", ["z"], ["a"]),
        oh.make_node("ThresholdQuant", ["a", "s", "t"], ["q"], domain=DOMAIN),
    ]
    outputs = [("q", TensorProto.UINT8, Y_SHAPE)]
    model = lut_conv_model(tail, [("r", Y_SHAPE)], outputs)
    counts, after, before, now = fused(model)
    assert counts == Fusions(1, 1, 1)
    (node,) = after.graph.node
    assert node.op_type == "LutConvQuant" and list(node.output) == ["q"]
    assert list(node.input) == ["x", "codes", "book", "scale", "bias", "r", "s", "t"]
    assert_same(before, now)
    assert len(np.unique(before[0])) >= 3


def test_lut_conv_quant_without_bias_lists_empty_inputs():
    model = lut_conv_model(
        [oh.make_node("ThresholdQuant", ["y", "s", "t"], ["q"], domain=DOMAIN)],
        outputs=[("q", TensorProto.UINT8, Y_SHAPE)],
    )
    del model.graph.node[0].input[4]  # no Bias
    counts, after, before, now = fused(model)
    assert counts == Fusions(0, 0, 1)
    assert list(after.graph.node[0].input) == ["x", "codes", "book", "scale", "", "", "s", "t"]
    assert_same(before, now)


def test_identical_threshold_quants_become_one():
    """Two ThresholdQuant nodes with the same inputs: one LutConvQuant, readers rewired."""
    tail = [
        oh.make_node("ThresholdQuant", ["y", "s", "t"], ["q1"], domain=DOMAIN),
        oh.make_node("ThresholdQuant", ["y", "s", "t"], ["q2"], domain=DOMAIN),
        oh.make_node("Cast", ["q1"], ["o1"], to=TensorProto.FLOAT),
        oh.make_node("Cast", ["q2"], ["o2"], to=TensorProto.FLOAT),
    ]
    outs = [("o1", TensorProto.FLOAT, Y_SHAPE), ("o2", TensorProto.FLOAT, Y_SHAPE)]
    counts, after, before, now = fused(lut_conv_model(tail, outputs=outs))
    assert counts == Fusions(0, 0, 1)
    assert sorted(ops(after)) == ["Cast", "Cast", "LutConvQuant"]
    assert [n.input[0] for n in after.graph.node if n.op_type == "Cast"] == ["q1", "q1"]
    assert_same(before, now)


def test_two_quantizers_become_q_and_q2():
    """y read only by quantizers with two sets of parameters (a block output read by the next
    block's conv1 and by its downsampling shortcut): one LutConvQuant with outputs Q and Q2."""
    tail = [
        oh.make_node("ThresholdQuant", ["y", "s", "t"], ["q1"], domain=DOMAIN),
        oh.make_node("ThresholdQuant", ["y", "s", "t2"], ["q2"], domain=DOMAIN),
        oh.make_node("ThresholdQuant", ["y", "s", "t"], ["q3"], domain=DOMAIN),
        oh.make_node("Cast", ["q3"], ["o3"], to=TensorProto.FLOAT),
    ]
    outs = [("q1", TensorProto.UINT8, Y_SHAPE), ("q2", TensorProto.UINT8, Y_SHAPE)]
    outs.append(("o3", TensorProto.FLOAT, Y_SHAPE))
    counts, after, before, now = fused(lut_conv_model(tail, outputs=outs))
    assert counts == Fusions(0, 0, 1, 0)
    assert sorted(ops(after)) == ["Cast", "LutConvQuant"]
    lut = next(n for n in after.graph.node if n.op_type == "LutConvQuant")
    assert list(lut.input[6:]) == ["s", "t", "s", "t2"]
    assert list(lut.output) == ["q1", "q2"]
    assert next(n for n in after.graph.node if n.op_type == "Cast").input[0] == "q1"
    assert_same(before, now)


@pytest.mark.parametrize("groups", [2, 3])
def test_quantizers_with_other_parameters_keep_reading_y(groups):
    """When y has another reader (or three quantizers differ), the largest group of quantizers
    becomes output Q; the others keep reading the float y."""
    tail = [
        oh.make_node("ThresholdQuant", ["y", "s", "t"], ["q1"], domain=DOMAIN),
        oh.make_node("ThresholdQuant", ["y", "s", "t2"], ["q2"], domain=DOMAIN),
    ]
    outs = [("q1", TensorProto.UINT8, Y_SHAPE), ("q2", TensorProto.UINT8, Y_SHAPE)]
    if groups == 2:
        tail.append(oh.make_node("Neg", ["y"], ["n"]))
        outs.append(("n", TensorProto.FLOAT, Y_SHAPE))
    else:
        tail.append(oh.make_node("ThresholdQuant", ["y", "s2", "t2"], ["q3"], domain=DOMAIN))
        outs.append(("q3", TensorProto.UINT8, Y_SHAPE))
    counts, after, before, now = fused(lut_conv_model(tail, outputs=outs))
    assert counts == Fusions(0, 0, 0, 1)
    lut = next(n for n in after.graph.node if n.op_type == "LutConv")
    assert len(lut.output) == 2
    left = [n for n in after.graph.node if n.op_type == "ThresholdQuant"]
    assert len(left) == groups - 1 and all(n.input[0] == lut.output[0] for n in left)
    assert_same(before, now)


REFUSED = {
    # y has a second reader
    "second reader": (
        [oh.make_node("Relu", ["y"], ["out"]), oh.make_node("Neg", ["y"], ["n"])],
        [],
        [("out", TensorProto.FLOAT, Y_SHAPE), ("n", TensorProto.FLOAT, Y_SHAPE)],
    ),
    # y is a graph output
    "graph output": (
        [oh.make_node("Relu", ["y"], ["out"])],
        [],
        [("out", TensorProto.FLOAT, Y_SHAPE), ("y", TensorProto.FLOAT, Y_SHAPE)],
    ),
    # the other operand broadcasts (per-channel), has another batch symbol, or unknown dims
    "broadcast": ([oh.make_node("Add", ["y", "r"], ["out"])], [("r", [1, M, 1, 1])], None),
    "other symbol": ([oh.make_node("Add", ["y", "r"], ["out"])], [("r", ["B", M, H, H])], None),
    "unknown dims": ([oh.make_node("Add", ["r", "y"], ["out"])], [("r", [N, M, None, H])], None),
    "computed shape": (  # r's dims are unknown to shape inference (it makes up symbols)
        [
            oh.make_node("Reshape", ["flat", "shape"], ["r"]),
            oh.make_node("Add", ["y", "r"], ["out"]),
        ],
        [("flat", [None])],
        None,
    ),
    "Add(y, y)": ([oh.make_node("Add", ["y", "y"], ["out"])], [], None),
    # a quantizer whose Scale is computed from y: as LutConv's input, a cycle
    "scale from y": (
        [
            oh.make_node("ReduceMax", ["y"], ["m"], keepdims=0),
            oh.make_node("ThresholdQuant", ["y", "m", "t"], ["q"], domain=DOMAIN),
            oh.make_node("Neg", ["y"], ["n"]),
        ],
        [],
        [("q", TensorProto.UINT8, Y_SHAPE), ("n", TensorProto.FLOAT, Y_SHAPE)],
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refuses_unsafe_fusions(case):
    tail, extra, outputs = REFUSED[case]
    model = lut_conv_model(tail, extra, outputs or (("out", TensorProto.FLOAT, Y_SHAPE),))
    counts, after, before, now = fused(model)
    assert counts == Fusions(0, 0, 0)
    assert ops(after) == ops(model)
    assert_same(before, now)


def test_add_fused_but_not_a_relu_with_another_reader():
    tail = [
        oh.make_node("Add", ["y", "r"], ["z"]),
        oh.make_node("Relu", ["z"], ["out"]),
        oh.make_node("Neg", ["z"], ["n"]),
    ]
    outputs = [("out", TensorProto.FLOAT, Y_SHAPE), ("n", TensorProto.FLOAT, Y_SHAPE)]
    counts, after, before, now = fused(lut_conv_model(tail, [("r", Y_SHAPE)], outputs))
    assert counts == Fusions(1, 0, 0)
    assert ops(after) == ["LutConv", "Relu", "Neg"] and after.graph.node[0].output[0] == "z"
    assert_same(before, now)


LEVEL_OUTPUT = {
    # the block output: the next block's residual Add and the next conv's quantizer read it
    "Add reader": (
        [
            oh.make_node("ThresholdQuant", ["y", "s", "t"], ["q"], domain=DOMAIN),
            oh.make_node("Add", ["y", "r"], ["z"]),
        ],
        [("q", TensorProto.UINT8, Y_SHAPE), ("z", TensorProto.FLOAT, Y_SHAPE)],
    ),
    "graph output": (
        [oh.make_node("ThresholdQuant", ["y", "s", "t"], ["q"], domain=DOMAIN)],
        [("q", TensorProto.UINT8, Y_SHAPE), ("y", TensorProto.FLOAT, Y_SHAPE)],
    ),
    # identical quantizers become one output, their readers rewired
    "two quantizers and Neg": (
        [
            oh.make_node("ThresholdQuant", ["y", "s", "t"], ["q1"], domain=DOMAIN),
            oh.make_node("ThresholdQuant", ["y", "s", "t"], ["q2"], domain=DOMAIN),
            oh.make_node("Neg", ["y"], ["n"]),
            oh.make_node("Cast", ["q2"], ["c"], to=TensorProto.FLOAT),
        ],
        [("q1", TensorProto.UINT8, Y_SHAPE), ("c", TensorProto.FLOAT, Y_SHAPE)],
    ),
}


@pytest.mark.parametrize("case", LEVEL_OUTPUT)
def test_block_output_gets_the_levels_output(case):
    """y read by identical ThresholdQuant nodes and by something else (or a graph output):
    LutConv writes both, Y and the levels Q (inputs 6, 7 the quantizer's Scale, Thresholds)."""
    tail, outputs = LEVEL_OUTPUT[case]
    model = lut_conv_model(tail, [("r", Y_SHAPE)], outputs)
    counts, after, before, now = fused(model)
    assert counts == Fusions(0, 0, 0, level_outputs=1)
    q = tail[0].output[0]  # the first quantizer's levels (the others read them now)
    lut = after.graph.node[0]
    assert lut.op_type == "LutConv" and list(lut.output) == ["y", q]
    assert list(lut.input) == ["x", "codes", "book", "scale", "bias", "", "s", "t"]
    assert "ThresholdQuant" not in ops(after)
    assert [n.input[0] for n in after.graph.node if n.op_type == "Cast"] in ([], [q])
    assert_same(before, now)


def test_levels_output_after_the_epilogue():
    """Add + Relu fused first, then the block output (read by a quantizer and a Neg, the next
    residual) gets Q; without Bias the node lists "" for it."""
    tail = [
        oh.make_node("Add", ["y", "r"], ["z"]),
        oh.make_node("Relu", ["z"], ["a"]),
        oh.make_node("ThresholdQuant", ["a", "s", "t"], ["q"], domain=DOMAIN),
        oh.make_node("Neg", ["a"], ["n"]),
    ]
    outputs = [("q", TensorProto.UINT8, Y_SHAPE), ("n", TensorProto.FLOAT, Y_SHAPE)]
    model = lut_conv_model(tail, [("r", Y_SHAPE)], outputs)
    del model.graph.node[0].input[4]  # no Bias
    counts, after, before, now = fused(model)
    assert counts == Fusions(1, 1, 0, 1) and ops(after) == ["LutConv", "Neg"]
    lut = after.graph.node[0]
    assert list(lut.input) == ["x", "codes", "book", "scale", "", "r", "s", "t"]
    assert list(lut.output) == ["a", "q"]
    assert_same(before, now)
    assert len(np.unique(before[0])) >= 3


def test_lut_conv_with_levels_output_is_left_alone():
    """A LutConv that already writes Q keeps its Y: no Add, Relu or quantizer fused into it."""
    model = lut_conv_model(
        [
            oh.make_node("Add", ["y", "r"], ["z"]),
            oh.make_node("Relu", ["z"], ["out"]),
            oh.make_node("ThresholdQuant", ["y", "s", "t2"], ["q2"], domain=DOMAIN),
        ],
        [("r", Y_SHAPE)],
        [("out", TensorProto.FLOAT, Y_SHAPE), ("q", TensorProto.UINT8, Y_SHAPE)],
    )
    lut = model.graph.node[0]
    lut.input.extend(["", "s", "t"])
    lut.output.append("q")
    counts, after, *_ = fused(model)
    assert counts == Fusions(0, 0, 0) and after.graph.node[0] == lut


def _const(name, values, dtype=np.int64):
    return oh.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.array(values, dtype))
    )


# The pads of a zero-padding shortcut (ResNet-20's option A, F.pad over channels) as the
# TorchScript exporter computes them: [0, 0, 0, 0, 1, 1] -> ONNX order [0, 1, 0, 0, 0, 1, 0, 0].
PAD_CHAIN = [
    _const("p6", [0, 0, 0, 0, 1, 1]),
    _const("two", [2]),
    oh.make_node(
        "ConstantOfShape", ["two"], ["zeros"], value=numpy_helper.from_array(np.zeros(1, np.int64))
    ),
    oh.make_node("Concat", ["p6", "zeros"], ["p8"], axis=0),
    _const("pairs", [-1, 2]),
    oh.make_node("Reshape", ["p8", "pairs"], ["p42"]),
    _const("start", [-1]),
    _const("end", [-(2**63)]),
    _const("axis", [0]),
    _const("step", [-1]),
    oh.make_node("Slice", ["p42", "start", "end", "axis", "step"], ["rev"]),
    oh.make_node("Transpose", ["rev"], ["cols"], perm=[1, 0]),
    _const("flat", [-1]),
    oh.make_node("Reshape", ["cols", "flat"], ["pads64"]),
    oh.make_node("Cast", ["pads64"], ["pads"], to=TensorProto.INT64),
    oh.make_node("Pad", ["short", "pads"], ["r"]),
]


def test_folded_pad_shortcut_lets_the_add_fuse():
    """The zero-padding shortcut: while its pads are computed, shape inference cannot tell the
    Pad's output shape and the Add stays; fold_constants turns the chain into one initializer,
    and the Add and Relu fuse. The outputs never change."""
    tail = [
        *PAD_CHAIN,
        oh.make_node("Add", ["y", "r"], ["z"]),
        oh.make_node("Relu", ["z"], ["out"]),
    ]
    model = lut_conv_model(tail, [("short", [N, 1, H, H])])
    counts, _, before, _ = fused(model)
    assert counts == Fusions(0, 0, 0)

    folded = copy.deepcopy(model)
    assert fold_constants(folded) == len(PAD_CHAIN) - 1  # all but the Pad
    assert ops(folded) == ["LutConv", "Pad", "Add", "Relu"]
    pads = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}["pads"]
    np.testing.assert_array_equal(pads, [0, 1, 0, 0, 0, 1, 0, 0])
    counts, after, unfused, now = fused(folded)
    assert counts == Fusions(residual_adds=1, relus=1, threshold_quants=0)
    assert sorted(ops(after)) == ["LutConv", "Pad"]
    assert_same(before, unfused)
    assert_same(before, now)


def test_fold_constants_leaves_large_values_and_runtime_inputs():
    big = int(FOLD_MAX_ELEMENTS) + 1
    nodes = [
        _const("n", [big]),
        oh.make_node(
            "ConstantOfShape",
            ["n"],
            ["ones"],
            value=numpy_helper.from_array(np.ones(1, np.float32)),
        ),
        oh.make_node("ReduceSum", ["ones"], ["total"], keepdims=0),
        oh.make_node("Mul", ["x", "total"], ["out"]),
    ]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)])
    x = {"x": np.array([1.0, -2.0], np.float32)}
    expected = run_reference(model, x)
    assert fold_constants(model) == 1  # the Constant only: the rest is too large or reads x
    assert ops(model) == ["ConstantOfShape", "ReduceSum", "Mul"]
    np.testing.assert_array_equal(run_reference(model, x)[0], expected[0])
    np.testing.assert_array_equal(expected[0], [big, -2.0 * big])


def test_known_shapes_see_through_adq_ops():
    """Shape inference with the ai.adq schemas: every value of the graph has a full shape."""
    tail = [
        oh.make_node("Relu", ["y"], ["a"]),
        oh.make_node("ThresholdQuant", ["a", "s", "t"], ["q"], domain=DOMAIN),
    ]
    shapes = known_shapes(lut_conv_model(tail, outputs=[("q", TensorProto.UINT8, [None] * 4)]))
    assert shapes["y"] == shapes["a"] == shapes["q"] == (N, M, H, H)
    assert shapes["codes"] == (M, 9)


def test_channels_last_keeps_the_outputs():
    """to_channels_last: the convolutions and the ThresholdQuant between them run NHWC, with one
    Transpose in (x), one out per tensor read elsewhere (y by a Relu, z as a graph output), and
    the pool of z a ReduceMean of its NHWC form: the same outputs under the same names."""
    codes2 = pack_rows(np.random.default_rng(3).integers(0, 4, size=(M, M * 9)), 2)
    tail = [
        oh.make_node("ThresholdQuant", ["y", "s", "t"], ["q"], domain=DOMAIN),
        oh.make_node(
            "LutConv",
            ["q", "codes2", "book", "scale", "bias", "y"],
            ["z"],
            domain=DOMAIN,
            bits=2,
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        oh.make_node("GlobalAveragePool", ["z"], ["p"]),
        oh.make_node("Relu", ["y"], ["r"]),
    ]
    outs = [("p", TensorProto.FLOAT, [N, M, 1, 1]), ("r", TensorProto.FLOAT, Y_SHAPE)]
    outs.append(("z", TensorProto.FLOAT, Y_SHAPE))
    model = lut_conv_model(tail, outputs=outs)
    model.graph.initializer.append(numpy_helper.from_array(codes2, "codes2"))
    after = copy.deepcopy(model)
    assert to_channels_last(after.graph, DOMAIN) == 2
    register_onnx_schemas()
    onnx.checker.check_model(after, full_check=True)
    assert sorted(ops(after)) == sorted(
        ["LutConv", "LutConv", "ThresholdQuant", "ReduceMean", "Relu"] + ["Transpose"] * 4
    )
    by_output = {o: n for n in after.graph.node for o in n.output}
    assert by_output["q"].input[0] == "y_nhwc"  # the quantizer reads the NHWC tensor
    assert by_output["z_nhwc"].input[0] == "q" and by_output["z_nhwc"].input[5] == "y_nhwc"
    for n in after.graph.node:
        if n.op_type == "LutConv":
            assert (
                oh.get_attribute_value(next(a for a in n.attribute if a.name == "channels_last"))
                == 1
            )
    x = feeds(model)
    before, now = run_reference(model, x), run_reference(after, x)
    for b, a in zip(before, now, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(now[1], before[1])  # r, z: the same float operations
    np.testing.assert_array_equal(now[2], before[2])


def test_channels_last_without_convolutions_changes_nothing():
    model = relu_then_thresholds(1.0, [0.5])
    after = copy.deepcopy(model)
    assert to_channels_last(after.graph, DOMAIN) == 0
    assert after == model


def test_shortcut_folds_into_the_convolution_it_adds_to():
    """fuse_shortcut: a 1x1 LutConv whose Residual is another LutConv's float output (read by it
    alone) becomes that LutConv's shortcut, with the 1x1 node's relu, levels and outputs: the
    same outputs, bit for bit; a second reader of the float output prevents it."""
    rng = np.random.default_rng(4)
    codes1 = pack_rows(rng.integers(0, 4, size=(M, C)), 2)
    down = oh.make_node(
        "LutConv",
        ["x2", "codes1", "book", "scale", "", "y", "s", "t"],
        ["z", "zq"],
        domain=DOMAIN,
        bits=2,
        kernel_shape=[1, 1],
        strides=[2, 2],
        relu=1,
    )
    outs = [("z", TensorProto.FLOAT, Y_SHAPE), ("zq", TensorProto.UINT8, Y_SHAPE)]
    for extra_reader in (False, True):
        tail = [down] + ([oh.make_node("Relu", ["y"], ["r"])] if extra_reader else [])
        extra = [("r", TensorProto.FLOAT, Y_SHAPE)] if extra_reader else []
        model = lut_conv_model(tail, outputs=outs + extra)
        model.graph.initializer.append(numpy_helper.from_array(codes1, "codes1"))
        model.graph.input.append(
            oh.make_tensor_value_info("x2", TensorProto.UINT8, [N, C, 2 * H - 1, 2 * H])
        )
        after = copy.deepcopy(model)
        assert fuse_shortcut(after.graph, DOMAIN) == (0 if extra_reader else 1)
        if extra_reader:
            assert after == model
            continue
        register_onnx_schemas()
        onnx.checker.check_model(after, full_check=True)
        (node,) = after.graph.node
        assert node.op_type == "LutConv" and list(node.output) == ["z", "zq"]
        assert list(node.input) == ["x", "codes", "book", "scale", "bias", "", "s", "t"] + [
            "x2",
            "codes1",
            "book",
            "scale",
        ]
        attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
        assert attrs["relu"] == 1 and attrs["shortcut_bits"] == 2
        assert list(attrs["shortcut_strides"]) == [2, 2]
        x = feeds(model)
        x["x2"] = np.random.default_rng(7).integers(0, 4, (2, C, 2 * H - 1, 2 * H)).astype(np.uint8)
        assert_same(run_reference(model, x), run_reference(after, x))


def stem_model(relu=True, pool=True, **change):
    """x -> Conv (constant W, B) [-> Relu] [-> MaxPool] -> Transpose to NHWC -> ThresholdQuant,
    the NHWC tensor also read by a Neg (as the first residual block reads it). ``change``:
    conv_attrs / pool_attrs updates, w_input (W a graph input), extra ("z" also a graph output),
    perm, second_quantizer."""
    rng = np.random.default_rng(8)
    conv_attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    conv_attrs.update(change.get("conv_attrs", {}))
    inits = [
        numpy_helper.from_array(
            rng.normal(size=(16, 3 // conv_attrs.get("group", 1), 3, 3)).astype(np.float32), "w"
        ),
        numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([1.5], np.float32), "s"),
        numpy_helper.from_array(np.array([0.5, 4.0, 9.0], np.float32), "t"),
    ]
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 17, 15])]
    if change.get("w_input"):
        inputs.append(oh.make_tensor_value_info("w", TensorProto.FLOAT, [16, 3, 3, 3]))
        inits = inits[1:]
    nodes = [oh.make_node("Conv", ["x", "w", "b"], ["z"], name="conv1", **conv_attrs)]
    v = "z"
    if relu:
        nodes.append(oh.make_node("Relu", [v], ["r"]))
        v = "r"
    if pool:
        attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
        attrs.update(change.get("pool_attrs", {}))
        nodes.append(oh.make_node("MaxPool", [v], ["p"], **attrs))
        v = "p"
    nodes.append(oh.make_node("Transpose", [v], ["h"], perm=change.get("perm", [0, 2, 3, 1])))
    nodes.append(oh.make_node("ThresholdQuant", ["h", "s", "t"], ["q"], domain=DOMAIN))
    nodes.append(oh.make_node("Neg", ["h"], ["n"]))
    outputs = [
        oh.make_tensor_value_info("q", TensorProto.UINT8, [None] * 4),
        oh.make_tensor_value_info("n", TensorProto.FLOAT, [None] * 4),
    ]
    if change.get("second_quantizer"):
        nodes.append(oh.make_node("ThresholdQuant", ["h", "s", "t"], ["q2"], domain=DOMAIN))
        outputs.append(oh.make_tensor_value_info("q2", TensorProto.UINT8, [None] * 4))
    if change.get("extra"):
        outputs.append(oh.make_tensor_value_info("z", TensorProto.FLOAT, [None] * 4))
    graph = oh.make_graph(nodes, "stem", inputs, outputs, inits)
    opsets = [oh.make_opsetid("", 18), oh.make_opsetid(DOMAIN, VERSION)]
    return oh.make_model(graph, opset_imports=opsets)


def assert_same_stem_outputs(model, after, x):
    """The reference gives a stem model and its fused form the same NHWC tensor (read by the
    Neg; the float sums' rounding aside) and levels, exactly the fused op's levels of it."""
    (q0, n0), (q1, n1) = run_reference(model, x), run_reference(after, x)
    assert n1.shape == n0.shape and q1.shape == q0.shape
    np.testing.assert_allclose(n1, n0, rtol=0, atol=1e-5 * np.abs(n0).max())
    np.testing.assert_array_equal(
        q1, quantize(-n1, np.float32(1.5), np.array([0.5, 4.0, 9.0], np.float32))
    )
    assert (q1 != q0).mean() < 1e-3 and len(np.unique(q1)) >= 3


@pytest.mark.parametrize("relu, pool", [(True, True), (True, False), (False, True), (False, False)])
def test_first_layer_and_pooling_become_conv_pool_quant(relu, pool):
    """fuse_conv_pool_quant: Conv [-> Relu] [-> MaxPool] -> Transpose -> ThresholdQuant is one
    ConvPoolQuant writing the NHWC tensor (still read by the Neg) and the levels: the same
    outputs (the float sum's rounding aside; the levels of the new float output exactly)."""
    model = stem_model(relu, pool)
    after = copy.deepcopy(model)
    assert fuse_conv_pool_quant(after.graph, DOMAIN) == 1
    register_onnx_schemas()
    onnx.checker.check_model(after, full_check=True)
    assert ops(after) == ["ConvPoolQuant", "Neg"]
    node = after.graph.node[0]
    assert list(node.input) == ["x", "w", "b", "s", "t"] and list(node.output) == ["h", "q"]
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    assert attrs["relu"] == int(relu) and list(attrs["strides"]) == [2, 2]
    assert ("pool_kernel_shape" in attrs) == pool
    x = {"x": np.random.default_rng(9).normal(size=(2, 3, 17, 15)).astype(np.float32)}
    assert_same_stem_outputs(model, after, x)


@pytest.mark.parametrize(
    "change",
    [
        {"extra": True},  # the convolution's output is read elsewhere
        {"pool_attrs": {"ceil_mode": 1}},
        {"pool_attrs": {"dilations": [2, 2]}},
        {"pool_attrs": {"pads": [3, 0, 0, 0], "kernel_shape": [3, 3]}},
        {"conv_attrs": {"dilations": [2, 2]}},
        {"conv_attrs": {"group": 3}},
        {"w_input": True},  # the weight is not a constant
        {"perm": [0, 3, 2, 1]},
        {"second_quantizer": True},
    ],
    ids=str,
)
def test_conv_pool_quant_refuses_what_it_does_not_compute(change):
    model = stem_model(**change)
    after = copy.deepcopy(model)
    assert fuse_conv_pool_quant(after.graph, DOMAIN) == 0
    assert after == model


def int_stem_model(relu=True, pool=True, **change):
    """x -> ThresholdQuant (255 input levels) -> DequantizeLinear (zero point 100) -> Conv
    (LutDequant weight) -> Mul -> Add -> [Relu] -> [MaxPool] -> Transpose to NHWC ->
    ThresholdQuant, the NHWC tensor also read by a Neg: an integer first layer as the adq writer
    emits it. ``change``: conv_attrs, conv_bias, dq_reader (the values read elsewhere), mul_input
    (a non-constant factor), add_shape (the Add's constant shape)."""
    rng = np.random.default_rng(8)
    conv_attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    conv_attrs.update(change.get("conv_attrs", {}))
    cin = 3 // conv_attrs.get("group", 1)
    book = np.arange(-8, 8, dtype=np.float32)
    codes = rng.integers(0, 16, (16, cin * 9))
    add_shape = change.get("add_shape", [1, 16, 1, 1])
    inits = [
        numpy_helper.from_array(np.array(1 / 0.05, np.float32), "s_in"),
        numpy_helper.from_array((np.arange(1, 256) - 100.5).astype(np.float32), "t_in"),
        numpy_helper.from_array(np.array(0.05, np.float32), "step"),
        numpy_helper.from_array(np.array(100, np.uint8), "zp"),
        numpy_helper.from_array(pack_rows(codes, 4), "codes"),
        numpy_helper.from_array(book, "book"),
        numpy_helper.from_array(rng.uniform(0.01, 0.03, (1, 16, 1, 1)).astype(np.float32), "f"),
        numpy_helper.from_array(rng.normal(size=add_shape).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "cb"),
        numpy_helper.from_array(np.array([1.5], np.float32), "s"),
        numpy_helper.from_array(np.array([0.5, 4.0, 9.0], np.float32), "t"),
    ]
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 17, 15])]
    if change.get("mul_input"):
        inputs.append(oh.make_tensor_value_info("f", TensorProto.FLOAT, [1, 16, 1, 1]))
        inits = [i for i in inits if i.name != "f"]
    conv_in = ["v", "w"] + (["cb"] if change.get("conv_bias") else [])
    shape = [16, cin, 3, 3]
    nodes = [
        oh.make_node("ThresholdQuant", ["x", "s_in", "t_in"], ["xq"], domain=DOMAIN),
        oh.make_node("DequantizeLinear", ["xq", "step", "zp"], ["v"]),
        oh.make_node("LutDequant", ["codes", "book"], ["w"], domain=DOMAIN, bits=4, shape=shape),
        oh.make_node("Conv", conv_in, ["z"], name="conv1", **conv_attrs),
        oh.make_node("Mul", ["z", "f"], ["zs"]),
        oh.make_node("Add", ["zs", "b"], ["za"]),
    ]
    v = "za"
    if relu:
        nodes.append(oh.make_node("Relu", [v], ["r"]))
        v = "r"
    if pool:
        nodes.append(oh.make_node("MaxPool", [v], ["p"], kernel_shape=[3, 3], strides=[2, 2]))
        v = "p"
    nodes.append(oh.make_node("Transpose", [v], ["h"], perm=[0, 2, 3, 1]))
    nodes.append(oh.make_node("ThresholdQuant", ["h", "s", "t"], ["q"], domain=DOMAIN))
    nodes.append(oh.make_node("Neg", ["h"], ["n"]))
    outputs = [
        oh.make_tensor_value_info("q", TensorProto.UINT8, [None] * 4),
        oh.make_tensor_value_info("n", TensorProto.FLOAT, [None] * 4),
    ]
    if change.get("dq_reader"):
        nodes.append(oh.make_node("Neg", ["v"], ["nv"]))
        outputs.append(oh.make_tensor_value_info("nv", TensorProto.FLOAT, [None] * 4))
    graph = oh.make_graph(nodes, "int_stem", inputs, outputs, inits)
    opsets = [oh.make_opsetid("", 20), oh.make_opsetid(DOMAIN, VERSION)]
    return oh.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("relu, pool", [(True, True), (False, True), (True, False)])
def test_integer_first_layer_becomes_lut_conv_pool_quant(relu, pool):
    """fuse_lut_conv_pool_quant: the levels, codes and codebook go straight into one
    LutConvPoolQuant, with Scale = step * the Mul's factor, Bias the Add's and the zero point;
    the reference gives the same outputs (the float sums' rounding aside)."""
    model = int_stem_model(relu, pool)
    after = copy.deepcopy(model)
    assert fuse_lut_conv_pool_quant(after.graph, DOMAIN) == 1
    register_onnx_schemas()
    onnx.checker.check_model(after, full_check=True)
    assert ops(after) == ["ThresholdQuant", "LutConvPoolQuant", "Neg"]
    node = after.graph.node[1]
    assert list(node.input[:3]) == ["xq", "codes", "book"] and list(node.output) == ["h", "q"]
    assert list(node.input[5:]) == ["s", "t"]
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    assert attrs["x_zero_point"] == 100 and attrs["bits"] == 4 and attrs["relu"] == int(relu)
    assert ("pool_kernel_shape" in attrs) == pool
    inits = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}
    f = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "f"))
    np.testing.assert_array_equal(inits[node.input[3]], np.float32(0.05) * f.reshape(-1))
    assert "w" not in {o for n in after.graph.node for o in n.output}  # LutDequant is gone
    x = {"x": np.random.default_rng(9).normal(size=(2, 3, 17, 15)).astype(np.float32)}
    assert_same_stem_outputs(model, after, x)


@pytest.mark.parametrize(
    "change",
    [
        {"dq_reader": True},  # the input values are read elsewhere
        {"conv_bias": True},
        {"mul_input": True},  # the output scale is not a constant
        {"add_shape": [1, 1, 9, 1]},  # per row, not per channel
        {"conv_attrs": {"group": 3}},
        {"conv_attrs": {"dilations": [2, 2]}},
    ],
    ids=str,
)
def test_lut_conv_pool_quant_refuses_what_it_does_not_compute(change):
    model = int_stem_model(**change)
    after = copy.deepcopy(model)
    assert fuse_lut_conv_pool_quant(after.graph, DOMAIN) == 0
    assert after == model
