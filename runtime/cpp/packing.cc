#include "packing.h"

#include <immintrin.h>

#include <algorithm>

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

// AVX-512 VBMI: 16 codes (two groups of 8 = 2 * bits bytes) per step: pshufb puts each group in
// a qword, vpmultishiftqb extracts the 8 bit fields of each qword, then a table lookup (permute
// for K <= 32, gather of clamped indices otherwise). Decodes codes [0, j_end) with j_end a
// multiple of 16 and the 16 bytes loaded by the last step inside the Codes tensor (they may run
// into the next rows; only the row's own bits are used); returns the largest code.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi"))) unsigned DecodeVbmi(
    const uint8_t* row, int bits, int64_t j_end, const Lut& lut, float* out) {
  struct Tables {
    alignas(16) uint8_t shuffle[9][16];
    alignas(16) uint8_t shifts[9][16];
  };
  static const Tables tables = [] {
    Tables t{};
    for (int b = 1; b <= 8; ++b) {
      for (int i = 0; i < 8; ++i) {
        t.shuffle[b][i] = static_cast<uint8_t>(i);
        t.shuffle[b][8 + i] = static_cast<uint8_t>(b + i);
        t.shifts[b][i] = t.shifts[b][8 + i] = static_cast<uint8_t>(i * b);
      }
    }
    return t;
  }();
  const __m128i shuf = _mm_load_si128(reinterpret_cast<const __m128i*>(tables.shuffle[bits]));
  const __m128i shift = _mm_load_si128(reinterpret_cast<const __m128i*>(tables.shifts[bits]));
  const __m128i mask = _mm_set1_epi8(static_cast<char>((1u << bits) - 1u));
  __m128i maxc = _mm_setzero_si128();
  const uint8_t* p = row;
  int64_t j = 0;
  if (lut.K <= 16) {
    const __m512 t = _mm512_load_ps(lut.table);
    for (; j < j_end; j += 16, p += 2 * bits) {
      const __m128i v = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), shuf);
      const __m128i c = _mm_and_si128(_mm_multishift_epi64_epi8(shift, v), mask);
      maxc = _mm_max_epu8(maxc, c);
      _mm512_storeu_ps(out + j, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c), t));
    }
  } else if (lut.K <= 32) {
    const __m512 t0 = _mm512_load_ps(lut.table), t1 = _mm512_load_ps(lut.table + 16);
    for (; j < j_end; j += 16, p += 2 * bits) {
      const __m128i v = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), shuf);
      const __m128i c = _mm_and_si128(_mm_multishift_epi64_epi8(shift, v), mask);
      maxc = _mm_max_epu8(maxc, c);
      _mm512_storeu_ps(out + j, _mm512_permutex2var_ps(t0, _mm512_cvtepu8_epi32(c), t1));
    }
  } else {
    const __m512i kmax = _mm512_set1_epi32(lut.K - 1);
    for (; j < j_end; j += 16, p += 2 * bits) {
      const __m128i v = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), shuf);
      const __m128i c = _mm_and_si128(_mm_multishift_epi64_epi8(shift, v), mask);
      maxc = _mm_max_epu8(maxc, c);
      const __m512i idx = _mm512_min_epu32(_mm512_cvtepu8_epi32(c), kmax);  // never read past K
      _mm512_storeu_ps(out + j, _mm512_i32gather_ps(idx, lut.codebook, 4));
    }
  }
  maxc = _mm_max_epu8(maxc, _mm_srli_si128(maxc, 8));
  maxc = _mm_max_epu8(maxc, _mm_srli_si128(maxc, 4));
  maxc = _mm_max_epu8(maxc, _mm_srli_si128(maxc, 2));
  maxc = _mm_max_epu8(maxc, _mm_srli_si128(maxc, 1));
  return static_cast<unsigned>(_mm_cvtsi128_si32(maxc)) & 0xFFu;
}

// Reports the first invalid code of row m in [j0, j1) (there is one).
[[noreturn]] void FailInvalidCode(const Lut& lut, int64_t m, int64_t j0, int64_t j1) {
  const uint8_t* row = lut.codes + m * lut.row_bytes;
  uint8_t buf[512];
  for (int64_t j = j0; j < j1; j += 512) {
    const int64_t n = std::min<int64_t>(512, j1 - j);
    UnpackCodes(row, lut.row_bytes, lut.bits, j, n, buf);
    CheckCodes(lut, m, j, buf, n);
  }
  Fail(Str("invalid code at row ", m));
}

}  // namespace

void CheckCodes(const Lut& lut, int64_t m, int64_t j0, const uint8_t* codes, int64_t n) {
  uint8_t maxc = 0;
  for (int64_t q = 0; q < n; ++q) maxc = codes[q] > maxc ? codes[q] : maxc;
  if (maxc < lut.K) return;
  for (int64_t q = 0; q < n; ++q) {
    Check(codes[q] < lut.K, "invalid code ", static_cast<int>(codes[q]), " >= K=", lut.K,
          " (Codebook length) at row ", m, ", index ", j0 + q);
  }
}

void DecodeRow(const Lut& lut, int64_t m, float* out, Isa isa) {
  int64_t start = 0;
  if (isa == Isa::kAvx512 && HasVbmi()) {
    // Steps of 16 codes whose 16-byte load stays inside the Codes tensor.
    const int64_t avail = (lut.M - m) * lut.row_bytes;
    const int64_t steps = avail >= 16 ? (avail - 16) / (2 * lut.bits) + 1 : 0;
    start = std::min(steps * 16, lut.R / 16 * 16);
    if (start > 0) {
      const unsigned maxc = DecodeVbmi(lut.codes + m * lut.row_bytes, lut.bits, start, lut, out);
      if (maxc >= static_cast<unsigned>(lut.K)) FailInvalidCode(lut, m, 0, start);
    }
  }
  DecodeRowFrom(lut, m, start, out, isa);
}

void DecodeRowFrom(const Lut& lut, int64_t m, int64_t start, float* out, Isa isa) {
  constexpr int64_t kChunk = 512;
  alignas(64) uint8_t buf[kChunk];
  const uint8_t* row = lut.codes + m * lut.row_bytes;
  for (int64_t j0 = start; j0 < lut.R; j0 += kChunk) {
    const int64_t n = lut.R - j0 < kChunk ? lut.R - j0 : kChunk;
    UnpackCodes(row, lut.row_bytes, lut.bits, j0, n, buf);
    CheckCodes(lut, m, j0, buf, n);
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
