#include "conv_panels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <array>
#include <cstring>
#include <memory>
#include <utility>

#include "gemm.h"
#include "levels.h"
#include "packing.h"

namespace adq::panels {
namespace {

constexpr int kMaxQ = 12;     // outputs per float micro-tile (2 x 12 accumulators)
constexpr int kMaxQ1 = 24;    // outputs per float micro-tile of a one-block panel (1 x 24)
constexpr int kMaxQInt = 14;  // outputs per int8 micro-tile (2 x 14 accumulators)
constexpr int kMaxQAvx2 = 5;  // outputs per AVX2 micro-tile (16 channels: 2 x 5 accumulators)
constexpr int64_t kChunkQ = 16 * kMaxQ;  // flat outputs per task
constexpr int64_t kChunkK = 128;         // k-steps summed in registers before adding up
constexpr int64_t kPlaneBudget = 1 << 17;  // phase-plane elements per batch chunk (512 KB)
constexpr int64_t kMinChunkMacs = int64_t{1} << 28;  // multiply-adds per batch chunk, at least
constexpr int kMaxIntLevelsT = 15;  // thresholds per quantizer for TileIntLevels, at most

// Pixel-lane int8 tiles (TilePix): 8 output channels x up to kMaxV vectors of 16 consecutive
// flat outputs of the phase-plane grid (OH rows of Wq, the last Wq - OW of each row unused),
// kPixVecs vectors per task at most. Used for layers with few channels (their tiles have few
// k-steps, so the channel-lane tiles' transposes cost as much as the sums) when Wq >= 16 (a
// vector then meets at most 2 rows) and at most 1/8 of the grid is unused columns.
constexpr int kPixChannels = 8;
constexpr int kMaxV = 3;
constexpr int64_t kPixVecs = 8 * kMaxV;
constexpr int64_t kPixMaxSteps = 72;  // k-steps (channel quads x taps): 32 channels, 3x3

struct TileArgs {
  const void* w;           // the panel's weights: code words (float path) or int8 (integer)
  int64_t wstride;         // AVX2 tiles (one block of a panel): words per k
  int64_t C, taps, cstride;  // C: channels (float) or channel quads (integer)
  int64_t xstep;           // integer channels-last planes: bytes from one output's cells to the next
  const int64_t* tapoff;   // per tap: offset inside a channel's (quad's) phase planes
  const void* x;           // channel 0 of the image, at the tile's first output
  const float* table;      // the codebook, 16 floats
  const float* scale;      // the panel's 32 scales and biases
  const float* bias;
  float* out;              // [NQ][32]
};

// NB blocks of 16 channels x NQ consecutive flat outputs, over all k = (c, tap). Sums run in
// registers over chunks of about kChunkK k-steps and are added up in `out` (blocked summation:
// rounding error grows with the chunk length, not with C * taps).
template <int NB, int NQ>
__attribute__((target("avx512f"))) void Tile(const TileArgs& a) {
  // Word w >> 4q in 64-bit lane q: dword 2q holds the code of channel 2q in its low nibble,
  // dword 2q + 1 that of channel 2q + 1; vpermps reads only the low 4 bits of each index.
  const __m512i shifts = _mm512_setr_epi64(0, 4, 8, 12, 16, 20, 24, 28);
  const __m512 table = _mm512_loadu_ps(a.table);
  const uint64_t* w = static_cast<const uint64_t*>(a.w);
  const int64_t cchunk = std::max<int64_t>(1, kChunkK / a.taps);
  int64_t c0 = 0;
  do {
    __m512 acc[NB][NQ];
    for (int b = 0; b < NB; ++b) {
      for (int j = 0; j < NQ; ++j) acc[b][j] = _mm512_setzero_ps();
    }
    const int64_t c1 = std::min(a.C, c0 + cchunk);
    const float* xc = static_cast<const float*>(a.x) + c0 * a.cstride;
    for (int64_t c = c0; c < c1; ++c, xc += a.cstride) {
      for (int64_t t = 0; t < a.taps; ++t, w += NB) {
        const float* xt = xc + a.tapoff[t];
        __m512 wv[NB];
        for (int b = 0; b < NB; ++b) {
          const __m512i idx =
              _mm512_srlv_epi64(_mm512_set1_epi64(static_cast<long long>(w[b])), shifts);
          wv[b] = _mm512_permutexvar_ps(idx, table);
        }
#pragma GCC unroll 32
        for (int j = 0; j < NQ; ++j) {
          const __m512 xv = _mm512_set1_ps(xt[j]);
          for (int b = 0; b < NB; ++b) acc[b][j] = _mm512_fmadd_ps(wv[b], xv, acc[b][j]);
        }
      }
    }
    for (int b = 0; b < NB; ++b) {
      for (int j = 0; j < NQ; ++j) {
        float* o = a.out + j * 2 * kLanes + b * kLanes;
        _mm512_storeu_ps(o, c0 == 0 ? acc[b][j] : _mm512_add_ps(_mm512_loadu_ps(o), acc[b][j]));
      }
    }
    c0 = c1;
  } while (c0 < a.C);
  for (int b = 0; b < NB; ++b) {
    const __m512 s = _mm512_loadu_ps(a.scale + b * kLanes);
    const __m512 bias = _mm512_loadu_ps(a.bias + b * kLanes);
    for (int j = 0; j < NQ; ++j) {
      float* o = a.out + j * 2 * kLanes + b * kLanes;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), s, bias));
    }
  }
}

// The integer path: int8 weights (the integer codebook levels) and uint8 levels, 4 channels per
// 32-bit lane: vpdpbusd adds the 4 products of a channel quad to each output channel's int32
// sum, which is exact (the caller checks 255 * 128 * 4 * quads * taps < 2^31).
// POS: channels-last planes, where output j's cells start a.xstep bytes after output j - 1's
// (otherwise 4: the cells of consecutive outputs are adjacent).
template <int NB, int NQ, bool POS = false>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void SumsInt(
    const TileArgs& a, __m512i (&acc)[NB][NQ]) {
#pragma GCC unroll 2
  for (int b = 0; b < NB; ++b) {
#pragma GCC unroll 32
    for (int j = 0; j < NQ; ++j) acc[b][j] = _mm512_setzero_si512();
  }
  const int8_t* w = static_cast<const int8_t*>(a.w);
  const uint8_t* xc = static_cast<const uint8_t*>(a.x);
  const int64_t xs = POS ? a.xstep : 4;
  for (int64_t c = 0; c < a.C; ++c, xc += a.cstride) {
    for (int64_t t = 0; t < a.taps; ++t, w += NB * 4 * kLanes) {
      const uint8_t* xt = xc + a.tapoff[t];
      __m512i wv[NB];
      for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512(w + b * 4 * kLanes);
#pragma GCC unroll 32
      for (int j = 0; j < NQ; ++j) {
        int32_t quad;
        std::memcpy(&quad, POS ? xt + j * xs : xt + 4 * j, 4);
        const __m512i xv = _mm512_set1_epi32(quad);
        // acc += xv (uint8) . wv (int8) in place: with the intrinsic, GCC 12 copies every
        // accumulator through another register and spills some each step (1.3-1.4x slower).
#pragma GCC unroll 2
        for (int b = 0; b < NB; ++b) {
          asm("vpdpbusd %2, %1, %0" : "+v"(acc[b][j]) : "v"(xv), "v"(wv[b]));
        }
      }
    }
  }
}

template <int NB, int NQ, bool POS = false>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void TileInt(const TileArgs& a) {
  __m512i acc[NB][NQ];  // every loop over acc is unrolled, or GCC keeps it in memory
  SumsInt<NB, NQ, POS>(a, acc);
#pragma GCC unroll 2
  for (int b = 0; b < NB; ++b) {
    const __m512 s = _mm512_loadu_ps(a.scale + b * kLanes);
    const __m512 bias = _mm512_loadu_ps(a.bias + b * kLanes);
#pragma GCC unroll 32
    for (int j = 0; j < NQ; ++j) {
      _mm512_storeu_ps(a.out + j * 2 * kLanes + b * kLanes,
                       _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[b][j]), s, bias));
    }
  }
}

// AVX2 + FMA: one block of 16 channels (two ymm) x NQ outputs. The same code words: shifts by
// 0, 4, 8, 12 (and 16 ... 28) per 64-bit lane leave channels 0..7 (8..15) in the low nibbles
// of the dwords; vpermps reads 3 index bits, so K > 8 takes a second table and a blend on bit 3.
// Codebook levels of the low 4 bits of each dword of idx (t0: levels 0..7, t1: 8..15).
template <bool WIDE>
__attribute__((target("avx2"))) inline __m256 Lookup8(__m256i idx, __m256 t0, __m256 t1) {
  const __m256 lo = _mm256_permutevar8x32_ps(t0, idx);
  if (!WIDE) return lo;
  const __m256 hi = _mm256_permutevar8x32_ps(t1, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

template <int NQ, bool WIDE>
__attribute__((target("avx2,fma"))) void TileAvx2(const TileArgs& a) {
  const __m256i sh_lo = _mm256_setr_epi64x(0, 4, 8, 12);
  const __m256i sh_hi = _mm256_setr_epi64x(16, 20, 24, 28);
  const __m256 t0 = _mm256_loadu_ps(a.table), t1 = _mm256_loadu_ps(a.table + 8);
  const uint64_t* w = static_cast<const uint64_t*>(a.w);
  const int64_t cchunk = std::max<int64_t>(1, kChunkK / a.taps);
  int64_t c0 = 0;
  do {
    __m256 acc[2][NQ];
    for (int j = 0; j < NQ; ++j) acc[0][j] = acc[1][j] = _mm256_setzero_ps();
    const int64_t c1 = std::min(a.C, c0 + cchunk);
    const float* xc = static_cast<const float*>(a.x) + c0 * a.cstride;
    for (int64_t c = c0; c < c1; ++c, xc += a.cstride) {
      for (int64_t t = 0; t < a.taps; ++t, w += a.wstride) {
        const float* xt = xc + a.tapoff[t];
        const __m256i q = _mm256_set1_epi64x(static_cast<long long>(*w));
        const __m256 w0 = Lookup8<WIDE>(_mm256_srlv_epi64(q, sh_lo), t0, t1);
        const __m256 w1 = Lookup8<WIDE>(_mm256_srlv_epi64(q, sh_hi), t0, t1);
#pragma GCC unroll 32
        for (int j = 0; j < NQ; ++j) {
          const __m256 xv = _mm256_broadcast_ss(xt + j);
          acc[0][j] = _mm256_fmadd_ps(w0, xv, acc[0][j]);
          acc[1][j] = _mm256_fmadd_ps(w1, xv, acc[1][j]);
        }
      }
    }
    for (int j = 0; j < NQ; ++j) {
      for (int h = 0; h < 2; ++h) {
        float* o = a.out + j * 2 * kLanes + h * 8;
        _mm256_storeu_ps(o, c0 == 0 ? acc[h][j] : _mm256_add_ps(_mm256_loadu_ps(o), acc[h][j]));
      }
    }
    c0 = c1;
  } while (c0 < a.C);
  for (int h = 0; h < 2; ++h) {
    const __m256 s = _mm256_loadu_ps(a.scale + h * 8), bias = _mm256_loadu_ps(a.bias + h * 8);
    for (int j = 0; j < NQ; ++j) {
      float* o = a.out + j * 2 * kLanes + h * 8;
      _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_loadu_ps(o), s, bias));
    }
  }
}

