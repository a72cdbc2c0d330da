// ConvPoolQuant: a float convolution with ReLU, max pooling and ThresholdQuant of the pooled
// result in one pass, written channels last (docs/onnx-ops.md). A ResNet's first layer: the
// full-size convolution output (25.7 MB per 8 images for ResNet-18) never leaves the cache.
//
// LutConvPoolQuant is the same on uint8 input levels with codebook weights: the same bands, ring
// and pooling, its convolution rows from exact int8 x uint8 sums (AVX-512 VNNI, integer levels)
// or, otherwise, from the float tiles on level - x_zero_point and the decoded weights.
//
// A task is a band of pooled rows of one image. It copies the zero-padded input rows the band
// reads, computes the convolution row by row into a ring of pool-height rows (channels last),
// and, as soon as a pooled row's window is complete, pools it into Y and counts its levels
// into Q. Bands of one image overlap by the convolution rows two pooled rows share (none at
// large batch: one band per image).
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "levels.h"
#include "packing.h"

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

// The padded input rows a band reads: [C][rows][ld] floats (or bytes).
struct Band {
  const float* x;     // float band (ConvPoolQuant, LutConvPoolQuant's float path)
  const uint8_t* xb;  // byte band (LutConvPoolQuant's int8 tiles)
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

// w[u] = the maximum of rows[0..nrows) at offset at + 16u, u < 4 (64 channels of a column).
__attribute__((target("avx512f"), always_inline)) inline void ColumnMax(const float* const* rows,
                                                                       int nrows, int64_t at,
                                                                       __m512 (&w)[4]) {
  #pragma GCC unroll 4
  for (int u = 0; u < 4; ++u) w[u] = _mm512_loadu_ps(rows[0] + at + 16 * u);
  for (int i = 1; i < nrows; ++i) {
    #pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) w[u] = _mm512_max_ps(_mm512_loadu_ps(rows[i] + at + 16 * u), w[u]);
  }
}

// The same on 16 channels at a time (M % 16 == 0): 64 channels of one pooled output at once
// (four independent max chains, a column's maximum over the rows first), the geometry in locals
// (y's stores may alias nothing it reads); the levels are counted on the pooled registers.
__attribute__((target("avx512f,avx512bw"))) void PoolRowAvx512(const Geom& g,
                                                                const float* const* rows,
                                                                int nrows, float* y, uint8_t* q,
                                                                const Levels& lv) {
  const LevelCounter lc = MakeLevelCounter(lv);
  const int64_t M = g.M, OW = g.OW, PW = g.PW, pkW = g.pkW, psW = g.psW, ppl = g.ppl;
  const float* r[64];
  for (int i = 0; i < nrows; ++i) r[i] = rows[i];
  int64_t m = 0;
  for (; m + 4 * kLanes <= M; m += 4 * kLanes) {
    // k: the maximum over the rows of column `kept`, the previous window's last, which the
    // next window starts with where they overlap by one column (3 x 3 / 2 pooling: 6 of the 9
    // positions read per output instead of 9).
    __m512 k[4];
    int64_t kept = -1;
    for (int64_t pw = 0; pw < PW; ++pw) {
      const auto [c0, c1] = Window(pw, psW, ppl, pkW, OW);
      __m512 v[4];
      int64_t c = c0;
      if (c0 == kept) {
        #pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) v[u] = k[u];
        ++c;
      }
      for (; c < c1; ++c) {
        __m512 w[4];
        ColumnMax(r, nrows, c * M + m, w);
        #pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) v[u] = c == c0 ? w[u] : _mm512_max_ps(w[u], v[u]);
        if (c == c1 - 1) {
          #pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) k[u] = w[u];
          kept = c;
        }
      }
      float* yp = y + pw * M + m;
      uint8_t* qp = q + pw * M + m;
      #pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) StoreYQ(v[u], yp + 16 * u, qp + 16 * u, lc);
    }
  }
  for (int64_t pw = 0; pw < PW; ++pw) {
    const auto [c0, c1] = Window(pw, psW, ppl, pkW, OW);
    float* yp = y + pw * M;
    uint8_t* qp = q + pw * M;
    for (int64_t mm = m; mm < M; mm += kLanes) {
      __m512 v = _mm512_loadu_ps(r[0] + c0 * M + mm);
      for (int i = 0; i < nrows; ++i) {
        for (int64_t c = c0; c < c1; ++c) v = _mm512_max_ps(_mm512_loadu_ps(r[i] + c * M + mm), v);
      }
      StoreYQ(v, yp + mm, qp + mm, lc);
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

// LutConvPoolQuant's float band: (level - x_zero_point) of the uint8 input, zero padding (the
// padding level x_zero_point adds nothing).
void FillBandLevels(const Geom& g, const uint8_t* x, int64_t n, int64_t zp, float* buf, Band* b) {
  std::fill(buf, buf + g.C * b->plane, 0.0f);
  const float z = static_cast<float>(zp);
  for (int64_t c = 0; c < g.C; ++c) {
    const uint8_t* xc = x + (n * g.C + c) * g.H * g.W;
    for (int64_t i = 0; i < b->rows; ++i) {
      const int64_t h = b->row0 + i - g.pt;
      if (h < 0 || h >= g.H) continue;
      float* d = buf + c * b->plane + i * b->ld + g.pl;
      const uint8_t* s = xc + h * g.W;
      for (int64_t w = 0; w < g.W; ++w) d[w] = static_cast<float>(s[w]) - z;
    }
  }
  b->x = buf;
}

// LutConvPoolQuant's int8 band: the uint8 rows padded with the level x_zero_point, [C][rows][ld]
// bytes (ld leaves room for the last dword of taps past the padded row).
void FillBandBytes(const Geom& g, const uint8_t* x, int64_t n, int64_t zp, uint8_t* buf, Band* b) {
  std::memset(buf, static_cast<int>(zp), static_cast<size_t>(g.C * b->plane));
  for (int64_t c = 0; c < g.C; ++c) {
    const uint8_t* xc = x + (n * g.C + c) * g.H * g.W;
    for (int64_t i = 0; i < b->rows; ++i) {
      const int64_t h = b->row0 + i - g.pt;
      if (h < 0 || h >= g.H) continue;
      std::memcpy(buf + c * b->plane + i * b->ld + g.pl, xc + h * g.W, static_cast<size_t>(g.W));
    }
  }
  b->xb = buf;
}

// ---- LutConvPoolQuant's int8 tiles (AVX-512 VNNI) ----------------------------------------------
//
// For dilation 1 the taps j .. j + 3 of one kernel row of one output are 4 consecutive bytes of
// a band row, so each kernel row's kW taps are grouped in dwords of 4 (kW = 7: two dwords, the
// 8th weight 0) and a reduction step k = (c, i, dword) is one vpdpbusd per 16 channels: the
// output's dword broadcast against 16 channels' 4 int8 weights.

constexpr int kIntTileCols = 6;  // outputs per int8 tile: 4 x 6 accumulators, as the float tile

// Weights as int8 [blocks of 64 channels][k = (c, i, dword)][block's vectors][16][4] (the last
// block narrower), and per channel x_zero_point * sum of its weights (what the band's levels
// add beyond level - x_zero_point: every tap, padding included, reads a real level).
struct IntWeights {
  std::vector<int8_t> w;
  std::vector<int32_t> corr;
  int64_t K4 = 0;  // reduction steps: C * kH * ceil(kW / 4)
};

// Codes and codebook as int8 weights (levels integers in -128..127, M % 16 == 0), every code
// checked < K.
IntWeights PackIntWeights(const Lut& lut, int64_t C, int64_t kH, int64_t kW, int64_t zp) {
  const int64_t M = lut.M, R = lut.R, G4 = (kW + 3) / 4;
  const int64_t block = kBlockLanes * kLanes;
  IntWeights p;
  p.K4 = C * kH * G4;
  p.w.assign(static_cast<size_t>(CheckedMul(M, 4 * p.K4, "packed weights")), 0);
  p.corr.assign(static_cast<size_t>(M), 0);
  std::vector<uint8_t> codes(static_cast<size_t>(R));
  for (int64_t m = 0; m < M; ++m) {
    UnpackRowChecked(lut, m, codes.data());
    const int64_t b0 = m / block * block, bw = std::min<int64_t>(block, M - b0), mm = m - b0;
    int8_t* dst = p.w.data() + b0 * 4 * p.K4;
    int64_t sum = 0;
    for (int64_t c = 0, r = 0; c < C; ++c) {
      for (int64_t i = 0; i < kH; ++i) {
        for (int64_t j = 0; j < kW; ++j, ++r) {
          const int v = static_cast<int>(lut.codebook[codes[static_cast<size_t>(r)]]);
          const int64_t k = (c * kH + i) * G4 + j / 4;
          dst[(k * bw + mm) * 4 + j % 4] = static_cast<int8_t>(v);
          sum += v;
        }
      }
    }
    p.corr[static_cast<size_t>(m)] = static_cast<int32_t>(zp * sum);
  }
  return p;
}

// The epilogue's per-channel factors, Scale broadcast and Bias 0 filled in.
struct ChannelAffine {
  std::vector<float> scale, bias;
};

// One int8 tile: MB x 16 channels, NQ consecutive outputs of a row; `x` points at the first
// output's top-left tap in the byte band, off[k] is step k's dword offset from it. Then Z =
// Scale * (acc - x_zero_point * sum W) + Bias (one fma), ReLU, into the float ring row.
struct IntTileArgs {
  const uint8_t* x;
  const int32_t* off;
  int64_t K4, sW;
  const int8_t* w;
  const int32_t* corr;
  const float *scale, *bias;
  bool relu;
  float* out;
  int64_t M;
};

template <int MB, int NQ>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void TileVnni(const IntTileArgs& a) {
  __m512i acc[MB][NQ];  // every loop over acc is unrolled, or GCC keeps it in memory
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    // The sums start at -x_zero_point * sum W: they end at the sum over level - x_zero_point.
    const __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(),
                                           _mm512_loadu_si512(a.corr + m * kLanes));
#pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) acc[m][q] = start;
  }
  const int8_t* w = a.w;
  const int64_t sW = a.sW;
  for (int64_t k = 0; k < a.K4; ++k, w += MB * 4 * kLanes) {
    const uint8_t* xk = a.x + a.off[k];
    __m512i wv[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) wv[m] = _mm512_loadu_si512(w + m * 4 * kLanes);
#pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) {
      int32_t d;
      std::memcpy(&d, xk + q * sW, 4);
      const __m512i xv = _mm512_set1_epi32(d);
      // acc += xv (uint8) . wv (int8) in place (the intrinsic made GCC 12 copy accumulators,
      // see conv_panels.cc)
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) asm("vpdpbusd %2, %1, %0" : "+v"(acc[m][q]) : "v"(xv), "v"(wv[m]));
    }
  }
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    const __m512 s = _mm512_loadu_ps(a.scale + m * kLanes), b = _mm512_loadu_ps(a.bias + m * kLanes);
#pragma GCC unroll 8
    for (int q = 0; q < NQ; ++q) {
      __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][q]), s, b);
      if (a.relu) v = _mm512_max_ps(zero, v);  // NaN stays NaN (the second operand)
      _mm512_storeu_ps(a.out + q * a.M + m * kLanes, v);
    }
  }
}

