"""Row-wise bit packing of codebook codes (docs/onnx-ops.md, "Code packing").

A weight of shape ``[M, ...]`` is stored as ``uint8 [M, B]`` with ``B = ceil(R * bits / 8)`` and
``R = prod(shape[1:])``. Within a row, code ``j`` occupies bits ``j*bits .. j*bits + bits - 1``
of the row's bit stream, least significant bit first; stream bit ``k`` is bit ``k mod 8`` of byte
``k // 8``. Rows start on byte boundaries and the unused high bits of a row's last byte are 0.
"""

from __future__ import annotations

import numpy as np

MIN_BITS = 1
MAX_BITS = 8


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return int(bits)


def packed_row_bytes(row_len: int, bits: int) -> int:
    """Bytes per packed row: ``ceil(row_len * bits / 8)``."""
    bits = _check_bits(bits)
    if isinstance(row_len, bool) or not isinstance(row_len, (int, np.integer)) or row_len < 0:
        raise ValueError(f"row_len must be a non-negative int, got {row_len!r}")
    return (int(row_len) * bits + 7) // 8


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes ``[M, ...]`` (values in ``0 .. 2^bits - 1``) into ``uint8 [M, B]``."""
    bits = _check_bits(bits)
    codes = np.asarray(codes)
    if codes.dtype == np.bool_ or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    if codes.ndim < 1:
        raise ValueError("codes must have rank >= 1 (one row per output channel)")
    m = codes.shape[0]
    r = int(np.prod(codes.shape[1:], dtype=np.int64))
    if codes.size:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= 1 << bits:
            bad = lo if lo < 0 else hi
            raise ValueError(f"code {bad} out of range 0..{(1 << bits) - 1} for bits={bits}")
    rows = codes.reshape(m, r).astype(np.uint8)
    # [M, R, bits] bit matrix, LSB first, flattened to each row's bit stream.
    stream = np.unpackbits(rows[:, :, None], axis=2, count=bits, bitorder="little")
    return np.packbits(stream.reshape(m, r * bits), axis=1, bitorder="little")


def unpack_rows(packed: np.ndarray, bits: int, row_len: int) -> np.ndarray:
    """Unpack ``uint8 [M, B]`` rows into ``uint8`` codes ``[M, row_len]``.

    Unused high bits of a row's last byte are ignored.
    """
    bits = _check_bits(bits)
    nbytes = packed_row_bytes(row_len, bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.ndim != 2:
        raise ValueError(f"packed codes must have rank 2 [M, B], got shape {packed.shape}")
    if packed.shape[1] != nbytes:
        raise ValueError(
            f"packed codes have {packed.shape[1]} bytes per row, expected {nbytes} "
            f"(= ceil({row_len} * {bits} / 8))"
        )
    m = packed.shape[0]
    stream = np.unpackbits(packed, axis=1, count=row_len * bits, bitorder="little")
    return np.packbits(stream.reshape(m, row_len, bits), axis=2, bitorder="little").reshape(
        m, row_len
    )
