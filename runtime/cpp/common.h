// Shared helpers of the ai.adq kernels: the op template over the onnxruntime C++ custom-op
// API, input / attribute validation that throws Ort::Exception (turned into an error status,
// never a crash), and a ParallelFor over onnxruntime's intra-op thread pool.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "adq_domain.h"

namespace adq {

using Shape = std::vector<int64_t>;

// ---- errors ---------------------------------------------------------------------------------

template <class... A>
std::string Str(const A&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

// A shape in a message, written "[1, 2]" only when the message is built: Check's arguments are
// evaluated on every call, and a string built there cost a string stream per input per Compute.
struct ShapeStr {
  explicit ShapeStr(const Shape& shape) : s(shape) {}
  const Shape& s;  // the arguments of one Check call live until it returns
};
inline std::ostream& operator<<(std::ostream& os, const ShapeStr& v) {
  os << '[';
  for (size_t i = 0; i < v.s.size(); ++i) os << (i ? ", " : "") << v.s[i];
  return os << ']';
}

[[noreturn]] inline void Fail(const std::string& msg) {
  throw Ort::Exception(std::string(msg), ORT_INVALID_ARGUMENT);
}

template <class... A>
inline void Check(bool ok, const A&... msg) {
  if (!ok) Fail(Str(msg...));
}

// Runs f, turning any exception into an OrtStatus (nullptr on success). Never throws.
template <class F>
OrtStatusPtr Guard(const char* op, F&& f) noexcept {
  const OrtApi& api = Ort::GetApi();
  try {
    f();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), Str(kDomain, ".", op, ": ", e.what()).c_str());
  } catch (const std::bad_alloc&) {
    return api.CreateStatus(ORT_FAIL, Str(kDomain, ".", op, ": out of memory").c_str());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, Str(kDomain, ".", op, ": ", e.what()).c_str());
  } catch (...) {
    return api.CreateStatus(ORT_FAIL, Str(kDomain, ".", op, ": unknown error").c_str());
  }
}

// ---- checked arithmetic ----------------------------------------------------------------------

inline int64_t CheckedMul(int64_t a, int64_t b, const char* what) {
  int64_t r;
  Check(a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &r), what, " overflows");
  return r;
}

inline int64_t NumElements(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n = CheckedMul(n, d, "element count");
  return n;
}

// Bytes of a packed row of R codes of `bits` bits: ceil(R * bits / 8).
inline int64_t PackedRowBytes(int64_t R, int64_t bits) {
  return (CheckedMul(R, bits, "packed row size") + 7) / 8;
}

// ---- attributes ------------------------------------------------------------------------------

// Reads an int attribute; `def` is used when it is absent (nullptr: required).
inline int64_t IntAttr(const OrtKernelInfo* info, const char* name, const int64_t* def) {
  const OrtApi& api = Ort::GetApi();
  int64_t v = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &v);
  if (!st) return v;
  std::string msg = api.GetErrorMessage(st);
  api.ReleaseStatus(st);
  const bool absent = msg.find("No attribute") != std::string::npos;
  Check(absent, "attribute '", name, "' must be an int (", msg, ")");
  Check(def != nullptr, "missing required attribute '", name, "'");
  return *def;
}

inline std::vector<int64_t> IntsAttr(const OrtKernelInfo* info, const char* name,
                                     const std::vector<int64_t>* def) {
  const OrtApi& api = Ort::GetApi();
  size_t n = 0;
  OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &n);
  if (st) {
    std::string msg = api.GetErrorMessage(st);
    api.ReleaseStatus(st);
    const bool absent = msg.find("No attribute") != std::string::npos;
    Check(absent, "attribute '", name, "' must be a list of ints (", msg, ")");
    Check(def != nullptr, "missing required attribute '", name, "'");
    return *def;
  }
  std::vector<int64_t> v(n);
  if (n) Ort::ThrowOnError(api.KernelInfoGetAttributeArray_int64(info, name, v.data(), &n));
  return v;
}

