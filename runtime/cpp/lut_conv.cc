// LutConv: Y = Scale[m] * conv2d(X, Codebook[unpack(Codes)]) + Bias[m] on uint8 levels X, then
// optionally + Residual and relu; LutConvQuant: the same, thresholded into uint8 levels
// (docs/onnx-ops.md). Group-1 convolutions with codes of at most 4 bits run the panel kernels
// of conv_panels.cc, which apply that epilogue as they store. The paths below are the others:
// they write floats and run the epilogue over them. Weights stay packed in the model; each
// Compute decodes them once into a per-thread float scratch (vector table lookups). By case:
//  - stride 1: the uint8 input becomes zero-padded float planes [Hp, Wp] once; each kernel tap
//    (i, j) is then a GEMM whose B is the padded planes shifted by i*dH*Wp + j*dW (outputs are
//    computed over rows of Wp and the wrapped-around columns dropped): no im2col. Weights are
//    laid out tap-major [kH*kW, M, C/group] for it.
//  - other strides: im2col of the uint8 input (level 0 as padding) tile by tile into a float
//    block, then the GEMM on row-major weights [M, R].
//  - channel groups of at most two output channels (depthwise): a direct convolution over the
//    padded planes (one long axpy per tap for stride 1).
// The GEMM is the blocked AVX-512 / AVX2 / portable one of gemm.cc.
// channels_last = 1 (NHWC activations) runs natively only on the int8 panel kernel; the other
// paths compute on NCHW copies. A node's 1x1 shortcut (ShortcutX, ...) is added by that kernel
// tile by tile, and elsewhere computed into a buffer that serves as the Residual.


#include <algorithm>
#include <array>
#include <vector>

#include "common.h"
#include "conv_panels.h"
#include "gemm.h"
#include "packing.h"

namespace adq {
namespace {

using gemm::RoundUp;

struct Geom {
  int64_t N, C, H, W, M, group, G, Mg, kH, kW, sH, sW, dH, dW, pT, pL, pB, pR, OH, OW, P, R;
};

// A convolution's attributes: the node's own, or its 1x1 shortcut's.
struct ConvAttrs {
  Shape kernel, strides, pads, dilations;
  int64_t group = 1;
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

inline void Epilogue(float* y, int64_t n, const Affine& af, int64_t m) {
  const float s = af.scale[m * af.scale_step];
  const float b = af.bias ? af.bias[m] : 0.0f;
  for (int64_t q = 0; q < n; ++q) y[q] = s * y[q] + b;
}

// uint8: X and Codes, ShortcutX and ShortcutCodes (inputs sc, sc + 1); the others float.
template <size_t N, size_t sc>
constexpr std::array<ONNXTensorElementDataType, N> ConvInputs() {
  std::array<ONNXTensorElementDataType, N> types{};
  for (size_t i = 0; i < N; ++i) types[i] = i < 2 || i == sc || i == sc + 1 ? kU8 : kF32;
  return types;
}

// A node's optional second output of levels (LutConv's Q, LutConvQuant's Q2) with its scale
// and thresholds at inputs k and k + 1, which it has exactly when it lists the output: the
// output's data (levels set), or nullptr when the node has neither.
uint8_t* OptionalLevels(Ort::KernelContext& ctx, const Shape& shape, size_t k, const char* out,
                        const char* scale, const char* thresholds, Levels* levels) {
  const bool listed = ctx.GetOutputCount() > 1;
  Check(!listed || (HasInput(ctx, k) && HasInput(ctx, k + 1)), "output ", out, " needs inputs ",
        scale, " and ", thresholds);
  Check(listed || !(HasInput(ctx, k) || HasInput(ctx, k + 1)), scale, " and ", thresholds,
        " need output ", out);
  if (!listed) return nullptr;
  *levels = GetLevels(ctx, k, k + 1, scale, thresholds);
  return ctx.GetOutput(1, shape).GetTensorMutableData<uint8_t>();
}

template <bool kQuant>
constexpr auto ConvOutputs() {
  if constexpr (kQuant) {
    return std::array<ONNXTensorElementDataType, 2>{kU8, kU8};
  } else {
    return std::array<ONNXTensorElementDataType, 2>{kF32, kU8};
  }
}

// LutConv (kQuant false) and LutConvQuant (kQuant true).
template <bool kQuant>
struct LutConvT {
  static constexpr const char* kName = kQuant ? "LutConvQuant" : "LutConv";
  // X, Codes (uint8), Codebook, Scale, Bias, Residual, QScale, QThresholds (LutConvQuant:
  // QScale2, QThresholds2), then from kShortcut on ShortcutX, ShortcutCodes (uint8),
  // ShortcutCodebook, ShortcutScale, ShortcutBias
  static constexpr size_t kShortcut = kQuant ? 10 : 8;
  static constexpr auto kInputs = ConvInputs<kShortcut + 5, kShortcut>();
  // LutConv: Y and optionally its levels Q; LutConvQuant: Q and optionally Q2
  static constexpr auto kOutputs = ConvOutputs<kQuant>();
  static constexpr uint32_t kOptionalInputs = (kQuant ? 0x330u : 0xF0u) | (0x1Fu << kShortcut);
  static constexpr uint32_t kOptionalOutputs = 0x2u;

