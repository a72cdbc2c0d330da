"""The `adq` format: ai.adq custom ops, bit-packed codes; the smallest file (needs the op library).

Layer with a quantized input:  ThresholdQuant(x) -> uint8 levels -> LutConv / LutGemm.
Layer with a float input (a W8 first layer): LutDequant -> Conv / Gemm -> Mul / Add.
First layer on a quantized network input (input_bits): ThresholdQuant -> DequantizeLinear (the
level values (q - z) * step, zero-padded as the model pads) -> the float-input form.
A Relu read only by ThresholdQuant nodes (positive scale and thresholds) is dropped: it cannot
change their levels. Then what follows a LutConv is fused into it (exporters.graph.fuse_lut_conv):
a residual Add whose other operand provably has the output's shape (LutConv's Residual input)
and a Relu (relu=1), when nothing else reads the intermediate values; a ThresholdQuant that
is the only reader of a LutConv output makes the two one LutConvQuant (the next layer's uint8
levels, no float tensor in between); and one beside other readers of the output (a residual
block's output: the next residual and the next conv's levels) becomes the LutConv's second
output Q (QScale, QThresholds its inputs 6, 7). The fused ops compute the same float32
operations.

With ``int_codebooks`` every codebook is snapped as the int8 format snaps it (C ~ s_w * c,
integers c; on -127..127 in every layer, INT_CODEBOOKS_QMAX, where the int8 format narrows
8-bit-input layers) and stored as the integers c, s_w folded into the layer's scale: the same
codes and file size, and LutConv runs its exact int8 x uint8 kernel (AVX-512 VNNI) on such
codebooks. That kernel reads and writes channels-last tensors without transposes, so these
models run their convolutions with channels_last = 1 (exporters.graph.to_channels_last): NHWC
between them, a Transpose where the activations enter (after the float first layer) and leave. Each
downsampling shortcut is folded into the convolution whose output it adds
(exporters.graph.fuse_shortcut): the kernel adds its 1x1 sums tile by tile, and the float
tensor between the two is never written. The float first layer with its Relu and max pooling,
up to the levels of the first quantized layer, becomes one ConvPoolQuant
(exporters.graph.fuse_conv_pool_quant); an integer first layer (a quantized network input,
whose values DequantizeLinear gives the float layer) one LutConvPoolQuant, on the levels and
the packed codes (exporters.graph.fuse_lut_conv_pool_quant).
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import onnx
from onnx import helper

from runtime.packing import pack_rows

from .fold import FoldedLayer, FoldedModel
from .graph import (
    drop_relu_before_thresholds,
    fold_constants,
    fuse_conv_pool_quant,
    fuse_lut_conv,
    fuse_lut_conv_pool_quant,
    fuse_shortcut,
    to_channels_last,
)
from .skeleton import DOMAIN
from .write_int8 import INT_CODEBOOKS_QMAX, snapped, snapping_report
from .writer import affine_nodes, init, replace_placeholders, set_metadata, set_opsets

OPSET = 20
log = logging.getLogger(__name__)


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


def emit_float_input(
    graph: onnx.GraphProto,
    layer: FoldedLayer,
    x: str,
    y: str,
    codes: str,
    codebook: str,
    s_w: np.float32,
) -> list[onnx.NodeProto]:
    """A layer on a float input: LutDequant -> Conv / Gemm -> Mul / Add."""
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
        nodes.append(helper.make_node("Gemm", [x, w], [acc], name=f"{layer.name}/Gemm", transB=1))
    out_scale = (layer.out_scale * s_w).astype(np.float32)
    return nodes + affine_nodes(graph, layer, acc, y, out_scale)


def emit_adq(
    graph: onnx.GraphProto, layer: FoldedLayer, x: str, y: str, int_codebooks: bool = False
) -> list[onnx.NodeProto]:
    """The ai.adq nodes of one layer (integer codebooks and s_w in the scale: int_codebooks)."""
    codes = init(graph, layer, "codes", pack_rows(layer.codes, layer.bits))
    levels, s_w = layer.codebook, np.float32(1.0)
    if int_codebooks:
        scale_w, ints, _ = snapped(layer, INT_CODEBOOKS_QMAX)
        levels, s_w = ints.astype(np.float32), np.float32(scale_w)
    codebook = init(graph, layer, "codebook", levels)
    if layer.act is not None and layer.act.kind == "input":
        # a quantized network input: its levels, then their values (q - z) * step, which
        # zero-pad as the model does; the float layer follows (one LutConvPoolQuant when fused)
        tq, q = threshold_node(graph, layer, x)
        x = f"{layer.name}/input_value"
        zp = init(graph, layer, "act_zero_point", np.array(layer.act.zero_point, np.uint8))
        step = init(graph, layer, "act_step", layer.act.step.reshape(()))
        dq = helper.make_node(
            "DequantizeLinear", [q, step, zp], [x], name=f"{layer.name}/DequantizeLinear"
        )
        return [tq, dq, *emit_float_input(graph, layer, x, y, codes, codebook, s_w)]
    if layer.act is None:
        return emit_float_input(graph, layer, x, y, codes, codebook, s_w)
    tq, q = threshold_node(graph, layer, x)
    scale = init(graph, layer, "scale", (layer.act.step * s_w * layer.out_scale).astype(np.float32))
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


def write_adq(
    folded: FoldedModel, int_codebooks: bool = False, channels_last: bool = True
) -> onnx.ModelProto:
    """The adq-format model of a folded checkpoint (see the module docstring for int_codebooks;
    channels_last=False keeps such a model NCHW, without the fused shortcuts)."""
    model = replace_placeholders(folded, partial(emit_adq, int_codebooks=int_codebooks))
    drop_relu_before_thresholds(model.graph, DOMAIN)
    set_opsets(model, OPSET, adq_domain=True)  # shape inference in the fusion reads the opsets
    constants = fold_constants(model)  # what onnxsim does for the other formats
    fused = fuse_lut_conv(model, DOMAIN)
    log.debug("adq: %d constant nodes folded; fusion: %s", constants, fused)
    if int_codebooks and channels_last:
        shortcuts = fuse_shortcut(model.graph, DOMAIN)
        layers = to_channels_last(model.graph, DOMAIN)
        stems = fuse_conv_pool_quant(model.graph, DOMAIN)
        stems += fuse_lut_conv_pool_quant(model.graph, DOMAIN)
        log.debug(
            "adq: %d shortcuts fused, %d layers channels-last, %d first layers with pooling fused",
            shortcuts,
            layers,
            stems,
        )
    extra: dict = {"code_packing": "row-aligned, LSB-first bit stream"}
    if int_codebooks:
        extra.update(int_codebooks="true", snapping=snapping_report(folded, INT_CODEBOOKS_QMAX))
    set_metadata(model, folded, "adq", extra)
    return model