using TileFn = void (*)(const TileArgs&);

template <int NB, size_t... Q>
constexpr std::array<TileFn, sizeof...(Q)> Tiles(std::index_sequence<Q...>) {
  return {&Tile<NB, static_cast<int>(Q) + 1>...};
}
template <int NB, bool POS, size_t... Q>
constexpr std::array<TileFn, sizeof...(Q)> TilesInt(std::index_sequence<Q...>) {
  return {&TileInt<NB, static_cast<int>(Q) + 1, POS>...};
}
// Indexed by the tile's output count - 1: float panels of two blocks and of one, int8 panels
// ([channels last][blocks - 1]).
constexpr auto kTilesFloat2 = Tiles<2>(std::make_index_sequence<kMaxQ>{});
constexpr auto kTilesFloat1 = Tiles<1>(std::make_index_sequence<kMaxQ1>{});
constexpr std::array<TileFn, kMaxQInt> kTilesInt[2][2] = {
    {TilesInt<1, false>(std::make_index_sequence<kMaxQInt>{}),
     TilesInt<2, false>(std::make_index_sequence<kMaxQInt>{})},
    {TilesInt<1, true>(std::make_index_sequence<kMaxQInt>{}),
     TilesInt<2, true>(std::make_index_sequence<kMaxQInt>{})}};

// The pixel-lane form of the integer path: each accumulator holds 16 consecutive outputs of the
// phase-plane grid (lanes over pixels, at most two output rows) for one output channel, so that
// the outputs come out in NCHW rows without a transpose. Per k-step (channel quad, tap): one 64-byte load of 16 input cells
// per vector, one broadcast of each channel's 4 int8 weights, 8 x NV vpdpbusd.
struct PixArgs {
  const int8_t* w;            // the tile's 8 channels at k = 0: channel m's 4 bytes at w + 4m
  int64_t wstep;              // bytes from one k-step to the next
  int64_t C, taps, cstride;   // channel quads, taps, bytes per quad's phase planes
  const int64_t* tapoff;      // per tap: byte offset inside a quad's phase planes
  const uint8_t* x;           // the image's phase planes
  int64_t vin[kMaxV];         // byte offset of each vector's first input cell
  const float* scale;         // the 8 channels' scales and biases
  const float* bias;
  float* out;                 // [8][kMaxV][16]: Scale * sum + Bias
};

template <int NV>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void TilePix(const PixArgs& a) {
  // Every loop over the accumulators is unrolled, or GCC keeps them in memory.
  __m512i acc0[kPixChannels], acc1[kPixChannels], acc2[kPixChannels];
#pragma GCC unroll 8
  for (int m = 0; m < kPixChannels; ++m) {
    acc0[m] = acc1[m] = acc2[m] = _mm512_setzero_si512();
  }
  const int8_t* w = a.w;
  const uint8_t* xc = a.x;
  for (int64_t c = 0; c < a.C; ++c, xc += a.cstride) {
    for (int64_t t = 0; t < a.taps; ++t, w += a.wstep) {
      const uint8_t* xt = xc + a.tapoff[t];
      const __m512i x0 = _mm512_loadu_si512(xt + a.vin[0]);
      const __m512i x1 = NV > 1 ? _mm512_loadu_si512(xt + a.vin[1]) : x0;
      const __m512i x2 = NV > 2 ? _mm512_loadu_si512(xt + a.vin[2]) : x0;
#pragma GCC unroll 8
      for (int m = 0; m < kPixChannels; ++m) {
        int32_t quad;
        std::memcpy(&quad, w + 4 * m, 4);
        const __m512i wb = _mm512_set1_epi32(quad);
        // acc += x (uint8) . wb (int8) in place, as in TileInt
        asm("vpdpbusd %2, %1, %0" : "+v"(acc0[m]) : "v"(x0), "v"(wb));
        if (NV > 1) asm("vpdpbusd %2, %1, %0" : "+v"(acc1[m]) : "v"(x1), "v"(wb));
        if (NV > 2) asm("vpdpbusd %2, %1, %0" : "+v"(acc2[m]) : "v"(x2), "v"(wb));
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < kPixChannels; ++m) {
    const __m512 s = _mm512_set1_ps(a.scale[m]), bias = _mm512_set1_ps(a.bias[m]);
    float* o = a.out + m * kMaxV * kLanes;
    _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc0[m]), s, bias));
    if (NV > 1) _mm512_storeu_ps(o + kLanes, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc1[m]), s, bias));
    if (NV > 2) {
      _mm512_storeu_ps(o + 2 * kLanes, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc2[m]), s, bias));
    }
  }
}

using PixFn = void (*)(const PixArgs&);
constexpr std::array<PixFn, kMaxV> kTilesPix = {&TilePix<1>, &TilePix<2>, &TilePix<3>};

// In-register 16 x 16 transpose: on return r[n] holds element n of every input row.
__attribute__((target("avx512f"))) inline void Transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + c], 128-bit lane k: element 4k + c of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // A 4 x 4 transpose of 128-bit lanes for each c.
  for (int c = 0; c < 4; ++c) {
    const __m512 s0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
    const __m512 s1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 s2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 s3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(s0, s2, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(s0, s2, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(s1, s3, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(s1, s3, 0xDD);
  }
}

// Where a tile's outputs go: element (channel l, output j) of the tile is flat index l * P + j
// of each pointer (all offset to the tile's first output of its first channel).
struct TileOut {
  float* y;               // the float output (FLOATS)
  const float* residual;  // added when RES
  uint8_t* q;             // the levels output (QUANT)
  const Levels* levels;
  uint8_t* q2;            // a second levels output (with QUANT), or nullptr
  const Levels* levels2;
};

// The outputs of epilogue f (and float output y, or nullptr) from flat index `at` on.
inline TileOut OutputsAt(const Fused& f, float* y, int64_t at) {
  return {y ? y + at : nullptr, f.residual ? f.residual + at : nullptr, f.q ? f.q + at : nullptr,
          &f.levels, f.q2 ? f.q2 + at : nullptr, &f.levels2};
}

// The first n of 16 bytes to q.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void StoreBytes(__m128i bytes,
                                                                           int64_t n,
                                                                           uint8_t* q) {
  if (n == 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), bytes);
  } else {  // a masked byte store: a copy through memory cost 3.2 ns a row here, this 0.6
    _mm_mask_storeu_epi8(q, static_cast<__mmask16>((1u << n) - 1u), bytes);
  }
}

// Levels #{k : scale * v >= t[k]} of the first n lanes of v, stored as bytes (NaN: 0); Counter:
// LevelCounter or FixedCounter<T>.
template <class Counter>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void StoreLevels(
    __m512 v, const Counter& lc, int64_t n, uint8_t* q) {
  StoreBytes(_mm512_cvtepi32_epi8(CountLevels16(v, lc)), n, q);
}

// Asks for the cache lines of n floats at each of `rows` rows P apart (the residual a tile's
// epilogue will read), so that they arrive while earlier tiles compute. That epilogue reads a
// short run of each of up to 32 channel rows, from memory at large batch sizes, which the
// hardware prefetchers do not follow: ResNet-18's residual-fused 64-channel 56x56 int8 layer at
// batch 32 took 8.1 ms without this, 6.6 with it, 5.2 without a residual (op profile, 2 threads).
// (asm: GCC's dead-code pass drops a loop of __builtin_prefetch.)
inline void PrefetchRows(const float* first, int64_t n, int64_t rows, int64_t P) {
  for (int64_t l = 0; l < rows; ++l) {
    const float* r = first + l * P;
    asm volatile("prefetcht0 %0" : : "m"(*r));
    asm volatile("prefetcht0 %0" : : "m"(r[n - 1]));
  }
}

// Asks for lines [l0, l1) of 64 bytes from p into L2 (the next batch chunk's input, so that its
// conversion finds it there; asm for the reason given at PrefetchRows).
inline void PrefetchLines(const uint8_t* p, int64_t l0, int64_t l1) {
  for (int64_t l = l0; l < l1; ++l) asm volatile("prefetcht1 %0" : : "m"(p[l * 64]));
}

// Writes a tile [nq][32] (outputs x channels) to NCHW rows through 16 x 16 transposes in
// registers, with the fused epilogue (+ residual, relu, levels: chosen at compile time), and
// masked stores.
template <bool RES, bool RELU, bool FLOATS, bool QUANT>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void StoreTile(const float* tile, int64_t nq,
                                                                    int64_t mcount,
                                                                    const TileOut& o, int64_t P) {
  const __m512 zero = _mm512_setzero_ps();
  const LevelCounter lc = QUANT ? MakeLevelCounter(*o.levels) : LevelCounter{};
  const LevelCounter lc2 = QUANT && o.q2 ? MakeLevelCounter(*o.levels2) : LevelCounter{};
  for (int64_t q0 = 0; q0 < nq; q0 += 16) {
    const int64_t n = std::min<int64_t>(16, nq - q0);
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
    for (int64_t b = 0; b * kLanes < mcount; ++b) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) {
        r[j] = j < n ? _mm512_loadu_ps(tile + (q0 + j) * 2 * kLanes + b * kLanes)
                     : _mm512_setzero_ps();
      }
      Transpose16(r);
      const int64_t lanes = std::min<int64_t>(kLanes, mcount - b * kLanes);
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t at = (b * kLanes + l) * P + q0;
        __m512 v = r[l];
        if (RES) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, o.residual + at));
        if (RELU) v = _mm512_max_ps(zero, v);  // max(0, NaN) is the NaN (second operand)
        if (FLOATS) _mm512_mask_storeu_ps(o.y + at, mask, v);
        if (QUANT) StoreLevels(v, lc, n, o.q + at);
        if (QUANT && o.q2) StoreLevels(v, lc2, n, o.q2 + at);
      }
    }
  }
}

using StoreFn = void (*)(const float*, int64_t, int64_t, const TileOut&, int64_t);