  explicit LutConvT(const OrtKernelInfo* info) : isa_(SelectIsa()) {
    bits_ = BitsAttr(info);
    const Shape ones{1, 1}, zeros{0, 0, 0, 0};
    const int64_t one = 1, zero = 0;
    ConvAttrs& a = conv_;
    a.kernel = WindowAttr(info, "kernel_shape", 2, 1, nullptr);
    a.strides = WindowAttr(info, "strides", 2, 1, &ones);
    a.pads = WindowAttr(info, "pads", 4, 0, &zeros);
    a.dilations = WindowAttr(info, "dilations", 2, 1, &ones);
    a.group = IntAttr(info, "group", &one);
    Check(a.group >= 1, "group must be >= 1, got ", a.group);
    const int64_t relu = IntAttr(info, "relu", &zero);
    Check(relu == 0 || relu == 1, "attribute 'relu' must be 0 or 1, got ", relu);
    relu_ = relu == 1;
    const int64_t last = IntAttr(info, "channels_last", &zero);
    Check(last == 0 || last == 1, "attribute 'channels_last' must be 0 or 1, got ", last);
    nhwc_ = last == 1;
    shortcut_bits_ = IntAttr(info, "shortcut_bits", &zero);
    Check(shortcut_bits_ >= 0 && shortcut_bits_ <= 8, "shortcut_bits must be in 0..8, got ",
          shortcut_bits_);
    shortcut_ = ConvAttrs{ones, WindowAttr(info, "shortcut_strides", 2, 1, &ones), zeros, ones, 1};
    // Constant Codes and Codebook (initializers) are repacked once for the panel paths and kept.
    constant_ = ConstantInput(info, 1) && ConstantInput(info, 2);
    shortcut_constant_ = ConstantInput(info, kShortcut + 1) && ConstantInput(info, kShortcut + 2);
  }

