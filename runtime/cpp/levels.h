// ThresholdQuant's count on 16 floats at once (AVX-512), shared by ThresholdQuant and the
// LutConvQuant epilogue: #{k : scale * v >= t[k]} per lane, NaN -> 0.
#pragma once

#include <immintrin.h>

#include "common.h"

namespace adq {

// The per-call part of the count, set up once: the scale, the thresholds in a register table
// (NaN past T, which no value reaches) and the first step of the binary search over them
// (for 8 to 15 thresholds; fewer are counted one by one, more by a loop).
struct LevelCounter {
  __m512 scale;
  __m512 table;
  int first;  // the largest power of two <= T for 8 <= T <= 15; 0: a linear count over lv->t
  int T;
  const Levels* lv;
};

__attribute__((target("avx512f"))) inline LevelCounter MakeLevelCounter(const Levels& lv) {
  LevelCounter c{_mm512_set1_ps(lv.scale), _mm512_loadu_ps(lv.padded), 0, lv.T, &lv};
  if (lv.T >= 8 && lv.T <= 15) {
    c.first = 1;
    while (2 * c.first <= lv.T) c.first *= 2;
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
  for (int k = 0; k < lc.T; ++k) c = AddIfGe(c, sv, lc.lv->t[k]);
  return c;
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
