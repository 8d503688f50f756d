// What the CPU and CUDA glue of silu_mul share: one call's checked inputs
// (as [rows, dim] views, or copies where no view exists), its output and the
// kernel parameters.
#pragma once

#include <ATen/ATen.h>

#include "llada/silu_mul.h"

namespace llada {

struct SiluMulCall {
  at::Tensor gate, up;  // [rows, dim], the last dimension contiguous
  at::Tensor out;       // new, contiguous, the inputs' shape
  SiluMulParams params{};
};

// Checks the arguments (errors name them) and allocates the output. Defined
// in silu_mul.cpp.
SiluMulCall prepare_silu_mul(const at::Tensor& gate, const at::Tensor& up, bool allow_half);

}  // namespace llada
