// CUDA kernel of silu_mul: one thread per element, the grid's y dimension
// over rows and x over columns (striding where there are more). The exp is
// the accurate expf and the division and product round to nearest, as the
// torch ops compute them; the 16-bit path rounds after each, as they do.
#include <cstdint>

#include "element.cuh"
#include "llada/kernels_cuda.h"

namespace llada {
namespace {

constexpr int kThreads = 256;

template <DType T>
__global__ void __launch_bounds__(kThreads) silu_mul_kernel(SiluMulParams p) {
  using E = Element<T>;
  using V = typename E::type;
  const V* gate = static_cast<const V*>(p.gate);
  const V* up = static_cast<const V*>(p.up);
  V* out = static_cast<V*>(p.out);
  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.dim; i += int64_t(gridDim.x) * kThreads) {
      const float g = E::load(gate[r * p.gate_stride + i]);
      const float s = E::load(E::store(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g)))));
      out[r * p.dim + i] = E::store(__fmul_rn(s, E::load(up[r * p.up_stride + i])));
    }
  }
}

}  // namespace

cudaError_t silu_mul_cuda(const SiluMulParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return cudaSuccess;
  // A block per 256 columns of a row, up to the grid's limits; beyond, blocks loop.
  const int64_t columns = (p.dim + kThreads - 1) / kThreads;
  const dim3 grid(unsigned(columns < 65536 ? columns : 65536), unsigned(p.rows < 65535 ? p.rows : 65535));
  switch (p.dtype) {
    case DType::kFloat32: silu_mul_kernel<DType::kFloat32><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kBFloat16: silu_mul_kernel<DType::kBFloat16><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kFloat16: silu_mul_kernel<DType::kFloat16><<<grid, kThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace llada
