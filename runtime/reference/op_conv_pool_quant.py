"""ConvPoolQuant: a float convolution (+ bias, optional ReLU), max pooling, the result written
channels last as Y and its ThresholdQuant levels as Q (docs/onnx-ops.md)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from onnx.reference.op_run import OpRun

from runtime.reference._common import check_flag, check_tensor, check_window, im2col
from runtime.reference.op_threshold_quant import check_quant_params, quantize
from runtime.schema import DOMAIN, attribute_defaults

_DEFAULTS = attribute_defaults("ConvPoolQuant")


def _out_size(size: int, kernel: int, stride: int, before: int, after: int) -> int:
    return (size + before + after - kernel) // stride + 1


def max_pool(z: np.ndarray, kernel, strides, pads) -> np.ndarray:
    """ONNX MaxPool of NCHW ``z`` (ceil_mode 0): padding never wins (-inf)."""
    (kh, kw), (sh, sw), (top, left, bottom, right) = kernel, strides, pads
    zp = np.pad(z, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=-np.inf)
    ph = _out_size(z.shape[2], kh, sh, top, bottom)
    pw = _out_size(z.shape[3], kw, sw, left, right)
    cols = im2col(zp, (kh, kw), (sh, sw), (1, 1), (ph, pw))  # [N, C, kH, kW, PH, PW]
    return cols.max(axis=(2, 3))


class Window(NamedTuple):
    """The validated window attributes of ConvPoolQuant / LutConvPoolQuant and the output
    sizes of one input: convolution (kernel, strides, pads [top, left, bottom, right], OH x
    OW), ReLU, and the pooling window."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    relu: bool
    pool_kernel: tuple[int, ...]
    pool_strides: tuple[int, ...]
    pool_pads: tuple[int, ...]
    out_hw: tuple[int, int]


def conv_pool_window(
    op: str,
    x_shape,
    *,
    kernel_shape,
    strides,
    pads,
    relu,
    pool_kernel_shape,
    pool_strides,
    pool_pads,
) -> Window:
    """The attributes checked (docs/onnx-ops.md, "Errors"), with the sizes for an input of
    ``x_shape`` [N, C, H, W]: both outputs (convolution and pooled) not empty, and the padded
    input below 2^31 values per image; else ValueError."""
    kh, kw = check_window(op, "kernel_shape", kernel_shape, 2, 1)
    sh, sw = check_window(op, "strides", strides, 2, 1)
    top, left, bottom, right = check_window(op, "pads", pads, 4, 0)
    relu = check_flag(op, "relu", relu)
    pool_kernel = check_window(op, "pool_kernel_shape", pool_kernel_shape, 2, 1)
    pool_strides = check_window(op, "pool_strides", pool_strides, 2, 1)
    pool_pads = check_window(op, "pool_pads", pool_pads, 4, 0)
    if max(pool_kernel) > 64:
        raise ValueError(f"{op}: attribute pool_kernel_shape entries must be <= 64")
    for d in range(2):
        if max(pool_pads[d], pool_pads[d + 2]) >= pool_kernel[d]:
            raise ValueError(f"{op}: attribute pool_pads must be below pool_kernel_shape")
    _, c, h, w = x_shape
    if c * (h + top + bottom) * (w + left + right) >= 1 << 31:
        raise ValueError(f"{op}: X is too large: C * padded H * padded W must stay below 2^31")
    oh = _out_size(h, kh, sh, top, bottom)
    ow = _out_size(w, kw, sw, left, right)
    if oh < 1 or ow < 1:
        raise ValueError(f"{op}: empty convolution output {oh}x{ow}")
    ph = _out_size(oh, pool_kernel[0], pool_strides[0], pool_pads[0], pool_pads[2])
    pw = _out_size(ow, pool_kernel[1], pool_strides[1], pool_pads[1], pool_pads[3])
    if ph < 1 or pw < 1:
        raise ValueError(f"{op}: empty pooled output {ph}x{pw}")
    pads = (top, left, bottom, right)
    return Window((kh, kw), (sh, sw), pads, relu, pool_kernel, pool_strides, pool_pads, (oh, ow))


def conv_columns(xp: np.ndarray, win: Window) -> np.ndarray:
    """im2col of the padded input ``xp`` [N, C, Hp, Wp] as [N, C * kH * kW, OH * OW]."""
    n, c = xp.shape[:2]
    cols = im2col(xp, win.kernel, win.strides, (1, 1), win.out_hw)
    return cols.reshape(n, c * win.kernel[0] * win.kernel[1], -1)


def relu_pool_nhwc(z: np.ndarray, win: Window) -> np.ndarray:
    """ReLU (when set), max pooling and the transpose to NHWC of the float32 ``z`` [N, M, OH,
    OW]: Y."""
    if win.relu:
        z = np.maximum(z, np.float32(0))  # NaN stays NaN
    y = max_pool(z, win.pool_kernel, win.pool_strides, win.pool_pads)
    return np.ascontiguousarray(y.transpose(0, 2, 3, 1), dtype=np.float32)


def conv_pool(op: str, X, W, B, **attrs) -> np.ndarray:
    """ConvPoolQuant's Y (float32 ``[N, PH, PW, M]``), validated; ``op`` names the caller;
    ``attrs``: the window attributes of conv_pool_window."""
    X = check_tensor(op, "X", X, "float", 4)
    W = check_tensor(op, "W", W, "float", 4)
    win = conv_pool_window(op, X.shape, **attrs)
    n, c = X.shape[:2]
    kh, kw = win.kernel
    m = W.shape[0]
    if W.shape[1:] != (c, kh, kw) or m < 1:
        raise ValueError(f"{op}: W must have shape [M, {c}, {kh}, {kw}], got {list(W.shape)}")
    if B is not None:
        B = check_tensor(op, "B", B, "float", 1)
        if B.shape != (m,):
            raise ValueError(f"{op}: B must have shape [{m}], got {list(B.shape)}")

    top, left, bottom, right = win.pads
    xp = np.pad(X, ((0, 0), (0, 0), (top, bottom), (left, right))).astype(np.float64)
    cols = conv_columns(xp, win)
    acc = np.matmul(W.astype(np.float64).reshape(m, -1)[None], cols)
    z = acc.reshape(n, m, *win.out_hw).astype(np.float32)  # the float64 sum rounded once
    if B is not None:
        z = z + B.reshape(1, m, 1, 1)  # one float32 addition, as Conv's bias
    return relu_pool_nhwc(z, win)


class ConvPoolQuant(OpRun):
    op_domain = DOMAIN

    def _run(
        self,
        X,
        W,
        B,
        QScale,
        QThresholds,
        kernel_shape=_DEFAULTS["kernel_shape"],
        strides=_DEFAULTS["strides"],
        pads=_DEFAULTS["pads"],
        relu=_DEFAULTS["relu"],
        pool_kernel_shape=_DEFAULTS["pool_kernel_shape"],
        pool_strides=_DEFAULTS["pool_strides"],
        pool_pads=_DEFAULTS["pool_pads"],
    ):
        op = "ConvPoolQuant"
        quant = check_quant_params(op, QScale, QThresholds, ("QScale", "QThresholds"))
        attrs = dict(kernel_shape=kernel_shape, strides=strides, pads=pads, relu=relu)
        attrs.update(pool_kernel_shape=pool_kernel_shape, pool_strides=pool_strides)
        y = conv_pool(op, X, W, B, pool_pads=pool_pads, **attrs)
        return y, quantize(y, *quant)
