// ConvPoolQuant: a float convolution with ReLU, max pooling and ThresholdQuant of the pooled
// result in one pass, written channels last (docs/onnx-ops.md). A ResNet's first layer: the
// full-size convolution output (25.7 MB per 8 images for ResNet-18) never leaves the cache.
//
// A task is a band of pooled rows of one image. It copies the zero-padded input rows the band
// reads, computes the convolution row by row into a ring of pool-height rows (channels last),
// and, as soon as a pooled row's window is complete, pools it into Y and counts its levels
// into Q. Bands of one image overlap by the convolution rows two pooled rows share (none at
// large batch: one band per image).
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "levels.h"

namespace adq {
namespace {

// Shapes and attributes of one call.
struct Geom {
  int64_t N, C, H, W, M;
  int64_t kH, kW, sH, sW, pt, pl, OH, OW;        // convolution
  int64_t pkH, pkW, psH, psW, ppt, ppl, PH, PW;  // pooling (1x1 / 1 / 0: none)
  bool relu;
};

constexpr int kLanes = 16;
constexpr int kBlockLanes = 4;  // output channels per AVX-512 tile: 4 x 16
constexpr int kTileCols = 6;    // outputs per tile: 4 x 6 accumulators (AVX2: 2 x 6, 8 lanes)
constexpr int kLanes2 = 8;
constexpr int kBlockLanes2 = 2;

// How a call runs: AVX-512 needs M % 16 == 0, AVX2 (with FMA) M % 8 == 0.
enum class Path { kScalar, kAvx2, kAvx512 };

// Convolution rows (or columns) [lo, hi) in pooled row (column) p's window, padding left out.
struct Span {
  int64_t lo, hi;
};
inline Span Window(int64_t p, int64_t stride, int64_t pad, int64_t k, int64_t size) {
  return {std::max<int64_t>(p * stride - pad, 0), std::min<int64_t>(p * stride - pad + k, size)};
}

// The zero-padded input rows a band reads: [C][rows][ld] floats.
struct Band {
  const float* x;
  int64_t rows, ld, plane;
  int64_t row0;  // padded-input row of the band's first row
};

// Weights as [blocks of `block` channels][R = C*kH*kW][block] (the last block narrower).
std::vector<float> PackWeights(const float* w, int64_t M, int64_t R, int64_t block) {
  std::vector<float> p(static_cast<size_t>(M * R));
  for (int64_t b0 = 0; b0 < M; b0 += block) {
    const int64_t bw = std::min<int64_t>(block, M - b0);
    float* dst = p.data() + b0 * R;
    for (int64_t k = 0; k < R; ++k) {
      for (int64_t m = 0; m < bw; ++m) dst[k * bw + m] = w[(b0 + m) * R + k];
    }
  }
  return p;
}

// acc[m][q] over the R taps of one tile: MB x 16 channels, NQ consecutive outputs of a row.
// `x` points at the tile's first output's top-left tap; off[k] is tap k's offset from it.
template <int MB, int NQ>
__attribute__((target("avx512f"))) void TileAvx512(const float* x, const int32_t* off, int64_t R,
                                                   int64_t sW, const float* w, const float* bias,
                                                   bool relu, float* out, int64_t M) {
  __m512 acc[MB][NQ];
  #pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) acc[m][q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < R; ++k) {
    const float* xk = x + off[k];
    __m512 wv[MB];
    #pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) wv[m] = _mm512_loadu_ps(w + (k * MB + m) * kLanes);
    #pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) {
      const __m512 b = _mm512_set1_ps(xk[q * sW]);
      #pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m][q] = _mm512_fmadd_ps(wv[m], b, acc[m][q]);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  #pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    const __m512 bv = bias ? _mm512_loadu_ps(bias + m * kLanes) : zero;
    #pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) {
      __m512 v = _mm512_add_ps(acc[m][q], bv);
      if (relu) v = _mm512_max_ps(v, zero);
      _mm512_storeu_ps(out + q * M + m * kLanes, v);
    }
  }
}

