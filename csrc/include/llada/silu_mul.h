// The gated activation of LLaDA's MLP, silu(gate) * up, as the checkpoint's
// code computes it in the storage dtype:
//
//   s   = to_dtype(g / (1 + exp(-g)))     (in float32)
//   out = to_dtype(s * u)                 (the product in float32)
//
// Two roundings, as two torch ops round. The kernels use their own exp, so
// a float32 element may differ from torch's by a few ulps, and a 16-bit one
// may round the other way.
#pragma once

#include <cstdint>

#include "llada/common.h"

namespace llada {

struct SiluMulParams {
  const void* gate;     // [rows, dim], row stride gate_stride, element type `dtype`
  const void* up;       // [rows, dim], row stride up_stride, `dtype`
  void* out;            // [rows, dim] contiguous, `dtype`
  int64_t rows;
  int64_t dim;
  int64_t gate_stride;  // elements between rows (gate and up may be the halves
  int64_t up_stride;    // of one packed [rows, 2 * dim] projection)
  DType dtype;
};

// The CPU twin computes rows [row_begin, row_end), so callers may split the
// rows across threads. Supports float32 and bfloat16.
void silu_mul_cpu(const SiluMulParams& p, int64_t row_begin, int64_t row_end);

}  // namespace llada
