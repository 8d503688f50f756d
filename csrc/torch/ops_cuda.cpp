// CUDA implementations of the llada ops: checks, device guard, stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "llada/kernels_cuda.h"

namespace llada {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "llada.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// The kernels give each row a block of their grid, whose x dimension holds
// at most 2^31 - 1.
void check_grid_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(0) <= int64_t(0x7fffffff), name, ": expected at most 2^31 - 1 rows on CUDA, got ",
                    num(t.size(0)));
}

// The longest row select_positions sorts in one block's shared memory on the
// current device: 8 bytes per position, the row padded to a power of two.
int64_t select_max_length_here() {
  int device = 0, optin = 0;
  check_launch(cudaGetDevice(&device), "select_positions");
  check_launch(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "select_positions");
  int64_t length = 1;
  while (length * 2 <= kSelectMaxLength && length * 2 * int64_t(sizeof(uint64_t)) <= optin) length *= 2;
  return length;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_tokens_cuda_op(
    const at::Tensor& logits, const at::Tensor& suppress_ids, double temperature, int64_t seed,
    const c10::optional<at::Tensor>& noise_rows) {
  check_sample_tokens_args(logits, suppress_ids, temperature, noise_rows);
  check_grid_rows(logits, "logits");
  const at::Tensor keys = noise_rows.has_value() ? noise_rows->contiguous() : at::Tensor();
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor ids = suppress_ids.contiguous();
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor confidence = at::empty({rows}, f32), margin = at::empty({rows}, f32),
             entropy = at::empty({rows}, f32);
  SampleTokensParams p{logits.data_ptr(), logits.stride(0), rows, vocab, logits_dtype(logits),
                       ids.data_ptr<int64_t>(), int32_t(ids.numel()), float(temperature),
                       uint64_t(seed), tokens.data_ptr<int64_t>(), confidence.data_ptr<float>(),
                       margin.data_ptr<float>(), entropy.data_ptr<float>(),
                       keys.defined() ? keys.data_ptr<int64_t>() : nullptr};
  check_launch(sample_tokens_cuda(p, c10::cuda::getCurrentCUDAStream()), "sample_tokens");
  return {tokens, confidence, margin, entropy};
}

at::Tensor select_positions_cuda_op(const at::Tensor& confidence, const at::Tensor& k, int64_t rule,
                                    double threshold, double factor, int64_t k_all) {
  check_select_positions_args(confidence, k, rule, threshold, factor, k_all);
  check_grid_rows(confidence, "confidence");
  const c10::cuda::CUDAGuard guard(confidence.device());
  const int64_t max_length = select_max_length_here();
  TORCH_CHECK_VALUE(confidence.size(1) <= max_length, "confidence: expected at most ", num(max_length),
                    " positions per row on this GPU, got ", num(confidence.size(1)));
  at::Tensor accepted = at::empty(confidence.sizes(), confidence.options().dtype(at::kBool));
  const at::Tensor k_dense = k.contiguous();  // k is often a column of a schedule
  const bool per_row = rule == int64_t(SelectionRule::kTopK) && k_all == -1;
  SelectPositionsParams p{confidence.data_ptr<float>(), confidence.size(0), confidence.size(1),
                          SelectionRule(rule), per_row ? k_dense.data_ptr<int64_t>() : nullptr,
                          k_all, float(threshold), float(factor), accepted.data_ptr<bool>()};
  check_launch(select_positions_cuda(p, c10::cuda::getCurrentCUDAStream()), "select_positions");
  return accepted;
}

at::Tensor commit_tokens_cuda_op(at::Tensor& canvas, const at::Tensor& x0, const at::Tensor& accepted,
                                 const c10::optional<at::Tensor>& remask, int64_t mask_id) {
  check_commit_tokens_args(canvas, x0, accepted, remask);
  check_grid_rows(canvas, "canvas");
  const c10::cuda::CUDAGuard guard(canvas.device());
  at::Tensor remaining = at::empty({canvas.size(0)}, canvas.options());
  CommitTokensParams p{canvas.data_ptr<int64_t>(), x0.data_ptr<int64_t>(), accepted.data_ptr<bool>(),
                       remask.has_value() ? remask->data_ptr<bool>() : nullptr, canvas.size(0),
                       canvas.size(1), mask_id, remaining.data_ptr<int64_t>()};
  check_launch(commit_tokens_cuda(p, c10::cuda::getCurrentCUDAStream()), "commit_tokens");
  return remaining;
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_IMPL(llada, CUDA, m) {
  m.impl("sample_tokens", &llada::sample_tokens_cuda_op);
  m.impl("select_positions", &llada::select_positions_cuda_op);
  m.impl("commit_tokens", &llada::commit_tokens_cuda_op);
}
