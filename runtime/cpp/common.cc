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

bool UseAvx2() {
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* force = std::getenv("ADQ_FORCE_SCALAR");
  const bool forced = force && force[0] && std::strcmp(force, "0") != 0;
  return cpu && !forced;
}

}  // namespace adq