using IntTileFn = void (*)(const IntTileArgs&);
template <int MB, size_t... Q>
constexpr std::array<IntTileFn, kIntTileCols> IntTileRow(std::index_sequence<Q...>) {
  return {&TileVnni<MB, static_cast<int>(Q) + 1>...};
}
// kIntTiles[MB - 1][NQ - 1]
constexpr std::array<std::array<IntTileFn, kIntTileCols>, kBlockLanes> kIntTiles = {
    IntTileRow<1>(std::make_index_sequence<kIntTileCols>()),
    IntTileRow<2>(std::make_index_sequence<kIntTileCols>()),
    IntTileRow<3>(std::make_index_sequence<kIntTileCols>()),
    IntTileRow<4>(std::make_index_sequence<kIntTileCols>())};

// One convolution row of the int8 path (M % 16 == 0): blocks of 64 channels x 6 outputs.
void ConvRowInt(const Geom& g, const Band& b, int64_t r, const IntWeights& iw,
                const ChannelAffine& ca, const int32_t* off, float* row) {
  const uint8_t* x0 = b.xb + (r * g.sH - b.row0) * b.ld;
  constexpr int64_t block = kBlockLanes * kLanes;
  IntTileArgs a{};
  a.off = off;
  a.K4 = iw.K4;
  a.sW = g.sW;
  a.relu = g.relu;
  a.M = g.M;
  for (int64_t b0 = 0; b0 < g.M; b0 += block) {
    const int64_t vectors = std::min<int64_t>(kBlockLanes, (g.M - b0) / kLanes);
    a.w = iw.w.data() + b0 * 4 * iw.K4;
    a.corr = iw.corr.data() + b0;
    a.scale = ca.scale.data() + b0;
    a.bias = ca.bias.data() + b0;
    for (int64_t ow = 0; ow < g.OW; ow += kIntTileCols) {
      const int64_t nq = std::min<int64_t>(kIntTileCols, g.OW - ow);
      a.x = x0 + ow * g.sW;
      a.out = row + ow * g.M + b0;
      kIntTiles[vectors - 1][nq - 1](a);
    }
  }
}

