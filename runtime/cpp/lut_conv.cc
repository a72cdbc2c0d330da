// LutConv: Y = Scale[m] * conv2d(X, Codebook[unpack(Codes)]) + Bias[m] on uint8 levels X
// (docs/onnx-ops.md). Weights stay packed in the model; each Compute decodes them once into a
// per-thread float scratch [M, R] (vector table lookups), then runs im2col on the uint8
// activations (level 0 as padding) tile by tile into a float block and the blocked GEMM
// (AVX-512 / AVX2 / portable). Channel groups with at most two output channels (depthwise) use a
// direct convolution instead.
#include <immintrin.h>

#include <algorithm>

#include "common.h"
#include "gemm.h"
#include "packing.h"

namespace adq {
namespace {

using gemm::RoundUp;

struct Geom {
  int64_t N, C, H, W, M, group, G, Mg, kH, kW, sH, sW, dH, dW, pT, pL, OH, OW, P, R;
};

// Range [lo, hi) of output columns whose input column ow * sW + off lies in [0, W).
inline void ValidCols(int64_t off, int64_t sW, int64_t W, int64_t OW, int64_t* lo, int64_t* hi) {
  *lo = off >= 0 ? 0 : (-off + sW - 1) / sW;
  *hi = (W - 1 - off) >= 0 ? (W - 1 - off) / sW + 1 : 0;
  *lo = std::min(*lo, OW);
  *hi = std::max(std::min(*hi, OW), *lo);
}

// dst[kk * ldb + q] = Xp[c, ih, iw] for depth k = k0 + kk (c, i, j) and output position
// p = p0 + q, q < pt; columns pt..ldb-1 are zeroed. x points at the group's first channel.
void Im2col(const uint8_t* x, const Geom& g, int64_t k0, int64_t kc, int64_t p0, int64_t pt,
            int64_t ldb, float* dst, Isa isa) {
  const int64_t khw = g.kH * g.kW;
  for (int64_t kk = 0; kk < kc; ++kk) {
    const int64_t k = k0 + kk;
    const int64_t c = k / khw, i = (k % khw) / g.kW, j = k % g.kW;
    const uint8_t* xc = x + c * g.H * g.W;
    const int64_t off = j * g.dW - g.pL;
    int64_t lo, hi;
    ValidCols(off, g.sW, g.W, g.OW, &lo, &hi);
    float* d = dst + kk * ldb;
    int64_t p = p0, oh = p0 / g.OW, ow = p0 % g.OW;
    const int64_t end = p0 + pt;
    while (p < end) {
      const int64_t cnt = std::min(g.OW - ow, end - p);
      const int64_t ih = oh * g.sH - g.pT + i * g.dH;
      if (ih < 0 || ih >= g.H) {
        std::fill(d, d + cnt, 0.0f);
      } else {
        const uint8_t* row = xc + ih * g.W;
        const int64_t a = std::min(std::max(lo, ow), ow + cnt);
        const int64_t b = std::max(std::min(hi, ow + cnt), a);
        std::fill(d, d + (a - ow), 0.0f);
        if (g.sW == 1) {
          gemm::U8ToFloat(row + a + off, b - a, d + (a - ow), isa);
        } else {
          for (int64_t q = a; q < b; ++q) d[q - ow] = static_cast<float>(row[q * g.sW + off]);
        }
        std::fill(d + (b - ow), d + cnt, 0.0f);
      }
      d += cnt;
      p += cnt;
      ++oh;
      ow = 0;
    }
    std::fill(dst + kk * ldb + pt, dst + (kk + 1) * ldb, 0.0f);
  }
}

// o[q] += w * x[q * stride], q < n.
void AxpyU8Scalar(const uint8_t* x, int64_t stride, int64_t n, float w, float* o) {
  for (int64_t q = 0; q < n; ++q) o[q] += w * static_cast<float>(x[q * stride]);
}

__attribute__((target("avx2,fma"))) void AxpyU8Avx2(const uint8_t* x, int64_t stride, int64_t n,
                                                    float w, float* o) {
  if (stride != 1) return AxpyU8Scalar(x, stride, n, w, o);
  const __m256 vw = _mm256_set1_ps(w);
  int64_t q = 0;
  for (; q + 8 <= n; q += 8) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + q));
    const __m256 xf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    _mm256_storeu_ps(o + q, _mm256_fmadd_ps(vw, xf, _mm256_loadu_ps(o + q)));
  }
  for (; q < n; ++q) o[q] += w * static_cast<float>(x[q]);
}

inline void Epilogue(float* y, int64_t n, const Affine& af, int64_t m) {
  const float s = af.scale[m * af.scale_step];
  const float b = af.bias ? af.bias[m] : 0.0f;
  for (int64_t q = 0; q < n; ++q) y[q] = s * y[q] + b;
}

