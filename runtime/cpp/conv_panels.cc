#include "conv_panels.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <memory>
#include <utility>

#include "gemm.h"
#include "packing.h"

namespace adq::panels {
namespace {

constexpr int kMaxQ = 12;                // flat outputs per micro-tile (2 x 12 accumulators)
constexpr int64_t kChunkQ = 16 * kMaxQ;  // flat outputs per task
constexpr int64_t kChunkK = 128;         // k-steps summed in registers before adding up

struct TileArgs {
  const uint64_t* w;       // the panel's words, k-major, NB per k
  int64_t C, taps, cstride;
  const int64_t* tapoff;   // per tap: offset inside a channel's phase planes
  const float* x;          // channel 0 of the image, at the tile's first flat output
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
  const uint64_t* w = a.w;
  const int64_t cchunk = std::max<int64_t>(1, kChunkK / a.taps);
  int64_t c0 = 0;
  do {
    __m512 acc[NB][NQ];
    for (int b = 0; b < NB; ++b) {
      for (int j = 0; j < NQ; ++j) acc[b][j] = _mm512_setzero_ps();
    }
    const int64_t c1 = std::min(a.C, c0 + cchunk);
    const float* xc = a.x + c0 * a.cstride;
    for (int64_t c = c0; c < c1; ++c, xc += a.cstride) {
      for (int64_t t = 0; t < a.taps; ++t, w += NB) {
        const float* xt = xc + a.tapoff[t];
        __m512 wv[NB];
        for (int b = 0; b < NB; ++b) {
          const __m512i idx =
              _mm512_srlv_epi64(_mm512_set1_epi64(static_cast<long long>(w[b])), shifts);
          wv[b] = _mm512_permutexvar_ps(idx, table);
        }
#pragma GCC unroll 12
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

using TileFn = void (*)(const TileArgs&);

template <int NB, size_t... Q>
constexpr std::array<TileFn, sizeof...(Q)> Tiles(std::index_sequence<Q...>) {
  return {&Tile<NB, static_cast<int>(Q) + 1>...};
}
constexpr auto kTiles1 = Tiles<1>(std::make_index_sequence<kMaxQ>{});
constexpr auto kTiles2 = Tiles<2>(std::make_index_sequence<kMaxQ>{});

}  // namespace

bool Usable(Isa isa, int64_t bits, int64_t K, int64_t group) {
  return isa == Isa::kAvx512 && bits <= 4 && K <= kLanes && group == 1;
}

void Pack(const Lut& lut, Packed* p) {
  const int64_t M = lut.M, R = lut.R;
  const int64_t blocks = (M + kLanes - 1) / kLanes;
  p->M = M;
  p->R = R;
  p->K = lut.K;
  p->words.assign(static_cast<size_t>(CheckedMul(blocks, R, "packed codes")), 0);
  std::vector<uint8_t> codes(static_cast<size_t>(R));
  for (int64_t m = 0; m < M; ++m) {
    UnpackCodes(lut.codes + m * lut.row_bytes, lut.row_bytes, lut.bits, 0, R, codes.data());
    const int64_t block = m / kLanes, lane = m % kLanes;
    const int64_t panel = block / 2, nb = std::min<int64_t>(2, blocks - 2 * panel);
    const int shift = static_cast<int>((lane % 2 ? 32 : 0) + 4 * (lane / 2));
    uint64_t* dst = p->words.data() + 2 * panel * R + block % 2;
    for (int64_t k = 0; k < R; ++k) {
      Check(codes[k] < lut.K, "invalid code ", static_cast<int>(codes[k]), " >= K=", lut.K,
            " (Codebook length) at row ", m, ", index ", k);
      dst[k * nb] |= static_cast<uint64_t>(codes[k]) << shift;
    }
  }
}

std::shared_ptr<const Packed> Cache::Get(const Lut& lut, bool codes_constant) {
  auto fresh = [&] {
    auto p = std::make_shared<Packed>();
    Pack(lut, p.get());
    return std::shared_ptr<const Packed>(std::move(p));
  };
  if (!codes_constant) return fresh();
  std::lock_guard<std::mutex> lock(mu_);
  if (!packed_ || source_ != lut.codes || packed_->M != lut.M || packed_->R != lut.R ||
      packed_->K != lut.K) {
    packed_ = fresh();
    source_ = lut.codes;
  }
  return packed_;
}

void Conv(const Ort::KernelContext& ctx, const ConvShape& s, const uint8_t* x, const Packed& w,
          const Lut& lut, const Affine& af, float* y) {
  const int64_t Hp = s.H + s.pT + s.pB, Wp = s.W + s.pL + s.pR;
  const int64_t Hq = (Hp + s.sH - 1) / s.sH, Wq = (Wp + s.sW - 1) / s.sW;
  const int64_t PQ = CheckedMul(Hq, Wq, "phase plane");
  const int64_t cstride = CheckedMul(PQ, s.sH * s.sW, "phase planes");
  const int64_t taps = s.kH * s.kW, P = s.OH * s.OW;

  // Tap (i, j) reads padded input (oh*sH + i*dH, ow*sW + j*dW): phase plane
  // ((i*dH) % sH, (j*dW) % sW) at (oh + i*dH / sH, ow + j*dW / sW).
  std::vector<int64_t> tapoff(static_cast<size_t>(taps));
  std::vector<char> used(static_cast<size_t>(s.sH * s.sW), 0);
  for (int64_t i = 0; i < s.kH; ++i) {
    for (int64_t j = 0; j < s.kW; ++j) {
      const int64_t rh = i * s.dH, rw = j * s.dW;
      const int64_t phase = (rh % s.sH) * s.sW + rw % s.sW;
      used[phase] = 1;
      tapoff[i * s.kW + j] = phase * PQ + (rh / s.sH) * Wq + rw / s.sW;
    }
  }

  // Float phase planes of every (n, c); only the phases some tap reads are filled.
  const int64_t NC = CheckedMul(s.N, s.C, "input planes");
  float* planes = ThreadScratch<kConvInput>(CheckedMul(NC, cstride, "phase planes") + kLanes);
  const Isa isa = Isa::kAvx512;
  ParallelFor(ctx, static_cast<size_t>(NC), [&](size_t t) {
    const uint8_t* src = x + static_cast<int64_t>(t) * s.H * s.W;
    for (int64_t ph = 0; ph < s.sH; ++ph) {
      for (int64_t pw = 0; pw < s.sW; ++pw) {
        if (!used[ph * s.sW + pw]) continue;
        float* d = planes + static_cast<int64_t>(t) * cstride + (ph * s.sW + pw) * PQ;
        for (int64_t a = 0; a < Hq; ++a, d += Wq) {
          const int64_t ih = a * s.sH + ph - s.pT;
          if (ih < 0 || ih >= s.H) {
            std::fill(d, d + Wq, 0.0f);
            continue;
          }
          const uint8_t* row = src + ih * s.W;
          if (s.sW == 1) {
            std::fill(d, d + s.pL, 0.0f);
            gemm::U8ToFloat(row, s.W, d + s.pL, isa);
            std::fill(d + s.pL + s.W, d + Wq, 0.0f);
          } else {
            for (int64_t b = 0; b < Wq; ++b) {
              const int64_t iw = b * s.sW + pw - s.pL;
              d[b] = iw >= 0 && iw < s.W ? static_cast<float>(row[iw]) : 0.0f;
            }
          }
        }
      }
    }
  });

  // Scales and biases padded to whole panels.
  const int64_t blocks = (s.M + kLanes - 1) / kLanes, npanels = (blocks + 1) / 2;
  std::vector<float> sb(static_cast<size_t>(npanels * 4 * kLanes), 0.0f);
  for (int64_t m = 0; m < s.M; ++m) {
    const int64_t p = m / (2 * kLanes), l = m % (2 * kLanes);
    sb[p * 4 * kLanes + l] = af.scale[m * af.scale_step];
    sb[p * 4 * kLanes + 2 * kLanes + l] = af.bias ? af.bias[m] : 0.0f;
  }

  // Tiles of at most kMaxQ outputs within one output row (a row of OW splits into near-equal
  // parts), so that every tap reads kMaxQ consecutive floats of a phase plane row.
  const int64_t parts = (s.OW + kMaxQ - 1) / kMaxQ;
  std::vector<int64_t> starts(static_cast<size_t>(parts + 1));
  for (int64_t i = 0; i <= parts; ++i) starts[i] = i * s.OW / parts;
  const int64_t rows_per_task = std::max<int64_t>(1, kChunkQ / s.OW);
  const int64_t rchunks = (s.OH + rows_per_task - 1) / rows_per_task;
  const int64_t tasks = CheckedMul(CheckedMul(s.N, rchunks, "tasks"), npanels, "tasks");
  ParallelFor(ctx, static_cast<size_t>(tasks), [&](size_t task) {
    const int64_t p = static_cast<int64_t>(task) % npanels;
    const int64_t rest = static_cast<int64_t>(task) / npanels;
    const int64_t rc = rest % rchunks, n = rest / rchunks;
    const int64_t nb = std::min<int64_t>(2, blocks - 2 * p);
    const int64_t m0 = p * 2 * kLanes, mcount = std::min<int64_t>(nb * kLanes, s.M - m0);
    alignas(64) float tile[kMaxQ * 2 * kLanes];
    TileArgs a{};
    a.w = w.words.data() + 2 * p * taps * s.C;
    a.C = s.C;
    a.taps = taps;
    a.cstride = cstride;
    a.tapoff = tapoff.data();
    a.table = lut.table;
    a.scale = sb.data() + p * 4 * kLanes;
    a.bias = a.scale + 2 * kLanes;
    a.out = tile;
    const float* xn = planes + n * s.C * cstride;
    float* yn = y + (n * s.M + m0) * P;
    const auto& tiles = nb == 2 ? kTiles2 : kTiles1;
    const int64_t oh_end = std::min(s.OH, (rc + 1) * rows_per_task);
    for (int64_t oh = rc * rows_per_task; oh < oh_end; ++oh) {
      for (int64_t part = 0; part < parts; ++part) {
        const int64_t ow0 = starts[part], nq = starts[part + 1] - ow0;
        a.x = xn + oh * Wq + ow0;
        tiles[nq - 1](a);
        float* yo = yn + oh * s.OW + ow0;
        for (int64_t l = 0; l < mcount; ++l) {
          for (int64_t j = 0; j < nq; ++j) yo[l * P + j] = tile[j * 2 * kLanes + l];
        }
      }
    }
  });
}

}  // namespace adq::panels