// The float fallback's epilogue on a row of sums (channels last): Z = fma(Scale, acc, Bias),
// ReLU (NaN stays NaN).
__attribute__((always_inline)) inline void AffineRowImpl(const Geom& g, const ChannelAffine& ca,
                                                         float* row) {
  const float* s = ca.scale.data();
  const float* b = ca.bias.data();
  for (int64_t ow = 0; ow < g.OW; ++ow) {
    float* v = row + ow * g.M;
    for (int64_t m = 0; m < g.M; ++m) {
      const float z = std::fma(s[m], v[m], b[m]);
      v[m] = g.relu && z < 0.0f ? 0.0f : z;
    }
  }
}
void AffineRowScalar(const Geom& g, const ChannelAffine& ca, float* row) {
  AffineRowImpl(g, ca, row);
}
__attribute__((target("avx2,fma"))) void AffineRowAvx2(const Geom& g, const ChannelAffine& ca,
                                                       float* row) {
  AffineRowImpl(g, ca, row);
}

// ---- what both ops share: attributes, geometry, the band / ring / pooling driver ---------------

struct WindowAttrs {
  std::vector<int64_t> kernel, strides, pads, pool_kernel, pool_strides, pool_pads;
  int64_t relu = 0;

  explicit WindowAttrs(const OrtKernelInfo* info) {
    const std::vector<int64_t> one{1, 1}, zero4{0, 0, 0, 0};
    kernel = WindowAttr(info, "kernel_shape", 2, 1, nullptr);
    strides = WindowAttr(info, "strides", 2, 1, &one);
    pads = WindowAttr(info, "pads", 4, 0, &zero4);
    const int64_t no_relu = 0;
    relu = IntAttr(info, "relu", &no_relu);
    Check(relu == 0 || relu == 1, "attribute 'relu' must be 0 or 1, got ", relu);
    pool_kernel = WindowAttr(info, "pool_kernel_shape", 2, 1, &one);
    Check(pool_kernel[0] <= 64 && pool_kernel[1] <= 64,
          "attribute 'pool_kernel_shape' must be at most 64, got ", ShapeStr(pool_kernel));
    pool_strides = WindowAttr(info, "pool_strides", 2, 1, &one);
    pool_pads = WindowAttr(info, "pool_pads", 4, 0, &zero4);
    for (int d = 0; d < 2; ++d) {
      Check(pool_pads[d] < pool_kernel[d] && pool_pads[d + 2] < pool_kernel[d],
            "attribute 'pool_pads' must be below 'pool_kernel_shape' (a window without inputs)");
    }
  }

