// CUDA kernel of select_positions: one thread block per row. The row's packed
// (confidence, position) keys are sorted in shared memory with a bitonic
// network, the rule picks the length of the accepted prefix, and every
// position of the row is written.
#include <cstdint>

#include "llada/kernels_cuda.h"

namespace llada {
namespace {

constexpr int kMaxThreads = 1024;

__global__ void select_positions_kernel(SelectPositionsParams p, int32_t padded) {
  extern __shared__ uint64_t keys[];
  __shared__ int32_t candidates, take;
  const int64_t row = blockIdx.x;
  const int32_t length = int32_t(p.length);
  const float* c = p.confidence + row * p.length;
  if (threadIdx.x == 0) {
    candidates = 0;
    take = 0;
  }
  __syncthreads();

  int32_t local_candidates = 0;
  for (int32_t i = threadIdx.x; i < padded; i += blockDim.x) {
    if (i < length) {
      float ci = c[i];
      keys[i] = ranking_key(ci, i);
      local_candidates += is_candidate(ci) ? 1 : 0;
    } else {
      keys[i] = ~uint64_t(0);
    }
  }
  atomicAdd(&candidates, local_candidates);
  __syncthreads();

  for (int32_t size = 2; size <= padded; size <<= 1) {
    for (int32_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (int32_t i = threadIdx.x; i < padded; i += blockDim.x) {
        int32_t partner = i ^ stride;
        if (partner > i) {
          uint64_t a = keys[i], b = keys[partner];
          bool ascending = (i & size) == 0;
          if ((a > b) == ascending) {
            keys[i] = b;
            keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }

  const int32_t n = candidates;
  if (p.rule == SelectionRule::kTopK) {
    const int64_t k = p.k != nullptr ? p.k[row] : p.k_all;
    if (threadIdx.x == 0) take = int32_t(k < n ? k : n);
  } else {
    int32_t local_take = 0;
    for (int32_t j = threadIdx.x; j < n; j += blockDim.x) {
      float cj = c[keys[j] & 0xffffffffu];
      if (passes_rule(p.rule, cj, j, p.threshold, p.factor)) local_take = j + 1;
    }
    atomicMax(&take, n > 0 ? max(local_take, 1) : 0);
  }
  __syncthreads();

  bool* accepted = p.accepted + row * p.length;
  for (int32_t j = threadIdx.x; j < length; j += blockDim.x)
    accepted[keys[j] & 0xffffffffu] = j < take;
}

}  // namespace

cudaError_t select_positions_cuda(const SelectPositionsParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.length == 0) return cudaSuccess;
  if (p.length > kSelectMaxLength) return cudaErrorInvalidValue;
  int32_t padded = 1;
  while (padded < p.length) padded <<= 1;
  const size_t shared = size_t(padded) * sizeof(uint64_t);
  if (shared > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(
        select_positions_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
    if (err != cudaSuccess) return err;
  }
  const int threads = padded / 2 < 32 ? 32 : (padded / 2 > kMaxThreads ? kMaxThreads : padded / 2);
  select_positions_kernel<<<unsigned(p.rows), threads, shared, stream>>>(p, padded);
  return cudaGetLastError();
}

}  // namespace llada