// The levels of one tile vector (relu first when RELU: max(0, NaN) is the NaN, level 0).
template <bool RELU>
__attribute__((target("avx512f"))) inline __m512i CountTile16(const float* p,
                                                              const LevelCounter& lc) {
  const __m512 v = _mm512_loadu_ps(p);
  return CountLevels16(RELU ? _mm512_max_ps(_mm512_setzero_ps(), v) : v, lc);
}

// The levels of outputs 4g .. 4g + 3 of a tile column (t: output 0, 16 channels), as bytes
// 16 * i + 4 * s + r = channel 4i + r, output 4g + s (packus keeps each 128-bit lane's order).
template <bool RELU>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i LevelGroup(
    const float* t, int g, const LevelCounter& lc) {
  const float* u = t + 4 * g * 2 * kLanes;
  const __m512i c0 = CountTile16<RELU>(u, lc), c1 = CountTile16<RELU>(u + 2 * kLanes, lc);
  const __m512i c2 = CountTile16<RELU>(u + 4 * kLanes, lc);
  const __m512i c3 = CountTile16<RELU>(u + 6 * kLanes, lc);
  return _mm512_packus_epi16(_mm512_packus_epi32(c0, c1), _mm512_packus_epi32(c2, c3));
}

// Byte permutes for StoreTileLevels: result k, byte 16 * l + j (channel 4k + l of the block,
// output j) comes from byte 16 * k + 4 * (j % 4) + l of z[j / 4]; one permute of (z[0], z[1])
// serves outputs 0-7, one of (z[2], z[3]) outputs 8-15.
struct ByteTranspose {
  alignas(64) uint8_t idx[4][64];
};
constexpr ByteTranspose MakeByteTranspose() {
  ByteTranspose t{};
  for (int k = 0; k < 4; ++k) {
    for (int l = 0; l < 4; ++l) {
      for (int j = 0; j < 16; ++j) {
        const int jj = j % 8;
        t.idx[k][16 * l + j] = static_cast<uint8_t>(64 * (jj / 4) + 16 * k + 4 * (jj % 4) + l);
      }
    }
  }
  return t;
}
constexpr ByteTranspose kByteTranspose = MakeByteTranspose();

// The levels z (LevelGroup's packing) of n <= 16 outputs of 16 channels, `lanes` of them real,
// to the NCHW rows of q (channel 0 at the first output): 4 channels per pair of byte permutes.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi"))) inline void StoreLevelBytes(
    const __m512i (&z)[4], int64_t n, int64_t lanes, uint8_t* q, int64_t P) {
  const uint64_t bytes = n == 16 ? 0xFFFFull : (1ull << n) - 1;
  for (int64_t k = 0; 4 * k < lanes; ++k) {
    const __m512i idx = _mm512_load_si512(kByteTranspose.idx[k]);
    __m512i w = _mm512_permutex2var_epi8(z[0], idx, z[1]);
    if (n > 8) {
      w = _mm512_mask_mov_epi8(w, 0xFF00FF00FF00FF00ull, _mm512_permutex2var_epi8(z[2], idx, z[3]));
    }
    for (int64_t l = 0; l < 4 && 4 * k + l < lanes; ++l) {
      // Bytes [16 l, 16 l + n) of w to the channel's row (a masked store: only those bytes are
      // touched, though the base lies 16 l bytes before the row).
      _mm512_mask_storeu_epi8(q + (4 * k + l) * P - 16 * l, bytes << (16 * l), w);
    }
  }
}

// One quantizer's levels of a tile column (t: 16 channels, `lanes` of them real; n <= 16
// outputs) to the NCHW rows of q (channel 0, the column's first output).
template <bool RELU>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi"))) inline void StoreLevelColumn(
    const float* t, int64_t n, int64_t lanes, const LevelCounter& lc, uint8_t* q, int64_t P) {
  const __m512i z[4] = {
      LevelGroup<RELU>(t, 0, lc), n > 4 ? LevelGroup<RELU>(t, 1, lc) : _mm512_setzero_si512(),
      n > 8 ? LevelGroup<RELU>(t, 2, lc) : _mm512_setzero_si512(),
      n > 12 ? LevelGroup<RELU>(t, 3, lc) : _mm512_setzero_si512()};
  StoreLevelBytes(z, n, lanes, q, P);
}

// The levels-only epilogue (no residual, no float output): the per-tensor thresholds are
// counted in the tile's own layout (a vector = 16 channels of one output), the counts packed
// to bytes and transposed to NCHW rows with byte permutes, so no float transposes. Reads whole
// groups of 4 outputs of the tile (up to 16 or the next multiple of 4: inside its buffer of
// kMaxQ1 outputs, whose floats are all initialized).
template <bool RELU>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi"))) void StoreTileLevels(
    const float* tile, int64_t nq, int64_t mcount, const TileOut& o, int64_t P) {
  const LevelCounter lc = MakeLevelCounter(*o.levels);
  const LevelCounter lc2 = o.q2 ? MakeLevelCounter(*o.levels2) : LevelCounter{};
  for (int64_t q0 = 0; q0 < nq; q0 += 16) {
    const int64_t n = std::min<int64_t>(16, nq - q0);
    for (int64_t b = 0; b * kLanes < mcount; ++b) {
      const float* t = tile + q0 * 2 * kLanes + b * kLanes;
      const int64_t lanes = std::min<int64_t>(kLanes, mcount - b * kLanes);
      StoreLevelColumn<RELU>(t, n, lanes, lc, o.q + b * kLanes * P + q0, P);
      if (o.q2) StoreLevelColumn<RELU>(t, n, lanes, lc2, o.q2 + b * kLanes * P + q0, P);
    }
  }
}

// Where TileIntLevels writes: per quantizer (q[1]: Q2 or nullptr), the levels rows (channel m0
// at the tile's first output) and the panel's integer thresholds (IntLevels).
struct LevelOut {
  uint8_t* q[2];
  const int32_t* tau[2];   // the panel's [block][T][16]
  const int32_t* flip[2];  // the panel's [block][16]
  int T[2];
  int64_t mcount, P;
};

// The levels of one output's 16 channels from their sums acc: #{k : (acc ^ flip) >= tau[k]}
// per lane (IntLevels; tau: T vectors of 16 thresholds).
__attribute__((target("avx512f"), always_inline)) inline __m512i IntLevel(__m512i acc,
                                                                           const int32_t* tau,
                                                                           int T, __m512i flip) {
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i x = _mm512_xor_si512(acc, flip);
  __m512i c = _mm512_setzero_si512();
  for (int k = 0; k < T; ++k) {
    const __mmask16 ge = _mm512_cmpge_epi32_mask(x, _mm512_loadu_si512(tau + k * kLanes));
    c = _mm512_mask_add_epi32(c, ge, c, one);
  }
  return c;
}

// The levels of 4 outputs of one block from their sums (outputs past NQ: zeros), packed as
// LevelGroup's.
template <int NQ, int G>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512i IntLevelGroup(
    const __m512i* acc, const int32_t* tau, int T, __m512i flip) {
  __m512i c[4];
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
    c[s] = 4 * G + s < NQ ? IntLevel(acc[4 * G + s], tau, T, flip) : _mm512_setzero_si512();
  }
  return _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
}

// TileInt with LutConvQuant's levels (no residual) counted from the int32 sums in registers
// against integer thresholds (IntLevels), transposed to NCHW rows with byte permutes: no float
// tile, no float epilogue.
template <int NB, int NQ>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi"))) void TileIntLevels(
    const TileArgs& a, const LevelOut& o) {
  static_assert(NQ <= 16, "one group of 16 outputs");
  __m512i acc[NB][NQ];  // every loop over acc is unrolled, or GCC keeps it in memory
  SumsInt<NB, NQ>(a, acc);
  for (int u = 0; u < 2 && o.q[u]; ++u) {
#pragma GCC unroll 2
    for (int b = 0; b < NB; ++b) {
      const int64_t lanes = std::min<int64_t>(kLanes, o.mcount - b * kLanes);
      const int32_t* tau = o.tau[u] + b * o.T[u] * kLanes;
      const __m512i flip = _mm512_loadu_si512(o.flip[u] + b * kLanes);
      const __m512i zero = _mm512_setzero_si512();
      const __m512i z[4] = {IntLevelGroup<NQ, 0>(acc[b], tau, o.T[u], flip),
                            NQ > 4 ? IntLevelGroup<NQ, 1>(acc[b], tau, o.T[u], flip) : zero,
                            NQ > 8 ? IntLevelGroup<NQ, 2>(acc[b], tau, o.T[u], flip) : zero,
                            NQ > 12 ? IntLevelGroup<NQ, 3>(acc[b], tau, o.T[u], flip) : zero};
      StoreLevelBytes(z, NQ, lanes, o.q[u] + b * kLanes * o.P, o.P);
    }
  }
}

using TileLevelsFn = void (*)(const TileArgs&, const LevelOut&);

// An epilogue as an index into the tables of store instances <RES, RELU, FLOATS, QUANT>.
inline int EpilogueIndex(const Fused& f, bool floats) {
  return (f.residual ? 8 : 0) + (f.relu ? 4 : 0) + (floats ? 2 : 0) + (f.q ? 1 : 0);
}

// Channels last: a tile [nq][32] (outputs x channels) is already in the outputs' order, so each
// vector (16 channels of one output) gets the fused epilogue and goes out with one store per
// output, masked only for a block of fewer than 16 channels (full-width masked stores measured
// 0.994x slower on ResNet-18 at batch 32). P: the elements from one output position to the
// next, M. T > 0: every quantizer has T thresholds, held in registers (FixedCounter: 0.985x
// against a count that branches on T and loads each threshold per vector); 0: any number.
template <bool RES, bool RELU, bool FLOATS, bool QUANT, int T = 0>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void StoreTileNhwc(const float* tile,
                                                                        int64_t nq,
                                                                        int64_t mcount,
                                                                        const TileOut& o,
                                                                        int64_t P) {
  const __m512 zero = _mm512_setzero_ps();
  using Counter = std::conditional_t<(T > 0), FixedCounter<(T > 0 ? T : 1)>, LevelCounter>;
  auto make = [](const Levels& lv) -> Counter {
    if constexpr (T > 0) {
      return MakeFixedCounter<T>(lv);
    } else {
      return MakeLevelCounter(lv);
    }
  };
  const Counter lc = QUANT ? make(*o.levels) : Counter{};
  const Counter lc2 = QUANT && o.q2 ? make(*o.levels2) : Counter{};
  for (int64_t b = 0; b * kLanes < mcount; ++b) {
    const int64_t lanes = std::min<int64_t>(kLanes, mcount - b * kLanes);
    const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1u);
    for (int64_t j = 0; j < nq; ++j) {
      const int64_t at = j * P + b * kLanes;
      __m512 v = _mm512_loadu_ps(tile + j * 2 * kLanes + b * kLanes);
      if (RES) {
        v = _mm512_add_ps(v, lanes == kLanes ? _mm512_loadu_ps(o.residual + at)
                                             : _mm512_maskz_loadu_ps(mask, o.residual + at));
      }
      if (RELU) v = _mm512_max_ps(zero, v);  // max(0, NaN) is the NaN (second operand)
      if (FLOATS) {
        if (lanes == kLanes) {
          _mm512_storeu_ps(o.y + at, v);
        } else {
          _mm512_mask_storeu_ps(o.y + at, mask, v);
        }
      }
      if (QUANT) StoreLevels(v, lc, lanes, o.q + at);
      if (QUANT && o.q2) StoreLevels(v, lc2, lanes, o.q2 + at);
    }
  }
}

