// CPU twin of rope: per (batch, position), the rotation of every head by that
// position's cos/sin row. Compiled with -ffp-contract=off (kernels.cmake), so
// the products and sums round exactly as the torch composition's do.
#include "llada/rope.h"

#include <cstring>

#include "cpu_math.h"

namespace llada {
namespace {

// One head: out[i] = x[i] c[i] - x[i + h] s[i], out[i + h] = x[i + h] c[i + h] + x[i] s[i + h].
LLADA_MULTIVERSION
void rotate_float32(const float* x, const float* c, const float* s, float* out, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float lo = x[i], hi = x[i + half];
    out[i] = lo * c[i] + (-hi) * s[i];
    out[i + half] = hi * c[i + half] + lo * s[i + half];
  }
}

LLADA_MULTIVERSION
void rotate_bfloat16(const uint16_t* x, const float* c, const float* s, uint16_t* out, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float lo = bf16_to_float(x[i]), hi = bf16_to_float(x[i + half]);
    out[i] = float_to_bf16(lo * c[i] + (-hi) * s[i]);
    out[i + half] = float_to_bf16(hi * c[i + half] + lo * s[i + half]);
  }
}

}  // namespace

void rope_cpu(const RopeParams& p, int64_t pos_begin, int64_t pos_end) {
  const int64_t d = p.head_dim, half = d / 2;
  const size_t element = p.dtype == DType::kFloat32 ? 4 : 2;
  for (int64_t bl = pos_begin; bl < pos_end; ++bl) {
    const int64_t b = bl / p.length, l = bl % p.length;
    const int64_t table = ((p.tables_per_row ? b : 0) * p.length + l) * d;
    const float* c = p.cos + table;
    const float* s = p.sin + table;
    // The output row: position l's own, or the cache row it is stored at.
    const int64_t out_row = p.out_positions != nullptr ? b * p.out_length + p.out_positions[l] : bl;
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t from = b * p.x_stride_batch + l * p.x_stride_position + h * p.x_stride_head;
      const int64_t at = (out_row * p.heads + h) * d;
      if (p.copy_x != nullptr) {
        const int64_t v_from = b * p.copy_stride_batch + l * p.copy_stride_position + h * p.copy_stride_head;
        std::memcpy(static_cast<char*>(p.copy_out) + at * element,
                    static_cast<const char*>(p.copy_x) + v_from * element, d * element);
      }
      if (p.dtype == DType::kFloat32) {
        rotate_float32(static_cast<const float*>(p.x) + from, c, s, static_cast<float*>(p.out) + at, half);
      } else {
        rotate_bfloat16(static_cast<const uint16_t*>(p.x) + from, c, s, static_cast<uint16_t*>(p.out) + at,
                        half);
      }
    }
  }
}

}  // namespace llada