// A window attribute (kernel shape, strides, pads, dilations): `count` ints, each >= lo and
// below 2^24 (def: the default; nullptr: required).
inline std::vector<int64_t> WindowAttr(const OrtKernelInfo* info, const char* name, size_t count,
                                       int64_t lo, const std::vector<int64_t>* def) {
  std::vector<int64_t> v = IntsAttr(info, name, def);
  Check(v.size() == count, name, " must have ", count, " values, got ", ShapeStr(v));
  for (int64_t x : v) {
    Check(x >= lo && x < (int64_t{1} << 24), name,
          lo > 0 ? " must be positive and below 2^24, got "
                 : " must be non-negative and below 2^24, got ",
          ShapeStr(v));
  }
  return v;
}

// Whether input i is a constant initializer (false when onnxruntime cannot say), so that a
// kernel may keep what it derives from it across runs.
inline bool ConstantInput(const OrtKernelInfo* info, size_t i) {
  Ort::ConstKernelInfo ki(info);
  if (i >= ki.GetInputCount()) return false;
  int constant = 0;
  try {
    ki.GetTensorConstantInput(i, &constant);
  } catch (const Ort::Exception&) {
    return false;
  }
  return constant != 0;
}

// What a kernel derives from constant inputs (weights repacked for its tiles): made on the first
// call and kept while `key` (the inputs' addresses and shapes) stays the same; for inputs that
// are not constant, made afresh on every call. Thread-safe.
template <class T, class Key>
class Kept {
 public:
  template <class Make>
  std::shared_ptr<const T> Get(bool constant, const Key& key, Make&& make) {
    if (!constant) return make();
    std::lock_guard<std::mutex> lock(mu_);
    if (!value_ || !(key_ == key)) {
      value_ = make();
      key_ = key;
    }
    return value_;
  }

 private:
  std::mutex mu_;
  std::shared_ptr<const T> value_;
  Key key_{};
};

inline int64_t BitsAttr(const OrtKernelInfo* info) {
  int64_t bits = IntAttr(info, "bits", nullptr);
  Check(bits >= 1 && bits <= 8, "attribute 'bits' must be in 1..8, got ", bits);
  return bits;
}

// ---- inputs ----------------------------------------------------------------------------------

struct Tensor {
  const void* data = nullptr;
  Shape shape;
  int64_t size = 0;
  template <class T>
  const T* as() const { return static_cast<const T*>(data); }
};

inline const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    default: return "other";
  }
}

inline bool HasInput(const Ort::KernelContext& ctx, size_t index) {
  if (index >= ctx.GetInputCount()) return false;
  return static_cast<const OrtValue*>(ctx.GetInput(index)) != nullptr;
}

// Reads input `index`, checking it is a tensor of element type `type` and, when rank >= 0,
// of that rank.
inline Tensor GetInput(const Ort::KernelContext& ctx, size_t index, const char* name,
                       ONNXTensorElementDataType type, int rank) {
  Check(HasInput(ctx, index), "input '", name, "' is missing");
  Ort::ConstValue v = ctx.GetInput(index);
  Check(v.IsTensor(), "input '", name, "' must be a tensor");
  auto info = v.GetTensorTypeAndShapeInfo();
  Check(info.GetElementType() == type, "input '", name, "' must be ", TypeName(type), ", got ",
        TypeName(info.GetElementType()));
  Tensor t;
  t.shape = info.GetShape();
  Check(rank < 0 || static_cast<int>(t.shape.size()) == rank, "input '", name, "' must have rank ",
        rank, ", got shape ", ShapeStr(t.shape));
  for (int64_t d : t.shape) Check(d >= 0, "input '", name, "' has a negative dimension");
  t.size = NumElements(t.shape);
  t.data = v.GetTensorRawData();
  Check(t.size == 0 || t.data != nullptr, "input '", name, "' has no data");
  return t;
}

// Scale of a Lut op: [M] or [1]; Bias: [M] or absent. Returns per-channel pointers and strides.
struct Affine {
  const float* scale = nullptr;
  int64_t scale_step = 0;  // 0 when broadcast
  const float* bias = nullptr;  // nullptr when absent
};

