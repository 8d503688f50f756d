// CUDA implementation of the silu_mul op: device guard, stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "llada/kernels_cuda.h"
#include "silu_mul_call.h"

namespace llada {
namespace {

at::Tensor silu_mul_cuda_op(const at::Tensor& gate, const at::Tensor& up) {
  const c10::cuda::CUDAGuard guard(gate.device());
  const SiluMulCall c = prepare_silu_mul(gate, up, /*allow_half=*/true);
  const cudaError_t err = silu_mul_cuda(c.params, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "llada.silu_mul: CUDA launch failed: ", cudaGetErrorString(err));
  return c.out;
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_IMPL(llada, CUDA, m) { m.impl("silu_mul", &llada::silu_mul_cuda_op); }
