// LutGemm: Y[n, m] = Scale[m] * sum_k X[n, k] * Codebook[code[m, k]] + Bias[m] on uint8 levels
// X [N, Kin] (docs/onnx-ops.md). Each Compute decodes the packed weights once into W^T [Kin, M]
// (float, columns padded to the micro-kernel width), converts X into GEMM panels and runs the
// blocked AVX2/FMA GEMM over (batch rows x output columns) tiles.
#include <algorithm>

#include "common.h"
#include "gemm.h"
#include "packing.h"

namespace adq {
namespace {

using gemm::MR;
using gemm::NR;
using gemm::RoundUp;

struct LutGemm {
  static constexpr const char* kName = "LutGemm";
  static constexpr ONNXTensorElementDataType kInputs[] = {kU8, kU8, kF32, kF32, kF32};
  static constexpr ONNXTensorElementDataType kOutputs[] = {kF32};
  static constexpr size_t kRequiredInputs = 4;

  explicit LutGemm(const OrtKernelInfo* info) : avx2_(UseAvx2()) { bits_ = BitsAttr(info); }

  void Compute(Ort::KernelContext& ctx) const {
    Tensor x = GetInput(ctx, 0, "X", kU8, 2);
    const int64_t N = x.shape[0], Kin = x.shape[1];
    const int64_t M = GetInput(ctx, 1, "Codes", kU8, 2).shape[0];
    Lut lut = GetLut(ctx, 1, 2, bits_, M, Kin);
    Affine af = GetAffine(ctx, 3, 4, M);
    float* y = GetOutputFloat(ctx, {N, M});
    const bool avx2 = avx2_;

    // W^T [Kin, ldw]: decoded in bands of NR columns so tasks never share a cache line.
    const int64_t ldw = RoundUp(std::max<int64_t>(M, 1), NR);
    std::vector<float> wt(static_cast<size_t>(CheckedMul(Kin, ldw, "weight size")), 0.0f);
    if (M * Kin > 0) {
      const int64_t band = NR * std::max<int64_t>(1, (1 << 15) / (NR * Kin));
      ParallelFor(ctx, static_cast<size_t>((M + band - 1) / band), [&](size_t t) {
        const int64_t m0 = static_cast<int64_t>(t) * band;
        for (int64_t m = m0; m < std::min(M, m0 + band); ++m) DecodeRow(lut, m, wt.data() + m, ldw);
      });
    }
    if (N * M == 0) return;
    if (Kin == 0) {
      std::fill(y, y + N * M, 0.0f);
    } else {
      // X as GEMM panels of MR rows.
      std::vector<float> a(static_cast<size_t>(gemm::PackedSize(N, Kin)));
      const uint8_t* xs = x.as<uint8_t>();
      for (int64_t n = 0; n < N; ++n) {
        float* d = gemm::PackedRow(a.data(), Kin, n);
        for (int64_t k = 0; k < Kin; ++k) d[k * MR] = static_cast<float>(xs[n * Kin + k]);
      }
      const int64_t hint = TaskHint();
      int64_t cols = std::min<int64_t>(ldw, 256);
      int64_t rows = RoundUp(N, MR);
      auto count = [&] { return ((N + rows - 1) / rows) * ((M + cols - 1) / cols); };
      while (count() < hint && rows > 4 * MR) rows = RoundUp(rows / 2, MR);
      while (count() < hint && cols > 2 * NR) cols = RoundUp(cols / 2, NR);
      const int64_t col_tiles = (M + cols - 1) / cols;
      ParallelFor(ctx, static_cast<size_t>(count()), [&](size_t task) {
        const int64_t r0 = static_cast<int64_t>(task) / col_tiles * rows;
        const int64_t c0 = static_cast<int64_t>(task) % col_tiles * cols;
        const int64_t nr = std::min(rows, N - r0), nc = std::min(cols, M - c0);
        for (int64_t k0 = 0; k0 < Kin; k0 += gemm::KC) {
          const int64_t kc = std::min(gemm::KC, Kin - k0);
          gemm::Multiply(a.data(), Kin, r0, nr, k0, kc, wt.data() + k0 * ldw + c0, ldw, nc,
                         y + r0 * M + c0, M, k0 > 0, avx2);
        }
      });
    }
    for (int64_t n = 0; n < N; ++n) {
      float* yr = y + n * M;
      for (int64_t m = 0; m < M; ++m) {
        yr[m] = af.scale[m * af.scale_step] * yr[m] + (af.bias ? af.bias[m] : 0.0f);
      }
    }
  }

  bool avx2_;
  int64_t bits_;
};

}  // namespace

const OrtCustomOp* LutGemmOp() {
  static const Op<LutGemm> op;
  return &op;
}

}  // namespace adq
