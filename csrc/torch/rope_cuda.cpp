// CUDA implementations of the rope and store_kv ops: device guard, stream,
// launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "llada/kernels_cuda.h"
#include "rope_call.h"

namespace llada {
namespace {

void run_cuda(const RopeCall& c, const char* op) {
  const RopeParams& p = c.params;
  if (p.batch * p.length * p.heads * p.head_dim == 0) return;
  const cudaError_t err = rope_cuda(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor rope_cuda_op(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const c10::cuda::CUDAGuard guard(x.device());
  const RopeCall c = prepare_rope(x, cos, sin, /*allow_half=*/true);
  run_cuda(c, "llada.rope");
  return c.out;
}

// positions are not checked on the host (that would wait for the device);
// the kernel stops with a device-side error on one outside the caches.
void store_kv_cuda_op(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                      at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& positions) {
  const c10::cuda::CUDAGuard guard(k.device());
  const RopeCall c = prepare_store_kv(k, v, cos, sin, cache_k, cache_v, positions, /*allow_half=*/true);
  run_cuda(c, "llada.store_kv");
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_IMPL(llada, CUDA, m) {
  m.impl("rope", &llada::rope_cuda_op);
  m.impl("store_kv", &llada::store_kv_cuda_op);
}
