// Rotary position embedding, half-split convention, as LLaDA applies it to
// queries and keys:
//
//   out[..., i] = x[i] * cos[i] + rot[i] * sin[i],   rot = (-x[D/2:], x[:D/2])
//
// in float32, each product and the sum rounded on its own (no fused
// multiply-add, as the torch composition computes it), then rounded to x's
// dtype. So every implementation gives the composition's bits exactly.
//
// The same kernels store keys and values into a cache (the store_kv op):
// position l's rotated keys go to row positions[l] of the key cache, and
// its values, unrotated, to the same row of the value cache: RoPE and two
// index copies in one pass.
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
  // Into a cache: with out_positions ([L], each in [0, out_length)), out is
  // [B, out_length, H, D] contiguous and position l is written at row
  // out_positions[l]; null: out is [B, L, H, D].
  const int64_t* out_positions;
  int64_t out_length;
  // Optional: values copied unrotated to copy_out at the places x's rotation
  // goes; copy_x is [B, L, H, D] with its own strides (D's is 1), copy_out
  // laid out as out.
  const void* copy_x;
  void* copy_out;
  int64_t copy_stride_batch;
  int64_t copy_stride_position;
  int64_t copy_stride_head;
};

// The CPU twin rotates (and copies) positions [pos_begin, pos_end) of the
// B * L (batch, position) pairs, every head of each, so callers may split
// them across threads. Supports float32 and bfloat16; out_positions must be
// in range (the glue checks them).
void rope_cpu(const RopeParams& p, int64_t pos_begin, int64_t pos_end);

}  // namespace llada
