// CUDA implementation of the rms_norm op: checks, device guard, stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "llada/kernels_cuda.h"

namespace llada {

// Defined in rms_norm.cpp.
DType check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps, bool allow_half);
RmsNormParams make_rms_norm_params(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out,
                                   DType dtype, double eps);

namespace {

at::Tensor rms_norm_cuda_op(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  const DType dtype = check_rms_norm_args(x_in, weight_in, eps, /*allow_half=*/true);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const RmsNormParams p = make_rms_norm_params(x, weight, out, dtype, eps);
  const cudaError_t err = rms_norm_cuda(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "llada.rms_norm: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_IMPL(llada, CUDA, m) { m.impl("rms_norm", &llada::rms_norm_cuda_op); }
