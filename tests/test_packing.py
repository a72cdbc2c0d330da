"""Row-wise code packing (docs/onnx-ops.md, "Code packing")."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.packing import pack_rows, packed_row_bytes, unpack_rows


def _pack_python(rows: list[list[int]], bits: int) -> list[list[int]]:
    """Independent bit-by-bit packer, written straight from the spec's wording."""
    out = []
    for row in rows:
        nbytes = (len(row) * bits + 7) // 8
        data = [0] * nbytes
        for j, code in enumerate(row):
            for b in range(bits):
                k = j * bits + b  # stream bit k, LSB of the code first
                if (code >> b) & 1:
                    data[k // 8] |= 1 << (k % 8)
        out.append(data)
    return out


def _random_shape(rng: np.random.Generator) -> tuple[int, ...]:
    m = int(rng.integers(1, 5))
    tail = tuple(int(d) for d in rng.integers(1, 6, size=int(rng.integers(0, 4))))
    return (m, *tail)


def test_hand_worked_3bit():
    # stream = 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 | 0<<21 = 0x1F58D1
    codes = np.array([[1, 2, 3, 4, 5, 6, 7, 0]])
    np.testing.assert_array_equal(pack_rows(codes, 3), np.array([[0xD1, 0x58, 0x1F]], np.uint8))
    # 3 codes = 9 bits -> 2 bytes per row, each row starting on a byte boundary;
    # row 0: 7 | 0<<3 | 5<<6 = 0x147; row 1: 7<<6 = 0x1C0.
    codes = np.array([[7, 0, 5], [0, 0, 7]], dtype=np.int64)
    np.testing.assert_array_equal(
        pack_rows(codes, 3), np.array([[0x47, 0x01], [0xC0, 0x01]], np.uint8)
    )


def test_hand_worked_2bit_4bit_1bit_8bit():
    # 2 bits: 0 | 1<<2 | 2<<4 | 3<<6 = 0xE4, then 3 in the low bits of byte 1.
    np.testing.assert_array_equal(
        pack_rows(np.array([[0, 1, 2, 3, 3]]), 2), np.array([[0xE4, 0x03]], np.uint8)
    )
    # 4 bits: first code in the low nibble.
    np.testing.assert_array_equal(
        pack_rows(np.array([[0xA, 0x5, 0xF]], np.uint8), 4), np.array([[0x5A, 0x0F]], np.uint8)
    )
    # 1 bit: element j is bit j.
    np.testing.assert_array_equal(
        pack_rows(np.array([[1, 0, 1, 1, 0, 0, 0, 0, 1]]), 1), np.array([[0x0D, 0x01]], np.uint8)
    )
    # 8 bits: identity; rows of a [M, C, kH, kW] weight are flattened in C order.
    w = np.arange(2 * 2 * 1 * 3).reshape(2, 2, 1, 3) * 20
    np.testing.assert_array_equal(pack_rows(w, 8), w.reshape(2, 6).astype(np.uint8))


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_and_layout(bits):
    rng = np.random.default_rng(100 + bits)
    for _ in range(40):
        shape = _random_shape(rng)
        codes = rng.integers(0, 1 << bits, size=shape)
        m, r = shape[0], int(np.prod(shape[1:]))
        packed = pack_rows(codes.astype(rng.choice([np.uint8, np.int32, np.int64])), bits)
        assert packed.dtype == np.uint8
        assert packed.shape == (m, packed_row_bytes(r, bits)) == (m, -(-r * bits // 8))
        rows = codes.reshape(m, r)
        np.testing.assert_array_equal(packed, np.array(_pack_python(rows.tolist(), bits)))
        # Unused high bits of the last byte are 0.
        used = r * bits % 8
        if used:
            assert not np.any(packed[:, -1] >> used)
        out = unpack_rows(packed, bits, r)
        assert out.dtype == np.uint8 and out.shape == (m, r)
        np.testing.assert_array_equal(out, rows)
        # ... and ignored when read.
        if used:
            dirty = packed.copy()
            dirty[:, -1] |= np.uint8((0xFF << used) & 0xFF)
            np.testing.assert_array_equal(unpack_rows(dirty, bits, r), rows)


def test_lengths_not_multiple_of_8_bits():
    rng = np.random.default_rng(7)
    for bits in (3, 5, 6, 7):
        for r in range(1, 20):
            codes = rng.integers(0, 1 << bits, size=(3, r))
            packed = pack_rows(codes, bits)
            assert packed.shape == (3, (r * bits + 7) // 8)
            np.testing.assert_array_equal(unpack_rows(packed, bits, r), codes)


def test_empty_rows():
    assert pack_rows(np.zeros((3, 0), np.uint8), 3).shape == (3, 0)
    assert unpack_rows(np.zeros((3, 0), np.uint8), 3, 0).shape == (3, 0)


@pytest.mark.parametrize(
    "codes, bits",
    [
        (np.array([[0, 8]]), 3),  # code >= 2^bits
        (np.array([[256]]), 8),
        (np.array([[2]]), 1),
        (np.array([[-1, 0]]), 4),  # negative code
        (np.array([[0, 1]]), 0),  # bits out of range
        (np.array([[0, 1]]), 9),
        (np.array([[0, 1]]), True),
        (np.array([[0, 1]]), 2.0),
        (np.array([[0.0, 1.0]]), 2),  # not integer codes
        (np.array([[True, False]]), 1),
        (np.array(3), 2),  # rank 0
    ],
)
def test_pack_errors(codes, bits):
    with pytest.raises(ValueError):
        pack_rows(codes, bits)


@pytest.mark.parametrize(
    "packed, bits, row_len",
    [
        (np.zeros((2, 2), np.uint8), 3, 9),  # 27 bits need 4 bytes
        (np.zeros((2, 1), np.uint8), 3, 3),  # 9 bits need 2 bytes
        (np.zeros((2, 3), np.int8), 3, 8),  # not uint8
        (np.zeros((2, 3, 1), np.uint8), 3, 8),  # not rank 2
        (np.zeros((6,), np.uint8), 3, 8),
        (np.zeros((2, 3), np.uint8), 0, 8),
        (np.zeros((2, 3), np.uint8), 9, 8),
        (np.zeros((2, 3), np.uint8), 3, -1),
    ],
)
def test_unpack_errors(packed, bits, row_len):
    with pytest.raises(ValueError):
        unpack_rows(packed, bits, row_len)


def test_packed_row_bytes():
    assert [packed_row_bytes(r, 3) for r in range(9)] == [0, 1, 1, 2, 2, 2, 3, 3, 3]
    assert packed_row_bytes(9, 1) == 2 and packed_row_bytes(16, 8) == 16
    with pytest.raises(ValueError):
        packed_row_bytes(4, 0)
    with pytest.raises(ValueError):
        packed_row_bytes(-1, 4)