using TileFn = void (*)(const float*, const int32_t*, int64_t, int64_t, const float*, const float*,
                       bool, float*, int64_t);
template <int MB, size_t... Q>
constexpr std::array<TileFn, kTileCols> TileRow(std::index_sequence<Q...>) {
  return {&TileAvx512<MB, static_cast<int>(Q) + 1>...};
}
// kTiles[MB - 1][NQ - 1]: the tile of MB x 16 channels and NQ outputs.
constexpr std::array<std::array<TileFn, kTileCols>, kBlockLanes> kTiles = {
    TileRow<1>(std::make_index_sequence<kTileCols>()), TileRow<2>(std::make_index_sequence<kTileCols>()),
    TileRow<3>(std::make_index_sequence<kTileCols>()), TileRow<4>(std::make_index_sequence<kTileCols>())};

// The AVX2 form of TileAvx512: MB x 8 channels (MB <= 2), NQ outputs, 12 accumulators at most.
template <int MB, int NQ>
__attribute__((target("avx2,fma"))) void TileAvx2(const float* x, const int32_t* off, int64_t R,
                                                  int64_t sW, const float* w, const float* bias,
                                                  bool relu, float* out, int64_t M) {
  __m256 acc[MB][NQ];
  #pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
    #pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) acc[m][q] = _mm256_setzero_ps();
  for (int64_t k = 0; k < R; ++k) {
    const float* xk = x + off[k];
    __m256 wv[MB];
    #pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) wv[m] = _mm256_loadu_ps(w + (k * MB + m) * kLanes2);
    #pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) {
      const __m256 b = _mm256_broadcast_ss(xk + q * sW);
      #pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m][q] = _mm256_fmadd_ps(wv[m], b, acc[m][q]);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  #pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    const __m256 bv = bias ? _mm256_loadu_ps(bias + m * kLanes2) : zero;
    #pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) {
      __m256 v = _mm256_add_ps(acc[m][q], bv);
      if (relu) v = _mm256_max_ps(v, zero);
      _mm256_storeu_ps(out + q * M + m * kLanes2, v);
    }
  }
}

template <int MB, size_t... Q>
constexpr std::array<TileFn, kTileCols> TileRow2(std::index_sequence<Q...>) {
  return {&TileAvx2<MB, static_cast<int>(Q) + 1>...};
}
constexpr std::array<std::array<TileFn, kTileCols>, kBlockLanes2> kTiles2 = {
    TileRow2<1>(std::make_index_sequence<kTileCols>()),
    TileRow2<2>(std::make_index_sequence<kTileCols>())};

// One convolution row (channels last) in the tiles `tiles` of `lanes`-channel vectors
// ([vectors - 1][outputs - 1], AVX-512 or AVX2); M % lanes == 0, weights packed in blocks of
// V * lanes channels.
template <size_t V>
void ConvRowTiles(const Geom& g, const Band& b, int64_t r, const float* wp, const float* bias,
                  const int32_t* off, float* row, int64_t lanes,
                  const std::array<std::array<TileFn, kTileCols>, V>& tiles) {
  const int64_t R = g.C * g.kH * g.kW;
  const float* x0 = b.x + (r * g.sH - b.row0) * b.ld;
  for (int64_t b0 = 0; b0 < g.M; b0 += static_cast<int64_t>(V) * lanes) {
    const int64_t vectors = std::min<int64_t>(V, (g.M - b0) / lanes);
    for (int64_t ow = 0; ow < g.OW; ow += kTileCols) {
      const int64_t nq = std::min<int64_t>(kTileCols, g.OW - ow);
      tiles[vectors - 1][nq - 1](x0 + ow * g.sW, off, R, g.sW, wp + b0 * R,
                                 bias ? bias + b0 : nullptr, g.relu, row + ow * g.M + b0, g.M);
    }
  }
}

