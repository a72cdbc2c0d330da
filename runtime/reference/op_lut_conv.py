"""LutConv: 2-D convolution of uint8 levels with codebook weights, then the per-channel affine
epilogue, an optional Residual add and an optional Relu; with the optional second output Q also
``ThresholdQuant`` of the result (docs/onnx-ops.md)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx.reference.op_run import OpRun

from runtime.reference._common import (
    check_bits,
    check_codebook,
    check_flag,
    check_int,
    check_scale_bias,
    check_tensor,
    check_window,
    epilogue,
    im2col,
    lookup,
)
from runtime.reference.op_threshold_quant import check_quant_params, quantize
from runtime.schema import DOMAIN, attribute_defaults

_DEFAULTS = attribute_defaults("LutConv")


def lut_conv(
    op: str,
    X,
    Codes,
    Codebook,
    Scale,
    Bias,
    Residual,
    *,
    bits,
    kernel_shape,
    strides,
    pads,
    dilations,
    group,
    relu,
    channels_last=0,
    shortcut: Sequence[object] = (None,) * 5,
    shortcut_bits=0,
    shortcut_strides=(1, 1),
) -> np.ndarray:
    """LutConv's output Y (float32 ``[N, M, OH, OW]``, ``[N, OH, OW, M]`` with channels_last),
    validated; ``op`` names the caller in errors (LutConvQuant computes its float tensor here
    too). ``shortcut``: ShortcutX, ShortcutCodes, ShortcutCodebook, ShortcutScale, ShortcutBias
    (all None: no shortcut), whose 1x1 convolution takes Residual's place."""
    bits = check_bits(op, bits)
    kh, kw = check_window(op, "kernel_shape", kernel_shape, 2, 1)
    strides = check_window(op, "strides", strides, 2, 1)
    top, left, bottom, right = check_window(op, "pads", pads, 4, 0)
    dilations = check_window(op, "dilations", dilations, 2, 1)
    group = check_int(op, "group", group, 1)
    relu = check_flag(op, "relu", relu)
    last = check_flag(op, "channels_last", channels_last)
    X = check_tensor(op, "X", X, "uint8", 4)
    if last:  # the NCHW computation on transposed X and Residual, Y transposed back
        X = X.transpose(0, 3, 1, 2)
    n, c, h, w = X.shape
    if c % group:
        raise ValueError(f"{op}: input channels {c} not divisible by group {group}")
    g = c // group
    codebook = check_codebook(op, Codebook, bits)
    wt = lookup(op, Codes, codebook, bits, None, g * kh * kw)  # [M, G*kH*kW]
    m = wt.shape[0]
    if m % group:
        raise ValueError(f"{op}: output channels {m} not divisible by group {group}")
    scale, bias = check_scale_bias(op, Scale, Bias, m)
    (sh, sw), (dh, dw) = strides, dilations
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"{op}: empty output spatial size {oh}x{ow}")
    shape = (n, oh, ow, m) if last else (n, m, oh, ow)  # Y's, in the node's layout
    if Residual is not None:
        Residual = check_tensor(op, "Residual", Residual, "float", 4)
        if Residual.shape != shape:
            raise ValueError(
                f"{op}: Residual must have the output's shape {list(shape)}, "
                f"got {list(Residual.shape)}"
            )
        if last:
            Residual = Residual.transpose(0, 3, 1, 2)

    if any(v is not None for v in shortcut):
        if any(v is None for v in shortcut[:4]):
            raise ValueError(
                f"{op}: ShortcutX, ShortcutCodes, ShortcutCodebook and ShortcutScale go together"
            )
        if Residual is not None:
            raise ValueError(f"{op}: a node has a Residual or a shortcut, not both")
        if check_int(op, "shortcut_bits", shortcut_bits, 0) == 0:
            raise ValueError(f"{op}: the shortcut needs shortcut_bits")
        attrs = dict(bits=shortcut_bits, kernel_shape=[1, 1], strides=shortcut_strides)
        attrs.update(pads=[0] * 4, dilations=[1, 1], group=1, relu=0, channels_last=int(last))
        s = lut_conv(f"{op} shortcut", *shortcut, None, **attrs)
        if s.shape != shape:
            got = list(s.shape)
            raise ValueError(
                f"{op}: the shortcut's output must have Y's shape {list(shape)}, got {got}"
            )
        Residual = s.transpose(0, 3, 1, 2) if last else s

    xp = np.pad(X, ((0, 0), (0, 0), (top, bottom), (left, right))).astype(np.float64)
    cols = im2col(xp, (kh, kw), strides, dilations, (oh, ow))
    cols = cols.reshape(n, group, g * kh * kw, oh * ow)
    wg = wt.astype(np.float64).reshape(group, m // group, g * kh * kw)
    acc = np.matmul(wg[None], cols).reshape(n, m, oh, ow)  # float64 accumulation
    y = epilogue(acc, scale, bias, axis=1)
    if Residual is not None:
        y = y + Residual  # one float32 addition, as the unfused Add
    if relu:
        y = np.maximum(y, np.float32(0))  # NaN stays NaN
    return np.ascontiguousarray(y.transpose(0, 2, 3, 1)) if last else y


def level_output_wanted(
    op: str, outputs: Sequence[str], qscale: object, qthresholds: object, suffix: str = ""
) -> bool:
    """Whether a node lists its second output (LutConv's Q, LutConvQuant's Q2 with suffix
    "2"): it must then have QScale and QThresholds (+ suffix), and may have them only then,
    else ValueError; ``outputs`` are its output names ("" is an absent output)."""
    wanted = len(outputs) > 1 and outputs[1] != ""
    out = "Q2" if suffix else "Q"
    params = f"QScale{suffix} and QThresholds{suffix}"
    if wanted and (qscale is None or qthresholds is None):
        raise ValueError(f"{op}: output {out} needs inputs {params}")
    if not wanted and (qscale is not None or qthresholds is not None):
        raise ValueError(f"{op}: {params} need output {out}")
    return wanted


class LutConv(OpRun):
    op_domain = DOMAIN

    def _run(
        self,
        X,
        Codes,
        Codebook,
        Scale,
        Bias=None,
        Residual=None,
        QScale=None,
        QThresholds=None,
        ShortcutX=None,
        ShortcutCodes=None,
        ShortcutCodebook=None,
        ShortcutScale=None,
        ShortcutBias=None,
        bits=_DEFAULTS["bits"],
        kernel_shape=_DEFAULTS["kernel_shape"],
        strides=_DEFAULTS["strides"],
        pads=_DEFAULTS["pads"],
        dilations=_DEFAULTS["dilations"],
        group=_DEFAULTS["group"],
        relu=_DEFAULTS["relu"],
        channels_last=_DEFAULTS["channels_last"],
        shortcut_bits=_DEFAULTS["shortcut_bits"],
        shortcut_strides=_DEFAULTS["shortcut_strides"],
    ):
        op = "LutConv"
        quant = None
        if level_output_wanted(op, self.onnx_node.output, QScale, QThresholds):
            quant = check_quant_params(op, QScale, QThresholds, ("QScale", "QThresholds"))
        attrs = dict(bits=bits, kernel_shape=kernel_shape, strides=strides, pads=pads)
        attrs.update(dilations=dilations, group=group, relu=relu, channels_last=channels_last)
        attrs.update(shortcut_bits=shortcut_bits, shortcut_strides=shortcut_strides)
        shortcut = (ShortcutX, ShortcutCodes, ShortcutCodebook, ShortcutScale, ShortcutBias)
        y = lut_conv(op, X, Codes, Codebook, Scale, Bias, Residual, shortcut=shortcut, **attrs)
        return (y,) if quant is None else (y, quantize(y, *quant))
