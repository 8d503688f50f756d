// Pieces shared by the CPU twins: the run-time choice of vector width, the
// rounding to bfloat16 and an exp that loops can vectorise. Torch-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "llada/common.h"

namespace llada {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Hot loops are compiled twice, for x86-64-v3 (AVX2, FMA) and for the
// baseline; the loader picks one by the instruction sets the processor has.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLADA_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LLADA_MULTIVERSION
#endif

// float32 -> bfloat16 bits, round to nearest even; NaN stays NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// exp(t) for t <= 0 (or -inf), about 1 ulp: Cephes-style range reduction and
// polynomial in plain arithmetic so the loops calling it vectorise. Exactly 0
// below -87.
inline float exp_nonpositive(float t) {
  const float x = t < -87.0f ? -87.0f : t;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = bits_float(uint32_t(int32_t(n) + 127) << 23);
  return t < -87.0f ? 0.0f : p * scale;
}

}  // namespace llada