  // The geometry of a convolution with attributes a of x (dims in NCHW order) to M channels.
  static Geom Geometry(const Tensor& x, int64_t M, const ConvAttrs& a) {
    Geom g{};
    g.N = x.shape[0], g.C = x.shape[1], g.H = x.shape[2], g.W = x.shape[3];
    g.M = M, g.group = a.group;
    Check(g.C % a.group == 0, "input channels C=", g.C, " not divisible by group=", a.group);
    Check(M % a.group == 0, "output channels M=", M, " not divisible by group=", a.group);
    g.G = g.C / a.group, g.Mg = M / a.group;
    g.kH = a.kernel[0], g.kW = a.kernel[1], g.sH = a.strides[0], g.sW = a.strides[1];
    g.dH = a.dilations[0], g.dW = a.dilations[1];
    g.pT = a.pads[0], g.pL = a.pads[1], g.pB = a.pads[2], g.pR = a.pads[3];
    const int64_t nh = g.H + g.pT + g.pB - g.dH * (g.kH - 1) - 1;
    const int64_t nw = g.W + g.pL + g.pR - g.dW * (g.kW - 1) - 1;
    Check(nh >= 0 && nw >= 0, "empty output: input ", g.H, "x", g.W, " with pads ",
          ShapeStr(a.pads), " is smaller than the dilated kernel ", ShapeStr(a.kernel));
    g.OH = nh / g.sH + 1, g.OW = nw / g.sW + 1;
    g.P = CheckedMul(g.OH, g.OW, "output size");
    g.R = CheckedMul(CheckedMul(g.G, g.kH, "weight row"), g.kW, "weight row");
    return g;
  }

  // The output shape of convolution g in the node's layout.
  Shape OutputShape(const Geom& g) const {
    return nhwc_ ? Shape{g.N, g.OH, g.OW, g.M} : Shape{g.N, g.M, g.OH, g.OW};
  }

  // x with its dims in NCHW order, whatever its layout.
  Tensor NchwView(const Tensor& x) const {
    Tensor v = x;
    if (nhwc_) v.shape = {x.shape[0], x.shape[3], x.shape[1], x.shape[2]};
    return v;
  }

  void Compute(Ort::KernelContext& ctx) const {
    const Tensor x = GetInput(ctx, 0, "X", kU8, 4);
    const int64_t M = GetInput(ctx, 1, "Codes", kU8, 2).shape[0];
    const Geom g = Geometry(NchwView(x), M, conv_);
    Lut lut = GetLut(ctx, 1, 2, bits_, M, g.R);
    Affine af = GetAffine(ctx, 3, 4, M);
    const Shape yshape = OutputShape(g);
    panels::Fused f;
    f.relu = relu_;
    if (HasInput(ctx, 5)) {
      Tensor r = GetInput(ctx, 5, "Residual", kF32, 4);
      Check(r.shape == yshape, "Residual must have the output's shape ", ShapeStr(yshape), ", got ",
            ShapeStr(r.shape));
      f.residual = r.as<float>();
    }
    float* y = nullptr;
    if (kQuant) {
      f.levels = GetLevels(ctx, 6, 7, "QScale", "QThresholds");
      f.q = ctx.GetOutput(0, yshape).GetTensorMutableData<uint8_t>();
      f.level_cache[0] = &level_cache_[0];
      f.level_cache[1] = &level_cache_[1];
      f.q2 = OptionalLevels(ctx, yshape, 8, "Q2", "QScale2", "QThresholds2", &f.levels2);
    } else {
      y = GetOutputFloat(ctx, yshape);
      f.q = OptionalLevels(ctx, yshape, 6, "Q", "QScale", "QThresholds", &f.levels);
    }
    const panels::Kind kind = panels::Choose(isa_, lut, conv_.group, g.G, g.kH * g.kW);
    std::vector<float> shortcut;  // S, where it goes through memory
    bool listed = false;
    for (size_t i = kShortcut; i < kShortcut + 5; ++i) listed = listed || HasInput(ctx, i);
    if (listed) {
      for (size_t i = kShortcut; i < kShortcut + 4; ++i) {
        Check(HasInput(ctx, i),
              "ShortcutX, ShortcutCodes, ShortcutCodebook and ShortcutScale go together");
      }
      Check(!f.residual, "a node has a Residual or a shortcut, not both");
      Check(shortcut_bits_ > 0, "the shortcut needs shortcut_bits");
      const Tensor x2 = GetInput(ctx, kShortcut, "ShortcutX", kU8, 4);
      const Geom g2 = Geometry(NchwView(x2), M, shortcut_);
      const Shape sshape = OutputShape(g2);
      Check(sshape == yshape, "the shortcut's output must have Y's shape ", ShapeStr(yshape),
            ", got ", ShapeStr(sshape));
      Lut lut2 = GetLut(ctx, kShortcut + 1, kShortcut + 2, shortcut_bits_, M, g2.R);
      Affine af2 = GetAffine(ctx, kShortcut + 3, kShortcut + 4, M);
      const panels::Kind kind2 = panels::Choose(isa_, lut2, 1, g2.G, 1);
      if (nhwc_ && kind == panels::Kind::kInt8 && kind2 == panels::Kind::kInt8 && g2.C % 4 == 0) {
        // The int8 kernel adds S tile by tile (its sums next to the node's own).
        const auto packed2 = shortcut_cache_.Get(lut2, kind2, g2.G, 1, shortcut_constant_);
        f.shortcut = {x2.as<uint8_t>(), packed2, af2, g2.C, g2.H, g2.W, g2.sH, g2.sW};
      } else {
        shortcut.resize(static_cast<size_t>(g.N * M * g.P));
        Convolve(ctx, g2, x2, lut2, af2, panels::Fused{}, shortcut.data(), kind2, shortcut_cache_,
                 shortcut_constant_);
        f.residual = shortcut.data();
      }
    }
    Convolve(ctx, g, x, lut, af, f, y, kind, cache_, constant_);
  }

