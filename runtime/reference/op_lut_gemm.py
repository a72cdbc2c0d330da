"""LutGemm: ``Y = Scale[m] * X @ Codebook[unpack(Codes)]^T + Bias[m]`` (docs/onnx-ops.md)."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from runtime.reference._common import (
    check_bits,
    check_codebook,
    check_scale_bias,
    check_tensor,
    epilogue,
    lookup,
)
from runtime.schema import DOMAIN, attribute_defaults

_DEFAULTS = attribute_defaults("LutGemm")


class LutGemm(OpRun):
    op_domain = DOMAIN

    def _run(self, X, Codes, Codebook, Scale, Bias=None, bits=_DEFAULTS["bits"]):
        op = "LutGemm"
        bits = check_bits(op, bits)
        X = check_tensor(op, "X", X, "uint8", 2)
        codebook = check_codebook(op, Codebook, bits)
        w = lookup(op, Codes, codebook, bits, None, X.shape[1])
        scale, bias = check_scale_bias(op, Scale, Bias, w.shape[0])
        acc = X.astype(np.float64) @ w.astype(np.float64).T  # [N, M], float64 accumulation
        return (epilogue(acc, scale, bias, axis=1),)