  // The geometry of X [N, C, H, W] and M output channels, checked.
  Geom Make(const Shape& x, int64_t M) const {
    Geom g{};
    g.N = x[0];
    g.C = x[1];
    g.H = x[2];
    g.W = x[3];
    g.M = M;
    g.kH = kernel[0];
    g.kW = kernel[1];
    g.sH = strides[0];
    g.sW = strides[1];
    g.pt = pads[0];
    g.pl = pads[1];
    const int64_t Hp = g.H + pads[0] + pads[2], Wp = g.W + pads[1] + pads[3];
    Check(Hp >= g.kH && Wp >= g.kW, "the padded input ", Hp, "x", Wp,
          " is smaller than the kernel");
    g.OH = (Hp - g.kH) / g.sH + 1;
    g.OW = (Wp - g.kW) / g.sW + 1;
    g.pkH = pool_kernel[0];
    g.pkW = pool_kernel[1];
    g.psH = pool_strides[0];
    g.psW = pool_strides[1];
    g.ppt = pool_pads[0];
    g.ppl = pool_pads[1];
    const int64_t OHp = g.OH + pool_pads[0] + pool_pads[2];
    const int64_t OWp = g.OW + pool_pads[1] + pool_pads[3];
    Check(OHp >= g.pkH && OWp >= g.pkW, "the padded convolution output ", OHp, "x", OWp,
          " is smaller than the pooling window");
    g.PH = (OHp - g.pkH) / g.psH + 1;
    g.PW = (OWp - g.pkW) / g.psW + 1;
    g.relu = relu != 0;
    // The taps' offsets into a band of padded input rows are int32 (at most C * Hp * Wp).
    Check(CheckedMul(CheckedMul(g.C, Hp, "input size"), Wp, "input size") < (int64_t{1} << 31),
          "X is too large: C * padded H * padded W must stay below 2^31");
    return g;
  }

