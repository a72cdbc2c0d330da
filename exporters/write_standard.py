"""The `standard` format: stock ONNX only, runs on any onnxruntime with no extra library.

Weights: codes stored as UINT2 (opset >= 25) / UINT4 (opset >= 21) / UINT8 tensors of the weight
shape, looked up with Cast -> Gather(codebook). Activations: levels q = ReduceSum(Cast(
GreaterOrEqual(alpha1 * x, T))) and value q * step, then the float Conv / Gemm.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .fold import FoldedLayer, FoldedModel
from .graph import constant_value, remove_unused
from .skeleton import SKELETON_OPSET
from .writer import affine_nodes, init, replace_placeholders, set_metadata, set_opsets

DEFAULT_OPSET = 25
MIN_OPSET = 13  # ReduceSum with axes as an input


def code_type(bits: int, opset: int) -> int:
    """The narrowest unsigned ONNX integer type for b-bit codes at this opset."""
    if bits <= 2 and opset >= 25:
        return TensorProto.UINT2
    if bits <= 4 and opset >= 21:
        return TensorProto.UINT4
    return TensorProto.UINT8


def codes_tensor(name: str, codes: np.ndarray, dtype: int) -> onnx.TensorProto:
    """Codes as a tensor of a (sub-byte) unsigned type, packed in raw_data."""
    flat = codes.reshape(-1).astype(np.int64)
    if dtype == TensorProto.UINT8:
        return onnx.numpy_helper.from_array(codes.astype(np.uint8), name)
    t = helper.make_tensor(name, dtype, list(codes.shape), flat.tolist())
    t.raw_data = np.asarray(t.int32_data, dtype=np.uint8).tobytes()  # packed bytes, not varints
    del t.int32_data[:]
    return t


def count_nodes(graph: onnx.GraphProto, layer: FoldedLayer, x: str) -> tuple[list, str]:
    """Standard-op ThresholdQuant: nodes and the name of the levels q (float)."""
    act = layer.act
    assert act is not None
    if act.kind == "input":
        return uniform_count_nodes(graph, layer, x)
    n = layer.name
    scale = init(graph, layer, "act_scale", act.scale.reshape(1))
    thresholds = init(graph, layer, "act_thresholds", act.thresholds)
    last = init(graph, layer, "act_axes", np.array([-1], dtype=np.int64))
    nodes = [
        helper.make_node("Mul", [x, scale], [f"{n}/xs"], name=f"{n}/ActScale"),
        helper.make_node("Unsqueeze", [f"{n}/xs", last], [f"{n}/xs1"], name=f"{n}/Unsqueeze"),
        helper.make_node("GreaterOrEqual", [f"{n}/xs1", thresholds], [f"{n}/ge"], name=f"{n}/GE"),
        helper.make_node(
            "Cast", [f"{n}/ge"], [f"{n}/gef"], name=f"{n}/CastGE", to=TensorProto.FLOAT
        ),
        helper.make_node(
            "ReduceSum", [f"{n}/gef", last], [f"{n}/levels"], name=f"{n}/Levels", keepdims=0
        ),
    ]
    return nodes, f"{n}/levels"


def uniform_count_nodes(graph: onnx.GraphProto, layer: FoldedLayer, x: str) -> tuple[list, str]:
    """The count for thresholds t0, t0 + 1, ..., t0 + T - 1 (InputQuant's, exact in float32)
    without a [..., T] comparison tensor: c = clip(floor(xs - t0) + 1, 0, T), then one step
    down where xs < t0 + c - 1 and one up where xs >= t0 + c. The rounded subtraction moves the
    floor by at most one (far outside the range the clip decides alone), so the result is
    exactly #{i : xs >= t_i}; NaN gives 0."""
    act = layer.act
    assert act is not None
    t = act.thresholds.astype(np.float64)
    if not np.array_equal(t, t[0] + np.arange(t.size)):
        raise ValueError(f"layer {layer.name}: input thresholds are not evenly spaced by 1")
    n = layer.name

    def const(suffix: str, v: float) -> str:
        return init(graph, layer, suffix, np.array([v], dtype=np.float32))

    scale = init(graph, layer, "act_scale", act.scale.reshape(1))
    t0, top = const("act_t0", float(t[0])), const("act_count", float(t.size))
    zero, one = const("act_zero", 0.0), const("act_one", 1.0)

    def node(op: str, inputs: list[str], out: str, **kw) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{n}/{out}"], name=f"{n}/{out}", **kw)

    def f32(v: str, out: str) -> onnx.NodeProto:
        return node("Cast", [v], out, to=TensorProto.FLOAT)

    nodes = [
        node("Mul", [x, scale], "xs"),
        node("Sub", [f"{n}/xs", t0], "d"),
        node("Floor", [f"{n}/d"], "fl"),
        node("Add", [f"{n}/fl", one], "c1"),
        node("Clip", [f"{n}/c1", zero, top], "c2"),
        # down: c >= 1 and xs < t0 + c - 1
        node("Add", [f"{n}/c2", t0], "tc"),
        node("Sub", [f"{n}/tc", one], "tlow"),
        node("Less", [f"{n}/xs", f"{n}/tlow"], "below"),
        node("GreaterOrEqual", [f"{n}/c2", one], "hasdown"),
        node("And", [f"{n}/below", f"{n}/hasdown"], "down"),
        f32(f"{n}/down", "downf"),
        node("Sub", [f"{n}/c2", f"{n}/downf"], "c3"),
        # up: c < T and xs >= t0 + c
        node("Add", [f"{n}/c3", t0], "thigh"),
        node("GreaterOrEqual", [f"{n}/xs", f"{n}/thigh"], "above"),
        node("Less", [f"{n}/c3", top], "hasup"),
        node("And", [f"{n}/above", f"{n}/hasup"], "up"),
        f32(f"{n}/up", "upf"),
        node("Add", [f"{n}/c3", f"{n}/upf"], "c4"),
        node("IsNaN", [f"{n}/xs"], "nan"),
        node("Where", [f"{n}/nan", zero, f"{n}/c4"], "levels"),
    ]
    return nodes, f"{n}/levels"


def level_nodes(graph: onnx.GraphProto, layer: FoldedLayer, x: str) -> tuple[list, str]:
    """Standard-op ThresholdQuant followed by the level value: nodes and (q - z) * step."""
    act = layer.act
    assert act is not None
    n = layer.name
    nodes, q = count_nodes(graph, layer, x)
    if act.zero_point:
        zp = init(graph, layer, "act_zero_point", np.array([act.zero_point], dtype=np.float32))
        nodes.append(helper.make_node("Sub", [q, zp], [f"{n}/qz"], name=f"{n}/ZeroPoint"))
        q = f"{n}/qz"
    step = init(graph, layer, "act_step", act.step.reshape(1))
    nodes.append(helper.make_node("Mul", [q, step], [f"{n}/xq"], name=f"{n}/LevelValue"))
    return nodes, f"{n}/xq"


def emitter(opset: int):
    """The emit function of the standard writer at an opset."""

    def emit(graph: onnx.GraphProto, layer: FoldedLayer, x: str, y: str) -> list[onnx.NodeProto]:
        n = layer.name
        name = f"{n}.codes"
        for old in [i for i in graph.initializer if i.name == name]:
            graph.initializer.remove(old)
        graph.initializer.append(codes_tensor(name, layer.codes, code_type(layer.bits, opset)))
        codebook = init(graph, layer, "codebook", layer.codebook)
        nodes = [
            helper.make_node(
                "Cast", [name], [f"{n}/idx"], name=f"{n}/CastCodes", to=TensorProto.INT32
            ),
            helper.make_node("Gather", [codebook, f"{n}/idx"], [f"{n}/weight"], name=f"{n}/Lookup"),
        ]
        if layer.act is not None:
            act_nodes, x = level_nodes(graph, layer, x)
            nodes += act_nodes
        acc = f"{n}/acc"
        if layer.kind == "conv":
            nodes.append(
                helper.make_node("Conv", [x, f"{n}/weight"], [acc], name=f"{n}/Conv", **layer.conv)
            )
        else:
            nodes.append(
                helper.make_node("Gemm", [x, f"{n}/weight"], [acc], name=f"{n}/Gemm", transB=1)
            )
        return nodes + affine_nodes(graph, layer, acc, y, layer.out_scale)

    return emit


def write_standard(folded: FoldedModel, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The standard-format model of a folded checkpoint at an opset (13..onnx's newest)."""
    if opset < MIN_OPSET:
        raise ValueError(
            f"--opset {opset} is too old for the standard format (needs >= {MIN_OPSET})"
        )
    model = replace_placeholders(folded, emitter(opset))
    fit_skeleton_nodes(model.graph, opset)
    set_opsets(model, opset, adq_domain=False)
    model.ir_version = max(model.ir_version, _ir_version(opset))
    set_metadata(model, folded, "standard", {"opset": opset})
    return model


# Reductions whose `axes` moved from an attribute to an input at opset 18 (ReduceSum: at 13).
AXES_INPUT_SINCE_18 = {
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
}


# Integer attributes added at an opset (default 0): left out below it.
NEW_INT_ATTRIBUTES = {
    ("BatchNormalization", "training_mode"): 14,
    ("Reshape", "allowzero"): 14,
    **{(op, "noop_with_empty_axes"): 18 for op in AXES_INPUT_SINCE_18},
}


def fit_skeleton_nodes(graph: onnx.GraphProto, opset: int) -> None:
    """Rewrite the skeleton's nodes (exported at opset SKELETON_OPSET) whose form differs at an
    older opset: BatchNormalization's `training_mode` and Reshape's `allowzero` (since 14) are
    left out, the axes input of the reductions (since 18) becomes their `axes` attribute;
    same semantics. (Relabeling the skeleton's opset is otherwise valid from 13 on.)"""
    if opset >= SKELETON_OPSET:
        return
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        for attr in list(node.attribute):
            since = NEW_INT_ATTRIBUTES.get((node.op_type, attr.name))
            if since is not None and opset < since:
                if attr.i:  # only the default (0) means the same at the older version
                    raise ValueError(
                        f"--opset {opset}: {node.op_type} with {attr.name}={attr.i} "
                        f"needs opset >= {since}"
                    )
                node.attribute.remove(attr)
        if node.op_type in AXES_INPUT_SINCE_18 and opset < 18:
            if len(node.input) > 1 and node.input[1]:
                axes = _constant(graph, node.input[1])
                if axes is None:
                    raise ValueError(
                        f"--opset {opset}: {node.op_type} with computed axes needs opset >= 18"
                    )
                del node.input[1:]
                node.attribute.append(helper.make_attribute("axes", [int(a) for a in axes]))
    remove_unused(graph)


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's tensor, else None."""
    value = constant_value(graph, name)
    if value is not None:
        return value
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            return None if attr is None else onnx.numpy_helper.to_array(attr.t)
    return None


def _ir_version(opset: int) -> int:
    """The IR version that goes with an opset (UINT4 needs IR 10, UINT2 IR 11)."""
    table = onnx.helper.VERSION_TABLE
    return min((row[1] for row in table if row[2] >= opset), default=table[-1][1])