struct LutConv {
  static constexpr const char* kName = "LutConv";
  static constexpr ONNXTensorElementDataType kInputs[] = {kU8, kU8, kF32, kF32, kF32};
  static constexpr ONNXTensorElementDataType kOutputs[] = {kF32};
  static constexpr size_t kRequiredInputs = 4;

  explicit LutConv(const OrtKernelInfo* info) : isa_(SelectIsa()) {
    bits_ = BitsAttr(info);
    kernel_ = IntsAttr(info, "kernel_shape", nullptr);
    const Shape ones{1, 1}, zeros{0, 0, 0, 0};
    const int64_t one = 1;
    strides_ = IntsAttr(info, "strides", &ones);
    pads_ = IntsAttr(info, "pads", &zeros);
    dilations_ = IntsAttr(info, "dilations", &ones);
    group_ = IntAttr(info, "group", &one);
    Check(kernel_.size() == 2, "kernel_shape must have 2 values, got ", ShapeStr(kernel_));
    Check(strides_.size() == 2, "strides must have 2 values, got ", ShapeStr(strides_));
    Check(dilations_.size() == 2, "dilations must have 2 values, got ", ShapeStr(dilations_));
    Check(pads_.size() == 4, "pads must have 4 values, got ", ShapeStr(pads_));
    const int64_t kLimit = int64_t{1} << 24;
    for (int64_t v : kernel_) Check(v > 0 && v < kLimit, "kernel_shape must be positive, got ", ShapeStr(kernel_));
    for (int64_t v : strides_) Check(v > 0 && v < kLimit, "strides must be positive, got ", ShapeStr(strides_));
    for (int64_t v : dilations_) Check(v > 0 && v < kLimit, "dilations must be positive, got ", ShapeStr(dilations_));
    for (int64_t v : pads_) Check(v >= 0 && v < kLimit, "pads must be non-negative, got ", ShapeStr(pads_));
    Check(group_ >= 1, "group must be >= 1, got ", group_);
  }

  Geom Geometry(const Tensor& x, int64_t M) const {
    Geom g{};
    g.N = x.shape[0], g.C = x.shape[1], g.H = x.shape[2], g.W = x.shape[3];
    g.M = M, g.group = group_;
    Check(g.C % group_ == 0, "input channels C=", g.C, " not divisible by group=", group_);
    Check(M % group_ == 0, "output channels M=", M, " not divisible by group=", group_);
    g.G = g.C / group_, g.Mg = M / group_;
    g.kH = kernel_[0], g.kW = kernel_[1], g.sH = strides_[0], g.sW = strides_[1];
    g.dH = dilations_[0], g.dW = dilations_[1], g.pT = pads_[0], g.pL = pads_[1];
    const int64_t nh = g.H + pads_[0] + pads_[2] - g.dH * (g.kH - 1) - 1;
    const int64_t nw = g.W + pads_[1] + pads_[3] - g.dW * (g.kW - 1) - 1;
    Check(nh >= 0 && nw >= 0, "empty output: input ", g.H, "x", g.W, " with pads ", ShapeStr(pads_),
          " is smaller than the dilated kernel ", ShapeStr(kernel_));
    g.OH = nh / g.sH + 1, g.OW = nw / g.sW + 1;
    g.P = CheckedMul(g.OH, g.OW, "output size");
    g.R = CheckedMul(CheckedMul(g.G, g.kH, "weight row"), g.kW, "weight row");
    return g;
  }

  void Compute(Ort::KernelContext& ctx) const {
    Tensor x = GetInput(ctx, 0, "X", kU8, 4);
    const int64_t M = GetInput(ctx, 1, "Codes", kU8, 2).shape[0];
    const Geom g = Geometry(x, M);
    Lut lut = GetLut(ctx, 1, 2, bits_, M, g.R);
    Affine af = GetAffine(ctx, 3, 4, M);
    float* y = GetOutputFloat(ctx, {g.N, M, g.OH, g.OW});
    const bool direct = g.Mg <= 2;

    // Decode the weights once into a row-major [M, R] float scratch.
    float* w = ThreadScratch<kConvWeights>(CheckedMul(M, g.R, "weight size"));
    if (M * g.R > 0) {
      const int64_t rows_per_task = std::max<int64_t>(1, (1 << 15) / g.R);
      ParallelFor(ctx, static_cast<size_t>((M + rows_per_task - 1) / rows_per_task), [&](size_t t) {
        const int64_t m0 = static_cast<int64_t>(t) * rows_per_task;
        for (int64_t m = m0; m < std::min(M, m0 + rows_per_task); ++m) {
          DecodeRow(lut, m, w + m * g.R, isa_);
        }
      });
    }
    if (g.N * M * g.P == 0) return;
    if (direct) {
      Direct(ctx, g, x.as<uint8_t>(), w, af, y);
    } else {
      Gemm(ctx, g, x.as<uint8_t>(), w, af, y);
    }
  }

