#include "gemm.h"

#include <immintrin.h>

#include <algorithm>

namespace adq::gemm {
namespace {

using Kernel = void (*)(int64_t kc, const float* a, const float* b, int64_t ldb, float* c,
                        int64_t ldc, int64_t n, bool acc);

template <int R>
void KernelScalar(int64_t kc, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc,
                  int64_t n, bool acc) {
  float t[R][NR] = {};
  for (int64_t k = 0; k < kc; ++k, a += MR, b += ldb) {
    for (int r = 0; r < R; ++r) {
      const float av = a[r];
      for (int j = 0; j < NR; ++j) t[r][j] += av * b[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    for (int64_t j = 0; j < n; ++j) cr[j] = acc ? cr[j] + t[r][j] : t[r][j];
  }
}

template <int R>
__attribute__((target("avx2,fma"))) void KernelAvx2(int64_t kc, const float* a, const float* b,
                                                    int64_t ldb, float* c, int64_t ldc, int64_t n,
                                                    bool acc) {
  __m256 c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, a += MR, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r);
      c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
    }
  }
  if (n == NR) {
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
    alignas(32) float t[NR];
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(t, c0[r]);
      _mm256_store_ps(t + 8, c1[r]);
      float* cr = c + r * ldc;
      for (int64_t j = 0; j < n; ++j) cr[j] = acc ? cr[j] + t[j] : t[j];
    }
  }
}

constexpr Kernel kScalar[MR + 1] = {nullptr,         KernelScalar<1>, KernelScalar<2>,
                                    KernelScalar<3>, KernelScalar<4>, KernelScalar<5>,
                                    KernelScalar<6>};
constexpr Kernel kAvx2[MR + 1] = {nullptr,       KernelAvx2<1>, KernelAvx2<2>, KernelAvx2<3>,
                                  KernelAvx2<4>, KernelAvx2<5>, KernelAvx2<6>};

__attribute__((target("avx2"))) void U8ToFloatAvx2(const uint8_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

}  // namespace

void Multiply(const float* A, int64_t K, int64_t row0, int64_t rows, int64_t k0, int64_t kc,
              const float* B, int64_t ldb, int64_t ncols, float* C, int64_t ldc, bool accumulate,
              bool avx2) {
  const Kernel* table = avx2 ? kAvx2 : kScalar;
  for (int64_t j0 = 0; j0 < ncols; j0 += NR) {
    const int64_t n = std::min<int64_t>(NR, ncols - j0);
    for (int64_t i0 = 0; i0 < rows; i0 += MR) {
      const int r = static_cast<int>(std::min<int64_t>(MR, rows - i0));
      const float* a = A + ((row0 + i0) / MR) * MR * K + k0 * MR;
      table[r](kc, a, B + j0, ldb, C + i0 * ldc + j0, ldc, n, accumulate);
    }
  }
}

void U8ToFloat(const uint8_t* src, int64_t n, float* dst, bool avx2) {
  if (avx2) return U8ToFloatAvx2(src, n, dst);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

}  // namespace adq::gemm
