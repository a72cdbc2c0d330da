// Row-packed b-bit codes (docs/onnx-ops.md, "Code packing"): code j of a row occupies bits
// j*bits .. j*bits+bits-1 of the row's LSB-first bit stream; every row starts on a byte.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace adq {

// Unpacks codes [j0, j0 + n) of a packed row into out[0, n); j0 is a multiple of 8, so every
// group of 8 codes is BITS whole bytes, read little-endian into one integer.
template <int BITS>
inline void UnpackGroups(const uint8_t* row, int64_t row_bytes, int64_t j0, int64_t n,
                         uint8_t* out) {
  constexpr uint64_t kMask = (uint64_t{1} << BITS) - 1;
  const uint8_t* p = row + (j0 / 8) * BITS;
  int64_t q = 0;
  for (; q + 8 <= n; q += 8, p += BITS) {
    uint64_t v = 0;
    for (int b = 0; b < BITS; ++b) v |= static_cast<uint64_t>(p[b]) << (8 * b);
    for (int i = 0; i < 8; ++i) out[q + i] = static_cast<uint8_t>((v >> (i * BITS)) & kMask);
  }
  if (q < n) {  // a last partial group: only the bytes still inside the row
    const int64_t avail = row_bytes - (p - row);
    uint64_t v = 0;
    for (int64_t b = 0; b < BITS && b < avail; ++b) v |= static_cast<uint64_t>(p[b]) << (8 * b);
    for (int64_t i = 0; q + i < n; ++i) out[q + i] = static_cast<uint8_t>((v >> (i * BITS)) & kMask);
  }
}

inline void UnpackCodes(const uint8_t* row, int64_t row_bytes, int bits, int64_t j0, int64_t n,
                        uint8_t* out) {
  switch (bits) {
    case 1: return UnpackGroups<1>(row, row_bytes, j0, n, out);
    case 2: return UnpackGroups<2>(row, row_bytes, j0, n, out);
    case 3: return UnpackGroups<3>(row, row_bytes, j0, n, out);
    case 4: return UnpackGroups<4>(row, row_bytes, j0, n, out);
    case 5: return UnpackGroups<5>(row, row_bytes, j0, n, out);
    case 6: return UnpackGroups<6>(row, row_bytes, j0, n, out);
    case 7: return UnpackGroups<7>(row, row_bytes, j0, n, out);
    default: std::memcpy(out, row + j0, static_cast<size_t>(n)); return;
  }
}

// Checks that unpacked codes [j0, j0 + n) of row m are all < K; the error names the first
// invalid one.
void CheckCodes(const Lut& lut, int64_t m, int64_t j0, const uint8_t* codes, int64_t n);

// Unpacks all R codes of row m into out[0, R), checked < K (CheckCodes).
inline void UnpackRowChecked(const Lut& lut, int64_t m, uint8_t* out) {
  UnpackCodes(lut.codes + m * lut.row_bytes, lut.row_bytes, lut.bits, 0, lut.R, out);
  CheckCodes(lut, m, 0, out, lut.R);
}

// Whether every codebook level is an integer in -128..127: weights the int8 (VNNI) kernels can
// hold as int8.
inline bool Int8Levels(const Lut& lut) {
  for (int i = 0; i < lut.K; ++i) {
    const float v = lut.codebook[i];
    if (!(v >= -128.0f && v <= 127.0f && v == static_cast<float>(static_cast<int>(v)))) {
      return false;
    }
  }
  return true;
}

// Decodes row m of a Lut, out[j] = Codebook[code j] for j < R, checking every code is < K
// (throws Ort::Exception via Fail otherwise). Vector table lookups for K <= 16 (AVX2) or
// K <= 32 (AVX-512).
void DecodeRow(const Lut& lut, int64_t m, float* out, Isa isa);

// The same for codes [start, R) (start a multiple of 8) into out[start, R).
void DecodeRowFrom(const Lut& lut, int64_t m, int64_t start, float* out, Isa isa);

}  // namespace adq