inline Affine GetAffine(const Ort::KernelContext& ctx, size_t scale_index, size_t bias_index,
                        int64_t M) {
  Affine a;
  Tensor s = GetInput(ctx, scale_index, "Scale", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 1);
  Check(s.shape[0] == M || s.shape[0] == 1, "Scale must have shape [", M, "] or [1], got ",
        ShapeStr(s.shape));
  a.scale = s.as<float>();
  a.scale_step = s.shape[0] == 1 ? 0 : 1;
  if (HasInput(ctx, bias_index)) {
    Tensor b = GetInput(ctx, bias_index, "Bias", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 1);
    Check(b.shape[0] == M, "Bias must have shape [", M, "], got ", ShapeStr(b.shape));
    a.bias = b.as<float>();
  }
  return a;
}

// Codes [M, ceil(R*bits/8)] and Codebook [K], 1 <= K <= 2^bits.
struct Lut {
  const uint8_t* codes = nullptr;
  int64_t M = 0, R = 0, row_bytes = 0;
  int bits = 0;
  const float* codebook = nullptr;
  int K = 0;
  alignas(64) float table[32] = {};  // the first min(K, 32) levels, zero padded
};

inline Lut GetLut(const Ort::KernelContext& ctx, size_t codes_index, size_t codebook_index,
                  int64_t bits, int64_t M, int64_t R) {
  Lut l;
  Tensor c = GetInput(ctx, codes_index, "Codes", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 2);
  Tensor cb = GetInput(ctx, codebook_index, "Codebook", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 1);
  const int64_t B = PackedRowBytes(R, bits);
  Check(c.shape[0] == M && c.shape[1] == B, "Codes must have shape [", M, ", ", B,
        "] (M, ceil(", R, " * ", bits, " / 8)), got ", ShapeStr(c.shape));
  Check(cb.shape[0] >= 1 && cb.shape[0] <= (int64_t{1} << bits), "Codebook length must be in 1..",
        (1 << bits), " for bits=", bits, ", got ", cb.shape[0]);
  l.codes = c.as<uint8_t>();
  l.M = M;
  l.R = R;
  l.row_bytes = B;
  l.bits = static_cast<int>(bits);
  l.codebook = cb.as<float>();
  l.K = static_cast<int>(cb.shape[0]);
  for (int i = 0; i < l.K && i < 32; ++i) l.table[i] = l.codebook[i];
  return l;
}

// The scale and thresholds of a ThresholdQuant (or LutConvQuant's QScale, QThresholds): a scalar
// scale and 1..255 non-decreasing thresholds without NaN.
struct Levels {
  float scale = 1.0f;
  const float* t = nullptr;
  int T = 0;
  float padded[16];  // t[0..min(T, 16)), then NaN: a register table of the thresholds
  // For T > 15 (levels.h, CountMany16): lookup[k] = t[k - 1] for 1 <= k <= T, lookup[0] = -inf
  // and NaN past T (gathered by count), and a linear estimate of the count,
  // floor(lin_scale * v + lin_offset) (lin_scale 0 where the thresholds' spacing is 0 or not
  // finite: the estimate is then T / 2 and the count a binary search).
  float lookup[257];
  float lin_scale = 0.0f, lin_offset = 0.0f;
  // Where the estimate floor(lin_a * v + lin_b) in double (one fma) clamped to [0, T] is the
  // exact count for every v (checked at every threshold: evenly spaced thresholds), it is
  // the count, without the gathered corrections.
  bool lin_exact = false;
  double lin_a = 0.0, lin_b = 0.0;
};
Levels GetLevels(const Ort::KernelContext& ctx, size_t scale_index, size_t thresholds_index,
                 const char* scale_name, const char* thresholds_name);
// Fills lv->lookup, lin_scale, lin_offset and lin_exact (with lin_a, lin_b) from lv->t and
// lv->T > 15 (GetLevels does).
void PrepareManyLevels(Levels* lv);

inline float* GetOutputFloat(Ort::KernelContext& ctx, const Shape& shape) {
  auto v = ctx.GetOutput(0, shape);
  return v.GetTensorMutableData<float>();
}

// ---- threading -------------------------------------------------------------------------------

