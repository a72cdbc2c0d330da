// LutGemm: Y[n, m] = Scale[m] * sum_k X[n, k] * Codebook[code[m, k]] + Bias[m] on uint8 levels
// X [N, Kin] (docs/onnx-ops.md). Small batches: each task decodes its weight rows one at a time
// into a small float buffer and takes dot products with the (float) activation rows, so the
// weights never exist unpacked in full. Larger batches: the weights are decoded once per Compute
// into a per-thread float scratch [M, Kin] and multiplied with X^T by the blocked GEMM.
#include <algorithm>

#include "common.h"
#include "gemm.h"
#include "packing.h"

namespace adq {
namespace {

using gemm::RoundUp;

constexpr int64_t kGemvMaxBatch = 4;

struct LutGemm {
  static constexpr const char* kName = "LutGemm";
  static constexpr ONNXTensorElementDataType kInputs[] = {kU8, kU8, kF32, kF32, kF32};
  static constexpr ONNXTensorElementDataType kOutputs[] = {kF32};
  static constexpr uint32_t kOptionalInputs = 1u << 4;
  static constexpr uint32_t kOptionalOutputs = 0;

  explicit LutGemm(const OrtKernelInfo* info) : isa_(SelectIsa()) { bits_ = BitsAttr(info); }

  void Compute(Ort::KernelContext& ctx) const {
    Tensor x = GetInput(ctx, 0, "X", kU8, 2);
    const int64_t N = x.shape[0], Kin = x.shape[1];
    const int64_t M = GetInput(ctx, 1, "Codes", kU8, 2).shape[0];
    Lut lut = GetLut(ctx, 1, 2, bits_, M, Kin);
    Affine af = GetAffine(ctx, 3, 4, M);
    float* y = GetOutputFloat(ctx, {N, M});
    if (N <= kGemvMaxBatch) {
      Gemv(ctx, lut, x.as<uint8_t>(), N, y);
    } else {
      Gemm(ctx, lut, x.as<uint8_t>(), N, y);
    }
    for (int64_t n = 0; n < N; ++n) {
      float* yr = y + n * M;
      for (int64_t m = 0; m < M; ++m) {
        yr[m] = af.scale[m * af.scale_step] * yr[m] + (af.bias ? af.bias[m] : 0.0f);
      }
    }
  }

  // Decodes every row (validating all codes, even for an empty batch) and, for N > 0, writes
  // y[n, m] = dot(X[n], W[m]).
  void Gemv(const Ort::KernelContext& ctx, const Lut& lut, const uint8_t* x, int64_t N,
            float* y) const {
    const int64_t M = lut.M, Kin = lut.R;
    if (M == 0) return;
    float* xf = ThreadScratch<kGemmX>(N * Kin);
    gemm::U8ToFloat(x, N * Kin, xf, isa_);
    const int64_t band = std::max<int64_t>(1, std::min<int64_t>((1 << 15) / std::max<int64_t>(Kin, 1),
                                                                (M + TaskHint() - 1) / TaskHint()));
    const Isa isa = isa_;
    ParallelFor(ctx, static_cast<size_t>((M + band - 1) / band), [&](size_t t) {
      float* row = ThreadScratch<kGemmRow>(Kin);
      const int64_t m0 = static_cast<int64_t>(t) * band;
      for (int64_t m = m0; m < std::min(M, m0 + band); ++m) {
        DecodeRow(lut, m, row, isa);
        for (int64_t n = 0; n < N; ++n) y[n * M + m] = gemm::Dot(xf + n * Kin, row, Kin, isa);
      }
    });
  }

  // Y^T [M, N] = W [M, Kin] * X^T [Kin, N] in tiles (rows of W x columns of batch), each
  // computed into a small buffer and written transposed into Y.
  void Gemm(const Ort::KernelContext& ctx, const Lut& lut, const uint8_t* x, int64_t N,
            float* y) const {
    const int64_t M = lut.M, Kin = lut.R;
    const Isa isa = isa_;
    float* w = ThreadScratch<kGemmWeights>(CheckedMul(M, Kin, "weight size"));
    if (M * Kin > 0) {
      const int64_t rows_per_task = std::max<int64_t>(1, (1 << 15) / Kin);
      ParallelFor(ctx, static_cast<size_t>((M + rows_per_task - 1) / rows_per_task), [&](size_t t) {
        const int64_t m0 = static_cast<int64_t>(t) * rows_per_task;
        for (int64_t m = m0; m < std::min(M, m0 + rows_per_task); ++m) DecodeRow(lut, m, w + m * Kin, isa);
      });
    }
    if (M == 0) return;
    if (Kin == 0) {
      std::fill(y, y + N * M, 0.0f);
      return;
    }
    // X^T [Kin, ldx], padding columns zeroed.
    const int64_t ldx = RoundUp(N, gemm::kColAlign);
    float* xt = ThreadScratch<kGemmX>(CheckedMul(Kin, ldx, "activation size"));
    for (int64_t k = 0; k < Kin; ++k) {
      float* d = xt + k * ldx;
      for (int64_t n = 0; n < N; ++n) d[n] = static_cast<float>(x[n * Kin + k]);
      std::fill(d + N, d + ldx, 0.0f);
    }
    const int64_t hint = TaskHint();
    int64_t cols = std::min<int64_t>(ldx, 256);
    int64_t rows = std::min<int64_t>(RoundUp(M, gemm::MR), 96);
    auto count = [&] { return ((M + rows - 1) / rows) * ((N + cols - 1) / cols); };
    while (count() < hint && rows > 4 * gemm::MR) rows = RoundUp(rows / 2, gemm::MR);
    while (count() < hint && cols > 2 * gemm::kColAlign) cols = RoundUp(cols / 2, gemm::kColAlign);
    const int64_t col_tiles = (N + cols - 1) / cols;
    ParallelFor(ctx, static_cast<size_t>(count()), [&](size_t task) {
      const int64_t m0 = static_cast<int64_t>(task) / col_tiles * rows;
      const int64_t n0 = static_cast<int64_t>(task) % col_tiles * cols;
      const int64_t nr = std::min(rows, M - m0), nc = std::min(cols, N - n0);
      const int64_t ldc = RoundUp(nc, gemm::kColAlign);
      float* c = ThreadScratch<kGemmTile>(nr * ldc);
      for (int64_t k0 = 0; k0 < Kin; k0 += gemm::KC) {
        const int64_t kc = std::min(gemm::KC, Kin - k0);
        gemm::Multiply(w + m0 * Kin + k0, Kin, nr, kc, xt + k0 * ldx + n0, ldx, nc, c, ldc, k0 > 0,
                       isa);
      }
      for (int64_t n = 0; n < nc; ++n) {
        for (int64_t r = 0; r < nr; ++r) y[(n0 + n) * M + m0 + r] = c[r * ldc + n];
      }
    });
  }

  Isa isa_;
  int64_t bits_;
};

}  // namespace

const OrtCustomOp* LutGemmOp() {
  static const Op<LutGemm> op;
  return &op;
}

}  // namespace adq