// The same row in plain C++ (any M), weights in their [M, R] layout.
void ConvRowScalar(const Geom& g, const Band& b, int64_t r, const float* w, const float* bias,
                   const int32_t* off, float* row) {
  const int64_t R = g.C * g.kH * g.kW;
  const float* x0 = b.x + (r * g.sH - b.row0) * b.ld;
  for (int64_t ow = 0; ow < g.OW; ++ow) {
    const float* x = x0 + ow * g.sW;
    for (int64_t m = 0; m < g.M; ++m) {
      const float* wm = w + m * R;
      float acc = 0.0f;
      for (int64_t k = 0; k < R; ++k) acc += x[off[k]] * wm[k];
      float v = acc + (bias ? bias[m] : 0.0f);
      if (g.relu) v = std::max(v, 0.0f);
      row[ow * g.M + m] = v;
    }
  }
}

// Y row = max over the window's convolution rows `rows[0..nrows)` and columns (channels last).
__attribute__((always_inline)) inline void PoolRowImpl(const Geom& g, const float* const* rows,
                                                       int nrows, float* y) {
  for (int64_t pw = 0; pw < g.PW; ++pw) {
    const auto [c0, c1] = Window(pw, g.psW, g.ppl, g.pkW, g.OW);
    float* yp = y + pw * g.M;
    std::copy(rows[0] + c0 * g.M, rows[0] + (c0 + 1) * g.M, yp);
    for (int i = 0; i < nrows; ++i) {
      for (int64_t c = c0; c < c1; ++c) {
        const float* s = rows[i] + c * g.M;
        for (int64_t m = 0; m < g.M; ++m) yp[m] = std::max(yp[m], s[m]);
      }
    }
  }
}

void PoolRowScalar(const Geom& g, const float* const* rows, int nrows, float* y) {
  PoolRowImpl(g, rows, nrows, y);
}

// Compiled for AVX2: the channel loop vectorized.
__attribute__((target("avx2,fma"))) void PoolRowAvx2(const Geom& g, const float* const* rows,
                                                     int nrows, float* y) {
  PoolRowImpl(g, rows, nrows, y);
}

// Stores 16 pooled values of Y and their levels, counted on the register (not read back: that
// was 0.6-1.4% of ResNet-18 at batch 32; streaming Y past the cache gained nothing more).
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void StoreYQ(
    __m512 v, float* y, uint8_t* q, const LevelCounter& lc) {
  _mm512_storeu_ps(y, v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(CountLevels16(v, lc)));
}

// The same on 16 channels at a time (M % 16 == 0): 64 channels of one pooled output at once
// (four independent max chains), the geometry in locals (y's stores may alias nothing it
// reads); the levels are counted on the pooled registers.
__attribute__((target("avx512f,avx512bw"))) void PoolRowAvx512(const Geom& g,
                                                                const float* const* rows,
                                                                int nrows, float* y, uint8_t* q,
                                                                const Levels& lv) {
  const LevelCounter lc = MakeLevelCounter(lv);
  const int64_t M = g.M, OW = g.OW, PW = g.PW, pkW = g.pkW, psW = g.psW, ppl = g.ppl;
  const float* r[64];
  for (int i = 0; i < nrows; ++i) r[i] = rows[i];
  for (int64_t pw = 0; pw < PW; ++pw) {
    const auto [c0, c1] = Window(pw, psW, ppl, pkW, OW);
    float* yp = y + pw * M;
    uint8_t* qp = q + pw * M;
    int64_t m = 0;
    for (; m + 4 * kLanes <= M; m += 4 * kLanes) {
      const float* s0 = r[0] + c0 * M + m;
      __m512 v0 = _mm512_loadu_ps(s0), v1 = _mm512_loadu_ps(s0 + 16);
      __m512 v2 = _mm512_loadu_ps(s0 + 32), v3 = _mm512_loadu_ps(s0 + 48);
      for (int i = 0; i < nrows; ++i) {
        for (const float* s = r[i] + c0 * M + m; s < r[i] + c1 * M + m; s += M) {
          v0 = _mm512_max_ps(_mm512_loadu_ps(s), v0);
          v1 = _mm512_max_ps(_mm512_loadu_ps(s + 16), v1);
          v2 = _mm512_max_ps(_mm512_loadu_ps(s + 32), v2);
          v3 = _mm512_max_ps(_mm512_loadu_ps(s + 48), v3);
        }
      }
      StoreYQ(v0, yp + m, qp + m, lc);
      StoreYQ(v1, yp + m + 16, qp + m + 16, lc);
      StoreYQ(v2, yp + m + 32, qp + m + 32, lc);
      StoreYQ(v3, yp + m + 48, qp + m + 48, lc);
    }
    for (; m < M; m += kLanes) {
      __m512 v = _mm512_loadu_ps(r[0] + c0 * M + m);
      for (int i = 0; i < nrows; ++i) {
        for (int64_t c = c0; c < c1; ++c) v = _mm512_max_ps(_mm512_loadu_ps(r[i] + c * M + m), v);
      }
      StoreYQ(v, yp + m, qp + m, lc);
    }
  }
}

