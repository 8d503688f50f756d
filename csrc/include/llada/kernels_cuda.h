// Launchers of the CUDA kernels. Every pointer in the params is device memory
// (the suppress list of sample_tokens too). Each returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include "llada/commit_tokens.h"
#include "llada/sample_tokens.h"
#include "llada/select_positions.h"

namespace llada {

cudaError_t sample_tokens_cuda(const SampleTokensParams& p, cudaStream_t stream);

// Rows up to this length are ranked in shared memory.
constexpr int64_t kSelectMaxLength = 16384;
cudaError_t select_positions_cuda(const SelectPositionsParams& p, cudaStream_t stream);

cudaError_t commit_tokens_cuda(const CommitTokensParams& p, cudaStream_t stream);

}  // namespace llada
