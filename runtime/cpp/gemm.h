// A small blocked float GEMM shared by LutConv and LutGemm: C (+)= A * B with A packed in
// panels of MR rows (the decoded codebook weights, or the activations of LutGemm) and B a
// row-major tile (im2col of the uint8 activations, or the decoded weights transposed).
// AVX2/FMA micro-kernels chosen at run time, with a portable scalar fallback.
#pragma once

#include <cstdint>

namespace adq::gemm {

constexpr int MR = 6;   // rows of A per panel / micro-kernel
constexpr int NR = 16;  // columns of B per micro-kernel (two AVX2 vectors)
constexpr int64_t KC = 256;  // depth of a K block (B block of KC x NR floats stays in L1)

inline int64_t PanelCount(int64_t rows) { return (rows + MR - 1) / MR; }
// Floats of a packed A of `rows` x K: element (m, k) lives at
// (m / MR) * MR * K + k * MR + m % MR; padding rows are never read into C.
inline int64_t PackedSize(int64_t rows, int64_t K) { return PanelCount(rows) * MR * K; }
inline float* PackedRow(float* A, int64_t K, int64_t m) { return A + (m / MR) * MR * K + m % MR; }
inline int64_t RoundUp(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// C[i * ldc + j] (+)= sum_{kk < kc} A(row0 + i, k0 + kk) * B[kk * ldb + j] for i < rows,
// j < ncols. A is packed over depth K; row0 is a multiple of MR. Every B row must be readable
// (and zero) up to RoundUp(ncols, NR) columns. accumulate=false overwrites C.
void Multiply(const float* A, int64_t K, int64_t row0, int64_t rows, int64_t k0, int64_t kc,
              const float* B, int64_t ldb, int64_t ncols, float* C, int64_t ldc, bool accumulate,
              bool avx2);

// Convert n uint8 values to float.
void U8ToFloat(const uint8_t* src, int64_t n, float* dst, bool avx2);

}  // namespace adq::gemm
