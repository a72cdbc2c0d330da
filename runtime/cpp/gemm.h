// A small blocked float GEMM shared by LutConv and LutGemm: C (+)= A * B with A row-major (the
// decoded codebook weights, or the activations of LutGemm) and B a row-major tile (im2col of the
// uint8 activations, or the decoded weights transposed).
// Micro-kernels for AVX-512 (6x32), AVX2/FMA (6x16) and portable C++, chosen at run time.
#pragma once

#include <cstdint>

#include "common.h"

namespace adq::gemm {

constexpr int MR = 6;              // rows of A per micro-kernel
constexpr int64_t kColAlign = 32;  // B rows are readable (zero-padded) to a multiple of this
constexpr int64_t KC = 256;        // depth of a K block

inline int64_t RoundUp(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// C[i * ldc + j] (+)= sum_{k < kc} A[i * lda + k] * B[k * ldb + j] for i < rows, j < ncols.
// Every B row must be readable (and zero) up to RoundUp(ncols, kColAlign) columns.
// accumulate=false overwrites C.
void Multiply(const float* A, int64_t lda, int64_t rows, int64_t kc, const float* B, int64_t ldb,
              int64_t ncols, float* C, int64_t ldc, bool accumulate, Isa isa);

// dst[i] = float(src[i]), i < n.
void U8ToFloat(const uint8_t* src, int64_t n, float* dst, Isa isa);

// y[i] += w * x[i], i < n.
void Axpy(float w, const float* x, int64_t n, float* y, Isa isa);

// sum_i a[i] * b[i] (float accumulation, order unspecified).
float Dot(const float* a, const float* b, int64_t n, Isa isa);

}  // namespace adq::gemm
