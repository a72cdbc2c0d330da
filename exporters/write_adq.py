"""The `adq` format: ai.adq custom ops, bit-packed codes; the smallest file (needs the op library).

Layer with a quantized input:  ThresholdQuant(x) -> uint8 levels -> LutConv / LutGemm.
Layer with a float input (a W8 first layer): LutDequant -> Conv / Gemm -> Mul / Add.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from runtime.packing import pack_rows

from .fold import FoldedLayer, FoldedModel
from .skeleton import DOMAIN
from .writer import affine_nodes, init, replace_placeholders, set_metadata, set_opsets

OPSET = 20


def threshold_node(
    graph: onnx.GraphProto, layer: FoldedLayer, x: str
) -> tuple[onnx.NodeProto, str]:
    """ThresholdQuant of a layer's input; returns the node and its uint8 output name."""
    act = layer.act
    assert act is not None
    scale = init(graph, layer, "act_scale", act.scale.reshape(1))
    thresholds = init(graph, layer, "act_thresholds", act.thresholds)
    q = f"{layer.name}/levels"
    node = helper.make_node(
        "ThresholdQuant",
        [x, scale, thresholds],
        [q],
        name=f"{layer.name}/ThresholdQuant",
        domain=DOMAIN,
    )
    return node, q


def emit_adq(graph: onnx.GraphProto, layer: FoldedLayer, x: str, y: str) -> list[onnx.NodeProto]:
    """The ai.adq nodes of one layer."""
    codes = init(graph, layer, "codes", pack_rows(layer.codes, layer.bits))
    codebook = init(graph, layer, "codebook", layer.codebook)
    if layer.act is None:
        w = f"{layer.name}/weight"
        nodes = [
            helper.make_node(
                "LutDequant",
                [codes, codebook],
                [w],
                name=f"{layer.name}/LutDequant",
                domain=DOMAIN,
                bits=layer.bits,
                shape=list(layer.codes.shape),
            )
        ]
        acc = f"{layer.name}/acc"
        if layer.kind == "conv":
            nodes.append(
                helper.make_node("Conv", [x, w], [acc], name=f"{layer.name}/Conv", **layer.conv)
            )
        else:
            nodes.append(
                helper.make_node("Gemm", [x, w], [acc], name=f"{layer.name}/Gemm", transB=1)
            )
        return nodes + affine_nodes(graph, layer, acc, y, layer.out_scale)
    tq, q = threshold_node(graph, layer, x)
    scale = init(graph, layer, "scale", (layer.act.step * layer.out_scale).astype(np.float32))
    bias = init(graph, layer, "bias", layer.out_bias)
    op = "LutConv" if layer.kind == "conv" else "LutGemm"
    attrs = {"bits": layer.bits, **layer.conv}
    lut = helper.make_node(
        op,
        [q, codes, codebook, scale, bias],
        [y],
        name=f"{layer.name}/{op}",
        domain=DOMAIN,
        **attrs,
    )
    return [tq, lut]


def write_adq(folded: FoldedModel) -> onnx.ModelProto:
    """The adq-format model of a folded checkpoint."""
    model = replace_placeholders(folded, emit_adq)
    set_opsets(model, OPSET, adq_domain=True)
    set_metadata(model, folded, "adq", {"code_packing": "row-aligned, LSB-first bit stream"})
    return model
