// LutConv's AVX-512 path: a direct convolution whose weights stay 4-bit codes in memory.
//
// The codes of each block of 16 output channels are repacked once (cached when Codes is a
// constant initializer) into one 64-bit word per reduction index k = (c, i, j); a broadcast,
// one shift per 64-bit lane and a 16-entry table permute turn a word into the 16 float weights
// right before the FMAs, so no decoded weight buffer exists. The uint8 input becomes float
// "phase planes" (one per stride phase, zero padded), in which every kernel tap reads a
// contiguous run of inputs for consecutive flat outputs, at any stride or dilation: no im2col.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "common.h"

namespace adq::panels {

constexpr int kLanes = 16;  // output channels per block (one zmm of floats)

// Codes of a weight [M, R] repacked: block b (channels 16b..16b+15) pairs with block b+1 in a
// panel; panel p's words start at 2 * p * R, k-major with one word per block of the panel.
// Channel 16b + l has its code in bits 4*(l/2) (l even) or 32 + 4*(l/2) (l odd) of word k.
struct Packed {
  int64_t M = 0, R = 0;
  int K = 0;
  std::vector<uint64_t> words;
};

// Whether the panel path applies: AVX-512, codes of at most 4 bits (K <= 16), one group.
bool Usable(Isa isa, int64_t bits, int64_t K, int64_t group);

// Repacks lut's codes into p, checking that every code is < K (an error otherwise).
void Pack(const Lut& lut, Packed* p);

// A packed copy of a constant Codes input, made on first use and kept (thread-safe).
class Cache {
 public:
  // The packed codes of lut: for a constant Codes tensor the copy made from it on first use,
  // otherwise a fresh packing.
  std::shared_ptr<const Packed> Get(const Lut& lut, bool codes_constant);

 private:
  std::mutex mu_;
  const uint8_t* source_ = nullptr;
  std::shared_ptr<const Packed> packed_;
};

struct ConvShape {
  int64_t N, C, H, W, M, kH, kW, sH, sW, dH, dW, pT, pL, pB, pR, OH, OW;
};

// Y[n, m] = Scale[m] * conv(X, Codebook[codes]) + Bias[m] for group 1 (docs/onnx-ops.md).
void Conv(const Ort::KernelContext& ctx, const ConvShape& s, const uint8_t* x, const Packed& w,
          const Lut& lut, const Affine& af, float* y);

}  // namespace adq::panels
