// What the CPU and CUDA glue of rope and store_kv share: one call's checked
// inputs (kept alive here), its output and the kernel parameters.
#pragma once

#include <ATen/ATen.h>

#include "llada/rope.h"

namespace llada {

struct RopeCall {
  at::Tensor x, cos, sin, copy_x, positions;  // x and copy_x contiguous in D; the rest contiguous
  at::Tensor out;                             // rope: new; store_kv: the key cache
  RopeParams params{};
};

// rope(x, cos, sin): checks the arguments (errors name them) and allocates
// the output. Defined in rope.cpp, as is the next.
RopeCall prepare_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool allow_half);

// store_kv(k, v, cos, sin, cache_k, cache_v, positions): checks the
// arguments (not the values of positions, which would need them on the host).
RopeCall prepare_store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& positions,
                          bool allow_half);

}  // namespace llada
