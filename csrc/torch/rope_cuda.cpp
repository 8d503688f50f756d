// CUDA implementation of the rope op: checks, device guard, stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "llada/kernels_cuda.h"

namespace llada {

// Defined in rope.cpp.
DType check_rope_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool allow_half);
RopeParams make_rope_params(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            at::Tensor& out, DType dtype);

namespace {

at::Tensor rope_cuda_op(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  const DType dtype = check_rope_args(x_in, cos_in, sin_in, /*allow_half=*/true);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = last_dim_contiguous(x_in), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const RopeParams p = make_rope_params(x, cos, sin, out, dtype);
  const cudaError_t err = rope_cuda(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "llada.rope: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_IMPL(llada, CUDA, m) { m.impl("rope", &llada::rope_cuda_op); }