// t[i] += u[i] for i < n (a multiple of 16; both 64-byte aligned): a tile plus its shortcut's.
__attribute__((target("avx512f"))) void AddTile(float* t, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; i += kLanes) {
    _mm512_store_ps(t + i, _mm512_add_ps(_mm512_load_ps(t + i), _mm512_load_ps(u + i)));
  }
}


// TileInt's levels-only form for channels last: each vector's levels, counted on its int32 sums
// against the integer thresholds, are the 16 bytes of one output's channels (o.P: M). T > 0:
// every quantizer has T thresholds, held in registers per block (0.992x against IntLevel's loop
// over a runtime T on ResNet-18 at batch 32); 0: any number.
template <int NB, int NQ, int T = 0>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void TileIntLevelsNhwc(
    const TileArgs& a, const LevelOut& o) {
  __m512i acc[NB][NQ];  // every loop over acc is unrolled, or GCC keeps it in memory
  SumsInt<NB, NQ, true>(a, acc);
  const __m512i one = _mm512_set1_epi32(1);
  for (int u = 0; u < 2 && o.q[u]; ++u) {
#pragma GCC unroll 2
    for (int b = 0; b < NB; ++b) {
      const int64_t lanes = std::min<int64_t>(kLanes, o.mcount - b * kLanes);
      const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1u);
      const int32_t* tau = o.tau[u] + b * o.T[u] * kLanes;
      const __m512i flip = _mm512_loadu_si512(o.flip[u] + b * kLanes);
      __m512i tv[T > 0 ? T : 1];
#pragma GCC unroll 16
      for (int k = 0; k < T; ++k) tv[k] = _mm512_loadu_si512(tau + k * kLanes);
#pragma GCC unroll 32
      for (int j = 0; j < NQ; ++j) {
        __m512i c;
        if constexpr (T > 0) {  // IntLevel with the thresholds in registers
          const __m512i x = _mm512_xor_si512(acc[b][j], flip);
          c = _mm512_setzero_si512();
#pragma GCC unroll 16
          for (int k = 0; k < T; ++k) {
            c = _mm512_mask_add_epi32(c, _mm512_cmpge_epi32_mask(x, tv[k]), c, one);
          }
        } else {
          c = IntLevel(acc[b][j], tau, o.T[u], flip);
        }
        _mm_mask_storeu_epi8(o.q[u] + j * o.P + b * kLanes, mask, _mm512_cvtepi32_epi8(c));
      }
    }
  }
}

// The levels-only int8 tiles, indexed as kTilesInt: [channels last][blocks - 1][outputs - 1].
template <int NB, bool NHWC, size_t... Q>
constexpr std::array<TileLevelsFn, sizeof...(Q)> TilesIntLevels(std::index_sequence<Q...>) {
  if constexpr (NHWC) {
    return {&TileIntLevelsNhwc<NB, static_cast<int>(Q) + 1>...};
  } else {
    return {&TileIntLevels<NB, static_cast<int>(Q) + 1>...};
  }
}
// Channels-last panels of two blocks whose quantizers all have T thresholds ([outputs - 1]).
template <int T, size_t... Q>
constexpr std::array<TileLevelsFn, sizeof...(Q)> TilesIntLevelsFixed(std::index_sequence<Q...>) {
  return {&TileIntLevelsNhwc<2, static_cast<int>(Q) + 1, T>...};
}
constexpr std::array<TileLevelsFn, kMaxQInt> kTilesIntLevelsFixed[3] = {
    TilesIntLevelsFixed<1>(std::make_index_sequence<kMaxQInt>{}),
    TilesIntLevelsFixed<3>(std::make_index_sequence<kMaxQInt>{}),
    TilesIntLevelsFixed<7>(std::make_index_sequence<kMaxQInt>{})};
constexpr std::array<TileLevelsFn, kMaxQInt> kTilesIntLevels[2][2] = {
    {TilesIntLevels<1, false>(std::make_index_sequence<kMaxQInt>{}),
     TilesIntLevels<2, false>(std::make_index_sequence<kMaxQInt>{})},
    {TilesIntLevels<1, true>(std::make_index_sequence<kMaxQInt>{}),
     TilesIntLevels<2, true>(std::make_index_sequence<kMaxQInt>{})}};

// The StoreTile (channels last: StoreTileNhwc) for an epilogue (writing floats, levels or both).
template <bool NHWC, size_t... I>
constexpr std::array<StoreFn, sizeof...(I)> Stores(std::index_sequence<I...>) {
  if constexpr (NHWC) {
    return {&StoreTileNhwc<(I & 8) != 0, (I & 4) != 0, (I & 2) != 0, (I & 1) != 0>...};
  } else {
    return {&StoreTile<(I & 8) != 0, (I & 4) != 0, (I & 2) != 0, (I & 1) != 0>...};
  }
}
// Channels-last epilogues with levels, for T thresholds per quantizer (index: EpilogueIndex / 2).
template <int T, size_t... I>
constexpr std::array<StoreFn, sizeof...(I)> FixedStores(std::index_sequence<I...>) {
  return {&StoreTileNhwc<(I & 4) != 0, (I & 2) != 0, (I & 1) != 0, true, T>...};
}
StoreFn ChooseStore(const Fused& f, bool floats, bool nhwc) {
  static constexpr auto kStores = Stores<false>(std::make_index_sequence<16>{});
  static constexpr auto kStoresNhwc = Stores<true>(std::make_index_sequence<16>{});
  static constexpr auto kStores1 = FixedStores<1>(std::make_index_sequence<8>{});
  static constexpr auto kStores3 = FixedStores<3>(std::make_index_sequence<8>{});
  static constexpr auto kStores7 = FixedStores<7>(std::make_index_sequence<8>{});
  const int T = f.levels.T;
  if (nhwc && f.q && (!f.q2 || f.levels2.T == T) && (T == 1 || T == 3 || T == 7)) {
    // 1-, 2- and 3-bit activations (4 bits, 15 thresholds: the register table's binary search)
    const int i = EpilogueIndex(f, floats) / 2;
    return T == 1 ? kStores1[i] : T == 3 ? kStores3[i] : kStores7[i];
  }
  if (nhwc) return kStoresNhwc[EpilogueIndex(f, floats)];
  if (f.q && !f.residual && !floats && HasVbmi()) {
    return f.relu ? &StoreTileLevels<true> : &StoreTileLevels<false>;
  }
  return kStores[EpilogueIndex(f, floats)];
}

// Where each vector of a pixel-lane tile goes: its lanes in mask1 to flat index base1 + lane of
// each channel's output plane (one output row), those in mask2 to base2 + lane (the next row).
struct PixVec {
  int64_t in;            // byte offset of the vector's first cell in the phase planes
  int64_t base1, base2;  // may lie before the plane: only lanes in the masks are touched
  __mmask16 mask1, mask2;
};

// PrefetchRows for the residual of vectors [v0, v1) of a pixel-lane tile (each vector's one or
// two row segments): a 56x56 layer at batch 32, run in these tiles, took 1.2x as long without.
inline void PrefetchResidual(const float* residual, const PixVec* vec, int64_t v0, int64_t v1,
                             int64_t mcount, int64_t P) {
  for (int64_t v = v0; v < v1; ++v) {
    const PixVec& pv = vec[v];
    if (pv.mask1) PrefetchRows(residual + pv.base1, __builtin_popcount(pv.mask1), mcount, P);
    if (pv.mask2) {
      PrefetchRows(residual + pv.base2 + __builtin_ctz(pv.mask2), __builtin_popcount(pv.mask2),
                   mcount, P);
    }
  }
}

// Writes a pixel-lane tile [8][kMaxV][16] (channels x vectors x lanes) to NCHW rows (pointers
// offset to the tile's first channel; P per channel) with the fused epilogue.
template <bool RES, bool RELU, bool FLOATS, bool QUANT>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void StorePix(const float* tile, int64_t nv,
                                                                   const PixVec* vec,
                                                                   int64_t mcount,
                                                                   const TileOut& o, int64_t P) {
  const __m512 zero = _mm512_setzero_ps();
  const LevelCounter lc = QUANT ? MakeLevelCounter(*o.levels) : LevelCounter{};
  const LevelCounter lc2 = QUANT && o.q2 ? MakeLevelCounter(*o.levels2) : LevelCounter{};
  for (int64_t l = 0; l < mcount; ++l) {
    for (int64_t v = 0; v < nv; ++v) {
      const PixVec& pv = vec[v];
      const int64_t a1 = l * P + pv.base1, a2 = l * P + pv.base2;
      __m512 r = _mm512_loadu_ps(tile + (l * kMaxV + v) * kLanes);
      if (RES) {
        __m512 res = _mm512_maskz_loadu_ps(pv.mask1, o.residual + a1);
        if (pv.mask2) res = _mm512_mask_loadu_ps(res, pv.mask2, o.residual + a2);
        r = _mm512_add_ps(r, res);
      }
      if (RELU) r = _mm512_max_ps(zero, r);  // max(0, NaN) is the NaN (second operand)
      if (FLOATS) {
        _mm512_mask_storeu_ps(o.y + a1, pv.mask1, r);
        if (pv.mask2) _mm512_mask_storeu_ps(o.y + a2, pv.mask2, r);
      }
      if (QUANT) {
        const __m128i bytes = _mm512_cvtepi32_epi8(CountLevels16(r, lc));
        _mm_mask_storeu_epi8(o.q + a1, pv.mask1, bytes);
        if (pv.mask2) _mm_mask_storeu_epi8(o.q + a2, pv.mask2, bytes);
      }
      if (QUANT && o.q2) {
        const __m128i bytes = _mm512_cvtepi32_epi8(CountLevels16(r, lc2));
        _mm_mask_storeu_epi8(o.q2 + a1, pv.mask1, bytes);
        if (pv.mask2) _mm_mask_storeu_epi8(o.q2 + a2, pv.mask2, bytes);
      }
    }
  }
}

