#include "packing.h"

#include <immintrin.h>

namespace adq {
namespace {

void LookupScalar(const uint8_t* c, int64_t n, const float* codebook, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = codebook[c[i]];
}

__attribute__((target("avx2"))) void LookupAvx2(const uint8_t* c, int64_t n, const Lut& lut,
                                                 float* out) {
  int64_t i = 0;
  if (lut.K <= 8) {
    const __m256 t = _mm256_load_ps(lut.table);
    for (; i + 8 <= n; i += 8) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i)));
      _mm256_storeu_ps(out + i, _mm256_permutevar8x32_ps(t, idx));
    }
  } else if (lut.K <= 16) {
    const __m256 t0 = _mm256_load_ps(lut.table), t1 = _mm256_load_ps(lut.table + 8);
    for (; i + 8 <= n; i += 8) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i)));
      const __m256 lo = _mm256_permutevar8x32_ps(t0, idx), hi = _mm256_permutevar8x32_ps(t1, idx);
      // bit 3 of the index picks the upper table (blendv reads the sign bit)
      _mm256_storeu_ps(out + i, _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
    }
  }
  LookupScalar(c + i, n - i, lut.codebook, out + i);
}

__attribute__((target("avx512f"))) void LookupAvx512(const uint8_t* c, int64_t n, const Lut& lut,
                                                      float* out) {
  int64_t i = 0;
  if (lut.K <= 16) {
    const __m512 t = _mm512_load_ps(lut.table);
    for (; i + 16 <= n; i += 16) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i)));
      _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(idx, t));
    }
  } else if (lut.K <= 32) {
    const __m512 t0 = _mm512_load_ps(lut.table), t1 = _mm512_load_ps(lut.table + 16);
    for (; i + 16 <= n; i += 16) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i)));
      _mm512_storeu_ps(out + i, _mm512_permutex2var_ps(t0, idx, t1));
    }
  }
  LookupScalar(c + i, n - i, lut.codebook, out + i);
}

}  // namespace

void DecodeRow(const Lut& lut, int64_t m, float* out, Isa isa) {
  constexpr int64_t kChunk = 512;
  alignas(64) uint8_t buf[kChunk];
  const uint8_t* row = lut.codes + m * lut.row_bytes;
  for (int64_t j0 = 0; j0 < lut.R; j0 += kChunk) {
    const int64_t n = lut.R - j0 < kChunk ? lut.R - j0 : kChunk;
    UnpackCodes(row, lut.row_bytes, lut.bits, j0, n, buf);
    uint8_t maxc = 0;
    for (int64_t q = 0; q < n; ++q) maxc = buf[q] > maxc ? buf[q] : maxc;
    if (maxc >= lut.K) {
      for (int64_t q = 0; q < n; ++q) {
        Check(buf[q] < lut.K, "invalid code ", static_cast<int>(buf[q]), " >= K=", lut.K,
              " (Codebook length) at row ", m, ", index ", j0 + q);
      }
    }
    if (isa == Isa::kAvx512) {
      LookupAvx512(buf, n, lut, out + j0);
    } else if (isa == Isa::kAvx2) {
      LookupAvx2(buf, n, lut, out + j0);
    } else {
      LookupScalar(buf, n, lut.codebook, out + j0);
    }
  }
}

}  // namespace adq
