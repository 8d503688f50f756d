// CUDA implementations of the rms_norm and add_rms_norm ops: device guard,
// stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "llada/kernels_cuda.h"
#include "rms_norm_call.h"

namespace llada {
namespace {

void run_cuda(const RmsNormCall& c, const char* op) {
  if (c.out.numel() == 0) return;
  // The kernel gives each row a block of its grid, whose x dimension holds at most 2^31 - 1.
  TORCH_CHECK_VALUE(c.params.rows <= int64_t(0x7fffffff), "x: expected at most 2^31 - 1 rows (elements "
                    "over the last dimension) on CUDA, got ", num(c.params.rows));
  const cudaError_t err = rms_norm_cuda(c.params, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor rms_norm_cuda_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const RmsNormCall c = prepare_rms_norm(x, std::nullopt, weight, eps, /*allow_half=*/true);
  run_cuda(c, "llada.rms_norm");
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda_op(const at::Tensor& x, const at::Tensor& residual,
                                                        const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const RmsNormCall c = prepare_rms_norm(x, residual, weight, eps, /*allow_half=*/true);
  run_cuda(c, "llada.add_rms_norm");
  return {c.sum, c.out};
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_IMPL(llada, CUDA, m) {
  m.impl("rms_norm", &llada::rms_norm_cuda_op);
  m.impl("add_rms_norm", &llada::add_rms_norm_cuda_op);
}
