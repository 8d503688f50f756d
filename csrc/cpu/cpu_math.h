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

// e^x as 2^n e^r, r = x - n ln2 (ln2 in two parts), n = round(x / ln2):
// Cephes' polynomial for e^r. Returns e^r; the callers apply 2^n.
inline float exp_reduced(float x, float n) {
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp(t) for t <= 0 (or -inf), about 1 ulp, in plain arithmetic so the loops
// calling it vectorise. Exactly 0 below -87; NaN stays NaN. (The clamp sends
// NaN to -87 too: converting a NaN n to an int is undefined behaviour.)
inline float exp_nonpositive(float t) {
  const float x = t >= -87.0f ? t : -87.0f;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float scale = bits_float(uint32_t(int32_t(n) + 127) << 23);
  return t >= -87.0f ? exp_reduced(x, n) * scale : (t < -87.0f ? 0.0f : t);
}

// exp(t) for any t, about 1 ulp, vectorisable too: 2^n is applied in two
// halves, so that the result reaches FLT_MAX (and overflows to inf beyond).
// 0 below -87; NaN stays NaN (clamped first, as in exp_nonpositive).
inline float exp_float(float t) {
  const float x = t >= -87.0f ? (t > 89.0f ? 89.0f : t) : -87.0f;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const int32_t k = int32_t(n), half = k / 2;
  const float scale_a = bits_float(uint32_t(half + 127) << 23);
  const float scale_b = bits_float(uint32_t(k - half + 127) << 23);
  return t >= -87.0f ? exp_reduced(x, n) * scale_a * scale_b : (t < -87.0f ? 0.0f : t);
}

}  // namespace llada
