// The ai.adq custom-op domain: its name and version, written once (docs/onnx-ops.md).
#pragma once

namespace adq {

inline constexpr const char* kDomain = "ai.adq";
inline constexpr int kDomainVersion = 1;

}  // namespace adq