// Calls f(i) for i in [0, n) on onnxruntime's intra-op thread pool (serially when the session has
// one thread). An exception in any task is rethrown here once all tasks ended.
template <class F>
void ParallelFor(const Ort::KernelContext& ctx, size_t n, F&& f) {
  if (n == 0) return;
  if (n == 1) {
    f(size_t{0});
    return;
  }
  struct State {
    std::remove_reference_t<F>* f;
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::string msg;
  } st;
  st.f = &f;
  auto run = [](void* p, size_t i) {
    auto* s = static_cast<State*>(p);
    if (s->failed.load(std::memory_order_relaxed)) return;
    try {
      (*s->f)(i);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(s->mu);
      if (!s->failed.exchange(true)) s->msg = e.what();
    } catch (...) {
      std::lock_guard<std::mutex> lock(s->mu);
      if (!s->failed.exchange(true)) s->msg = "unknown error in a worker";
    }
  };
  ctx.ParallelFor(run, n, 0, &st);
  if (st.failed) Fail(st.msg);
}

// A per-thread float buffer of at least n entries, kept and reused across calls (its contents
// are unspecified). Each Tag is a separate buffer: use different tags for buffers alive at the
// same time on one thread (a Compute's caller thread also runs ParallelFor tasks).
template <int Tag>
float* ThreadScratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) {
    buf.clear();
    buf.shrink_to_fit();
    buf.resize(static_cast<size_t>(n));
  }
  return buf.data();
}
enum ScratchTag {
  kConvWeights, kConvInput, kConvRow, kConvTile, kConvPhaseRows,
  kGemmX, kGemmRow, kGemmWeights, kGemmTile,
  kPoolInput, kPoolRing
};

// Rough number of tasks worth splitting work into (a granularity hint, not a thread count).
int TaskHint();

// Instruction sets the kernels dispatch on at run time.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best instruction set of this CPU (AVX2 means AVX2+FMA, AVX512 means AVX-512F, BW and VL
// too: every AVX-512 CPU but the Xeon Phi), capped
// by the environment variable ADQ_ISA=scalar|avx2|avx512 (read when a kernel is created).
Isa SelectIsa();

// Whether the CPU has AVX-512 VBMI (byte permutes) besides F, BW and VL.
bool HasVbmi();
// Whether the CPU has AVX-512 VNNI besides F, BW and VL: what the int8 kernels use (VNNI sums,
// BW byte shuffles, VL masked 128-bit loads and stores).
bool HasVnni();

// q[i] = #{k : lv.scale * x[i] >= lv.t[k]} (NaN: 0), x and q of n entries (ThresholdQuant).
void CountLevels(const float* x, int64_t n, const Levels& lv, uint8_t* q, Isa isa);

// ---- the op template -------------------------------------------------------------------------

// Kernel provides: static constexpr const char* kName; static constexpr
// ONNXTensorElementDataType kInputs[], kOutputs[]; static constexpr uint32_t kOptionalInputs,
// kOptionalOutputs (bit i set: input / output i may be absent); explicit
// Kernel(const OrtKernelInfo*);
// void Compute(Ort::KernelContext&).
template <class Kernel>
struct KernelAdapter : Kernel {
  using Kernel::Kernel;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(Kernel::kName, [&] {
      Ort::KernelContext ctx(context);
      this->Compute(ctx);
    });
  }
};

template <class Kernel>
struct Op : Ort::CustomOpBase<Op<Kernel>, KernelAdapter<Kernel>, true> {
  Op() { this->start_ver_ = kDomainVersion; }
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info,
                              void** op_kernel) const {
    *op_kernel = nullptr;
    return Guard(Kernel::kName, [&] { *op_kernel = new KernelAdapter<Kernel>(info); });
  }
  const char* GetName() const { return Kernel::kName; }
  size_t GetInputTypeCount() const { return std::size(Kernel::kInputs); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return Kernel::kInputs[i]; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return (Kernel::kOptionalInputs >> i) & 1u ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return std::size(Kernel::kOutputs); }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return Kernel::kOutputs[i]; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return (Kernel::kOptionalOutputs >> i) & 1u ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
};

constexpr ONNXTensorElementDataType kU8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

// The ops of this library (defined one family per file, listed in ops_registry.cc).
const OrtCustomOp* ThresholdQuantOp();
const OrtCustomOp* LutDequantOp();
const OrtCustomOp* LutConvOp();
const OrtCustomOp* LutConvQuantOp();
const OrtCustomOp* LutGemmOp();
const OrtCustomOp* ConvPoolQuantOp();
const OrtCustomOp* LutConvPoolQuantOp();

}  // namespace adq