// Copies the padded input rows [row0, row0 + rows) of image n (zeros outside) into a band.
void FillBand(const Geom& g, const float* x, int64_t n, float* buf, Band* b) {
  std::fill(buf, buf + g.C * b->plane, 0.0f);
  for (int64_t c = 0; c < g.C; ++c) {
    const float* xc = x + (n * g.C + c) * g.H * g.W;
    for (int64_t i = 0; i < b->rows; ++i) {
      const int64_t h = b->row0 + i - g.pt;
      if (h < 0 || h >= g.H) continue;
      std::copy(xc + h * g.W, xc + (h + 1) * g.W, buf + c * b->plane + i * b->ld + g.pl);
    }
  }
  b->x = buf;
}

struct ConvPoolQuant {
  static constexpr const char* kName = "ConvPoolQuant";
  static constexpr ONNXTensorElementDataType kInputs[] = {kF32, kF32, kF32, kF32, kF32};
  static constexpr ONNXTensorElementDataType kOutputs[] = {kF32, kU8};
  static constexpr uint32_t kOptionalInputs = 1u << 2;
  static constexpr uint32_t kOptionalOutputs = 0;

  explicit ConvPoolQuant(const OrtKernelInfo* info)
      : isa_(SelectIsa()), w_constant_(ConstantInput(info, 1)) {
    const std::vector<int64_t> one{1, 1}, zero4{0, 0, 0, 0};
    kernel_ = WindowAttr(info, "kernel_shape", 2, 1, nullptr);
    strides_ = WindowAttr(info, "strides", 2, 1, &one);
    pads_ = WindowAttr(info, "pads", 4, 0, &zero4);
    const int64_t no_relu = 0;
    relu_ = IntAttr(info, "relu", &no_relu);
    Check(relu_ == 0 || relu_ == 1, "attribute 'relu' must be 0 or 1, got ", relu_);
    pool_kernel_ = WindowAttr(info, "pool_kernel_shape", 2, 1, &one);
    Check(pool_kernel_[0] <= 64 && pool_kernel_[1] <= 64,
          "attribute 'pool_kernel_shape' must be at most 64, got ", ShapeStr(pool_kernel_));
    pool_strides_ = WindowAttr(info, "pool_strides", 2, 1, &one);
    pool_pads_ = WindowAttr(info, "pool_pads", 4, 0, &zero4);
    for (int d = 0; d < 2; ++d) {
      Check(pool_pads_[d] < pool_kernel_[d] && pool_pads_[d + 2] < pool_kernel_[d],
            "attribute 'pool_pads' must be below 'pool_kernel_shape' (a window without inputs)");
    }
  }

