#include "common.h"

#include <thread>

namespace adq {

int TaskHint() {
  static const int hint = [] {
    unsigned hw = std::thread::hardware_concurrency();
    return static_cast<int>(hw ? 4 * hw : 8);
  }();
  return hint;
}

bool HasVbmi() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi");
  return has;
}

bool HasVnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return has;
}

Isa SelectIsa() {
  static const Isa cpu = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return Isa::kScalar;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    return avx512 ? Isa::kAvx512 : Isa::kAvx2;
  }();
  Isa cap = Isa::kAvx512;
  if (const char* env = std::getenv("ADQ_ISA")) {
    const std::string v = env;
    if (v == "scalar") {
      cap = Isa::kScalar;
    } else if (v == "avx2") {
      cap = Isa::kAvx2;
    } else if (!v.empty() && v != "avx512") {
      Fail(Str("ADQ_ISA must be scalar, avx2 or avx512, got '", v, "'"));
    }
  }
  return static_cast<int>(cpu) < static_cast<int>(cap) ? cpu : cap;
}

}  // namespace adq
