// CPU twin of silu_mul: per row, one vectorisable pass over the elements
// with exp_float (cpu_math.h); the two roundings of the 16-bit path as the
// CUDA kernel does them.
#include "llada/silu_mul.h"

#include "cpu_math.h"

namespace llada {
namespace {

inline float silu(float g) { return g / (1.0f + exp_float(-g)); }

LLADA_MULTIVERSION
void row_float32(const float* gate, const float* up, float* out, int64_t dim) {
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i) out[i] = silu(gate[i]) * up[i];
}

// In chunks that stay in L1, widened first, so the silu loop vectorises as
// the float32 one does.
LLADA_MULTIVERSION
void row_bfloat16(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t dim) {
  constexpr int64_t kChunk = 256;
  float buf[kChunk];
  for (int64_t c = 0; c < dim; c += kChunk) {
    const int64_t n = dim - c < kChunk ? dim - c : kChunk;
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(gate[c + i]);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = silu(buf[i]);
    for (int64_t i = 0; i < n; ++i)
      out[c + i] = float_to_bf16(bf16_to_float(float_to_bf16(buf[i])) * bf16_to_float(up[c + i]));
  }
}

}  // namespace

void silu_mul_cpu(const SiluMulParams& p, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    if (p.dtype == DType::kFloat32) {
      row_float32(static_cast<const float*>(p.gate) + r * p.gate_stride,
                  static_cast<const float*>(p.up) + r * p.up_stride, static_cast<float*>(p.out) + r * p.dim, p.dim);
    } else {
      row_bfloat16(static_cast<const uint16_t*>(p.gate) + r * p.gate_stride,
                   static_cast<const uint16_t*>(p.up) + r * p.up_stride, static_cast<uint16_t*>(p.out) + r * p.dim,
                   p.dim);
    }
  }
}

}  // namespace llada
