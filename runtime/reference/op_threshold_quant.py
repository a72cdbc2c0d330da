"""ThresholdQuant: ``Q = #{i : Scale * X >= Thresholds[i]}`` as uint8 (docs/onnx-ops.md)."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from runtime.reference._common import check_tensor
from runtime.schema import DOMAIN

MAX_THRESHOLDS = 255


def check_quant_params(
    op: str, scale: object, thresholds: object, names: tuple[str, str] = ("Scale", "Thresholds")
) -> tuple[np.float32, np.ndarray]:
    """The scalar scale and the thresholds (float ``[T]``, ``1 <= T <= 255``, non-decreasing,
    no NaN), else ValueError; ``names`` are the inputs' names in the caller's op."""
    s_name, t_name = names
    scale = check_tensor(op, s_name, scale, "float")
    if scale.shape not in ((), (1,)):
        raise ValueError(f"{op}: {s_name} must be a scalar ([] or [1]), got shape {scale.shape}")
    thr = check_tensor(op, t_name, thresholds, "float", 1)
    if not 1 <= thr.shape[0] <= MAX_THRESHOLDS:
        raise ValueError(
            f"{op}: {t_name} length must be in 1..{MAX_THRESHOLDS}, got {thr.shape[0]}"
        )
    if np.isnan(thr).any() or (np.diff(thr) < 0).any():
        raise ValueError(f"{op}: {t_name} must be non-decreasing (and not NaN)")
    return np.float32(scale.reshape(())), thr


def quantize(x: np.ndarray, scale: np.float32, thresholds: np.ndarray) -> np.ndarray:
    """``#{i : scale * x >= thresholds[i]}`` as uint8 of x's shape (validated parameters)."""
    # One float32 multiply, as the PyTorch model does; then count thresholds <= value.
    v = scale * x
    q = np.where(np.isnan(v), 0, np.searchsorted(thresholds, v, side="right"))  # NaN -> level 0
    return q.astype(np.uint8).reshape(x.shape)


class ThresholdQuant(OpRun):
    op_domain = DOMAIN

    def _run(self, X, Scale, Thresholds):
        op = "ThresholdQuant"
        X = check_tensor(op, "X", X, "float")
        scale, thr = check_quant_params(op, Scale, Thresholds)
        return (quantize(X, scale, thr),)
