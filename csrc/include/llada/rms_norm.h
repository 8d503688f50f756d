// Root-mean-square normalisation of rows, exactly as LLaDA's blocks apply it:
//
//   y   = to_dtype(x * rsqrt(mean(x^2) + eps))     (in float32)
//   out = to_dtype(weight * y)                     (the product in float32)
//
// The two roundings are those of the checkpoint's own code, which casts back
// to the storage type before multiplying by the weight.
//
// With a residual, x is first replaced by sum = to_dtype(x + residual) (the
// sum in float32), which is also written out: a block's residual add and the
// next norm in one pass.
#pragma once

#include <cstdint>

#include "llada/common.h"

namespace llada {

struct RmsNormParams {
  const void* x;         // [rows, dim] contiguous, element type `dtype`
  const void* weight;    // [dim], `dtype`
  void* out;             // [rows, dim] contiguous, `dtype`
  int64_t rows;
  int64_t dim;
  float eps;
  DType dtype;
  const void* residual;  // [rows, dim] contiguous, `dtype`; or null: no add
  void* sum;             // [rows, dim] contiguous, `dtype`: x + residual (with a residual)
};

// The CPU twin normalises rows [row_begin, row_end), so callers may split the
// rows across threads. Supports float32 and bfloat16.
void rms_norm_cpu(const RmsNormParams& p, int64_t row_begin, int64_t row_end);

}  // namespace llada
