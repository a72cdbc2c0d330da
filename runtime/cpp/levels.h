// ThresholdQuant's count on 16 floats at once (AVX-512), shared by ThresholdQuant and the
// LutConvQuant epilogue: #{k : scale * v >= t[k]} per lane, NaN -> 0.
#pragma once

#include <immintrin.h>

#include "common.h"

namespace adq {

// The per-call part of the count, set up once: the scale, the thresholds in a register table
// (NaN past T, which no value reaches) and the first step of the binary search over them
// (for 8 to 15 thresholds; fewer are counted one by one, more by CountMany16).
struct LevelCounter {
  __m512 scale;
  __m512 table;
  int first;  // the largest power of two <= T for 8 <= T <= 15; 0: T <= 7 or T > 15
  int T;
  const Levels* lv;
  __m512 lin_scale, lin_offset;  // T > 15: the count's linear estimate (Levels)
  __m512d lin_a, lin_b;          // and its exact form in double (lin_exact)
  bool lin_exact;
};

__attribute__((target("avx512f"))) inline LevelCounter MakeLevelCounter(const Levels& lv) {
  LevelCounter c{_mm512_set1_ps(lv.scale), _mm512_loadu_ps(lv.padded), 0, lv.T, &lv,
                 _mm512_set1_ps(lv.lin_scale), _mm512_set1_ps(lv.lin_offset),
                 _mm512_set1_pd(lv.lin_a), _mm512_set1_pd(lv.lin_b), lv.lin_exact && lv.T > 15};
  if (lv.T >= 8 && lv.T <= 15) {
    c.first = 1;
    while (2 * c.first <= lv.T) c.first *= 2;
  }
  return c;
}

// clamp(floor(fma(v, lin_a, lin_b)), 0, T) in double on 8 lanes (NaN -> 0: max's second operand).
__attribute__((target("avx512f"))) inline __m256i EstimateExact8(__m256 v, const LevelCounter& lc) {
  __m512d e = _mm512_fmadd_pd(_mm512_cvtps_pd(v), lc.lin_a, lc.lin_b);
  e = _mm512_min_pd(_mm512_max_pd(e, _mm512_setzero_pd()),
                    _mm512_set1_pd(static_cast<double>(lc.T)));
  return _mm512_cvttpd_epi32(e);
}

// The count of more than 15 thresholds on the product sv. Where the linear estimate in double
// is exact (Levels::lin_exact, checked when the thresholds are set up: evenly spaced ones), it
// is the count. Otherwise the linear estimate
// floor(lin_scale * sv + lin_offset) clamped to [0, T] (NaN: 0), then corrected against the
// gathered thresholds around it, lookup[c + 1] = t[c] (NaN past T: never reached) and
// lookup[c] = t[c - 1] (-inf for c = 0), one step per round in the lanes where the count is
// off, until no lane moves: exact for any sorted thresholds, one round (two gathers) for
// evenly spaced ones. A lane moves one way only (the count is monotone in the thresholds), so
// after three rounds the lanes still moving finish with a binary search (8 gathers: at most
// 255 thresholds) instead of up to 255 rounds.
__attribute__((target("avx512f"))) inline __m512i CountMany16(__m512 sv, const LevelCounter& lc) {
  if (lc.lin_exact) {
    // The estimate in double is the count (checked at every threshold, Levels::lin_exact):
    // 8 lanes at a time, no corrections.
    const __m256i lo = EstimateExact8(_mm512_castps512_ps256(sv), lc);
    const __m256i hi =
        EstimateExact8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sv), 1)), lc);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
  const float* tab = lc.lv->lookup;
  const __m512i one = _mm512_set1_epi32(1);
  __m512 e = _mm512_fmadd_ps(sv, lc.lin_scale, lc.lin_offset);
  e = _mm512_max_ps(e, _mm512_setzero_ps());  // NaN (NaN sv, inf * 0) -> 0: the second operand
  e = _mm512_min_ps(e, _mm512_set1_ps(static_cast<float>(lc.T)));
  __m512i c = _mm512_cvttps_epi32(e);  // e >= 0: truncation is floor
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, one);
  for (int round = 0;; ++round) {
    // (t[c - 1], t[c]) = lookup[c], lookup[c + 1]: one 8-byte pair per lane (two gathers of 8
    // lanes load half the elements of two 16-lane gathers), split into below and above.
    const __m512 p0 = _mm512_castsi512_ps(_mm512_i32gather_epi64(_mm512_castsi512_si256(c), tab, 4));
    const __m512 p1 = _mm512_castsi512_ps(
        _mm512_i32gather_epi64(_mm512_extracti64x4_epi64(c, 1), tab, 4));
    const __m512 below = _mm512_permutex2var_ps(p0, even, p1);  // t[c - 1]
    const __m512 above = _mm512_permutex2var_ps(p0, odd, p1);   // t[c]
    const __mmask16 up = _mm512_cmp_ps_mask(above, sv, _CMP_LE_OQ);  // NaN sv: never
    const __mmask16 down = _mm512_cmp_ps_mask(below, sv, _CMP_GT_OQ);
    if ((up | down) == 0) return c;
    if (round == 2) break;
    c = _mm512_mask_add_epi32(c, up, c, one);
    c = _mm512_mask_sub_epi32(c, down, c, one);
  }
  // Branch-free binary search: c grows by 128, 64, ..., 1 while t[c + step - 1] <= sv.
  c = _mm512_setzero_si512();
  for (int step = 128; step >= 1; step >>= 1) {
    const __m512i cand = _mm512_add_epi32(c, _mm512_set1_epi32(step));
    const __m512 t = _mm512_i32gather_ps(cand, tab, 4);
    c = _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask(t, sv, _CMP_LE_OQ), cand);
  }
  return c;
}

