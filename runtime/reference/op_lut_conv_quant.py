"""LutConvQuant: ``ThresholdQuant(LutConv(...), QScale, QThresholds)`` in one op, and
optionally Q2 with a second quantizer (docs/onnx-ops.md), computed by composing the two
references."""

from __future__ import annotations

from onnx.reference.op_run import OpRun

from runtime.reference.op_lut_conv import level_output_wanted, lut_conv
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
        QScale2=None,
        QThresholds2=None,
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
        op = "LutConvQuant"
        qscale, thr = check_quant_params(op, QScale, QThresholds, ("QScale", "QThresholds"))
        second = None
        if level_output_wanted(op, self.onnx_node.output, QScale2, QThresholds2, "2"):
            names = ("QScale2", "QThresholds2")
            second = check_quant_params(op, QScale2, QThresholds2, names)
        attrs = dict(bits=bits, kernel_shape=kernel_shape, strides=strides, pads=pads)
        attrs.update(dilations=dilations, group=group, relu=relu, channels_last=channels_last)
        attrs.update(shortcut_bits=shortcut_bits, shortcut_strides=shortcut_strides)
        shortcut = (ShortcutX, ShortcutCodes, ShortcutCodebook, ShortcutScale, ShortcutBias)
        y = lut_conv(op, X, Codes, Codebook, Scale, Bias, Residual, shortcut=shortcut, **attrs)
        q = quantize(y, qscale, thr)
        return (q,) if second is None else (q, quantize(y, *second))