using PixStoreFn = void (*)(const float*, int64_t, const PixVec*, int64_t, const TileOut&,
                            int64_t);
template <size_t... I>
constexpr std::array<PixStoreFn, sizeof...(I)> PixStores(std::index_sequence<I...>) {
  return {&StorePix<(I & 8) != 0, (I & 4) != 0, (I & 2) != 0, (I & 1) != 0>...};
}
PixStoreFn ChoosePixStore(const Fused& f, bool floats) {
  static constexpr auto kStores = PixStores(std::make_index_sequence<16>{});
  return kStores[EpilogueIndex(f, floats)];
}

template <bool WIDE, size_t... Q>
constexpr std::array<TileFn, sizeof...(Q)> TilesAvx2(std::index_sequence<Q...>) {
  return {&TileAvx2<static_cast<int>(Q) + 1, WIDE>...};
}
constexpr std::array<TileFn, kMaxQAvx2> kTilesAvx2[2] = {
    TilesAvx2<false>(std::make_index_sequence<kMaxQAvx2>{}),
    TilesAvx2<true>(std::make_index_sequence<kMaxQAvx2>{})};

// Interleaves 4 uint8 rows (nullptr: zeros) into dst[4 * i + r] = rows[r][i], i < n: byte and
// word unpacks, 16 columns at a time, the last < 16 columns through masked loads and stores (a
// scalar tail had cost as much as the rest: 8 of the 56 columns of ResNet-18's first layers).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void Interleave4(const uint8_t* const rows[4],
                                                                      int64_t n, uint8_t* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t m = std::min<int64_t>(16, n - i);
    const __mmask16 in = static_cast<__mmask16>((1u << m) - 1u);
    __m128i r[4];
    for (int k = 0; k < 4; ++k) {
      r[k] = rows[k] ? _mm_maskz_loadu_epi8(in, rows[k] + i) : _mm_setzero_si128();
    }
    const __m128i lo01 = _mm_unpacklo_epi8(r[0], r[1]), hi01 = _mm_unpackhi_epi8(r[0], r[1]);
    const __m128i lo23 = _mm_unpacklo_epi8(r[2], r[3]), hi23 = _mm_unpackhi_epi8(r[2], r[3]);
    const __m128i out[4] = {_mm_unpacklo_epi16(lo01, lo23), _mm_unpackhi_epi16(lo01, lo23),
                            _mm_unpacklo_epi16(hi01, hi23), _mm_unpackhi_epi16(hi01, hi23)};
    uint8_t* d = dst + 4 * i;
    if (m == 16) {
      for (int k = 0; k < 4; ++k) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 16 * k), out[k]);
      continue;
    }
    for (int k = 0; k < 4 && 4 * k < m; ++k) {  // columns 4k .. 4k + 3: bytes 16k .. 16k + 15
      const int64_t cols = std::min<int64_t>(4, m - 4 * k);
      _mm_mask_storeu_epi8(d + 16 * k, static_cast<__mmask16>((1u << (4 * cols)) - 1u), out[k]);
    }
  }
}

// Stride 2, AVX-512 VBMI: dst cell b = the 4 rows' bytes at column 2b + start, for b in
// [lo, hi) (all inside the rows of n bytes; a null row gives zeros), 16 cells per step: each
// row's next 32 bytes, and one two-register byte permute picks the even ones and interleaves
// the rows (no scratch row of cells, no second copy per column phase).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi"))) void GatherCells2(
    const uint8_t* const rows[4], int64_t n, int64_t start, int64_t lo, int64_t hi,
    uint8_t* dst) {
  alignas(64) static constexpr auto kIdx = [] {
    std::array<uint8_t, 64> idx{};
    for (int i = 0; i < 16; ++i) {
      for (int r = 0; r < 4; ++r) idx[4 * i + r] = static_cast<uint8_t>(32 * r + 2 * i);
    }
    return idx;
  }();
  const __m512i idx = _mm512_load_si512(kIdx.data());
  for (int64_t b0 = lo; b0 < hi; b0 += 16) {
    const int64_t nb = std::min<int64_t>(16, hi - b0), col0 = 2 * b0 + start;
    const int64_t avail = std::min<int64_t>(32, n - col0);  // >= 1: cell b0 is inside
    const __mmask32 in = avail >= 32 ? ~__mmask32{0} : (__mmask32{1} << avail) - 1;
    __m256i r[4];
    for (int k = 0; k < 4; ++k) {
      r[k] = rows[k] ? _mm256_maskz_loadu_epi8(in, rows[k] + col0) : _mm256_setzero_si256();
    }
    const __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512(r[0]), r[1], 1);
    const __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512(r[2]), r[3], 1);
    const __m512i cells = _mm512_permutex2var_epi8(a, idx, b);
    if (nb == 16) {
      _mm512_storeu_si512(dst + 4 * b0, cells);
    } else {
      _mm512_mask_storeu_epi8(dst + 4 * b0, (__mmask64{1} << (4 * nb)) - 1, cells);
    }
  }
}

// Channels last: the C bytes of n pixels step bytes apart to cells of Cb >= C bytes (zeros past
// C), 64 bytes per masked load and store (a memcpy call per pixel cost more than the copy).
__attribute__((target("avx512f,avx512bw"))) void CopyPixels(const uint8_t* src, int64_t step,
                                                             int64_t n, int64_t C, int64_t Cb,
                                                             uint8_t* dst) {
  auto mask = [](int64_t bytes) {
    return bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << std::max<int64_t>(bytes, 0)) - 1;
  };
  for (int64_t i = 0; i < n; ++i, src += step, dst += Cb) {
    for (int64_t c = 0; c < Cb; c += 64) {
      const __m512i v = _mm512_maskz_loadu_epi8(mask(C - c), src + c);
      _mm512_mask_storeu_epi8(dst + c, mask(Cb - c), v);
    }
  }
}

// dst[b] = row[b * step + start] for b in [lo, hi) (all inside the row).
inline void GatherColumns(const uint8_t* row, int64_t lo, int64_t hi, int64_t step, int64_t start,
                          uint8_t* dst) {
  const uint8_t* src = row + start;
  for (int64_t b = lo; b < hi; ++b) dst[b] = src[b * step];
}

// dst cell b = src cell b * step + start for b in [lo, hi) (4-byte cells, all inside the n
// source cells); step 2 (stride-2 convolutions) by a two-register permute, 16 cells at a time.
__attribute__((target("avx512f"))) void CopyCells(const uint8_t* src, int64_t n, int64_t start,
                                                  int64_t step, int64_t lo, int64_t hi,
                                                  uint8_t* dst) {
  int64_t b = lo;
  if (step == 2) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    for (; b + 16 <= hi && 2 * b + start + 32 <= n; b += 16) {
      const uint8_t* s = src + 4 * (2 * b + start);
      const __m512i v = _mm512_permutex2var_epi32(_mm512_loadu_si512(s), even,
                                                  _mm512_loadu_si512(s + 64));
      _mm512_storeu_si512(dst + 4 * b, v);
    }
  }
  for (; b < hi; ++b) std::memcpy(dst + 4 * b, src + 4 * (b * step + start), 4);
}

}  // namespace

Kind Choose(Isa isa, const Lut& lut, int64_t group, int64_t C, int64_t taps) {
  if (isa == Isa::kScalar || group != 1) return Kind::kNone;
  const bool integral = isa == Isa::kAvx512 && HasVnni() && Int8Levels(lut);
  // |sum| <= 255 * 128 * 4 * quads * taps must stay below 2^31 for exact int32 sums.
  const int64_t quads = (C + 3) / 4;
  if (integral && quads * taps <= (int64_t{1} << 31) / (255 * 128 * 4) - 1) return Kind::kInt8;
  return lut.bits <= 4 && lut.K <= kLanes ? Kind::kFloat : Kind::kNone;
}

void Pack(const Lut& lut, Kind kind, int64_t C, int64_t taps, Packed* p) {
  const int64_t M = lut.M, R = lut.R;
  Check(R == C * taps, "internal: packing ", R, " codes per row as ", C, " x ", taps);
  const int64_t blocks = (M + kLanes - 1) / kLanes, quads = (C + 3) / 4;
  p->kind = kind;
  if (kind == Kind::kFloat) {
    p->words.assign(static_cast<size_t>(CheckedMul(blocks, R, "packed codes")), 0);
  } else {
    p->int8.assign(static_cast<size_t>(CheckedMul(blocks * 4 * kLanes, quads * taps, "weights")), 0);
  }
  std::vector<uint8_t> codes(static_cast<size_t>(R));
  for (int64_t m = 0; m < M; ++m) {
    UnpackRowChecked(lut, m, codes.data());
    const int64_t block = m / kLanes, lane = m % kLanes;
    const int64_t panel = block / 2, nb = std::min<int64_t>(2, blocks - 2 * panel);
    if (kind == Kind::kFloat) {
      const int shift = static_cast<int>((lane % 2 ? 32 : 0) + 4 * (lane / 2));
      uint64_t* dst = p->words.data() + 2 * panel * R + block % 2;
      for (int64_t k = 0; k < R; ++k) dst[k * nb] |= static_cast<uint64_t>(codes[k]) << shift;
      continue;
    }
    // Panel p: [quad][tap][block of the panel][lane][4 channels of the quad].
    int8_t* dst = p->int8.data() + panel * quads * taps * 8 * kLanes + (block % 2) * 4 * kLanes;
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < taps; ++t) {
        const float v = lut.codebook[codes[c * taps + t]];
        dst[((c / 4) * taps + t) * nb * 4 * kLanes + 4 * lane + c % 4] = static_cast<int8_t>(v);
      }
    }
  }
}

std::shared_ptr<const Packed> Cache::Get(const Lut& lut, Kind kind, int64_t C, int64_t taps,
                                         bool constant) {
  return kept_.Get(constant, {lut.codes, lut.codebook, kind, lut.M, lut.R, lut.K}, [&] {
    auto p = std::make_shared<Packed>();
    Pack(lut, kind, C, taps, p.get());
    return std::shared_ptr<const Packed>(std::move(p));
  });
}

namespace {

// g(acc) of IntLevels: what the float epilogue compares with the thresholds for sum acc.
inline float LevelInput(int64_t acc, float s, float b, bool relu, float qscale) {
  float v = std::fma(static_cast<float>(static_cast<int32_t>(acc)), s, b);  // cvt, fmadd
  if (relu) v = v < 0.0f ? 0.0f : v;
  return qscale * v;
}

}  // namespace

