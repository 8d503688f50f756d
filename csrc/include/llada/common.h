// Shared by the CPU twins and the CUDA kernels: dtypes, float helpers and the
// counter-based Gumbel noise. Plain C++ (no torch, no CUDA headers needed).
#pragma once

#include <bit>
#include <cstdint>

#if defined(__CUDACC__)
#define LLADA_HD __host__ __device__ __forceinline__
#else
#define LLADA_HD inline
#endif

namespace llada {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "unknown";
}

enum class SelectionRule : int32_t { kTopK = 0, kThreshold = 1, kFactor = 2 };

LLADA_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return std::bit_cast<uint32_t>(f);
#endif
}

LLADA_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return std::bit_cast<float>(u);
#endif
}

LLADA_HD float bf16_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

// IEEE binary16 -> binary32, exact for every input (subnormals, inf, nan).
LLADA_HD float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_float(sign | ((exp + 112) << 23) | (man << 13));
  // Subnormal (or zero): man * 2^-24, exact in float32.
  float f = float(man) * 5.9604644775390625e-8f;
  return bits_float(sign | float_bits(f));
}

// Maps a float to a uint32 whose unsigned order is the float order
// (-inf lowest, +inf highest); NaN maps above +inf.
LLADA_HD uint32_t ordered_bits(float f) {
  uint32_t u = float_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// ---------------------------------------------------------------------------
// Gumbel noise keyed by (seed, row, column).
//
// The noise must be identical on every device and independent of the launch
// shape, so it is a pure function of its key: a keyed double round of a 32-bit
// avalanche mixer, then g = -log(-log(u)) with u from the top 23 bits. The
// logarithm is our own, written with correctly rounded float operations only,
// so the CPU and the GPU produce the same bits (no contraction to FMA).
// ---------------------------------------------------------------------------

LLADA_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

struct GumbelKey {
  uint32_t k1, k2;
};

LLADA_HD GumbelKey gumbel_row_key(uint64_t seed, int64_t row) {
  const uint32_t golden = 0x9e3779b9u;
  uint32_t s = mix32(uint32_t(seed) ^ mix32(uint32_t(seed >> 32) + golden));
  uint64_t r = uint64_t(row);
  uint32_t k1 = mix32(s ^ (uint32_t(r) * golden) ^ uint32_t(r >> 32));
  uint32_t k2 = mix32(k1 + 0x632be5abu);
  return {k1, k2};
}

#if defined(__CUDA_ARCH__)
LLADA_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
LLADA_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
LLADA_HD float div_rn(float a, float b) { return __fdiv_rn(a, b); }
#else
// The CPU sources are compiled with -ffp-contract=off, so these round alone.
LLADA_HD float mul_rn(float a, float b) { return a * b; }
LLADA_HD float add_rn(float a, float b) { return a + b; }
LLADA_HD float div_rn(float a, float b) { return a / b; }
#endif

// Natural log of a positive normal float, to about 1e-7 relative:
// x = 2^e * m with m in [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(s), s = (m-1)/(m+1).
LLADA_HD float portable_log(float x) {
  uint32_t bits = float_bits(x);
  int e = int((bits >> 23) & 0xff) - 127;
  float m = bits_float((bits & 0x007fffffu) | 0x3f800000u);
  if (m > 1.41421356f) {
    m = mul_rn(m, 0.5f);
    e += 1;
  }
  float s = div_rn(add_rn(m, -1.0f), add_rn(m, 1.0f));
  float z = mul_rn(s, s);
  float p = add_rn(0.22222222f, mul_rn(z, 0.18181818f));  // 2/9, 2/11
  p = add_rn(0.28571429f, mul_rn(z, p));                   // 2/7
  p = add_rn(0.4f, mul_rn(z, p));                          // 2/5
  p = add_rn(0.66666667f, mul_rn(z, p));                   // 2/3
  p = add_rn(2.0f, mul_rn(z, p));
  return add_rn(mul_rn(float(e), 0.69314718f), mul_rn(s, p));
}

LLADA_HD float gumbel_noise(GumbelKey key, uint32_t col) {
  uint32_t h = mix32(mix32(col ^ key.k1) + key.k2);
  // 23 bits, so that n + 1/2 is exact in float32: u = (n + 1/2) / 2^23 lies in
  // [2^-24, 1 - 2^-24], never 0 or 1, where the logarithms break down.
  float u = mul_rn(float(h >> 9) + 0.5f, 1.1920928955078125e-7f);
  return -portable_log(-portable_log(u));
}

// logit * logit_scale + noise * noise_scale has its argmax where
// logit / temperature + noise has, and neither factor exceeds 1, so no
// temperature overflows float32: a tiny one scales the noise down instead of
// scaling the logits up (45 / 1e-38 would be +inf, a tie with every other
// large logit).
struct GumbelScale {
  float logit_scale;
  float noise_scale;
};

LLADA_HD GumbelScale gumbel_scale(float temperature) {
  if (temperature < 1.0f) return GumbelScale{1.0f, temperature};
  return GumbelScale{div_rn(1.0f, temperature), 1.0f};
}

// Score whose argmax is a sample of softmax(logit / temperature).
LLADA_HD float gumbel_score(float logit, GumbelScale scale, GumbelKey key, uint32_t col) {
  return add_rn(mul_rn(logit, scale.logit_scale), mul_rn(gumbel_noise(key, col), scale.noise_scale));
}

}  // namespace llada
