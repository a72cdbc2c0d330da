"""Validation and arithmetic shared by the ai.adq reference ops (docs/onnx-ops.md, "Errors")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.packing import _check_bits, packed_row_bytes, unpack_rows

_DTYPES = {"uint8": np.uint8, "float": np.float32}


def check_tensor(op: str, name: str, value: object, dtype: str, rank: int | None = None):
    """``value`` as an ndarray of the declared element type (and rank), else ValueError."""
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{op}: input {name} must be a numpy array, got {type(value).__name__}")
    if value.dtype != _DTYPES[dtype]:
        raise ValueError(f"{op}: input {name} must be {dtype}, got {value.dtype}")
    if rank is not None and value.ndim != rank:
        raise ValueError(f"{op}: input {name} must have rank {rank}, got shape {value.shape}")
    return value


def check_bits(op: str, bits: object) -> int:
    """The ``bits`` attribute as an int in 1..8, else ValueError."""
    if bits is None:
        raise ValueError(f"{op}: attribute bits is required")
    try:
        return _check_bits(bits)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"{op}: {e}") from None


def check_int(op: str, name: str, value: object, minimum: int) -> int:
    """An int attribute ``>= minimum``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{op}: attribute {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{op}: attribute {name} must be >= {minimum}, got {value}")
    return int(value)


def check_flag(op: str, name: str, value: object) -> bool:
    """A 0 / 1 int attribute as a bool, else ValueError."""
    if check_int(op, name, value, 0) > 1:
        raise ValueError(f"{op}: attribute {name} must be 0 or 1, got {value}")
    return bool(value)


def check_ints(
    op: str, name: str, value: object, length: int | None, minimum: int
) -> tuple[int, ...]:
    """An ints attribute (of ``length`` entries, each ``>= minimum``), else ValueError."""
    if value is None:
        raise ValueError(f"{op}: attribute {name} is required")
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(f"{op}: attribute {name} must be a list of ints, got {value!r}")
    items = list(value)
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in items):
        raise ValueError(f"{op}: attribute {name} must be a list of ints, got {value!r}")
    if length is not None and len(items) != length:
        raise ValueError(f"{op}: attribute {name} must have {length} entries, got {items}")
    if any(v < minimum for v in items):
        raise ValueError(f"{op}: attribute {name} entries must be >= {minimum}, got {items}")
    return tuple(int(v) for v in items)


# Window attributes (kernel shapes, strides, pads, dilations) stay below this bound, as in the
# kernels: it keeps every index computed from them far from int64 overflow.
WINDOW_LIMIT = 1 << 24


def check_window(op: str, name: str, value: object, length: int, minimum: int) -> tuple[int, ...]:
    """A window attribute: check_ints, and every entry below WINDOW_LIMIT, else ValueError."""
    items = check_ints(op, name, value, length, minimum)
    if any(v >= WINDOW_LIMIT for v in items):
        raise ValueError(f"{op}: attribute {name} entries must be below 2^24, got {list(items)}")
    return items


def check_codebook(op: str, codebook: object, bits: int) -> np.ndarray:
    """A float ``[K]`` codebook with ``1 <= K <= 2^bits``, else ValueError."""
    codebook = check_tensor(op, "Codebook", codebook, "float", 1)
    if not 1 <= codebook.shape[0] <= 1 << bits:
        raise ValueError(
            f"{op}: Codebook length must be in 1..{1 << bits} for bits={bits}, "
            f"got {codebook.shape[0]}"
        )
    return codebook


def lookup(op: str, codes: object, codebook: np.ndarray, bits: int, rows: int | None, row_len: int):
    """``Codebook[unpack(Codes)]`` as float32 ``[M, row_len]``, validating the codes.

    ``rows`` is the expected ``M`` (None: any).
    """
    codes = check_tensor(op, "Codes", codes, "uint8", 2)
    expected_b = packed_row_bytes(row_len, bits)
    m = codes.shape[0] if rows is None else rows
    if codes.shape != (m, expected_b):
        raise ValueError(
            f"{op}: Codes must have shape [{m}, {expected_b}] (= [M, ceil({row_len} * {bits} / 8)])"
            f", got {list(codes.shape)}"
        )
    idx = unpack_rows(codes, bits, row_len)
    k = codebook.shape[0]
    if idx.size and int(idx.max()) >= k:
        raise ValueError(f"{op}: code {int(idx.max())} >= Codebook length {k}")
    return codebook[idx]


def check_scale_bias(op: str, scale: object, bias: object, m: int):
    """``Scale`` (float ``[M]`` or ``[1]``) and ``Bias`` (float ``[M]`` or None)."""
    scale = check_tensor(op, "Scale", scale, "float", 1)
    if scale.shape[0] not in (m, 1):
        raise ValueError(f"{op}: Scale must have length {m} or 1, got {scale.shape[0]}")
    if bias is not None:
        bias = check_tensor(op, "Bias", bias, "float", 1)
        if bias.shape[0] != m:
            raise ValueError(f"{op}: Bias must have length {m}, got {bias.shape[0]}")
    return scale, bias


def epilogue(acc: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, axis: int):
    """``Scale[m] * acc + Bias[m]`` in float32, ``m`` on ``axis`` of ``acc`` (float64)."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    y = scale.reshape(shape) * acc.astype(np.float32)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y.astype(np.float32, copy=False)


def im2col(xp: np.ndarray, kernel, strides, dilations, out_hw) -> np.ndarray:
    """Columns ``[N, C, kH, kW, OH, OW]`` of the padded input ``xp`` ``[N, C, Hp, Wp]``."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, strides, dilations, out_hw
    n, c = xp.shape[:2]
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=xp.dtype)
    for i in range(kh):
        for j in range(kw):
            h0, w0 = i * dh, j * dw
            cols[:, :, i, j] = xp[
                :, :, h0 : h0 + sh * (oh - 1) + 1 : sh, w0 : w0 + sw * (ow - 1) + 1 : sw
            ]
    return cols
