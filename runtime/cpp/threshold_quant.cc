// ThresholdQuant: Q = #{i : Scale * X >= Thresholds[i]} as uint8 (docs/onnx-ops.md).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"
#include "levels.h"

namespace adq {
namespace {

// Linear count, exactly the definition (NaN compares false).
void CountScalar(const float* x, int64_t n, float s, const float* t, int T, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = s * x[i];
    int c = 0;
    for (int k = 0; k < T; ++k) c += v >= t[k];
    q[i] = static_cast<uint8_t>(c);
  }
}

__attribute__((target("avx2"))) void CountAvx2(const float* x, int64_t n, float s, const float* t,
                                                int T, uint8_t* q) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_mul_ps(vs, _mm256_loadu_ps(x + i));
    __m256i c = _mm256_setzero_si256();
    for (int k = 0; k < T; ++k) {
      const __m256 ge = _mm256_cmp_ps(v, _mm256_broadcast_ss(t + k), _CMP_GE_OQ);
      c = _mm256_sub_epi32(c, _mm256_castps_si256(ge));
    }
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packus_epi16(w, w));
  }
  CountScalar(x + i, n - i, s, t, T, q + i);
}

// 16 values at a time (CountLevels16), the tail through CountScalar.
__attribute__((target("avx512f"))) void CountAvx512(const float* x, int64_t n, const Levels& lv,
                                                    uint8_t* q) {
  const LevelCounter lc = MakeLevelCounter(lv);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i bytes = _mm512_cvtepi32_epi8(CountLevels16(_mm512_loadu_ps(x + i), lc));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), bytes);
  }
  CountScalar(x + i, n - i, lv.scale, lv.t, lv.T, q + i);
}

// Binary search over the sorted, NaN-free thresholds: #{k : t[k] <= v}; NaN v gives 0.
void CountSorted(const float* x, int64_t n, float s, const float* t, int T, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = s * x[i];
    int lo = 0, len = T;
    while (len > 0) {
      const int half = len / 2;
      if (t[lo + half] <= v) {
        lo += half + 1;
        len -= half + 1;
      } else {
        len = half;
      }
    }
    q[i] = static_cast<uint8_t>(lo);
  }
}

// The linear estimate of the count in double, clamp(floor(fma(double(v), a, b)), 0, T), NaN ->
// 0: what PrepareManyLevels checks against the thresholds, and what CountMany16 (levels.h) and
// the counts below compute where it is exact (Levels::lin_exact).
inline int LinearEstimate(float v, double a, double b, int T) {
  if (v != v) return 0;
  const double e = std::fma(static_cast<double>(v), a, b);
  return static_cast<int>(std::min(std::max(e, 0.0), static_cast<double>(T)));  // e >= 0: floor
}

void CountEstimatedScalar(const float* x, int64_t n, const Levels& lv, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) {
    q[i] = static_cast<uint8_t>(LinearEstimate(lv.scale * x[i], lv.lin_a, lv.lin_b, lv.T));
  }
}

// LinearEstimate of 4 values (AVX2 + FMA); max_pd returns its second operand (0) for a NaN
// estimate: NaN counts 0.
__attribute__((target("avx2,fma"), always_inline)) inline __m128i EstimateExact4(
    __m128 v, __m256d a, __m256d b, __m256d top) {
  const __m256d e = _mm256_fmadd_pd(_mm256_cvtps_pd(v), a, b);
  return _mm256_cvttpd_epi32(_mm256_min_pd(_mm256_max_pd(e, _mm256_setzero_pd()), top));
}

// CountEstimatedScalar 8 values at a time.
__attribute__((target("avx2,fma"))) void CountEstimatedAvx2(const float* x, int64_t n,
                                                           const Levels& lv, uint8_t* q) {
  const __m256 vs = _mm256_set1_ps(lv.scale);
  const __m256d a = _mm256_set1_pd(lv.lin_a), b = _mm256_set1_pd(lv.lin_b);
  const __m256d top = _mm256_set1_pd(static_cast<double>(lv.T));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_mul_ps(vs, _mm256_loadu_ps(x + i));
    const __m128i w = _mm_packus_epi32(EstimateExact4(_mm256_castps256_ps128(v), a, b, top),
                                       EstimateExact4(_mm256_extractf128_ps(v, 1), a, b, top));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packus_epi16(w, w));
  }
  CountEstimatedScalar(x + i, n - i, lv, q + i);
}

struct ThresholdQuant {
  static constexpr const char* kName = "ThresholdQuant";
  static constexpr ONNXTensorElementDataType kInputs[] = {kF32, kF32, kF32};
  static constexpr ONNXTensorElementDataType kOutputs[] = {kU8};
  static constexpr uint32_t kOptionalInputs = 0;
  static constexpr uint32_t kOptionalOutputs = 0;

  explicit ThresholdQuant(const OrtKernelInfo* /*info*/) : isa_(SelectIsa()) {}