  int64_t Hp(const Geom& g) const { return g.H + pads[0] + pads[2]; }
  int64_t Wp(const Geom& g) const { return g.W + pads[1] + pads[3]; }
};

// The bands of pooled rows (tasks): for each, fill(n, &band) copies the padded input rows it
// reads, conv(band, off, r, row) computes convolution row r into a ring row (channels last, M
// floats per output), and each pooled row is pooled into y and its levels counted into q as
// soon as its window is complete. ld: the band's row length; pool16: M % 16 == 0 and AVX-512.
// conv gets the offsets of the reduction steps k = (c, i, j / group) in the band, off[k] = c *
// plane + i * ld + j (group: taps per step, 1 for the float tiles, 4 for the int8 dwords).
template <class Fill, class Conv>
void RunBands(const Ort::KernelContext& ctx, const Geom& g, int64_t ld, int64_t group,
              bool pool16, Isa isa, const Levels& lv, float* y, uint8_t* q, const Fill& fill,
              const Conv& conv) {
  // Bands: enough tasks for the pool at small batch, one per image at large batch.
  const int64_t bands =
      std::min<int64_t>(g.PH, std::max<int64_t>(1, (TaskHint() / 4 + g.N - 1) / g.N));
  const int64_t band_rows = (g.PH + bands - 1) / bands;
  const int64_t ring_ld = g.OW * g.M;
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
    fill(n, &b);
    const int64_t steps = (g.kW + group - 1) / group;
    std::vector<int32_t> off(static_cast<size_t>(g.C * g.kH * steps));
    for (int64_t c = 0, k = 0; c < g.C; ++c)
      for (int64_t i = 0; i < g.kH; ++i)
        for (int64_t j = 0; j < steps; ++j, ++k)
          off[static_cast<size_t>(k)] = static_cast<int32_t>(c * b.plane + i * ld + j * group);
    float* ring = ThreadScratch<kPoolRing>(g.pkH * ring_ld);
    const float* rows[64];
    int64_t p = p0;
    for (int64_t r = r0; r < r1 && p < p1; ++r) {
      conv(b, off.data(), r, ring + (r % g.pkH) * ring_ld);
      // Emit every pooled row whose window ends at this convolution row.
      while (p < p1 && Window(p, g.psH, g.ppt, g.pkH, g.OH).hi - 1 == r) {
        int nrows = 0;
        for (int64_t a = Window(p, g.psH, g.ppt, g.pkH, g.OH).lo; a <= r; ++a) {
          rows[nrows++] = ring + (a % g.pkH) * ring_ld;
        }
        const int64_t at = (n * g.PH + p) * g.PW * g.M;
        if (pool16) {
          PoolRowAvx512(g, rows, nrows, y + at, q + at, lv);
        } else {
          if (isa != Isa::kScalar && g.M % kLanes2 == 0) {
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

// The float tiles' path for this ISA and M.
Path FloatPath(Isa isa, int64_t M) {
  if (isa == Isa::kAvx512 && M % kLanes == 0) return Path::kAvx512;
  if (isa != Isa::kScalar && M % kLanes2 == 0) return Path::kAvx2;
  return Path::kScalar;
}

// One convolution row on the float path chosen (weights packed for it, or [M, R] for scalar).
void ConvRowFloat(Path path, const Geom& g, const Band& b, int64_t r, const float* wk,
                  const float* bias, const int32_t* off, float* row) {
  switch (path) {
    case Path::kAvx512: ConvRowTiles(g, b, r, wk, bias, off, row, kLanes, kTiles); break;
    case Path::kAvx2: ConvRowTiles(g, b, r, wk, bias, off, row, kLanes2, kTiles2); break;
    default: ConvRowScalar(g, b, r, wk, bias, off, row); break;
  }
}

struct ConvPoolQuant {
  static constexpr const char* kName = "ConvPoolQuant";
  static constexpr ONNXTensorElementDataType kInputs[] = {kF32, kF32, kF32, kF32, kF32};
  static constexpr ONNXTensorElementDataType kOutputs[] = {kF32, kU8};
  static constexpr uint32_t kOptionalInputs = 1u << 2;
  static constexpr uint32_t kOptionalOutputs = 0;

  explicit ConvPoolQuant(const OrtKernelInfo* info)
      : attrs_(info), isa_(SelectIsa()), w_constant_(ConstantInput(info, 1)) {}

  void Compute(Ort::KernelContext& ctx) const {
    Tensor x = GetInput(ctx, 0, "X", kF32, 4);
    Tensor w = GetInput(ctx, 1, "W", kF32, 4);
    const int64_t M = w.shape[0];
    const int64_t C = x.shape[1], kH = attrs_.kernel[0], kW = attrs_.kernel[1];
    Check(w.shape[1] == C && w.shape[2] == kH && w.shape[3] == kW, "W must have shape [M, ", C,
          ", ", kH, ", ", kW, "], got ", ShapeStr(w.shape));
    Check(M >= 1, "W must have at least one output channel");
    const float* bias = nullptr;
    if (HasInput(ctx, 2)) {
      Tensor b = GetInput(ctx, 2, "B", kF32, 1);
      Check(b.shape[0] == M, "B must have shape [", M, "], got ", ShapeStr(b.shape));
      bias = b.as<float>();
    }
    const Levels lv = GetLevels(ctx, 3, 4, "QScale", "QThresholds");
    const Geom g = attrs_.Make(x.shape, M);
    const Shape yshape{g.N, g.PH, g.PW, g.M};
    float* y = ctx.GetOutput(0, yshape).GetTensorMutableData<float>();
    uint8_t* q = ctx.GetOutput(1, yshape).GetTensorMutableData<uint8_t>();
    if (NumElements(yshape) == 0) return;

    const int64_t R = CheckedMul(CheckedMul(g.C, g.kH, "R"), g.kW, "R");
    const Path path = FloatPath(isa_, g.M);
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
    const float* xs = x.as<float>();
    RunBands(
        ctx, g, attrs_.Wp(g), 1, path == Path::kAvx512, isa_, lv, y, q,
        [&](int64_t n, Band* b) {
          FillBand(g, xs, n, ThreadScratch<kPoolInput>(CheckedMul(g.C, b->plane, "input band")),
                   b);
        },
        [&](const Band& b, const int32_t* off, int64_t r, float* row) {
          ConvRowFloat(path, g, b, r, wk, bias, off, row);
        });
  }

  WindowAttrs attrs_;
  Isa isa_;
  bool w_constant_;
  // W packed for the tiles: its address, M, R and the tiles' block width
  mutable Kept<std::vector<float>, std::tuple<const float*, int64_t, int64_t, int64_t>> packed_;
};

// LutConvPoolQuant: ConvPoolQuant on uint8 input levels with codebook weights (docs/onnx-ops.md):
// the int8 tiles where the levels are integers in -128..127, AVX-512 VNNI is there and M % 16 ==
// 0, else the float tiles on (level - x_zero_point) and the decoded weights, then the affine
// epilogue row by row.
struct LutConvPoolQuant {
  static constexpr const char* kName = "LutConvPoolQuant";
  static constexpr ONNXTensorElementDataType kInputs[] = {kU8, kU8, kF32, kF32, kF32, kF32, kF32};
  static constexpr ONNXTensorElementDataType kOutputs[] = {kF32, kU8};
  static constexpr uint32_t kOptionalInputs = 1u << 4;
  static constexpr uint32_t kOptionalOutputs = 0;

  explicit LutConvPoolQuant(const OrtKernelInfo* info)
      : attrs_(info),
        bits_(BitsAttr(info)),
        isa_(SelectIsa()),
        constant_(ConstantInput(info, 1) && ConstantInput(info, 2)) {
    const int64_t zero = 0;
    zp_ = IntAttr(info, "x_zero_point", &zero);
    Check(zp_ >= 0 && zp_ <= 255, "attribute 'x_zero_point' must be in 0..255, got ", zp_);
  }

  // Whether the int8 tiles run: integer levels in -128..127, VNNI, M % 16 == 0, exact int32
  // sums (|sum| <= 255 * 128 * 4 * K4 twice over, the correction included) and int32 offsets
  // in the wider byte band.
  bool IntPath(const Lut& lut, const Geom& g, int64_t ld) const {
    if (isa_ != Isa::kAvx512 || !HasVnni() || g.M % kLanes != 0 || !Int8Levels(lut)) {
      return false;
    }
    const int64_t K4 = g.C * g.kH * ((g.kW + 3) / 4);
    if (K4 > (int64_t{1} << 31) / (255 * 128 * 4 * 2) - 1) return false;
    return g.C * attrs_.Hp(g) * ld < (int64_t{1} << 31);
  }

  void Compute(Ort::KernelContext& ctx) const {
    Tensor x = GetInput(ctx, 0, "X", kU8, 4);
    Tensor codes = GetInput(ctx, 1, "Codes", kU8, 2);
    const int64_t M = codes.shape[0];
    Check(M >= 1, "Codes must have at least one row (output channel)");
    const int64_t kH = attrs_.kernel[0], kW = attrs_.kernel[1];
    const int64_t R = CheckedMul(CheckedMul(x.shape[1], kH, "R"), kW, "R");
    const Lut lut = GetLut(ctx, 1, 2, bits_, M, R);
    const Affine af = GetAffine(ctx, 3, 4, M);
    const Levels lv = GetLevels(ctx, 5, 6, "QScale", "QThresholds");
    const Geom g = attrs_.Make(x.shape, M);
    const Shape yshape{g.N, g.PH, g.PW, g.M};
    float* y = ctx.GetOutput(0, yshape).GetTensorMutableData<float>();
    uint8_t* q = ctx.GetOutput(1, yshape).GetTensorMutableData<uint8_t>();
    if (NumElements(yshape) == 0) {
      // Nothing to compute, but the codes are still checked (a code >= K is an error).
      std::vector<uint8_t> row(static_cast<size_t>(R));
      for (int64_t m = 0; m < M; ++m) UnpackRowChecked(lut, m, row.data());
      return;
    }
    ChannelAffine ca;
    ca.scale.resize(static_cast<size_t>(M));
    ca.bias.assign(static_cast<size_t>(M), 0.0f);
    for (int64_t m = 0; m < M; ++m) {
      ca.scale[static_cast<size_t>(m)] = af.scale[m * af.scale_step];
      if (af.bias) ca.bias[static_cast<size_t>(m)] = af.bias[m];
    }
    const uint8_t* xs = x.as<uint8_t>();
    const int64_t zp = zp_;

    // The byte band's rows: room for the last output's last dword of taps.
    const int64_t Wp = attrs_.Wp(g);
    const int64_t ld_int = std::max(Wp, (g.OW - 1) * g.sW + 4 * ((g.kW + 3) / 4));
    if (IntPath(lut, g, ld_int)) {
      const std::shared_ptr<const IntWeights> iw =
          int_.Get(constant_, {lut.codes, lut.codebook, M, R, lut.K}, [&] {
            return std::make_shared<const IntWeights>(PackIntWeights(lut, g.C, g.kH, g.kW, zp));
          });
      RunBands(
          ctx, g, ld_int, 4, true, isa_, lv, y, q,
          [&](int64_t n, Band* b) {
            const int64_t bytes = CheckedMul(g.C, b->plane, "input band");
            float* buf = ThreadScratch<kPoolInput>(bytes / 4 + 1);
            FillBandBytes(g, xs, n, zp, reinterpret_cast<uint8_t*>(buf), b);
          },
          [&](const Band& b, const int32_t* off, int64_t r, float* row) {
            ConvRowInt(g, b, r, *iw, ca, off, row);
          });
      return;
    }

    // The float fallback: decoded weights (packed for the tiles), float band of level - zp.
    const Path path = FloatPath(isa_, g.M);
    const int64_t block = path == Path::kAvx512 ? kBlockLanes * kLanes
                          : path == Path::kAvx2  ? kBlockLanes2 * kLanes2
                                                 : 0;
    const std::shared_ptr<const std::vector<float>> wk =
        float_.Get(constant_, {lut.codes, lut.codebook, M, R, lut.K, block}, [&] {
          std::vector<float> wt(static_cast<size_t>(CheckedMul(M, R, "weights")));
          for (int64_t m = 0; m < M; ++m) DecodeRow(lut, m, wt.data() + m * R, isa_);
          if (block == 0) return std::make_shared<const std::vector<float>>(std::move(wt));
          return std::make_shared<const std::vector<float>>(PackWeights(wt.data(), M, R, block));
        });
    RunBands(
        ctx, g, Wp, 1, path == Path::kAvx512, isa_, lv, y, q,
        [&](int64_t n, Band* b) {
          FillBandLevels(g, xs, n, zp,
                         ThreadScratch<kPoolInput>(CheckedMul(g.C, b->plane, "input band")), b);
        },
        [&](const Band& b, const int32_t* off, int64_t r, float* row) {
          Geom sums = g;
          sums.relu = false;
          ConvRowFloat(path, sums, b, r, wk->data(), nullptr, off, row);
          if (path == Path::kScalar) {
            AffineRowScalar(g, ca, row);
          } else {
            AffineRowAvx2(g, ca, row);
          }
        });
  }

  WindowAttrs attrs_;
  int64_t bits_;
  Isa isa_;
  bool constant_;  // Codes and Codebook are initializers
  int64_t zp_ = 0;
  // The int8 weights, or the decoded float weights packed for the float tiles, of constant
  // Codes and Codebook: their addresses, M, R, K (and the float tiles' block width)
  mutable Kept<IntWeights, std::tuple<const uint8_t*, const float*, int64_t, int64_t, int>> int_;
  mutable Kept<std::vector<float>,
               std::tuple<const uint8_t*, const float*, int64_t, int64_t, int, int64_t>>
      float_;
};

}  // namespace

const OrtCustomOp* ConvPoolQuantOp() {
  static const Op<ConvPoolQuant> op;
  return &op;
}

const OrtCustomOp* LutConvPoolQuantOp() {
  static const Op<LutConvPoolQuant> op;
  return &op;
}

}  // namespace adq