  // The convolution g of x (in the node's layout) and epilogue f into y (nullptr for
  // LutConvQuant) and f's levels, in the node's layout.
  void Convolve(const Ort::KernelContext& ctx, const Geom& g, const Tensor& x, const Lut& lut,
                const Affine& af, const panels::Fused& f, float* y, panels::Kind kind,
                panels::Cache& cache, bool constant) const {
    Tensor xv = NchwView(x);
    if (!nhwc_ || kind == panels::Kind::kInt8) {
      Run(ctx, g, xv, lut, af, f, y, kind, nhwc_, cache, constant);
      return;
    }
    // Channels last without a channels-last kernel (float codebooks, no AVX-512 VNNI): the
    // NCHW computation on transposed copies, its outputs transposed back.
    const int64_t HW = g.H * g.W, P = g.P, M = g.M;
    std::vector<uint8_t> xt(static_cast<size_t>(g.N * g.C * HW));
    Transpose(x.as<uint8_t>(), g.N, HW, g.C, xt.data());
    xv.data = xt.data();
    const size_t total = static_cast<size_t>(g.N * M * P);
    std::vector<float> rt(f.residual ? total : 0), yt(y ? total : 0);
    std::vector<uint8_t> qt(f.q ? total : 0), q2t(f.q2 ? total : 0);
    panels::Fused ft = f;
    if (f.residual) Transpose(f.residual, g.N, P, M, rt.data());
    ft.residual = f.residual ? rt.data() : nullptr;
    ft.q = f.q ? qt.data() : nullptr;
    ft.q2 = f.q2 ? q2t.data() : nullptr;
    Run(ctx, g, xv, lut, af, ft, y ? yt.data() : nullptr, kind, false, cache, constant);
    if (y) Transpose(yt.data(), g.N, M, P, y);
    if (f.q) Transpose(qt.data(), g.N, M, P, f.q);
    if (f.q2) Transpose(q2t.data(), g.N, M, P, f.q2);
  }

  // dst [N, cols, rows] = src [N, rows, cols] transposed per image (NHWC <-> NCHW).
  template <class T>
  static void Transpose(const T* src, int64_t N, int64_t rows, int64_t cols, T* dst) {
    for (int64_t n = 0; n < N; ++n, src += rows * cols, dst += rows * cols) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
      }
    }
  }