// c + 1 in the lanes where sv >= t.
__attribute__((target("avx512f"))) inline __m512i AddIfGe(__m512i c, __m512 sv, float t) {
  return _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(sv, _mm512_set1_ps(t), _CMP_GE_OQ), c,
                               _mm512_set1_epi32(1));
}

__attribute__((target("avx512f"))) inline __m512i CountLevels16(__m512 v, const LevelCounter& lc) {
  const __m512 sv = _mm512_mul_ps(lc.scale, v);  // one float32 product
  const __m512i one = _mm512_set1_epi32(1);
  __m512i c = _mm512_setzero_si512();
  if (lc.T <= 7) {
    // Few thresholds (2- and 3-bit activations): an unrolled linear count, fewer instructions
    // than the search (each threshold a broadcast memory operand of the compare).
    const float* t = lc.lv->t;
    switch (lc.T) {
      case 7: c = AddIfGe(c, sv, t[6]); [[fallthrough]];
      case 6: c = AddIfGe(c, sv, t[5]); [[fallthrough]];
      case 5: c = AddIfGe(c, sv, t[4]); [[fallthrough]];
      case 4: c = AddIfGe(c, sv, t[3]); [[fallthrough]];
      case 3: c = AddIfGe(c, sv, t[2]); [[fallthrough]];
      case 2: c = AddIfGe(c, sv, t[1]); [[fallthrough]];
      case 1: c = AddIfGe(c, sv, t[0]); [[fallthrough]];
      default: break;
    }
    return c;
  }
  if (lc.first) {
    // Branch-free binary search over the sorted thresholds: c grows by first, ..., 2, 1 while
    // t[c + step - 1] <= value (t below T; the count is at most T < 2 * first).
    for (int step = lc.first; step >= 1; step >>= 1) {
      const __m512i cand = _mm512_add_epi32(c, _mm512_set1_epi32(step));
      const __m512 t = _mm512_permutexvar_ps(_mm512_sub_epi32(cand, one), lc.table);
      c = _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask(sv, t, _CMP_GE_OQ), cand);
    }
    return c;
  }
  return CountMany16(sv, lc);
}

// CountLevels16 for a number of thresholds T known at compile time (a layer's activation bits
// fix it): the thresholds sit in registers, set up once per tile instead of a branch on T and a
// load per threshold for every vector. Same float32 product and compares as CountLevels16.
template <int T>
struct FixedCounter {
  __m512 scale;
  __m512 t[T];
};

// lv has T thresholds (the callers choose T from it); fewer would give zeros past lv.T rather
// than a read past lv.t.
template <int T>
__attribute__((target("avx512f"))) inline FixedCounter<T> MakeFixedCounter(const Levels& lv) {
  FixedCounter<T> c;
  c.scale = _mm512_set1_ps(lv.scale);
  for (int k = 0; k < T; ++k) c.t[k] = _mm512_set1_ps(k < lv.T ? lv.t[k] : 0.0f);
  return c;
}

template <int T>
__attribute__((target("avx512f"))) inline __m512i CountLevels16(__m512 v,
                                                                const FixedCounter<T>& fc) {
  const __m512 sv = _mm512_mul_ps(fc.scale, v);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i c = _mm512_setzero_si512();
#pragma GCC unroll 16
  for (int k = 0; k < T; ++k) {
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(sv, fc.t[k], _CMP_GE_OQ), c, one);
  }
  return c;
}

}  // namespace adq
