// ThresholdQuant's count on 16 floats at once (AVX-512), shared by ThresholdQuant and the
// LutConvQuant epilogue: #{k : scale * v >= t[k]} per lane, NaN -> 0.
#pragma once

#include <immintrin.h>

#include "common.h"

namespace adq {

__attribute__((target("avx512f"))) inline __m512i CountLevels16(__m512 v, const Levels& lv) {
  const __m512 sv = _mm512_mul_ps(_mm512_set1_ps(lv.scale), v);  // one float32 product
  const __m512i one = _mm512_set1_epi32(1);
  __m512i c = _mm512_setzero_si512();
  if (lv.T >= 4 && lv.T <= 15) {
    // Branch-free binary search in a register table of the thresholds (NaN past T, which no
    // value reaches): c grows by 8, 4, 2, 1 while t[c + step - 1] <= value.
    const __m512 table = _mm512_loadu_ps(lv.padded);
    for (int step = 8; step >= 1; step >>= 1) {
      const __m512i cand = _mm512_add_epi32(c, _mm512_set1_epi32(step));
      const __m512 t = _mm512_permutexvar_ps(_mm512_sub_epi32(cand, one), table);
      c = _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask(sv, t, _CMP_GE_OQ), cand);
    }
    return c;
  }
  for (int k = 0; k < lv.T; ++k) {
    const __mmask16 ge = _mm512_cmp_ps_mask(sv, _mm512_set1_ps(lv.t[k]), _CMP_GE_OQ);
    c = _mm512_mask_add_epi32(c, ge, c, one);
  }
  return c;
}

}  // namespace adq