  // The convolution and epilogue f on x into y (nullptr for LutConvQuant) and f's levels, all
  // in NCHW, or channels last (only for kind kInt8).
  void Run(const Ort::KernelContext& ctx, const Geom& g, const Tensor& x, const Lut& lut,
           const Affine& af, const panels::Fused& f, float* y, panels::Kind kind, bool nhwc,
           panels::Cache& cache, bool constant) const {
    const int64_t M = g.M;
    if (kind != panels::Kind::kNone) {
      const auto packed = cache.Get(lut, kind, g.G, g.kH * g.kW, constant);
      const panels::ConvShape s{g.N,  g.C,  g.H,  g.W,  M,    g.kH, g.kW, g.sH, g.sW,
                                g.dH, g.dW, g.pT, g.pL, g.pB, g.pR, g.OH, g.OW, nhwc};
      panels::Conv(ctx, s, x.as<uint8_t>(), *packed, lut, af, f, y, isa_);
      return;
    }
    // The other paths write floats (LutConvQuant: to a buffer), then the epilogue runs over them.
    const int64_t total = CheckedMul(CheckedMul(g.N, M, "output"), g.P, "output");
    std::vector<float> buffer(y ? 0 : static_cast<size_t>(total));
    if (!y) y = buffer.data();
    ComputeFloat(ctx, g, x, lut, af, y);
    if (!f.residual && !f.relu && !f.q && !f.q2) return;
    constexpr int64_t kChunk = 1 << 14;
    ParallelFor(ctx, static_cast<size_t>((total + kChunk - 1) / kChunk), [&](size_t t) {
      const int64_t i0 = static_cast<int64_t>(t) * kChunk;
      panels::Finish(y + i0, std::min(kChunk, total - i0), f, i0, isa_);
    });
  }

  // Y = Scale * conv + Bias into y (the paths other than the panel kernels).
  void ComputeFloat(const Ort::KernelContext& ctx, const Geom& g, const Tensor& x, const Lut& lut,
                    const Affine& af, float* y) const {
    const int64_t M = g.M;
    const bool direct = g.Mg <= 2;

    const bool stride1 = g.sH == 1 && g.sW == 1;
    const bool tap_major = stride1 && !direct;
    const int64_t taps = g.kH * g.kW;

    // Decode the weights once: row-major [M, R], or tap-major [kH*kW, M, G] for the stride-1 GEMM.
    float* w = ThreadScratch<kConvWeights>(CheckedMul(M, g.R, "weight size"));
    if (M * g.R > 0) {
      const int64_t rows_per_task = std::max<int64_t>(1, (1 << 15) / g.R);
      ParallelFor(ctx, static_cast<size_t>((M + rows_per_task - 1) / rows_per_task), [&](size_t t) {
        const int64_t m0 = static_cast<int64_t>(t) * rows_per_task;
        float* row = tap_major ? ThreadScratch<kConvRow>(g.R) : nullptr;
        for (int64_t m = m0; m < std::min(M, m0 + rows_per_task); ++m) {
          if (!tap_major) {
            DecodeRow(lut, m, w + m * g.R, isa_);
            continue;
          }
          DecodeRow(lut, m, row, isa_);
          for (int64_t c = 0; c < g.G; ++c) {
            for (int64_t tap = 0; tap < taps; ++tap) w[(tap * M + m) * g.G + c] = row[c * taps + tap];
          }
        }
      });
    }
    if (g.N * M * g.P == 0) return;
    if (!stride1 && !direct) {
      Gemm(ctx, g, x.as<uint8_t>(), w, af, y);
      return;
    }
    // Zero-padded float planes [N, C, Hp, Wp], with slack after the last one for the reads of
    // the shifted planes (and the GEMM's padded columns) past its end.
    const int64_t Hp = g.H + g.pT + g.pB, Wp = g.W + g.pL + g.pR;
    const int64_t plane = CheckedMul(Hp, Wp, "padded plane");
    const int64_t slack = 2 * gemm::kColAlign;
    float* xp = ThreadScratch<kConvInput>(CheckedMul(g.N * g.C, plane, "padded input") + slack);
    const uint8_t* xs = x.as<uint8_t>();
    std::fill(xp + g.N * g.C * plane, xp + g.N * g.C * plane + slack, 0.0f);
    ParallelFor(ctx, static_cast<size_t>(g.N * g.C), [&](size_t t) {
      float* d = xp + static_cast<int64_t>(t) * plane;
      const uint8_t* src = xs + static_cast<int64_t>(t) * g.H * g.W;
      std::fill(d, d + g.pT * Wp, 0.0f);
      for (int64_t h = 0; h < g.H; ++h) {
        float* r = d + (g.pT + h) * Wp;
        std::fill(r, r + g.pL, 0.0f);
        gemm::U8ToFloat(src + h * g.W, g.W, r + g.pL, isa_);
        std::fill(r + g.pL + g.W, r + Wp, 0.0f);
      }
      std::fill(d + (g.pT + g.H) * Wp, d + plane, 0.0f);
    });
    if (direct) {
      DirectPadded(ctx, g, xp, Wp, plane, w, af, y);
    } else {
      ShiftedGemm(ctx, g, xp, Wp, plane, w, af, y);
    }
  }

