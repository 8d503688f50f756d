// Launchers of the CUDA kernels. Every pointer in the params is device memory
// (the suppress list of sample_tokens too). Each returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include "llada/attention.h"
#include "llada/commit_tokens.h"
#include "llada/rms_norm.h"
#include "llada/rope.h"
#include "llada/sample_tokens.h"
#include "llada/select_positions.h"
#include "llada/silu_mul.h"

namespace llada {

cudaError_t sample_tokens_cuda(const SampleTokensParams& p, cudaStream_t stream);
// The same kernel without prefetching a thread's next loads (benchmark only).
cudaError_t sample_tokens_cuda_without_prefetch(const SampleTokensParams& p, cudaStream_t stream);

// Rows up to this length are ranked in shared memory.
constexpr int64_t kSelectMaxLength = 16384;
cudaError_t select_positions_cuda(const SelectPositionsParams& p, cudaStream_t stream);

cudaError_t commit_tokens_cuda(const CommitTokensParams& p, cudaStream_t stream);

cudaError_t rms_norm_cuda(const RmsNormParams& p, cudaStream_t stream);

cudaError_t rope_cuda(const RopeParams& p, cudaStream_t stream);

cudaError_t silu_mul_cuda(const SiluMulParams& p, cudaStream_t stream);

// Attention. bf16/fp16 run a tensor-core kernel with 16 or 32 query rows per
// warp that may split the keys into chunks (partial results in `workspace`,
// combined by a second kernel) when there are too few query tiles to fill the
// device; float32 runs a simple kernel (for testing) and needs no workspace.
// On Hopper (compute capability 9.0, when built for sm_90a) a third kernel
// on warpgroup MMAs and TMA (attention_sm90.cu) serves bf16/fp16 with head
// dim 128; `sm90` says when the plan may choose it.
// attention_cuda_plan picks the kernel, rows per warp and the split count for
// the current device; the caller allocates plan.workspace_bytes of device
// memory (none when 0) and passes both on.
// bf16/fp16 need q, k, v 16-byte aligned with strides multiple of 8 elements.
// (Sm90Pipeline: see attention.h.)
struct AttentionCudaPlan {
  int num_splits = 1;
  int rows_per_warp = 16;  // 16 or 32
  bool sm90 = false;       // the Hopper kernel (its own key tiles for the splits)
  bool sm90_persistent = true;  // its blocks loop over tiles (else one block per tile)
  Sm90Pipeline sm90_pipeline = Sm90Pipeline::kOneQuery;
  size_t workspace_bytes = 0;
};
enum class Sm90Use {
  kNever,
  kWhereFaster,  // where it measured faster: many queries, or few queries over many keys
  kAlways,       // wherever it can run (for testing)
};
cudaError_t attention_cuda_plan(const AttentionParams& p, AttentionCudaPlan* plan,
                                Sm90Use sm90 = Sm90Use::kNever);
size_t attention_cuda_workspace_bytes(const AttentionParams& p, int num_splits);
cudaError_t attention_cuda(const AttentionParams& p, const AttentionCudaPlan& plan, void* workspace,
                           cudaStream_t stream);

// The Hopper kernel itself (stubs that decline everything when the build
// has no sm_90a): whether it takes p (dtype, head dim, alignment, sizes; not
// the device), its key tile, and the
// launch, with the keys split into num_splits chunks of whole tiles (the
// plan's count; partial results in `workspace`, which attention_cuda then
// combines), persistent (a block per multiprocessor, each looping over its
// tiles, so that one tile's loads overlap another's output) or a block per
// tile, and `pipeline` for more than 64 queries.
bool attention_sm90_supports(const AttentionParams& p);
int attention_sm90_key_tile();
cudaError_t attention_sm90_cuda(const AttentionParams& p, int num_splits, bool persistent, Sm90Pipeline pipeline,
                                void* workspace, cudaStream_t stream);

}  // namespace llada
