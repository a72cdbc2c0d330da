// Row-packed b-bit codes (docs/onnx-ops.md, "Code packing"): code j of a row occupies bits
// j*bits .. j*bits+bits-1 of the row's LSB-first bit stream; every row starts on a byte.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace adq {

// Unpacks codes [j0, j0 + n) of a packed row into out[0, n).
inline void UnpackCodes(const uint8_t* row, int64_t row_bytes, int bits, int64_t j0, int64_t n,
                        uint8_t* out) {
  switch (bits) {
    case 8:
      std::memcpy(out, row + j0, static_cast<size_t>(n));
      return;
    case 4:
      for (int64_t q = 0; q < n; ++q) {
        const int64_t j = j0 + q;
        out[q] = (row[j >> 1] >> ((j & 1) * 4)) & 0xF;
      }
      return;
    case 2:
      for (int64_t q = 0; q < n; ++q) {
        const int64_t j = j0 + q;
        out[q] = (row[j >> 2] >> ((j & 3) * 2)) & 0x3;
      }
      return;
    case 1:
      for (int64_t q = 0; q < n; ++q) {
        const int64_t j = j0 + q;
        out[q] = (row[j >> 3] >> (j & 7)) & 0x1;
      }
      return;
    default: {  // 3, 5, 6, 7: codes may straddle two bytes
      const unsigned mask = (1u << bits) - 1u;
      for (int64_t q = 0; q < n; ++q) {
        const int64_t pos = (j0 + q) * bits;
        const int64_t byte = pos >> 3;
        const int shift = static_cast<int>(pos & 7);
        unsigned v = row[byte];
        if (shift + bits > 8 && byte + 1 < row_bytes) v |= static_cast<unsigned>(row[byte + 1]) << 8;
        out[q] = static_cast<uint8_t>((v >> shift) & mask);
      }
      return;
    }
  }
}

// Decodes row m of a Lut (W[m, j] = Codebook[code]) into out[j * stride], j < R, checking every
// code is < K. Throws Ort::Exception (via Fail) on an invalid code.
inline void DecodeRow(const Lut& lut, int64_t m, float* out, int64_t stride) {
  constexpr int64_t kChunk = 512;
  uint8_t buf[kChunk];
  const uint8_t* row = lut.codes + m * lut.row_bytes;
  for (int64_t j0 = 0; j0 < lut.R; j0 += kChunk) {
    const int64_t n = lut.R - j0 < kChunk ? lut.R - j0 : kChunk;
    UnpackCodes(row, lut.row_bytes, lut.bits, j0, n, buf);
    unsigned maxc = 0;
    for (int64_t q = 0; q < n; ++q) maxc = buf[q] > maxc ? buf[q] : maxc;
    if (maxc >= static_cast<unsigned>(lut.K)) {
      for (int64_t q = 0; q < n; ++q) {
        Check(buf[q] < lut.K, "invalid code ", static_cast<int>(buf[q]), " >= K=", lut.K,
              " (Codebook length) at row ", m, ", index ", j0 + q);
      }
    }
    float* o = out + j0 * stride;
    for (int64_t q = 0; q < n; ++q) o[q * stride] = lut.codebook[buf[q]];
  }
}

}  // namespace adq
