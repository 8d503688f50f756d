// The rms_norm op: schema, argument checks (shared with the CUDA glue) and the
// CPU implementation.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "llada/rms_norm.h"

namespace llada {

// Checks shared by both devices; returns the element type.
DType check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps, bool allow_half) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected at least one dimension [..., dim], got a 0-D tensor");
  const DType dtype = float_dtype(x, "x", allow_half);
  check_dim(weight, 1, "weight", "[dim]");
  check_dtype(weight, x.scalar_type(), "weight");
  check_same_device(weight, x, "weight", "x");
  TORCH_CHECK_VALUE(weight.size(0) == x.size(-1), "weight: expected ", num(x.size(-1)),
                    " elements (the last dimension of x, shape ", shape_of(x), "), got ",
                    num(weight.size(0)));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps: expected a finite value >= 0, got ", num(eps));
  return dtype;
}

// The kernel parameters; x, weight and out must be contiguous.
RmsNormParams make_rms_norm_params(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out,
                                   DType dtype, double eps) {
  RmsNormParams p{};
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  p.dim = x.size(-1);
  p.rows = p.dim > 0 ? x.numel() / p.dim : 0;
  p.eps = float(eps);
  p.dtype = dtype;
  return p;
}

namespace {

at::Tensor rms_norm_cpu_op(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  const DType dtype = check_rms_norm_args(x_in, weight_in, eps, /*allow_half=*/false);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const RmsNormParams p = make_rms_norm_params(x, weight, out, dtype, eps);
  // About 32k elements per task: rows of a few thousand come a few at a time.
  const int64_t grain = std::max<int64_t>(1, 32768 / p.dim);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) { rms_norm_cpu(p, begin, end); });
  return out;
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_FRAGMENT(llada, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(llada, CPU, m) { m.impl("rms_norm", &llada::rms_norm_cpu_op); }
