// Bidirectional (non-causal) attention: out = softmax(q k^T * scale) v per
// query head, with grouped-query heads (query head h reads kv head
// h / (q_heads / kv_heads)) and an optional key-padding mask. A query row
// whose keys are all masked gets a zero output.
//
// Layout: q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D] (what the projections
// produce), out [B, Lq, Hq, D] contiguous. The last dimension of q, k, v is
// contiguous; the other three have free strides (in elements), so a slice of
// a larger K/V cache needs no copy.
#pragma once

#include <cstdint>

#include "llada/common.h"

namespace llada {

struct AttentionParams {
  const void* q;  // element type `dtype` for q, k, v and out
  const void* k;
  const void* v;
  const bool* key_mask;  // [B, Lk] contiguous, true = attend; nullptr: all keys valid
  void* out;             // [B, Lq, Hq, D] contiguous
  int64_t q_strides[3];  // batch, position, head
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t batch;
  int64_t q_len;
  int64_t kv_len;
  int32_t q_heads;
  int32_t kv_heads;
  int32_t head_dim;
  float scale;
  DType dtype;
};

// How the Hopper CUDA kernel's blocks of 128 query rows (more than 64
// queries) pipeline their work items. The variants are there to be timed
// side by side (LLADA_ATTENTION_SM90_PIPELINE selects one by name); the
// plan takes kOneQuery.
enum class Sm90Pipeline {
  kOneQuery,        // one Q buffer: an item's Q loads once the last one's final Q K^T is done
  kTwoQueries,      // two Q buffers: the next item's Q loads while this one runs
  kTwoQueriesStoreO,  // two Q buffers, and O leaves through its item's Q buffer by a TMA store
  kThreeStages,     // one Q buffer and three K/V stages instead of two
  kTwoQueriesChain,   // two Q buffers; an item's last P V goes with the next one's first Q K^T
  kTwoQueriesChainStoreO,  // both of the above, and O out by a TMA store
  kOneQueryLean,    // kOneQuery with a leaner softmax (the scale folded into exp2's FMA, O rescaled
                    // only when a row's max moved)
  kTwoQueriesChainStoreOLean,  // kTwoQueriesChainStoreO with the leaner softmax
  kOneQueryOverlap,  // kOneQuery with each tile's softmax overlapped with the P V of the tile before
  kOneQueryLeanOverlap,  // kOneQueryOverlap with the leaner softmax
  kTwoQueriesStoreOOverlap,  // kTwoQueriesStoreO with the overlapped softmax
  kThreeStagesOverlap,  // kThreeStages with the overlapped softmax
};
struct Sm90PipelineName {
  const char* name;
  Sm90Pipeline pipeline;
};
inline constexpr Sm90PipelineName kSm90Pipelines[] = {
    {"one-q", Sm90Pipeline::kOneQuery},
    {"two-q", Sm90Pipeline::kTwoQueries},
    {"two-q-store-o", Sm90Pipeline::kTwoQueriesStoreO},
    {"three-stages", Sm90Pipeline::kThreeStages},
    {"two-q-chain", Sm90Pipeline::kTwoQueriesChain},
    {"two-q-chain-store-o", Sm90Pipeline::kTwoQueriesChainStoreO},
    {"one-q-lean", Sm90Pipeline::kOneQueryLean},
    {"two-q-chain-store-o-lean", Sm90Pipeline::kTwoQueriesChainStoreOLean},
    {"one-q-overlap", Sm90Pipeline::kOneQueryOverlap},
    {"one-q-lean-overlap", Sm90Pipeline::kOneQueryLeanOverlap},
    {"two-q-store-o-overlap", Sm90Pipeline::kTwoQueriesStoreOOverlap},
    {"three-stages-overlap", Sm90Pipeline::kThreeStagesOverlap},
};

// Head dimensions every implementation supports.
inline bool attention_head_dim_supported(int64_t d) { return d == 64 || d == 128; }

// The CPU twin works on tasks of (batch, query head, tile of query rows); it
// runs tasks [task_begin, task_end) so callers may split them across threads.
// Supports float32 and bfloat16 (computed in float32).
constexpr int64_t kAttentionCpuQueryTile = 256;
int64_t attention_cpu_num_tasks(const AttentionParams& p);
void attention_cpu(const AttentionParams& p, int64_t task_begin, int64_t task_end);

}  // namespace llada