bool MakeIntLevels(const Affine& af, const Levels& lv, bool relu, int64_t M, int64_t bound,
                   IntLevels* out) {
  if (!std::isfinite(lv.scale)) return false;
  const int64_t blocks = (M + kLanes - 1) / kLanes, T = lv.T;
  const int64_t never = bound + 1;  // above every sum (and every flipped sum)
  out->T = lv.T;
  out->tau.assign(static_cast<size_t>(blocks * T * kLanes), static_cast<int32_t>(never));
  out->flip.assign(static_cast<size_t>(blocks * kLanes), 0);
  for (int64_t m = 0; m < M; ++m) {
    const float s = af.scale[m * af.scale_step], b = af.bias ? af.bias[m] : 0.0f;
    if (!std::isfinite(s) || !std::isfinite(b)) return false;
    // g rises with acc when s and QScale have the same sign, falls when they differ.
    const int dir = (s > 0.0f ? 1 : s < 0.0f ? -1 : 0) * (lv.scale > 0.0f ? 1 : lv.scale < 0.0f ? -1 : 0);
    auto holds = [&](int64_t acc, float t) { return LevelInput(acc, s, b, relu, lv.scale) >= t; };
    if (dir < 0) out->flip[(m / kLanes) * kLanes + m % kLanes] = -1;
    for (int64_t k = 0; k < T; ++k) {
      const float t = lv.t[k];
      int64_t tau = never;
      if (dir == 0) {
        if (holds(0, t)) tau = -bound - 1;
      } else if (dir > 0 && holds(bound, t)) {  // the least acc that reaches t
        int64_t lo = -bound, hi = bound;
        while (lo < hi) {
          const int64_t mid = lo + (hi - lo) / 2;
          holds(mid, t) ? hi = mid : lo = mid + 1;
        }
        tau = lo;
      } else if (dir < 0 && holds(-bound, t)) {  // the greatest acc A that reaches t: ~acc >= ~A
        int64_t lo = -bound, hi = bound;
        while (lo < hi) {
          const int64_t mid = lo + (hi - lo + 1) / 2;
          holds(mid, t) ? lo = mid : hi = mid - 1;
        }
        tau = -lo - 1;
      }
      out->tau[((m / kLanes) * T + k) * kLanes + m % kLanes] = static_cast<int32_t>(tau);
    }
  }
  return true;
}

std::shared_ptr<const IntLevels> LevelCache::Get(const Affine& af, const Levels& lv, bool relu,
                                                 int64_t M, int64_t bound) {
  // The key: M, bound, relu, whether there is a bias; then QScale, the scales, biases and
  // thresholds, compared as bytes without building a copy (a NaN, refused below, matches itself).
  auto eq = [](const float* a, const float* b, size_t n) {
    return std::memcmp(a, b, n * sizeof(float)) == 0;
  };
  auto same = [&] {
    if (M != m_ || bound != bound_ || relu != relu_ || (af.bias != nullptr) != bias_) return false;
    const size_t size = 1 + static_cast<size_t>(M * (af.bias ? 2 : 1) + lv.T);
    if (values_.size() != size || !eq(values_.data(), &lv.scale, 1)) return false;
    const float* k = values_.data() + 1;
    if (af.scale_step) {  // per channel, else one scale for all
      if (!eq(k, af.scale, static_cast<size_t>(M))) return false;
    } else {
      for (int64_t m = 0; m < M; ++m) {
        if (!eq(k + m, af.scale, 1)) return false;
      }
    }
    k += M;
    if (af.bias) {
      if (!eq(k, af.bias, static_cast<size_t>(M))) return false;
      k += M;
    }
    return eq(k, lv.t, static_cast<size_t>(lv.T));
  };
  std::lock_guard<std::mutex> lock(mu_);
  if (same()) return levels_;
  m_ = M, bound_ = bound, relu_ = relu, bias_ = af.bias != nullptr;
  values_.assign(1, lv.scale);
  for (int64_t m = 0; m < M; ++m) values_.push_back(af.scale[m * af.scale_step]);
  if (af.bias) values_.insert(values_.end(), af.bias, af.bias + M);
  values_.insert(values_.end(), lv.t, lv.t + lv.T);
  auto made = std::make_shared<IntLevels>();
  levels_ = MakeIntLevels(af, lv, relu, M, bound, made.get()) ? std::move(made) : nullptr;
  return levels_;
}

void Finish(float* v, int64_t n, const Fused& f, int64_t at, Isa isa) {
  if (f.residual) {
    const float* r = f.residual + at;
    for (int64_t i = 0; i < n; ++i) v[i] += r[i];
  }
  if (f.relu) {
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] < 0.0f ? 0.0f : v[i];  // NaN stays NaN
  }
  if (f.q) CountLevels(v, n, f.levels, f.q + at, isa);
  if (f.q2) CountLevels(v, n, f.levels2, f.q2 + at, isa);
}

