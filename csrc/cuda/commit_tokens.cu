// CUDA kernel of commit_tokens: one thread block per row writes the accepted
// tokens and re-masks, counting the masks left in the row as it goes.
#include <cstdint>

#include "llada/kernels_cuda.h"

namespace llada {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) commit_tokens_kernel(CommitTokensParams p) {
  __shared__ int64_t warp_counts[kThreads / 32];
  const int64_t offset = int64_t(blockIdx.x) * p.length;
  int64_t remaining = 0;
  for (int64_t i = threadIdx.x; i < p.length; i += kThreads) {
    int64_t token = p.accepted[offset + i] ? p.x0[offset + i] : p.canvas[offset + i];
    if (p.remask != nullptr && p.remask[offset + i]) token = p.mask_id;
    p.canvas[offset + i] = token;
    remaining += token == p.mask_id ? 1 : 0;
  }
  for (int s = 16; s > 0; s >>= 1) remaining += __shfl_xor_sync(0xffffffffu, remaining, s);
  if ((threadIdx.x & 31) == 0) warp_counts[threadIdx.x >> 5] = remaining;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_counts[w];
    p.remaining[blockIdx.x] = total;
  }
}

}  // namespace

cudaError_t commit_tokens_cuda(const CommitTokensParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  commit_tokens_kernel<<<unsigned(p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace llada
