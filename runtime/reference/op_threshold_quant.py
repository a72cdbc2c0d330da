"""ThresholdQuant: ``Q = #{i : Scale * X >= Thresholds[i]}`` as uint8 (docs/onnx-ops.md)."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from runtime.reference._common import check_tensor
from runtime.schema import DOMAIN

MAX_THRESHOLDS = 255


class ThresholdQuant(OpRun):
    op_domain = DOMAIN

    def _run(self, X, Scale, Thresholds):
        op = "ThresholdQuant"
        X = check_tensor(op, "X", X, "float")
        Scale = check_tensor(op, "Scale", Scale, "float")
        if Scale.shape not in ((), (1,)):
            raise ValueError(f"{op}: Scale must be a scalar ([] or [1]), got shape {Scale.shape}")
        thr = check_tensor(op, "Thresholds", Thresholds, "float", 1)
        if not 1 <= thr.shape[0] <= MAX_THRESHOLDS:
            raise ValueError(
                f"{op}: Thresholds length must be in 1..{MAX_THRESHOLDS}, got {thr.shape[0]}"
            )
        if np.isnan(thr).any() or (np.diff(thr) < 0).any():
            raise ValueError(f"{op}: Thresholds must be non-decreasing (and not NaN)")
        # One float32 multiply, as the PyTorch model does; then count thresholds <= value.
        v = np.float32(Scale.reshape(())) * X
        q = np.where(np.isnan(v), 0, np.searchsorted(thr, v, side="right"))  # NaN -> level 0
        return (q.astype(np.uint8).reshape(X.shape),)
