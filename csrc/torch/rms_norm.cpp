// The rms_norm and add_rms_norm ops: schemas, argument checks and output
// allocation (shared with the CUDA glue: rms_norm_call.h) and the CPU
// implementations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "rms_norm_call.h"

namespace llada {

DType check_rms_norm_args(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                          const at::Tensor& weight, double eps, bool allow_half) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected at least one dimension [..., dim], got a 0-D tensor");
  const DType dtype = float_dtype(x, "x", allow_half);
  check_dim(weight, 1, "weight", "[dim]");
  check_dtype(weight, x.scalar_type(), "weight");
  check_same_device(weight, x, "weight", "x");
  TORCH_CHECK_VALUE(weight.size(0) == x.size(-1), "weight: expected ", num(x.size(-1)),
                    " elements (the last dimension of x, shape ", shape_of(x), "), got ",
                    num(weight.size(0)));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps: expected a finite value >= 0, got ", num(eps));
  if (residual.has_value()) {
    check_dtype(*residual, x.scalar_type(), "residual");
    check_same_device(*residual, x, "residual", "x");
    check_same_shape(*residual, x, "residual", "x");
  }
  return dtype;
}

// One call of either op: the contiguous inputs (kept alive here), the new
// outputs and the kernel parameters pointing at them. Without a residual,
// `sum` is undefined.
RmsNormCall prepare_rms_norm(const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
                             const at::Tensor& weight_in, double eps, bool allow_half) {
  const DType dtype = check_rms_norm_args(x_in, residual_in, weight_in, eps, allow_half);
  RmsNormCall c;
  c.x = x_in.contiguous();
  c.weight = weight_in.contiguous();
  c.out = at::empty(c.x.sizes(), c.x.options());
  c.params.x = c.x.data_ptr();
  c.params.weight = c.weight.data_ptr();
  c.params.out = c.out.data_ptr();
  c.params.dim = c.x.size(-1);
  c.params.rows = c.params.dim > 0 ? c.x.numel() / c.params.dim : 0;
  c.params.eps = float(eps);
  c.params.dtype = dtype;
  if (residual_in.has_value()) {
    c.residual = residual_in->contiguous();
    c.sum = at::empty(c.x.sizes(), c.x.options());
    c.params.residual = c.residual.data_ptr();
    c.params.sum = c.sum.data_ptr();
  }
  return c;
}

namespace {

void run_cpu(const RmsNormCall& c) {
  if (c.out.numel() == 0) return;
  const RmsNormParams& p = c.params;
  // About 32k elements per task: rows of a few thousand come a few at a time.
  const int64_t grain = std::max<int64_t>(1, 32768 / p.dim);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) { rms_norm_cpu(p, begin, end); });
}

at::Tensor rms_norm_cpu_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const RmsNormCall c = prepare_rms_norm(x, std::nullopt, weight, eps, /*allow_half=*/false);
  run_cpu(c);
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu_op(const at::Tensor& x, const at::Tensor& residual,
                                                       const at::Tensor& weight, double eps) {
  const RmsNormCall c = prepare_rms_norm(x, residual, weight, eps, /*allow_half=*/false);
  run_cpu(c);
  return {c.sum, c.out};
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_FRAGMENT(llada, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llada, CPU, m) {
  m.impl("rms_norm", &llada::rms_norm_cpu_op);
  m.impl("add_rms_norm", &llada::add_rms_norm_cpu_op);
}