  void Gemm(const Ort::KernelContext& ctx, const Geom& g, const uint8_t* x, const float* w,
            const Affine& af, float* y) const {
    // Tasks: (n, group, column tile, row chunk); shrink tiles until there are enough tasks.
    const int64_t hint = TaskHint();
    int64_t PT = std::min<int64_t>(RoundUp(g.P, gemm::kColAlign), 256);
    int64_t rows = RoundUp(g.Mg, gemm::MR);
    auto count = [&] { return g.N * g.group * ((g.P + PT - 1) / PT) * ((g.Mg + rows - 1) / rows); };
    while (count() < hint && PT > 64) PT = RoundUp(PT / 2, gemm::kColAlign);
    while (count() < hint && rows > 4 * gemm::MR) rows = RoundUp(rows / 2, gemm::MR);
    const int64_t tiles = (g.P + PT - 1) / PT, chunks = (g.Mg + rows - 1) / rows;
    const Isa isa = isa_;
    ParallelFor(ctx, static_cast<size_t>(count()), [&](size_t task) {
      int64_t t = static_cast<int64_t>(task);
      const int64_t chunk = t % chunks;
      t /= chunks;
      const int64_t tile = t % tiles;
      t /= tiles;
      const int64_t grp = t % g.group, n = t / g.group;
      const int64_t r0 = chunk * rows, nrows = std::min(rows, g.Mg - r0);
      const int64_t p0 = tile * PT, pt = std::min(PT, g.P - p0), ldb = RoundUp(pt, gemm::kColAlign);
      const uint8_t* xg = x + (n * g.C + grp * g.G) * g.H * g.W;
      const int64_t m0 = grp * g.Mg + r0;
      const float* a = w + m0 * g.R;
      float* yt = y + (n * g.M + m0) * g.P + p0;
      float* buf = ThreadScratch<kConvTile>(std::min(gemm::KC, g.R) * ldb);
      if (g.R == 0) {
        for (int64_t r = 0; r < nrows; ++r) std::fill(yt + r * g.P, yt + r * g.P + pt, 0.0f);
      }
      for (int64_t k0 = 0; k0 < g.R; k0 += gemm::KC) {
        const int64_t kc = std::min(gemm::KC, g.R - k0);
        Im2col(xg, g, k0, kc, p0, pt, ldb, buf, isa);
        gemm::Multiply(a + k0, g.R, nrows, kc, buf, ldb, pt, yt, g.P, k0 > 0, isa);
      }
      for (int64_t r = 0; r < nrows; ++r) Epilogue(yt + r * g.P, pt, af, m0 + r);
    });
  }

  void Direct(const Ort::KernelContext& ctx, const Geom& g, const uint8_t* x, const float* w,
              const Affine& af, float* y) const {
    const Isa isa = isa_;
    ParallelFor(ctx, static_cast<size_t>(g.N * g.M), [&](size_t task) {
      const int64_t n = static_cast<int64_t>(task) / g.M, m = static_cast<int64_t>(task) % g.M;
      float* out = y + (n * g.M + m) * g.P;
      std::fill(out, out + g.P, 0.0f);
      const float* wm = w + m * g.R;
      const uint8_t* xg = x + (n * g.C + (m / g.Mg) * g.G) * g.H * g.W;
      for (int64_t c = 0; c < g.G; ++c) {
        const uint8_t* xc = xg + c * g.H * g.W;
        for (int64_t i = 0; i < g.kH; ++i) {
          for (int64_t j = 0; j < g.kW; ++j) {
            const float wv = wm[(c * g.kH + i) * g.kW + j];
            const int64_t off = j * g.dW - g.pL;
            int64_t lo, hi;
            ValidCols(off, g.sW, g.W, g.OW, &lo, &hi);
            if (hi <= lo) continue;
            for (int64_t oh = 0; oh < g.OH; ++oh) {
              const int64_t ih = oh * g.sH - g.pT + i * g.dH;
              if (ih < 0 || ih >= g.H) continue;
              const uint8_t* src = xc + ih * g.W + lo * g.sW + off;
              float* o = out + oh * g.OW + lo;
              if (isa != Isa::kScalar) {
                AxpyU8Avx2(src, g.sW, hi - lo, wv, o);
              } else {
                AxpyU8Scalar(src, g.sW, hi - lo, wv, o);
              }
            }
          }
        }
      }
      Epilogue(out, g.P, af, m);
    });
  }

  Isa isa_;
  int64_t bits_, group_;
  Shape kernel_, strides_, pads_, dilations_;
};

}  // namespace

const OrtCustomOp* LutConvOp() {
  static const Op<LutConv> op;
  return &op;
}

}  // namespace adq