  // Output [oh, ow] of a flat column q = oh * Wp + ow of a padded-plane result: kept if ow < OW.
  static void StoreFlat(const float* src, int64_t q0, int64_t n, int64_t Wp, const Geom& g,
                        const Affine& af, int64_t m, float* ym) {
    const float s = af.scale[m * af.scale_step];
    const float b = af.bias ? af.bias[m] : 0.0f;
    int64_t q = q0, oh = q0 / Wp, ow = q0 % Wp;
    while (q < q0 + n) {
      const int64_t cnt = std::min(Wp - ow, q0 + n - q);
      const int64_t keep = std::max<int64_t>(0, std::min(g.OW - ow, cnt));
      float* dst = ym + oh * g.OW + ow;
      const float* from = src + (q - q0);
      for (int64_t k = 0; k < keep; ++k) dst[k] = s * from[k] + b;
      q += cnt;
      ++oh;
      ow = 0;
    }
  }

  // Stride 1, GEMM per kernel tap on shifted padded planes. Tasks: (n, group, column tile of the
  // flat output [0, L), row chunk).
  void ShiftedGemm(const Ort::KernelContext& ctx, const Geom& g, const float* xp, int64_t Wp,
                   int64_t plane, const float* w, const Affine& af, float* y) const {
    const int64_t L = (g.OH - 1) * Wp + g.OW;  // flat outputs oh * Wp + ow, ow < Wp
    const int64_t hint = TaskHint();
    int64_t CT = std::min<int64_t>(RoundUp(L, gemm::kColAlign), 256);
    int64_t rows = RoundUp(g.Mg, gemm::MR);
    auto count = [&] { return g.N * g.group * ((L + CT - 1) / CT) * ((g.Mg + rows - 1) / rows); };
    while (count() < hint && rows > 4 * gemm::MR) rows = RoundUp(rows / 2, gemm::MR);
    while (count() < hint && CT > 64) CT = RoundUp(CT / 2, gemm::kColAlign);
    const int64_t tiles = (L + CT - 1) / CT, chunks = (g.Mg + rows - 1) / rows;
    const Isa isa = isa_;
    ParallelFor(ctx, static_cast<size_t>(count()), [&](size_t task) {
      int64_t t = static_cast<int64_t>(task);
      const int64_t chunk = t % chunks;
      t /= chunks;
      const int64_t tile = t % tiles;
      t /= tiles;
      const int64_t grp = t % g.group, n = t / g.group;
      const int64_t r0 = chunk * rows, nrows = std::min(rows, g.Mg - r0);
      const int64_t q0 = tile * CT, ct = std::min(CT, L - q0), ldc = RoundUp(ct, gemm::kColAlign);
      const int64_t m0 = grp * g.Mg + r0;
      const float* xg = xp + (n * g.C + grp * g.G) * plane + q0;
      float* c = ThreadScratch<kConvTile>(nrows * ldc);
      if (g.G == 0) std::fill(c, c + nrows * ldc, 0.0f);
      bool first = true;
      for (int64_t i = 0; i < g.kH; ++i) {
        for (int64_t j = 0; j < g.kW; ++j) {
          const float* a = w + ((i * g.kW + j) * g.M + m0) * g.G;
          const float* b = xg + i * g.dH * Wp + j * g.dW;
          for (int64_t c0 = 0; c0 < g.G; c0 += gemm::KC) {
            const int64_t kc = std::min(gemm::KC, g.G - c0);
            gemm::Multiply(a + c0, g.G, nrows, kc, b + c0 * plane, plane, ct, c, ldc, !first, isa);
            first = false;
          }
        }
      }
      for (int64_t r = 0; r < nrows; ++r) {
        StoreFlat(c + r * ldc, q0, ct, Wp, g, af, m0 + r, y + (n * g.M + m0 + r) * g.P);
      }
    });
  }

