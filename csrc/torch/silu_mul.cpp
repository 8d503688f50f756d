// The silu_mul op: schema, argument checks (shared with the CUDA glue:
// silu_mul_call.h) and the CPU implementation.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "silu_mul_call.h"

namespace llada {
namespace {

// t as [rows, dim] with a contiguous last dimension: a view where the
// leading dimensions merge into one stride (the halves of a packed
// projection do), else a copy.
at::Tensor as_rows(const at::Tensor& t) {
  const int64_t dim = t.size(-1);
  at::Tensor rows = t.reshape({dim > 0 ? t.numel() / dim : 0, dim});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

}  // namespace

DType check_silu_mul_args(const at::Tensor& gate, const at::Tensor& up, bool allow_half) {
  TORCH_CHECK_VALUE(gate.dim() >= 1, "gate: expected at least one dimension [..., dim], got a 0-D tensor");
  const DType dtype = float_dtype(gate, "gate", allow_half);
  check_dtype(up, gate.scalar_type(), "up");
  check_same_device(up, gate, "up", "gate");
  check_same_shape(up, gate, "up", "gate");
  return dtype;
}

SiluMulCall prepare_silu_mul(const at::Tensor& gate, const at::Tensor& up, bool allow_half) {
  const DType dtype = check_silu_mul_args(gate, up, allow_half);
  SiluMulCall c;
  c.gate = as_rows(gate);
  c.up = as_rows(up);
  c.out = at::empty(gate.sizes(), gate.options());
  SiluMulParams& p = c.params;
  p.gate = c.gate.data_ptr();
  p.up = c.up.data_ptr();
  p.out = c.out.data_ptr();
  p.rows = c.gate.size(0);
  p.dim = c.gate.size(1);
  p.gate_stride = c.gate.stride(0);
  p.up_stride = c.up.stride(0);
  p.dtype = dtype;
  return c;
}

namespace {

at::Tensor silu_mul_cpu_op(const at::Tensor& gate, const at::Tensor& up) {
  const SiluMulCall c = prepare_silu_mul(gate, up, /*allow_half=*/false);
  const SiluMulParams& p = c.params;
  if (p.rows * p.dim == 0) return c.out;
  const int64_t grain = std::max<int64_t>(1, 32768 / p.dim);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) { silu_mul_cpu(p, begin, end); });
  return c.out;
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_FRAGMENT(llada, m) { m.def("silu_mul(Tensor gate, Tensor up) -> Tensor"); }

TORCH_LIBRARY_IMPL(llada, CPU, m) { m.impl("silu_mul", &llada::silu_mul_cpu_op); }
