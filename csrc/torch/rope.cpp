// The rope op: schema, argument checks (shared with the CUDA glue) and the CPU
// implementation.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "llada/rope.h"

namespace llada {

// Checks shared by both devices; returns the element type of x.
DType check_rope_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool allow_half) {
  check_dim(x, 4, "x", "[B, L, H, D]");
  const DType dtype = float_dtype(x, "x", allow_half);
  TORCH_CHECK_VALUE(x.size(3) % 2 == 0, "x: expected an even head dim, got shape ", shape_of(x));
  check_dim(cos, 3, "cos", "[B or 1, L, D]");
  check_dtype(cos, at::kFloat, "cos");
  check_same_device(cos, x, "cos", "x");
  TORCH_CHECK_VALUE((cos.size(0) == x.size(0) || cos.size(0) == 1) && cos.size(1) == x.size(1) &&
                        cos.size(2) == x.size(3),
                    "cos: expected shape [", num(x.size(0)), " or 1, ", num(x.size(1)), ", ", num(x.size(3)),
                    "] for x of shape ", shape_of(x), ", got ", shape_of(cos));
  check_dim(sin, 3, "sin", "[B or 1, L, D]");
  check_dtype(sin, at::kFloat, "sin");
  check_same_device(sin, x, "sin", "x");
  check_same_shape(sin, cos, "sin", "cos");
  return dtype;
}

// The kernel parameters; cos, sin and out must be contiguous, x only in its
// last dimension.
RopeParams make_rope_params(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            at::Tensor& out, DType dtype) {
  RopeParams p{};
  p.x = x.data_ptr();
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.out = out.data_ptr();
  p.batch = x.size(0);
  p.length = x.size(1);
  p.heads = x.size(2);
  p.head_dim = x.size(3);
  p.tables_per_row = cos.size(0) == x.size(0) && x.size(0) > 1;
  p.x_stride_batch = x.stride(0);
  p.x_stride_position = x.stride(1);
  p.x_stride_head = x.stride(2);
  p.dtype = dtype;
  return p;
}

namespace {

at::Tensor rope_cpu_op(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  const DType dtype = check_rope_args(x_in, cos_in, sin_in, /*allow_half=*/false);
  const at::Tensor x = last_dim_contiguous(x_in), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const RopeParams p = make_rope_params(x, cos, sin, out, dtype);
  const int64_t per_position = p.heads * p.head_dim;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(per_position, 1));
  at::parallel_for(0, p.batch * p.length, grain, [&](int64_t begin, int64_t end) { rope_cpu(p, begin, end); });
  return out;
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_FRAGMENT(llada, m) { m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor"); }

TORCH_LIBRARY_IMPL(llada, CPU, m) { m.impl("rope", &llada::rope_cpu_op); }