void Conv(const Ort::KernelContext& ctx, const ConvShape& s, const uint8_t* x, const Packed& w,
          const Lut& lut, const Affine& af, const Fused& f, float* y, Isa isa) {
  const bool integer = w.kind == Kind::kInt8;
  const int64_t Hp = s.H + s.pT + s.pB, Wp = s.W + s.pL + s.pR;
  const int64_t Hq = (Hp + s.sH - 1) / s.sH, Wq = (Wp + s.sW - 1) / s.sW;
  const int64_t PQ = CheckedMul(Hq, Wq, "phase plane");
  const int64_t cstride = CheckedMul(PQ, s.sH * s.sW, "phase planes");
  const int64_t taps = s.kH * s.kW, P = s.OH * s.OW;
  // Integer path: one 4-byte cell (a channel quad) per position; float path: one float.
  // Channels last (integer only): each position holds all its cells, Cb bytes.
  const bool nhwc = s.nhwc;
  const int64_t groups = integer ? (s.C + 3) / 4 : s.C;
  const int64_t Cb = 4 * groups;
  const int64_t cell = nhwc ? Cb : integer ? 4 : 1;

  // Tap (i, j) reads padded input (oh*sH + i*dH, ow*sW + j*dW): phase plane
  // ((i*dH) % sH, (j*dW) % sW) at (oh + i*dH / sH, ow + j*dW / sW).
  std::vector<int64_t> tapoff(static_cast<size_t>(taps));
  std::vector<char> used(static_cast<size_t>(s.sH * s.sW), 0);
  for (int64_t i = 0; i < s.kH; ++i) {
    for (int64_t j = 0; j < s.kW; ++j) {
      const int64_t rh = i * s.dH, rw = j * s.dW;
      const int64_t phase = (rh % s.sH) * s.sW + rw % s.sW;
      used[phase] = 1;
      tapoff[i * s.kW + j] = (phase * PQ + (rh / s.sH) * Wq + rw / s.sW) * cell;
    }
  }

  // Phase planes of every (n, channel) or (n, channel quad); only phases some tap reads. The
  // batch runs in chunks of images whose planes fit in about kPlaneBudget elements (4 bytes
  // each), so that the planes are still in cache when the tiles read them.
  const int64_t per_image = CheckedMul(groups, cstride, "phase planes");
  // Chunks also hold at least kMinChunkMacs of work: each costs two thread-pool dispatches,
  // which dominate small layers (ResNet-20 at batch 32 ran 8% slower in chunks of 9 images).
  const int64_t macs = std::max<int64_t>(1, s.M * s.OH * s.OW * s.C * taps);
  const int64_t nchunk = std::clamp<int64_t>(
      std::max(kPlaneBudget / std::max<int64_t>(per_image, 1), (kMinChunkMacs + macs - 1) / macs),
      1, s.N);
  const int64_t plane_elems = CheckedMul(nchunk, per_image, "phase planes");
  float* fplanes = nullptr;
  uint8_t* qplanes = nullptr;
  if (integer) {
    // Slack: a pixel-lane vector past the last row reads up to Wq + 16 cells beyond the planes.
    qplanes = reinterpret_cast<uint8_t*>(ThreadScratch<kConvInput>(plane_elems + Wq + 2 * kLanes));
  } else {
    fplanes = ThreadScratch<kConvInput>(plane_elems + kLanes);
  }
  int64_t n0 = 0;  // the chunk's first image: t below counts (image - n0, group)
  // The next chunk's input and its 64-byte lines (0: none), which the tile tasks prefetch.
  const int64_t image_bytes = s.C * s.H * s.W;
  const uint8_t* next_x = nullptr;
  int64_t next_lines = 0, chunk_tasks = 1;
  // Per column phase pw: the phase columns [lo, hi) whose input column b*sW + pw - pL is in
  // [0, W); the others are padding.
  std::vector<int64_t> lo(static_cast<size_t>(s.sW)), hi(static_cast<size_t>(s.sW));
  for (int64_t pw = 0; pw < s.sW; ++pw) {
    const int64_t first = s.pL - pw;  // b*sW >= first
    lo[pw] = std::min(Wq, first <= 0 ? 0 : (first + s.sW - 1) / s.sW);
    const int64_t last = s.W - 1 + s.pL - pw;  // b*sW <= last
    hi[pw] = std::max(lo[pw], last < 0 ? 0 : std::min(Wq, last / s.sW + 1));
  }
  // Integer path: each input row's 4 channels are interleaved once into cells, then every
  // column phase copies its cells out (a 4-byte copy per cell); at stride 2 with VBMI, each
  // column phase gathers its cells straight from the rows (GatherCells2).
  const bool gather2 = s.sW == 2 && HasVbmi();
  auto convert_quads = [&](size_t t) {
    const int64_t n = n0 + static_cast<int64_t>(t) / groups, g = static_cast<int64_t>(t) % groups;
    auto* cells = reinterpret_cast<uint8_t*>(ThreadScratch<kConvPhaseRows>(s.W));
    for (int64_t ph = 0; ph < s.sH; ++ph) {
      if (std::find(&used[ph * s.sW], &used[ph * s.sW] + s.sW, 1) == &used[ph * s.sW] + s.sW) {
        continue;
      }
      for (int64_t a = 0; a < Hq; ++a) {
        const int64_t ih = a * s.sH + ph - s.pT;
        const bool inside = ih >= 0 && ih < s.H;
        const uint8_t* rows[4];
        for (int r = 0; r < 4; ++r) {
          const int64_t c = 4 * g + r;
          rows[r] = inside && c < s.C ? x + ((n * s.C + c) * s.H + ih) * s.W : nullptr;
        }
        if (inside && s.sW > 1 && !gather2) Interleave4(rows, s.W, cells);
        for (int64_t pw = 0; pw < s.sW; ++pw) {
          if (!used[ph * s.sW + pw]) continue;
          const int64_t off = static_cast<int64_t>(t) * cstride + (ph * s.sW + pw) * PQ;
          uint8_t* d = qplanes + (off + a * Wq) * 4;
          if (!inside) {
            std::fill(d, d + 4 * Wq, uint8_t{0});
            continue;
          }
          std::fill(d, d + 4 * lo[pw], uint8_t{0});
          if (s.sW == 1) {
            Interleave4(rows, s.W, d + 4 * s.pL);
          } else if (gather2) {
            GatherCells2(rows, s.W, pw - s.pL, lo[pw], hi[pw], d);
          } else {
            CopyCells(cells, s.W, pw - s.pL, s.sW, lo[pw], hi[pw], d);
          }
          std::fill(d + 4 * hi[pw], d + 4 * Wq, uint8_t{0});
        }
      }
    }
  };
  auto convert_floats = [&](size_t t) {
    const int64_t n = n0 + static_cast<int64_t>(t) / groups, g = static_cast<int64_t>(t) % groups;
    for (int64_t ph = 0; ph < s.sH; ++ph) {
      for (int64_t pw = 0; pw < s.sW; ++pw) {
        if (!used[ph * s.sW + pw]) continue;
        const int64_t off = static_cast<int64_t>(t) * cstride + (ph * s.sW + pw) * PQ;
        for (int64_t a = 0; a < Hq; ++a) {
          const int64_t ih = a * s.sH + ph - s.pT;
          float* d = fplanes + off + a * Wq;
          if (ih < 0 || ih >= s.H) {
            std::fill(d, d + Wq, 0.0f);
            continue;
          }
          const uint8_t* row = x + ((n * s.C + g) * s.H + ih) * s.W;
          if (s.sW == 1) {
            std::fill(d, d + s.pL, 0.0f);
            gemm::U8ToFloat(row, s.W, d + s.pL, isa);
            std::fill(d + s.pL + s.W, d + Wq, 0.0f);
          } else {  // a byte row: Wq / 4 floats of scratch
            auto* cols = reinterpret_cast<uint8_t*>(ThreadScratch<kConvPhaseRows>((Wq + 3) / 4));
            GatherColumns(row, lo[pw], hi[pw], s.sW, pw - s.pL, cols);
            std::fill(d, d + lo[pw], 0.0f);
            gemm::U8ToFloat(cols + lo[pw], hi[pw] - lo[pw], d + lo[pw], isa);
            std::fill(d + hi[pw], d + Wq, 0.0f);
          }
        }
      }
    }
  };
  // Channels last: task t is row a of image n0 + t / Hq in every phase plane: per position, the
  // C bytes of an input pixel (zeros past C up to Cb) or zeros for padding.
  auto convert_nhwc = [&](size_t t) {
    const int64_t n = n0 + static_cast<int64_t>(t) / Hq, a = static_cast<int64_t>(t) % Hq;
    uint8_t* image = qplanes + (n - n0) * per_image * 4;
    for (int64_t ph = 0; ph < s.sH; ++ph) {
      const int64_t ih = a * s.sH + ph - s.pT;
      const bool inside = ih >= 0 && ih < s.H;
      const uint8_t* row = inside ? x + (n * s.H + ih) * s.W * s.C : nullptr;
      for (int64_t pw = 0; pw < s.sW; ++pw) {
        if (!used[ph * s.sW + pw]) continue;
        uint8_t* d = image + ((ph * s.sW + pw) * PQ + a * Wq) * Cb;
        if (!inside) {
          std::fill(d, d + Wq * Cb, uint8_t{0});
          continue;
        }
        std::fill(d, d + lo[pw] * Cb, uint8_t{0});
        if (s.sW == 1 && Cb == s.C) {
          std::memcpy(d + lo[pw] * Cb, row + (lo[pw] - s.pL) * s.C, (hi[pw] - lo[pw]) * Cb);
        } else {
          CopyPixels(row + (lo[pw] * s.sW + pw - s.pL) * s.C, s.sW * s.C, hi[pw] - lo[pw], s.C,
                     Cb, d + lo[pw] * Cb);
        }
        std::fill(d + hi[pw] * Cb, d + Wq * Cb, uint8_t{0});
      }
    }
  };
  auto convert = [&](size_t t) {
    nhwc ? convert_nhwc(t) : integer ? convert_quads(t) : convert_floats(t);
  };

  // Scales and biases padded to whole panels (the node's, and its shortcut's).
  const int64_t blocks = (s.M + kLanes - 1) / kLanes, npanels = (blocks + 1) / 2;
  auto panel_affine = [&](const Affine& a) {
    std::vector<float> v(static_cast<size_t>(npanels * 4 * kLanes), 0.0f);
    for (int64_t m = 0; m < s.M; ++m) {
      const int64_t p = m / (2 * kLanes), l = m % (2 * kLanes);
      v[p * 4 * kLanes + l] = a.scale[m * a.scale_step];
      v[p * 4 * kLanes + 2 * kLanes + l] = a.bias ? a.bias[m] : 0.0f;
    }
    return v;
  };
  const std::vector<float> sb = panel_affine(af);
  const Shortcut& sc = f.shortcut;
  const std::vector<float> sb2 = sc.x ? panel_affine(sc.af) : std::vector<float>{};
  const int64_t zero_tap = 0;

  // Tiles of at most qmax outputs within one output row (a row of OW splits into near-equal
  // parts), so that every tap reads qmax consecutive cells of a phase plane row.
  const bool avx2 = isa != Isa::kAvx512;
  // qmax: outputs per tile for panels of two blocks and of one (a panel of 16 channels has room
  // for twice the outputs in the float AVX-512 kernel).
  const int64_t qmax2 = integer ? kMaxQInt : avx2 ? kMaxQAvx2 : kMaxQ;
  const int64_t qmax1 = integer || avx2 ? qmax2 : kMaxQ1;
  auto split = [&](int64_t qmax) {
    const int64_t parts = (s.OW + qmax - 1) / qmax;
    std::vector<int64_t> starts(static_cast<size_t>(parts + 1));
    for (int64_t i = 0; i <= parts; ++i) starts[i] = i * s.OW / parts;
    return starts;
  };
  const std::vector<int64_t> starts2 = split(qmax2), starts1 = split(qmax1);
  // Rows per task: up to about kChunkQ outputs, fewer when that leaves too few tasks to share.
  const int64_t row_tasks = CheckedMul(nchunk * s.OH, npanels, "tasks");
  const int64_t rows_per_task = std::max<int64_t>(
      1, std::min<int64_t>(kChunkQ / s.OW, row_tasks / (2 * static_cast<int64_t>(TaskHint()))));
  const int64_t rchunks = (s.OH + rows_per_task - 1) / rows_per_task;
  const StoreFn store = ChooseStore(f, y != nullptr, nhwc);
  // Between the outputs of one channel (NCHW) or of one position (channels last).
  const int64_t ostep = nhwc ? s.M : P;
  // LutConvQuant without a residual on the int8 path: levels straight from the sums (IntLevels;
  // |sum| <= 255 * 128 per product). Only for up to 15 thresholds (activations of up to 4 bits):
  // making the integer thresholds costs a binary search per channel and threshold, up to 12 ms
  // for 255 thresholds of 512 channels, paid again whenever the parameters change, while with
  // that many thresholds the count itself costs the same either way.
  const int64_t sum_bound = 255 * 128 * 4 * groups * taps;
  std::shared_ptr<const IntLevels> ilv[2];
  bool int_levels = integer && f.q && !f.residual && !sc.x && !y && f.level_cache[0] &&
                    (nhwc || HasVbmi()) &&
                    sum_bound < (int64_t{1} << 30) && f.levels.T <= kMaxIntLevelsT &&
                    (!f.q2 || f.levels2.T <= kMaxIntLevelsT);
  for (int u = 0; u < 2 && int_levels && (u == 0 || f.q2); ++u) {
    ilv[u] = f.level_cache[u] ? f.level_cache[u]->Get(af, u ? f.levels2 : f.levels, f.relu, s.M,
                                                      sum_bound)
                              : nullptr;
    int_levels = ilv[u] != nullptr;
  }
  // Residual prefetch distance in tiles: about 256 k-steps of sums (one 3x3 tile of 64
  // channels; several tiles of a 1x1 layer) to cover a memory access.
  const int64_t ahead = std::clamp<int64_t>(256 / std::max<int64_t>(1, groups * taps), 1, 8);
  auto tile_task = [&](size_t task) {
    const int64_t p = static_cast<int64_t>(task) % npanels;
    const int64_t rest = static_cast<int64_t>(task) / npanels;
    const int64_t rc = rest % rchunks, n = n0 + rest / rchunks;
    const int64_t nb = std::min<int64_t>(2, blocks - 2 * p);
    const int64_t m0 = p * 2 * kLanes, mcount = std::min<int64_t>(nb * kLanes, s.M - m0);
    // Per thread, zeroed once (not per task): StoreTileLevels reads (finite, unused) floats past
    // a tile's nq outputs.
    alignas(64) static thread_local float tile[kMaxQ1 * 2 * kLanes];
    alignas(64) static thread_local float tile2[kMaxQInt * 2 * kLanes];  // the shortcut's
    TileArgs a{};
    if (integer) {
      a.w = w.int8.data() + p * groups * taps * 8 * kLanes;
      a.cstride = nhwc ? 4 : cstride * 4;
      a.xstep = Cb;
    } else {
      a.w = w.words.data() + 2 * p * taps * s.C;
      a.cstride = cstride;
    }
    a.C = groups;
    a.taps = taps;
    a.tapoff = tapoff.data();
    a.table = lut.table;
    a.scale = sb.data() + p * 4 * kLanes;
    a.bias = a.scale + 2 * kLanes;
    a.out = tile;
    const int64_t image = (n - n0) * per_image;
    // The flat index of the tile's first output (of channel m0), given a position in the
    // image's output (oh * OW + ow).
    auto out_at = [&](int64_t pos) {
      return nhwc ? (n * P + pos) * s.M + m0 : (n * s.M + m0) * P + pos;
    };
    const int64_t oh_end = std::min(s.OH, (rc + 1) * rows_per_task);
    const std::vector<int64_t>& starts = nb == 2 ? starts2 : starts1;
    const int64_t parts = static_cast<int64_t>(starts.size()) - 1;
    if (avx2) {  // each block of the panel on its own
      const auto& tiles = kTilesAvx2[lut.K > 8 ? 1 : 0];
      const uint64_t* words = static_cast<const uint64_t*>(a.w);
      for (int64_t b = 0; b < nb; ++b) {
        a.w = words + b;
        a.wstride = nb;
        a.scale = sb.data() + p * 4 * kLanes + b * kLanes;
        a.bias = a.scale + 2 * kLanes;
        const int64_t lanes = std::min<int64_t>(kLanes, mcount - b * kLanes);
        for (int64_t oh = rc * rows_per_task; oh < oh_end; ++oh) {
          for (int64_t part = 0; part < parts; ++part) {
            const int64_t ow0 = starts[part], nq = starts[part + 1] - ow0;
            a.x = fplanes + image + oh * Wq + ow0;
            tiles[nq - 1](a);
            const int64_t at = out_at(oh * s.OW + ow0) + b * kLanes * P;
            for (int64_t l = 0; l < lanes; ++l) {
              float row[kMaxQAvx2];
              for (int64_t j = 0; j < nq; ++j) row[j] = tile[j * 2 * kLanes + l];
              Finish(row, nq, f, at + l * P, isa);
              if (y) std::copy(row, row + nq, y + at + l * P);
            }
          }
        }
      }
      return;
    }
    const int64_t oh0 = rc * rows_per_task, ntiles = (oh_end - oh0) * parts;
    const TileFn* tiles = integer   ? kTilesInt[nhwc][nb - 1].data()
                          : nb == 2 ? kTilesFloat2.data()
                                    : kTilesFloat1.data();
    const TileLevelsFn* level_tiles = int_levels ? kTilesIntLevels[nhwc][nb - 1].data() : nullptr;
    if (level_tiles && nhwc && nb == 2 && (!ilv[1] || ilv[1]->T == ilv[0]->T)) {
      const int T = ilv[0]->T;  // 1-, 2- and 3-bit activations
      if (T == 1 || T == 3 || T == 7) level_tiles = kTilesIntLevelsFixed[T / 3].data();
    }
    LevelOut lo{};
    for (int u = 0; u < 2 && level_tiles && ilv[u]; ++u) {
      lo.T[u] = ilv[u]->T;
      lo.tau[u] = ilv[u]->tau.data() + 2 * p * ilv[u]->T * kLanes;
      lo.flip[u] = ilv[u]->flip.data() + 2 * p * kLanes;
    }
    lo.mcount = mcount;
    // The shortcut's tile arguments (its panel's weights and affine; sa.x set per tile).
    TileArgs sa{};
    if (sc.x) {
      sa.w = sc.w->int8.data() + p * (sc.C / 4) * 8 * kLanes;
      sa.C = sc.C / 4;
      sa.taps = 1;
      sa.tapoff = &zero_tap;
      sa.cstride = 4;
      sa.xstep = sc.sW * sc.C;
      sa.scale = sb2.data() + p * 4 * kLanes;
      sa.bias = sa.scale + 2 * kLanes;
      sa.out = tile2;
    }
    lo.P = ostep;
    // This task's share of the next chunk's input lines, a few with each tile.
    int64_t l0 = 0, l1 = 0, per_tile = 0;
    if (next_lines > 0) {
      l0 = static_cast<int64_t>(task) * next_lines / chunk_tasks;
      l1 = (static_cast<int64_t>(task) + 1) * next_lines / chunk_tasks;
      per_tile = (l1 - l0 + ntiles - 1) / std::max<int64_t>(ntiles, 1);
    }
    for (int64_t oh = oh0; oh < oh_end; ++oh) {
      for (int64_t part = 0; part < parts; ++part) {
        const int64_t ow0 = starts[part], nq = starts[part + 1] - ow0;
        const int64_t in = image + oh * Wq + ow0;
        a.x = nhwc      ? static_cast<const void*>(qplanes + image * 4 + (oh * Wq + ow0) * Cb)
              : integer ? static_cast<const void*>(qplanes + in * 4)
                        : fplanes + in;
        if (f.residual || sc.x) {  // the residual rows (or shortcut pixels) of the tile `ahead`
                                   // tiles on (at a task's start: of the tiles before it too)
          const int64_t t = (oh - oh0) * parts + part;
          for (int64_t u = t == 0 ? 0 : t + ahead; u <= t + ahead && u < ntiles; ++u) {
            const int64_t uh = oh0 + u / parts, up = u % parts;
            const int64_t un = starts[up + 1] - starts[up], ua = out_at(uh * s.OW + starts[up]);
            if (sc.x) {  // un pixels, each of sc.C bytes
              const uint8_t* px = sc.x + ((n * sc.H + uh * sc.sH) * sc.W + starts[up] * sc.sW) * sc.C;
              for (int64_t i = 0; i < un; ++i, px += sc.sW * sc.C) {
                for (int64_t c = 0; c < sc.C; c += 64) asm volatile("prefetcht0 %0" : : "m"(px[c]));
              }
            } else if (nhwc) {  // un positions, mcount floats each
              PrefetchRows(f.residual + ua, mcount, un, s.M);
            } else {
              PrefetchRows(f.residual + ua, un, mcount, P);
            }
          }
        }
        if (l0 < l1) {
          PrefetchLines(next_x, l0, std::min(l1, l0 + per_tile));
          l0 += per_tile;
        }
        if (level_tiles) {
          const int64_t at = out_at(oh * s.OW + ow0);
          lo.q[0] = f.q + at;
          lo.q[1] = f.q2 ? f.q2 + at : nullptr;
          level_tiles[nq - 1](a, lo);
          continue;
        }
        tiles[nq - 1](a);
        if (sc.x) {  // S of the same outputs: 1x1 sums straight from the NHWC input
          sa.x = sc.x + ((n * sc.H + oh * sc.sH) * sc.W + ow0 * sc.sW) * sc.C;
          kTilesInt[1][nb - 1][nq - 1](sa);
          AddTile(tile, tile2, nq * 2 * kLanes);
        }
        store(tile, nq, mcount, OutputsAt(f, y, out_at(oh * s.OW + ow0)), ostep);
      }
    }
  };
  // The pixel-lane integer tiles: vectors of 16 flat outputs of the OH x Wq grid.
  const bool pix = integer && !nhwc && Wq >= kLanes && groups * taps <= kPixMaxSteps &&
                   8 * (Wq - s.OW) <= Wq;
  const int64_t V = pix ? (s.OH * Wq + kLanes - 1) / kLanes : 0;
  const int64_t octets = (s.M + kPixChannels - 1) / kPixChannels;
  std::vector<PixVec> vecs(static_cast<size_t>(V));
  auto lanes = [](int64_t lo, int64_t hi) {  // mask of lanes [lo, hi) within 0..15
    lo = std::clamp<int64_t>(lo, 0, kLanes);
    hi = std::clamp<int64_t>(hi, lo, kLanes);
    return static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
  };
  for (int64_t v = 0; v < V; ++v) {
    const int64_t o0 = v * kLanes, oh = o0 / Wq, ow0 = o0 % Wq, next = Wq - ow0;
    PixVec& pv = vecs[v];
    pv.in = o0 * 4;
    pv.base1 = oh * s.OW + ow0;
    pv.mask1 = oh < s.OH ? lanes(0, s.OW - ow0) : 0;
    pv.base2 = (oh + 1) * s.OW - next;
    pv.mask2 = oh + 1 < s.OH ? lanes(next, next + s.OW) : 0;
  }
  // Vectors per task: kPixVecs, fewer (a multiple of kMaxV) when that leaves too few tasks.
  const int64_t vtasks = CheckedMul(nchunk * octets, (V + kPixVecs - 1) / kPixVecs, "tasks");
  const int64_t want = 4 * static_cast<int64_t>(TaskHint());
  const int64_t vper = vtasks >= want ? kPixVecs
                       : std::max<int64_t>(kMaxV, kMaxV * ((V * nchunk * octets / want) / kMaxV));
  const int64_t vchunks = pix ? (V + vper - 1) / vper : 0;
  const PixStoreFn pstore = ChoosePixStore(f, y != nullptr);
  auto pix_task = [&](size_t task) {
    const int64_t o = static_cast<int64_t>(task) % octets;
    const int64_t rest = static_cast<int64_t>(task) / octets;
    const int64_t vc = rest % vchunks, n = n0 + rest / vchunks;
    const int64_t p = o / 4, nb = std::min<int64_t>(2, blocks - 2 * p);
    const int64_t m0 = o * kPixChannels, mcount = std::min<int64_t>(kPixChannels, s.M - m0);
    alignas(64) float tile[kPixChannels * kMaxV * kLanes];
    PixArgs a{};
    // Panel p's int8 weights: [quad][tap][block][lane][4]; this octet is 8 lanes of a block.
    a.w = w.int8.data() + p * groups * taps * 8 * kLanes + ((o % 4) / 2) * 4 * kLanes +
          (o % 2) * 4 * kPixChannels;
    a.wstep = nb * 4 * kLanes;
    a.C = groups;
    a.taps = taps;
    a.cstride = cstride * 4;
    a.tapoff = tapoff.data();
    a.x = qplanes + (n - n0) * per_image * 4;
    a.scale = sb.data() + p * 4 * kLanes + (o % 4) * kPixChannels;
    a.bias = a.scale + 2 * kLanes;
    a.out = tile;
    const TileOut out = OutputsAt(f, y, (n * s.M + m0) * P);
    const int64_t v1 = std::min(V, (vc + 1) * vper);
    if (f.residual) {
      PrefetchResidual(out.residual, vecs.data(), vc * vper, std::min(v1, vc * vper + kMaxV),
                       mcount, P);
    }
    for (int64_t v0 = vc * vper; v0 < v1; v0 += kMaxV) {
      const int64_t nv = std::min<int64_t>(kMaxV, v1 - v0);
      for (int64_t v = 0; v < nv; ++v) a.vin[v] = vecs[v0 + v].in;
      if (f.residual && v0 + kMaxV < v1) {  // the next tile's, during this one's sums
        PrefetchResidual(out.residual, vecs.data(), v0 + kMaxV,
                         std::min(v1, v0 + 2 * kMaxV), mcount, P);
      }
      kTilesPix[nv - 1](a);
      pstore(tile, nv, vecs.data() + v0, mcount, out, P);
    }
  };
  for (; n0 < s.N; n0 += nchunk) {
    const int64_t images = std::min(nchunk, s.N - n0);
    const int64_t NG = images * (nhwc ? Hq : groups);
    // Tiny inputs are converted on the calling thread: waking the pool costs more than it saves
    // (measured: 2^13 elements; from 2^16, ResNet-18 batch 1 ran 8% slower in int8).
    if (images * per_image < (int64_t{1} << 13)) {
      for (int64_t t = 0; t < NG; ++t) convert(static_cast<size_t>(t));
    } else {
      ParallelFor(ctx, static_cast<size_t>(NG), convert);
    }
    const int64_t next = std::min(nchunk, s.N - n0 - images);
    next_x = x + (n0 + images) * image_bytes;
    next_lines = next > 0 ? (next * image_bytes) / 64 : 0;
    if (pix) {
      ParallelFor(ctx, static_cast<size_t>(images * vchunks * octets), pix_task);
    } else {
      chunk_tasks = images * rchunks * npanels;
      ParallelFor(ctx, static_cast<size_t>(chunk_tasks), tile_task);
    }
  }
}

}  // namespace adq::panels
