#include "gemm.h"

#include <immintrin.h>

#include <algorithm>

namespace adq::gemm {
namespace {

// Micro-kernels: C[r, j] (+)= sum_k a[r * lda + k] * b[k * ldb + j], r < R, j < n <= width.
using Kernel = void (*)(int64_t kc, const float* a, int64_t lda, const float* b, int64_t ldb,
                        float* c, int64_t ldc, int64_t n, bool acc);

// ---- portable: R x 16 --------------------------------------------------------------------------

template <int R>
void KernelScalar(int64_t kc, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                  int64_t ldc, int64_t n, bool acc) {
  constexpr int W = 16;
  float t[R][W] = {};
  for (int64_t k = 0; k < kc; ++k, ++a, b += ldb) {
    for (int r = 0; r < R; ++r) {
      const float av = a[r * lda];
      for (int j = 0; j < W; ++j) t[r][j] += av * b[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    for (int64_t j = 0; j < n; ++j) cr[j] = acc ? cr[j] + t[r][j] : t[r][j];
  }
}

// ---- AVX2 + FMA: R x 16 ------------------------------------------------------------------------

template <int R>
__attribute__((target("avx2,fma"))) void KernelAvx2(int64_t kc, const float* a, int64_t lda,
                                                    const float* b, int64_t ldb, float* c,
                                                    int64_t ldc, int64_t n, bool acc) {
  __m256 c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, ++a, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda);
      c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
    }
  }
  if (n == 16) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float* cr = c + r * ldc;
      if (acc) {
        c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(cr));
        c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(cr + 8));
      }
      _mm256_storeu_ps(cr, c0[r]);
      _mm256_storeu_ps(cr + 8, c1[r]);
    }
  } else {
    alignas(32) float t[16];
    // Unrolled like every loop over c0 / c1: one that is not makes GCC keep the accumulators in
    // memory, a store per FMA in the loop above (half the speed).
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(t, c0[r]);
      _mm256_store_ps(t + 8, c1[r]);
      float* cr = c + r * ldc;
      for (int64_t j = 0; j < n; ++j) cr[j] = acc ? cr[j] + t[j] : t[j];
    }
  }
}

// ---- AVX-512F: R x 32 --------------------------------------------------------------------------

template <int R>
__attribute__((target("avx512f"))) void KernelAvx512(int64_t kc, const float* a, int64_t lda,
                                                     const float* b, int64_t ldb, float* c,
                                                     int64_t ldc, int64_t n, bool acc) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, ++a, b += ldb) {
    const __m512 b0 = _mm512_loadu_ps(b);
    const __m512 b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda]);
      c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
    }
  }
  const __mmask16 m0 = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1u);
  const __mmask16 m1 = n >= 32 ? 0xFFFF : n > 16 ? static_cast<__mmask16>((1u << (n - 16)) - 1u) : 0;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    if (acc) {
      c0[r] = _mm512_add_ps(c0[r], _mm512_maskz_loadu_ps(m0, cr));
      c1[r] = _mm512_add_ps(c1[r], _mm512_maskz_loadu_ps(m1, cr + 16));
    }
    _mm512_mask_storeu_ps(cr, m0, c0[r]);
    _mm512_mask_storeu_ps(cr + 16, m1, c1[r]);
  }
}

constexpr Kernel kScalar[MR + 1] = {nullptr,         KernelScalar<1>, KernelScalar<2>,
                                    KernelScalar<3>, KernelScalar<4>, KernelScalar<5>,
                                    KernelScalar<6>};
constexpr Kernel kAvx2[MR + 1] = {nullptr,       KernelAvx2<1>, KernelAvx2<2>, KernelAvx2<3>,
                                  KernelAvx2<4>, KernelAvx2<5>, KernelAvx2<6>};
constexpr Kernel kAvx512[MR + 1] = {nullptr,         KernelAvx512<1>, KernelAvx512<2>,
                                    KernelAvx512<3>, KernelAvx512<4>, KernelAvx512<5>,
                                    KernelAvx512<6>};

__attribute__((target("avx2"))) void U8ToFloatAvx2(const uint8_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx512f"))) void U8ToFloatAvx512(const uint8_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

float DotScalar(const float* a, const float* b, int64_t n) {
  float s[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  }
  float r = 0.0f;
  for (; i < n; ++i) r += a[i] * b[i];
  for (int j = 0; j < 8; ++j) r += s[j];
  return r;
}

__attribute__((target("avx2,fma"))) float DotAvx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  float r = 0.0f;
  for (; i < n; ++i) r += a[i] * b[i];
  for (int j = 0; j < 8; ++j) r += t[j];
  return r;
}

__attribute__((target("avx2,fma"))) void AxpyAvx2(float w, const float* x, int64_t n, float* y) {
  const __m256 vw = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < n; ++i) y[i] += w * x[i];
}

__attribute__((target("avx512f"))) void AxpyAvx512(float w, const float* x, int64_t n, float* y) {
  const __m512 vw = _mm512_set1_ps(w);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(vw, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(vw, _mm512_maskz_loadu_ps(m, x + i),
                                                    _mm512_maskz_loadu_ps(m, y + i)));
  }
}

__attribute__((target("avx512f"))) float DotAvx512(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
  }
  alignas(64) float t[16];
  _mm512_store_ps(t, _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  float r = 0.0f;
  for (int j = 0; j < 16; ++j) r += t[j];
  return r;
}

}  // namespace

void Axpy(float w, const float* x, int64_t n, float* y, Isa isa) {
  if (isa == Isa::kAvx512) return AxpyAvx512(w, x, n, y);
  if (isa == Isa::kAvx2) return AxpyAvx2(w, x, n, y);
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

void Multiply(const float* A, int64_t lda, int64_t rows, int64_t kc, const float* B, int64_t ldb,
              int64_t ncols, float* C, int64_t ldc, bool accumulate, Isa isa) {
  const Kernel* table = isa == Isa::kAvx512 ? kAvx512 : isa == Isa::kAvx2 ? kAvx2 : kScalar;
  const int64_t width = isa == Isa::kAvx512 ? 32 : 16;
  for (int64_t j0 = 0; j0 < ncols; j0 += width) {
    const int64_t n = std::min<int64_t>(width, ncols - j0);
    for (int64_t i0 = 0; i0 < rows; i0 += MR) {
      const int r = static_cast<int>(std::min<int64_t>(MR, rows - i0));
      table[r](kc, A + i0 * lda, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, n, accumulate);
    }
  }
}

void U8ToFloat(const uint8_t* src, int64_t n, float* dst, Isa isa) {
  if (isa == Isa::kAvx512) return U8ToFloatAvx512(src, n, dst);
  if (isa == Isa::kAvx2) return U8ToFloatAvx2(src, n, dst);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

float Dot(const float* a, const float* b, int64_t n, Isa isa) {
  if (isa == Isa::kAvx512) return DotAvx512(a, b, n);
  return isa == Isa::kAvx2 ? DotAvx2(a, b, n) : DotScalar(a, b, n);
}

}  // namespace adq::gemm
