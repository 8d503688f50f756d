// CUDA kernel of rope: one thread per pair of elements (i, i + D/2) of one
// head, which read each other; storing into a cache, the thread also copies
// the values' pair. Products and sums use the round-to-nearest
// intrinsics so that nothing is contracted into a fused multiply-add: the
// result has the torch composition's bits, like the CPU twin's.
#include <cstdint>

#include "element.cuh"
#include "llada/kernels_cuda.h"

namespace llada {
namespace {

constexpr int kThreads = 256;

template <DType T>
__global__ void __launch_bounds__(kThreads) rope_kernel(RopeParams p) {
  using E = Element<T>;
  using V = typename E::type;
  const int64_t half = p.head_dim / 2;
  const int64_t pairs = p.batch * p.length * p.heads * half;
  const V* x = static_cast<const V*>(p.x);
  V* out = static_cast<V*>(p.out);
  for (int64_t n = int64_t(blockIdx.x) * kThreads + threadIdx.x; n < pairs;
       n += int64_t(gridDim.x) * kThreads) {
    const int64_t i = n % half;
    const int64_t row = n / half;  // (b * L + l) * H + h
    const int64_t bl = row / p.heads;
    const int64_t b = bl / p.length, l = bl % p.length, h = row % p.heads;
    const int64_t table = ((p.tables_per_row ? b : 0) * p.length + l) * p.head_dim;
    const int64_t from = b * p.x_stride_batch + l * p.x_stride_position + h * p.x_stride_head + i;
    int64_t at = row * p.head_dim + i;
    if (p.out_positions != nullptr) {
      const int64_t to = p.out_positions[l];
      if (to < 0 || to >= p.out_length) __trap();  // out of the cache: a device-side error, as index_copy_
      at = ((b * p.out_length + to) * p.heads + h) * p.head_dim + i;
    }
    const float lo = E::load(x[from]), hi = E::load(x[from + half]);
    const float c_lo = __ldg(p.cos + table + i), c_hi = __ldg(p.cos + table + i + half);
    const float s_lo = __ldg(p.sin + table + i), s_hi = __ldg(p.sin + table + i + half);
    out[at] = E::store(__fadd_rn(__fmul_rn(lo, c_lo), __fmul_rn(-hi, s_lo)));
    out[at + half] = E::store(__fadd_rn(__fmul_rn(hi, c_hi), __fmul_rn(lo, s_hi)));
    if (p.copy_x != nullptr) {
      const V* v = static_cast<const V*>(p.copy_x) + b * p.copy_stride_batch + l * p.copy_stride_position +
                   h * p.copy_stride_head + i;
      V* v_out = static_cast<V*>(p.copy_out) + at;
      v_out[0] = v[0];
      v_out[half] = v[half];
    }
  }
}

}  // namespace

cudaError_t rope_cuda(const RopeParams& p, cudaStream_t stream) {
  const int64_t pairs = p.batch * p.length * p.heads * (p.head_dim / 2);
  if (pairs == 0) return cudaSuccess;
  if (p.head_dim % 2 != 0) return cudaErrorInvalidValue;
  // Enough blocks to fill any current GPU; larger inputs loop.
  const int64_t blocks = (pairs + kThreads - 1) / kThreads;
  const unsigned grid = unsigned(blocks < 65536 ? blocks : 65536);
  switch (p.dtype) {
    case DType::kFloat32: rope_kernel<DType::kFloat32><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kBFloat16: rope_kernel<DType::kBFloat16><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kFloat16: rope_kernel<DType::kFloat16><<<grid, kThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace llada
