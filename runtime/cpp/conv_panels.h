// LutConv's fast paths (AVX-512, AVX2): a direct convolution whose weights stay 4-bit codes in
// memory, and on AVX-512 VNNI its exact integer form for integer codebooks.
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
#include <tuple>
#include <vector>

#include "common.h"

namespace adq::panels {

constexpr int kLanes = 16;  // output channels per block (one zmm of floats)

// Which panel kernel runs: none (LutConv's other paths), float FMAs on 4-bit code words (AVX-512
// or AVX2), or exact int8 x uint8 sums (AVX-512 VNNI) when every codebook level is an integer
// in -128..127.
enum class Kind { kNone, kFloat, kInt8 };

// Weights repacked per panel of 32 output channels (blocks of 16; the last panel may hold one).
// kFloat: panel p's code words start at 2 * p * R, k-major with one word per block of the panel;
//   channel 16b + l has its code in bits 4*(l/2) (l even) or 32 + 4*(l/2) (l odd) of word k.
// kInt8: the levels as int8, panel p at p * quads * taps * 128 bytes, laid out
//   [channel quad][tap][block][lane][4 channels of the quad] (zero past C).
struct Packed {
  Kind kind = Kind::kNone;
  std::vector<uint64_t> words;
  std::vector<int8_t> int8;
};

// The kernel for this instruction set, codebook, group count and weight shape [M, C, taps]
// (none for the scalar fallback).
Kind Choose(Isa isa, const Lut& lut, int64_t group, int64_t C, int64_t taps);

// Repacks lut's codes for `kind` (kFloat or kInt8), checking every code is < K.
void Pack(const Lut& lut, Kind kind, int64_t C, int64_t taps, Packed* p);

// A packed copy of constant Codes and Codebook inputs, made on first use and kept (thread-safe).
class Cache {
 public:
  // The packed weights: for constant inputs the copy made from these tensors on first use,
  // otherwise a fresh packing.
  std::shared_ptr<const Packed> Get(const Lut& lut, Kind kind, int64_t C, int64_t taps,
                                    bool constant);

 private:
  // Codes, Codebook, kind, M, R, K of the copy kept
  Kept<Packed, std::tuple<const uint8_t*, const float*, Kind, int64_t, int64_t, int>> kept_;
};

// LutConvQuant's levels on the int8 path straight from the exact int32 sums acc: for output
// channel m the level is #{k : g(acc) >= t[k]} with g(acc) = QScale * R(fma(float(acc), s_m,
// b_m)) as the float epilogue computes it (R: relu or the identity). g is monotone in acc, so
// each (m, k) has an integer threshold: level = #{k : (acc ^ flip[m]) >= tau[m][k]}, flip = -1
// (acc -> -acc - 1) where g decreases. Layout for the tiles: per block of 16 channels, T
// vectors of 16 thresholds, and 16 flips.
struct IntLevels {
  int T = 0;
  std::vector<int32_t> tau;   // [blocks][T][16]
  std::vector<int32_t> flip;  // [blocks][16]
};

// The IntLevels of M channels (scale, bias: as Affine) for the quantizer lv, sums within
// [-bound, bound]; false (nothing made) when a scale, bias or QScale is not finite.
bool MakeIntLevels(const Affine& af, const Levels& lv, bool relu, int64_t M, int64_t bound,
                   IntLevels* out);

// The IntLevels of a layer's quantizer, made on first use and kept while Scale, Bias, QScale,
// QThresholds, relu and the bound stay the same (compared by value: cheap next to the layer).
class LevelCache {
 public:
  std::shared_ptr<const IntLevels> Get(const Affine& af, const Levels& lv, bool relu, int64_t M,
                                       int64_t bound);

 private:
  std::mutex mu_;
  int64_t m_ = -1, bound_ = -1;  // the key (m_ = -1: none yet)
  bool relu_ = false, bias_ = false;
  std::vector<float> values_;  // QScale, scales, biases, thresholds
  std::shared_ptr<const IntLevels> levels_;
};

// A node's 1x1 shortcut on the int8 path, channels last: S = Scale * conv1x1(x) + Bias (float32,
// as LutConv rounds it) computed tile by tile next to the node's own sums and added in place of
// a Residual (docs/onnx-ops.md).
struct Shortcut {
  const uint8_t* x = nullptr;  // [N, H, W, C] with C % 4 == 0; nullptr: no shortcut
  std::shared_ptr<const Packed> w;  // kInt8, C channels, 1 tap
  Affine af;
  int64_t C = 0, H = 0, W = 0, sH = 1, sW = 1;
};

// What follows Scale and Bias in LutConv / LutConvQuant (docs/onnx-ops.md): + Residual, relu,
// and for LutConvQuant the thresholds, counted into uint8 levels instead of writing floats.
struct Fused {
  const float* residual = nullptr;  // [N, M, OH, OW] (channels last: [N, OH, OW, M]), or nullptr
  bool relu = false;
  uint8_t* q = nullptr;  // levels, Y's shape: LutConvQuant's output, LutConv's output Q
  Levels levels;         // their QScale and QThresholds
  uint8_t* q2 = nullptr;  // LutConvQuant's output Q2 (only with q), or nullptr
  Levels levels2;         // its QScale2 and QThresholds2
  LevelCache* level_cache[2] = {nullptr, nullptr};  // LutConvQuant's, for q and q2
  Shortcut shortcut;  // (int8, channels last) added in place of residual
};

// The fused epilogue on n consecutive outputs v (in place) at flat output index `at`; with f.q
// set, their levels go to f.q + at (and with f.q2, those of f.levels2 to f.q2 + at).
void Finish(float* v, int64_t n, const Fused& f, int64_t at, Isa isa);

struct ConvShape {
  int64_t N, C, H, W, M, kH, kW, sH, sW, dH, dW, pT, pL, pB, pR, OH, OW;
  bool nhwc = false;  // channels last: X [N, H, W, C], outputs and residual [N, OH, OW, M]
};

// Y[n, m] = Scale[m] * conv(X, Codebook[codes]) + Bias[m] for group 1, then the fused
// epilogue f (docs/onnx-ops.md), into y (nullptr: LutConvQuant, levels only) and f.q when set.
// isa: kAvx512 or kAvx2 (kFloat only). Channels last (s.nhwc) only for kInt8.
void Conv(const Ort::KernelContext& ctx, const ConvShape& s, const uint8_t* x, const Packed& w,
          const Lut& lut, const Affine& af, const Fused& f, float* y, Isa isa);

}  // namespace adq::panels