  void Compute(Ort::KernelContext& ctx) const {
    Tensor x = GetInput(ctx, 0, "X", kF32, 4);
    Tensor w = GetInput(ctx, 1, "W", kF32, 4);
    Geom g{};
    g.N = x.shape[0];
    g.C = x.shape[1];
    g.H = x.shape[2];
    g.W = x.shape[3];
    g.M = w.shape[0];
    g.kH = kernel_[0];
    g.kW = kernel_[1];
    Check(w.shape[1] == g.C && w.shape[2] == g.kH && w.shape[3] == g.kW, "W must have shape [M, ",
          g.C, ", ", g.kH, ", ", g.kW, "], got ", ShapeStr(w.shape));
    Check(g.M >= 1, "W must have at least one output channel");
    const float* bias = nullptr;
    if (HasInput(ctx, 2)) {
      Tensor b = GetInput(ctx, 2, "B", kF32, 1);
      Check(b.shape[0] == g.M, "B must have shape [", g.M, "], got ", ShapeStr(b.shape));
      bias = b.as<float>();
    }
    const Levels lv = GetLevels(ctx, 3, 4, "QScale", "QThresholds");
    g.sH = strides_[0];
    g.sW = strides_[1];
    g.pt = pads_[0];
    g.pl = pads_[1];
    const int64_t Hp = g.H + pads_[0] + pads_[2], Wp = g.W + pads_[1] + pads_[3];
    Check(Hp >= g.kH && Wp >= g.kW, "the padded input ", Hp, "x", Wp,
          " is smaller than the kernel");
    g.OH = (Hp - g.kH) / g.sH + 1;
    g.OW = (Wp - g.kW) / g.sW + 1;
    g.pkH = pool_kernel_[0];
    g.pkW = pool_kernel_[1];
    g.psH = pool_strides_[0];
    g.psW = pool_strides_[1];
    g.ppt = pool_pads_[0];
    g.ppl = pool_pads_[1];
    const int64_t OHp = g.OH + pool_pads_[0] + pool_pads_[2];
    const int64_t OWp = g.OW + pool_pads_[1] + pool_pads_[3];
    Check(OHp >= g.pkH && OWp >= g.pkW, "the padded convolution output ", OHp, "x", OWp,
          " is smaller than the pooling window");
    g.PH = (OHp - g.pkH) / g.psH + 1;
    g.PW = (OWp - g.pkW) / g.psW + 1;
    g.relu = relu_ != 0;

    const Shape yshape{g.N, g.PH, g.PW, g.M};
    float* y = ctx.GetOutput(0, yshape).GetTensorMutableData<float>();
    uint8_t* q = ctx.GetOutput(1, yshape).GetTensorMutableData<uint8_t>();
    // The taps' offsets into a band of padded input rows are int32 (at most C * Hp * Wp).
    Check(CheckedMul(CheckedMul(g.C, Hp, "input size"), Wp, "input size") < (int64_t{1} << 31),
          "X is too large: C * padded H * padded W must stay below 2^31");
    if (NumElements(yshape) == 0) return;

    const int64_t R = CheckedMul(CheckedMul(g.C, g.kH, "R"), g.kW, "R");
    Path path = Path::kScalar;
    if (isa_ == Isa::kAvx512 && g.M % kLanes == 0) {
      path = Path::kAvx512;
    } else if (isa_ != Isa::kScalar && g.M % kLanes2 == 0) {
      path = Path::kAvx2;
    }
    const int64_t block = path == Path::kAvx512 ? kBlockLanes * kLanes : kBlockLanes2 * kLanes2;
    // For the tiles; a constant W (an initializer) is packed on the first run and kept.
    const std::shared_ptr<const std::vector<float>> packed =
        path == Path::kScalar
            ? nullptr
            : packed_.Get(w_constant_, {w.as<float>(), g.M, R, block}, [&] {
                return std::make_shared<const std::vector<float>>(
                    PackWeights(w.as<float>(), g.M, R, block));
              });
    const float* wk = path == Path::kScalar ? w.as<float>() : packed->data();

    // Bands: enough tasks for the pool at small batch, one per image at large batch.
    const int64_t bands = std::min<int64_t>(g.PH, std::max<int64_t>(1, (TaskHint() / 4 + g.N - 1) / g.N));
    const int64_t band_rows = (g.PH + bands - 1) / bands;
    const int64_t ld = Wp;
    const int64_t ring_ld = g.OW * g.M;
    const float* xs = x.as<float>();
    const Isa isa = isa_;

    ParallelFor(ctx, static_cast<size_t>(g.N * bands), [&](size_t task) {
      const int64_t n = static_cast<int64_t>(task) / bands;
      const int64_t p0 = static_cast<int64_t>(task) % bands * band_rows;
      const int64_t p1 = std::min(g.PH, p0 + band_rows);
      if (p0 >= p1) return;
      // Convolution rows [r0, r1) of pooled rows [p0, p1).
      const int64_t r0 = Window(p0, g.psH, g.ppt, g.pkH, g.OH).lo;
      const int64_t r1 = Window(p1 - 1, g.psH, g.ppt, g.pkH, g.OH).hi;
      Band b{};
      b.row0 = r0 * g.sH;
      b.rows = (r1 - 1 - r0) * g.sH + g.kH;
      b.ld = ld;
      b.plane = b.rows * ld;
      FillBand(g, xs, n, ThreadScratch<kPoolInput>(CheckedMul(g.C, b.plane, "input band")), &b);
      std::vector<int32_t> off(static_cast<size_t>(R));
      for (int64_t c = 0, k = 0; c < g.C; ++c)
        for (int64_t i = 0; i < g.kH; ++i)
          for (int64_t j = 0; j < g.kW; ++j, ++k)
            off[static_cast<size_t>(k)] = static_cast<int32_t>(c * b.plane + i * ld + j);
      float* ring = ThreadScratch<kPoolRing>(g.pkH * ring_ld);
      const float* rows[64];
      int64_t p = p0;
      for (int64_t r = r0; r < r1 && p < p1; ++r) {
        float* row = ring + (r % g.pkH) * ring_ld;
        switch (path) {
          case Path::kAvx512: ConvRowTiles(g, b, r, wk, bias, off.data(), row, kLanes, kTiles); break;
          case Path::kAvx2: ConvRowTiles(g, b, r, wk, bias, off.data(), row, kLanes2, kTiles2); break;
          default: ConvRowScalar(g, b, r, wk, bias, off.data(), row); break;
        }
        // Emit every pooled row whose window ends at this convolution row.
        while (p < p1 && Window(p, g.psH, g.ppt, g.pkH, g.OH).hi - 1 == r) {
          int nrows = 0;
          for (int64_t a = Window(p, g.psH, g.ppt, g.pkH, g.OH).lo; a <= r; ++a) rows[nrows++] = ring + (a % g.pkH) * ring_ld;
          const int64_t at = (n * g.PH + p) * g.PW * g.M;
          if (path == Path::kAvx512) {
            PoolRowAvx512(g, rows, nrows, y + at, q + at, lv);
          } else {
            if (path == Path::kAvx2) {
              PoolRowAvx2(g, rows, nrows, y + at);
            } else {
              PoolRowScalar(g, rows, nrows, y + at);
            }
            CountLevels(y + at, g.PW * g.M, lv, q + at, isa);
          }
          ++p;
        }
      }
    });
  }

  std::vector<int64_t> kernel_, strides_, pads_, pool_kernel_, pool_strides_, pool_pads_;
  int64_t relu_ = 0;
  Isa isa_;
  bool w_constant_;
  // W packed for the tiles: its address, M, R and the tiles' block width
  mutable Kept<std::vector<float>, std::tuple<const float*, int64_t, int64_t, int64_t>> packed_;
};

}  // namespace

const OrtCustomOp* ConvPoolQuantOp() {
  static const Op<ConvPoolQuant> op;
  return &op;
}

}  // namespace adq
