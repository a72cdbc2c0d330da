"""The `int8` format: codebooks snapped to an integer grid, integer convolution on uint8 levels.

Per layer: codebook C ~ s_w * c with integers c in [-qmax, qmax]; the weight initializer is the
int8 tensor c[codes]. Input levels q (uint8, from the standard-op thresholds) go through
ConvInteger / MatMulInteger into int32, then y = (s_w * step * out_scale) * acc + out_bias.

qmax avoids the AVX2 u8 x s8 pair-sum saturation (two products must fit int16):
qmax = min(127, floor(32767 / (2 * (2^a_bits - 1)))), 64 for 8-bit activations.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from adq_deploy.checkpoint import Checkpoint
from adq_deploy.quant import QuantLayerMixin

from .fold import FoldedLayer, FoldedModel
from .write_standard import count_nodes
from .writer import affine_nodes, init, replace_placeholders, set_metadata, set_opsets

OPSET = 21


def int_range(a_bits: int | None) -> int:
    """Largest |integer weight| that cannot saturate u8 x s8 pair sums (AVX2 without VNNI)."""
    if a_bits is None:
        return 127
    return int(min(127, 32767 // (2 * (2**a_bits - 1))))


def snap_codebook(codebook: np.ndarray, qmax: int) -> tuple[float, np.ndarray, float]:
    """(s_w, integer levels, max |C - s_w c|): the codebook on the grid s_w * {-qmax..qmax}."""
    top = float(np.abs(codebook).max())
    scale = top / qmax if top > 0 else 1.0
    ints = np.clip(np.round(codebook / scale), -qmax, qmax).astype(np.int8)
    err = float(np.abs(codebook - scale * ints.astype(np.float64)).max())
    return scale, ints, err


# adq --int-codebooks: the op library sums u8 x s8 exactly (VNNI) or in float, never in
# saturating pairs, so every layer gets the whole int8 range (8-bit-input layers too).
INT_CODEBOOKS_QMAX = 127


def layer_qmax(layer: FoldedLayer) -> int:
    """The int8 format's integer range for a layer: what its input bits allow."""
    return int_range(layer.act.bits if layer.act else None)


def snapped(layer: FoldedLayer, qmax: int | None = None) -> tuple[float, np.ndarray, float]:
    """snap_codebook for a layer, on s_w * {-qmax..qmax} (default: layer_qmax)."""
    return snap_codebook(layer.codebook, layer_qmax(layer) if qmax is None else qmax)


def emit_int8(graph: onnx.GraphProto, layer: FoldedLayer, x: str, y: str) -> list[onnx.NodeProto]:
    """The integer nodes of one layer."""
    n = layer.name
    scale_w, ints, _ = snapped(layer)
    w_int = ints[layer.codes]
    nodes: list[onnx.NodeProto] = []
    acc = f"{n}/acc"
    if layer.act is None:
        w = init(graph, layer, "weight_int8", w_int)
        nodes.append(
            helper.make_node("Cast", [w], [f"{n}/wf"], name=f"{n}/CastW", to=TensorProto.FLOAT)
        )
        sw = init(graph, layer, "weight_scale", np.array([scale_w], dtype=np.float32))
        nodes.append(helper.make_node("Mul", [f"{n}/wf", sw], [f"{n}/weight"], name=f"{n}/ScaleW"))
        if layer.kind == "conv":
            nodes.append(helper.make_node("Conv", [x, f"{n}/weight"], [acc], **layer.conv))
        else:
            nodes.append(helper.make_node("Gemm", [x, f"{n}/weight"], [acc], transB=1))
        return nodes + affine_nodes(graph, layer, acc, y, layer.out_scale)
    act_nodes, levels = count_nodes(graph, layer, x)
    nodes += act_nodes  # levels as float; the level value goes into the output scale
    q = f"{n}/q_u8"
    nodes.append(helper.make_node("Cast", [levels], [q], name=f"{n}/CastQ", to=TensorProto.UINT8))
    # the zero point of a quantized network input: level z is zero, padding included
    zp = []
    if layer.act.zero_point:
        zp = [init(graph, layer, "act_zero_point", np.array(layer.act.zero_point, np.uint8))]
    acc_i = f"{n}/acc_i32"
    if layer.kind == "conv":
        w = init(graph, layer, "weight_int8", w_int)
        nodes.append(
            helper.make_node(
                "ConvInteger", [q, w, *zp], [acc_i], name=f"{n}/ConvInteger", **layer.conv
            )
        )
    else:
        w = init(graph, layer, "weight_int8_t", np.ascontiguousarray(w_int.T))
        nodes.append(
            helper.make_node("MatMulInteger", [q, w, *zp], [acc_i], name=f"{n}/MatMulInteger")
        )
    nodes.append(
        helper.make_node("Cast", [acc_i], [acc], name=f"{n}/CastAcc", to=TensorProto.FLOAT)
    )
    out_scale = (np.float64(scale_w) * layer.act.step * layer.out_scale).astype(np.float32)
    return nodes + affine_nodes(graph, layer, acc, y, out_scale)


def snapped_model(
    checkpoint: Checkpoint, folded: FoldedModel, qmax: dict[str, int] | None = None
) -> nn.Module:
    """The PyTorch reference of a snapped export (int8, adq --int-codebooks): a copy of the
    checkpoint's model whose codebooks are snapped as `snapped` does, with the same codes;
    `qmax`: each layer's range (an export's `adq.snapping`; default: layer_qmax)."""
    model = copy.deepcopy(checkpoint.model).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}
    with torch.no_grad():
        for name, layer in layers.items():
            f = folded.layers[name]
            scale, ints, _ = snapped(f, None if qmax is None else qmax[name])
            book = (np.float64(scale) * ints.astype(np.float64)).astype(np.float32)
            weight = torch.from_numpy(book[f.codes])
            layer.weight_quant.codebook.copy_(torch.from_numpy(book))
            layer.weight.copy_(weight)
            # the forward pass reassigns codes: it must find the snapped levels again
            if not torch.equal(layer.quantized_weight(), weight):
                raise ValueError(f"{name}: the snapped codebook does not keep the codes")
    return model


def snapping_report(folded: FoldedModel, qmax: int | None = None) -> dict[str, dict[str, float]]:
    """Per layer: weight scale, integer range and max |codebook - snapped| (absolute, relative);
    `qmax` as in `snapped`."""
    report = {}
    for name, layer in folded.layers.items():
        scale, _, err = snapped(layer, qmax)
        top = float(np.abs(layer.codebook).max()) or 1.0
        report[name] = {
            "weight_scale": scale,
            "qmax": layer_qmax(layer) if qmax is None else qmax,
            "max_abs_error": err,
            "max_rel_error": err / top,
        }
    return report


def write_int8(folded: FoldedModel) -> onnx.ModelProto:
    """The int8-format model of a folded checkpoint."""
    model = replace_placeholders(folded, emit_int8)
    set_opsets(model, OPSET, adq_domain=False)
    set_metadata(model, folded, "int8", {"snapping": snapping_report(folded)})
    return model
