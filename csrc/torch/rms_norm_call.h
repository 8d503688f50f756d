// What the CPU and CUDA glue of rms_norm and add_rms_norm share: one call's
// checked, contiguous inputs, its outputs and the kernel parameters.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "llada/rms_norm.h"

namespace llada {

struct RmsNormCall {
  at::Tensor x, residual, weight;  // contiguous; residual undefined without one
  at::Tensor sum, out;             // new; sum undefined without a residual
  RmsNormParams params{};
};

// Checks the arguments (errors name them) and allocates the outputs. Defined
// in rms_norm.cpp.
RmsNormCall prepare_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                             const at::Tensor& weight, double eps, bool allow_half);

}  // namespace llada
