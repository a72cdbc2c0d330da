// LutDequant: W = Codebook[unpack(Codes, bits)] reshaped to `shape` (docs/onnx-ops.md).
#include <algorithm>

#include "common.h"
#include "packing.h"

namespace adq {
namespace {

struct LutDequant {
  static constexpr const char* kName = "LutDequant";
  static constexpr ONNXTensorElementDataType kInputs[] = {kU8, kF32};
  static constexpr ONNXTensorElementDataType kOutputs[] = {kF32};
  static constexpr uint32_t kOptionalInputs = 0;
  static constexpr uint32_t kOptionalOutputs = 0;

  explicit LutDequant(const OrtKernelInfo* info) : isa_(SelectIsa()) {
    bits_ = BitsAttr(info);
    shape_ = IntsAttr(info, "shape", nullptr);
    Check(!shape_.empty(), "attribute 'shape' must have at least one dimension");
    for (int64_t d : shape_) Check(d >= 0, "attribute 'shape' has a negative dimension: ", ShapeStr(shape_));
    NumElements(shape_);  // overflow check
  }

  void Compute(Ort::KernelContext& ctx) const {
    const int64_t M = shape_[0];
    const int64_t R = NumElements(Shape(shape_.begin() + 1, shape_.end()));
    Lut lut = GetLut(ctx, 0, 1, bits_, M, R);
    float* w = GetOutputFloat(ctx, shape_);
    if (M == 0 || R == 0) return;
    const int64_t rows_per_task = std::max<int64_t>(1, (1 << 16) / R);
    const size_t tasks = static_cast<size_t>((M + rows_per_task - 1) / rows_per_task);
    ParallelFor(ctx, tasks, [&](size_t task) {
      const int64_t m0 = static_cast<int64_t>(task) * rows_per_task;
      const int64_t m1 = std::min(M, m0 + rows_per_task);
      for (int64_t m = m0; m < m1; ++m) DecodeRow(lut, m, w + m * R, isa_);
    });
  }

  Isa isa_;
  int64_t bits_;
  Shape shape_;
};

}  // namespace

const OrtCustomOp* LutDequantOp() {
  static const Op<LutDequant> op;
  return &op;
}

}  // namespace adq
