// Rotary position embedding, half-split convention, as LLaDA applies it to
// queries and keys:
//
//   out[..., i] = x[i] * cos[i] + rot[i] * sin[i],   rot = (-x[D/2:], x[:D/2])
//
// in float32, each product and the sum rounded on its own (no fused
// multiply-add, as the torch composition computes it), then rounded to x's
// dtype. So every implementation gives the composition's bits exactly.
#pragma once

#include <cstdint>

#include "llada/common.h"

namespace llada {

struct RopeParams {
  const void* x;        // [B, L, H, D], element type `dtype`, strides below
  const float* cos;     // [B or 1, L, D] contiguous
  const float* sin;     // [B or 1, L, D] contiguous
  void* out;            // [B, L, H, D] contiguous, `dtype`
  int64_t batch;
  int64_t length;
  int64_t heads;
  int64_t head_dim;     // even
  bool tables_per_row;  // cos/sin have B rows (else one, shared)
  // x's strides in elements (D's is 1), so a slice of a fused projection
  // is read where it lies.
  int64_t x_stride_batch;
  int64_t x_stride_position;
  int64_t x_stride_head;
  DType dtype;
};

// The CPU twin rotates positions [pos_begin, pos_end) of the B * L (batch,
// position) pairs, every head of each, so callers may split them across
// threads. Supports float32 and bfloat16.
void rope_cpu(const RopeParams& p, int64_t pos_begin, int64_t pos_end);

}  // namespace llada