  void Compute(Ort::KernelContext& ctx) const {
    Tensor x = GetInput(ctx, 0, "X", kF32, -1);
    const Levels lv = GetLevels(ctx, 1, 2, "Scale", "Thresholds");
    auto out = ctx.GetOutput(0, x.shape);
    uint8_t* q = out.GetTensorMutableData<uint8_t>();
    const float* xs = x.as<float>();
    const int64_t n = x.size;
    constexpr int64_t kChunk = 1 << 15;
    const size_t tasks = static_cast<size_t>((n + kChunk - 1) / kChunk);
    ParallelFor(ctx, tasks, [&](size_t task) {
      const int64_t i0 = static_cast<int64_t>(task) * kChunk;
      CountLevels(xs + i0, std::min(kChunk, n - i0), lv, q + i0, isa_);
    });
  }

  Isa isa_;
};

}  // namespace

void PrepareManyLevels(Levels* lv) {
  const int T = lv->T;
  lv->lookup[0] = -std::numeric_limits<float>::infinity();
  for (int k = 1; k <= 256; ++k) {
    lv->lookup[k] = k <= T ? lv->t[k - 1] : std::numeric_limits<float>::quiet_NaN();
  }
  // c ~ (v - t[0]) / d + 1 with d the mean spacing: exact up to rounding for evenly spaced
  // thresholds (one round of corrections), any other estimate still gives the exact count.
  const double t0 = lv->t[0], d = (static_cast<double>(lv->t[T - 1]) - t0) / (T - 1);
  lv->lin_scale = 0.0f;
  lv->lin_offset = static_cast<float>(T / 2);
  lv->lin_exact = false;
  if (std::isfinite(t0) && std::isfinite(d) && d > 0.0) {
    const double a = 1.0 / d, b = 1.0 - t0 / d;
    if (std::isfinite(static_cast<float>(a)) && std::isfinite(static_cast<float>(b)) &&
        static_cast<float>(a) > 0.0f) {
      lv->lin_scale = static_cast<float>(a);
      lv->lin_offset = static_cast<float>(b);
    }
    // The double estimate f(v) = clamp(floor(fma(v, a, b)), 0, T) is monotone in v, and the
    // count g(v) a step function rising at the thresholds: f == g everywhere (NaN and
    // infinities included, the thresholds being finite here) when at every threshold t
    // f(t) >= #{t_k <= t} and f(the float below t) <= #{t_k < t}.
    if (std::isfinite(a) && std::isfinite(b) && a > 0.0 && std::isfinite(lv->t[T - 1])) {
      auto f = [&](float v) { return LinearEstimate(v, a, b, T); };
      bool exact = true;
      for (int k = 0, lt = 0; k < T && exact; ++k) {
        if (k > 0 && lv->t[k] != lv->t[k - 1]) lt = k;  // #{t_j < t[k]}
        int le = k + 1;                                 // #{t_j <= t[k]}
        while (le < T && lv->t[le] == lv->t[k]) ++le;
        const float below = std::nextafter(lv->t[k], -std::numeric_limits<float>::infinity());
        exact = f(lv->t[k]) >= le && f(below) <= lt;
      }
      if (exact) {
        lv->lin_exact = true;
        lv->lin_a = a;
        lv->lin_b = b;
      }
    }
  }
}

Levels GetLevels(const Ort::KernelContext& ctx, size_t scale_index, size_t thresholds_index,
                 const char* scale_name, const char* thresholds_name) {
  Tensor scale = GetInput(ctx, scale_index, scale_name, kF32, -1);
  Check(scale.shape.empty() || (scale.shape.size() == 1 && scale.shape[0] == 1), scale_name,
        " must be a scalar ([] or [1]), got ", ShapeStr(scale.shape));
  Tensor th = GetInput(ctx, thresholds_index, thresholds_name, kF32, 1);
  const int64_t T = th.shape[0];
  Check(T >= 1 && T <= 255, thresholds_name, " must have 1..255 entries, got ", T);
  Levels lv;
  lv.scale = *scale.as<float>();
  lv.t = th.as<float>();
  lv.T = static_cast<int>(T);
  for (int k = 0; k < lv.T; ++k) {
    Check(lv.t[k] == lv.t[k] && (k == 0 || lv.t[k - 1] <= lv.t[k]), thresholds_name,
          " must be non-decreasing and not NaN (entry ", k, ")");
  }
  for (int k = 0; k < 16; ++k) {
    lv.padded[k] = k < lv.T ? lv.t[k] : std::numeric_limits<float>::quiet_NaN();
  }
  if (lv.T > 15) PrepareManyLevels(&lv);
  return lv;
}

void CountLevels(const float* x, int64_t n, const Levels& lv, uint8_t* q, Isa isa) {
  if (isa == Isa::kAvx512) {  // any T (more than 15: estimate and gathered corrections)
    CountAvx512(x, n, lv, q);
  } else if (lv.T > 15 && lv.lin_exact) {  // evenly spaced thresholds (an 8-bit quantizer)
    if (isa == Isa::kAvx2) {
      CountEstimatedAvx2(x, n, lv, q);
    } else {
      CountEstimatedScalar(x, n, lv, q);
    }
  } else if (lv.T > 24) {
    CountSorted(x, n, lv.scale, lv.t, lv.T, q);
  } else if (isa != Isa::kScalar) {
    CountAvx2(x, n, lv.scale, lv.t, lv.T, q);
  } else {
    CountScalar(x, n, lv.scale, lv.t, lv.T, q);
  }
}

const OrtCustomOp* ThresholdQuantOp() {
  static const Op<ThresholdQuant> op;
  return &op;
}

}  // namespace adq
