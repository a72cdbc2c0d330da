"""LutDequant: ``W = Codebook[unpack(Codes)]`` reshaped to ``shape`` (docs/onnx-ops.md)."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from runtime.reference._common import check_bits, check_codebook, check_ints, lookup
from runtime.schema import DOMAIN, attribute_defaults

_DEFAULTS = attribute_defaults("LutDequant")


class LutDequant(OpRun):
    op_domain = DOMAIN

    def _run(self, Codes, Codebook, bits=_DEFAULTS["bits"], shape=_DEFAULTS["shape"]):
        op = "LutDequant"
        bits = check_bits(op, bits)
        shape = check_ints(op, "shape", shape, None, 1)
        if not shape:
            raise ValueError(f"{op}: attribute shape must have at least one entry")
        codebook = check_codebook(op, Codebook, bits)
        row_len = int(np.prod(shape[1:], dtype=np.int64))
        w = lookup(op, Codes, codebook, bits, shape[0], row_len)
        return (w.reshape(shape),)