  // At most two output channels per group (depthwise), any stride: per (n, m) and per input
  // channel and tap, stride 1: one axpy over the flat padded plane (then the wrapped columns
  // dropped); other strides: a strided multiply-add per output row.
  void DirectPadded(const Ort::KernelContext& ctx, const Geom& g, const float* xp, int64_t Wp,
                    int64_t plane, const float* w, const Affine& af, float* y) const {
    const bool stride1 = g.sH == 1 && g.sW == 1;
    const int64_t L = stride1 ? (g.OH - 1) * Wp + g.OW : g.P;
    const Isa isa = isa_;
    ParallelFor(ctx, static_cast<size_t>(g.N * g.M), [&](size_t task) {
      const int64_t n = static_cast<int64_t>(task) / g.M, m = static_cast<int64_t>(task) % g.M;
      float* ym = y + (n * g.M + m) * g.P;
      float* acc = stride1 ? ThreadScratch<kConvTile>(L) : ym;
      std::fill(acc, acc + L, 0.0f);
      const float* wm = w + m * g.R;
      const float* xg = xp + (n * g.C + (m / g.Mg) * g.G) * plane;
      for (int64_t c = 0; c < g.G; ++c) {
        for (int64_t i = 0; i < g.kH; ++i) {
          for (int64_t j = 0; j < g.kW; ++j) {
            const float wv = wm[(c * g.kH + i) * g.kW + j];
            const float* src = xg + c * plane + i * g.dH * Wp + j * g.dW;
            if (stride1) {
              gemm::Axpy(wv, src, L, acc, isa);
              continue;
            }
            for (int64_t oh = 0; oh < g.OH; ++oh) {
              const float* s = src + oh * g.sH * Wp;
              float* o = acc + oh * g.OW;
              for (int64_t ow = 0; ow < g.OW; ++ow) o[ow] += wv * s[ow * g.sW];
            }
          }
        }
      }
      if (stride1) {
        StoreFlat(acc, 0, L, Wp, g, af, m, ym);
      } else {
        Epilogue(ym, g.P, af, m);
      }
    });
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

  Isa isa_;
  int64_t bits_, shortcut_bits_;
  ConvAttrs conv_, shortcut_;  // the node's convolution and its 1x1 shortcut's
  bool relu_ = false;
  bool nhwc_ = false;  // channels_last
  bool constant_ = false, shortcut_constant_ = false;
  mutable panels::Cache cache_, shortcut_cache_;
  mutable panels::LevelCache level_cache_[2];  // LutConvQuant: Q's and Q2's
};

}  // namespace

const OrtCustomOp* LutConvOp() {
  static const Op<LutConvT<false>> op;
  return &op;
}

const OrtCustomOp* LutConvQuantOp() {
  static const Op<LutConvT<true>> op;
  return &op;
}

}  // namespace adq
