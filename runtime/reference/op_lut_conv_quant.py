"""LutConvQuant: ``ThresholdQuant(LutConv(...), QScale, QThresholds)`` in one op
(docs/onnx-ops.md), computed by composing the two references."""

from __future__ import annotations

from onnx.reference.op_run import OpRun

from runtime.reference.op_lut_conv import lut_conv
from runtime.reference.op_threshold_quant import check_quant_params, quantize
from runtime.schema import DOMAIN, attribute_defaults

_DEFAULTS = attribute_defaults("LutConvQuant")


class LutConvQuant(OpRun):
    op_domain = DOMAIN

    # Bias and Residual have no defaults: required inputs follow them, so a node lists all 8
    # (with "" for an absent one, which the evaluator passes as None).
    def _run(
        self,
        X,
        Codes,
        Codebook,
        Scale,
        Bias,
        Residual,
        QScale,
        QThresholds,
        bits=_DEFAULTS["bits"],
        kernel_shape=_DEFAULTS["kernel_shape"],
        strides=_DEFAULTS["strides"],
        pads=_DEFAULTS["pads"],
        dilations=_DEFAULTS["dilations"],
        group=_DEFAULTS["group"],
        relu=_DEFAULTS["relu"],
    ):
        op = "LutConvQuant"
        qscale, thr = check_quant_params(op, QScale, QThresholds, ("QScale", "QThresholds"))
        attrs = dict(bits=bits, kernel_shape=kernel_shape, strides=strides, pads=pads)
        attrs.update(dilations=dilations, group=group, relu=relu)
        y = lut_conv(op, X, Codes, Codebook, Scale, Bias, Residual, **attrs)
        return (quantize(y, qscale, thr),)
