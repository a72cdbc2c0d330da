"""LutConvPoolQuant: ConvPoolQuant on uint8 input levels with codebook weights (the integer-input
first layer): LutConv's inputs and arithmetic with the levels taken relative to ``x_zero_point``
(the padding level), then ConvPoolQuant's ReLU, max pooling, NHWC output Y and its
ThresholdQuant levels Q (docs/onnx-ops.md)."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from runtime.reference._common import (
    check_bits,
    check_codebook,
    check_int,
    check_scale_bias,
    check_tensor,
    epilogue,
    lookup,
)
from runtime.reference.op_conv_pool_quant import conv_columns, conv_pool_window, relu_pool_nhwc
from runtime.reference.op_threshold_quant import check_quant_params, quantize
from runtime.schema import DOMAIN, attribute_defaults

_DEFAULTS = attribute_defaults("LutConvPoolQuant")


def lut_conv_pool(
    op: str, X, Codes, Codebook, Scale, Bias, *, bits, x_zero_point, **window
) -> np.ndarray:
    """LutConvPoolQuant's Y (float32 ``[N, PH, PW, M]``), validated; ``window``: the
    attributes of conv_pool_window."""
    bits = check_bits(op, bits)
    zp = check_int(op, "x_zero_point", x_zero_point, 0)
    if zp > 255:
        raise ValueError(f"{op}: attribute x_zero_point must be in 0..255, got {zp}")
    X = check_tensor(op, "X", X, "uint8", 4)
    win = conv_pool_window(op, X.shape, **window)
    n, c = X.shape[:2]
    kh, kw = win.kernel
    codebook = check_codebook(op, Codebook, bits)
    wt = lookup(op, Codes, codebook, bits, None, c * kh * kw)  # [M, C*kH*kW]
    m = wt.shape[0]
    if m < 1:
        raise ValueError(f"{op}: Codes must have at least one row (output channel)")
    scale, bias = check_scale_bias(op, Scale, Bias, m)

    top, left, bottom, right = win.pads
    # level - x_zero_point, padded with 0 (the padding level x_zero_point adds nothing)
    xp = np.pad(X.astype(np.float64) - zp, ((0, 0), (0, 0), (top, bottom), (left, right)))
    acc = np.matmul(wt.astype(np.float64)[None], conv_columns(xp, win))  # float64 sums
    z = epilogue(acc.reshape(n, m, *win.out_hw), scale, bias, axis=1)
    return relu_pool_nhwc(z, win)


class LutConvPoolQuant(OpRun):
    op_domain = DOMAIN

    # Bias has no default: required inputs follow it, so a node lists it ("" when absent,
    # which the evaluator passes as None).
    def _run(
        self,
        X,
        Codes,
        Codebook,
        Scale,
        Bias,
        QScale,
        QThresholds,
        bits=_DEFAULTS["bits"],
        kernel_shape=_DEFAULTS["kernel_shape"],
        strides=_DEFAULTS["strides"],
        pads=_DEFAULTS["pads"],
        x_zero_point=_DEFAULTS["x_zero_point"],
        relu=_DEFAULTS["relu"],
        pool_kernel_shape=_DEFAULTS["pool_kernel_shape"],
        pool_strides=_DEFAULTS["pool_strides"],
        pool_pads=_DEFAULTS["pool_pads"],
    ):
        op = "LutConvPoolQuant"
        quant = check_quant_params(op, QScale, QThresholds, ("QScale", "QThresholds"))
        window = dict(kernel_shape=kernel_shape, strides=strides, pads=pads, relu=relu)
        window.update(pool_kernel_shape=pool_kernel_shape, pool_strides=pool_strides)
        y = lut_conv_pool(
            op,
            X,
            Codes,
            Codebook,
            Scale,
            Bias,
            bits=bits,
            x_zero_point=x_zero_point,
            pool_pads=pool_pads,
            **window,
        )
        return y, quantize(y, *quant)
