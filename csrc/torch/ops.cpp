// Op schemas, argument checks and the CPU implementations of the llada ops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "llada/commit_tokens.h"
#include "llada/sample_tokens.h"
#include "llada/select_positions.h"

namespace llada {

// The CUDA kernel keeps the suppressed ids in shared memory.
constexpr int64_t kMaxSuppressIds = 64;

void check_sample_tokens_args(const at::Tensor& logits, const at::Tensor& suppress_ids,
                              double temperature, const c10::optional<at::Tensor>& noise_rows) {
  check_dim(logits, 2, "logits", "[N, V]");
  logits_dtype(logits);
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "logits: expected at least one column, got shape ",
                    shape_of(logits));
  TORCH_CHECK_VALUE(logits.size(1) < (int64_t(1) << 31), "logits: expected fewer than 2^31 columns, got ",
                    num(logits.size(1)));
  TORCH_CHECK_VALUE(logits.stride(1) == 1 || logits.size(1) == 1,
                    "logits: expected contiguous columns (stride 1 in the last dimension), got strides ",
                    format_sizes(logits.strides()));
  TORCH_CHECK_VALUE(logits.stride(0) >= 0, "logits: expected a non-negative row stride");
  check_dim(suppress_ids, 1, "suppress_ids", "[S]");
  check_dtype(suppress_ids, at::kLong, "suppress_ids");
  check_same_device(suppress_ids, logits, "suppress_ids", "logits");
  TORCH_CHECK_VALUE(suppress_ids.numel() <= kMaxSuppressIds, "suppress_ids: expected at most ",
                    num(kMaxSuppressIds), " ids, got ", num(suppress_ids.numel()));
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0,
                    "temperature: expected a finite value >= 0, got ", num(temperature));
  if (noise_rows.has_value()) {
    check_dim(*noise_rows, 1, "noise_rows", "[N]");
    check_dtype(*noise_rows, at::kLong, "noise_rows");
    check_same_device(*noise_rows, logits, "noise_rows", "logits");
    TORCH_CHECK_VALUE(noise_rows->size(0) == logits.size(0), "noise_rows: expected one key per row of logits (",
                      num(logits.size(0)), "), got ", num(noise_rows->size(0)));
  }
}

void check_select_positions_args(const at::Tensor& confidence, const at::Tensor& k, int64_t rule,
                                 double threshold, double factor, int64_t k_all) {
  check_dim(confidence, 2, "confidence", "[B, L]");
  check_dtype(confidence, at::kFloat, "confidence");
  check_contiguous(confidence, "confidence");
  TORCH_CHECK_VALUE(confidence.size(1) < (int64_t(1) << 31),
                    "confidence: expected fewer than 2^31 positions per row, got ", num(confidence.size(1)));
  TORCH_CHECK_VALUE(rule >= 0 && rule <= 2, "rule: expected 0 (topk), 1 (threshold) or 2 (factor), got ",
                    num(rule));
  if (rule == int64_t(SelectionRule::kTopK) && k_all != -1) {
    // One k for every row, checked here without reading device memory.
    TORCH_CHECK_VALUE(k_all >= 0, "k: expected values >= 0, got ", num(k_all));
    TORCH_CHECK_VALUE(k.numel() == 0, "k: expected an empty tensor with k_all, got ", num(k.numel()),
                      " values");
  } else if (rule == int64_t(SelectionRule::kTopK)) {
    check_dim(k, 1, "k", "[B]");
    check_dtype(k, at::kLong, "k");
    check_same_device(k, confidence, "k", "confidence");
    TORCH_CHECK_VALUE(k.size(0) == confidence.size(0), "k: expected one value per row of confidence (",
                      num(confidence.size(0)), "), got ", num(k.size(0)));
    if (k.numel() > 0) {
      const int64_t smallest = k.min().item<int64_t>();
      TORCH_CHECK_VALUE(smallest >= 0, "k: expected values >= 0, got ", num(smallest));
    }
  }
  TORCH_CHECK_VALUE(!std::isnan(threshold), "threshold: expected a number, got nan");
  TORCH_CHECK_VALUE(std::isfinite(factor) && factor > 0, "factor: expected a finite value > 0, got ",
                    num(factor));
}

void check_commit_tokens_args(const at::Tensor& canvas, const at::Tensor& x0,
                              const at::Tensor& accepted, const c10::optional<at::Tensor>& remask) {
  check_dim(canvas, 2, "canvas", "[B, L]");
  check_dtype(canvas, at::kLong, "canvas");
  check_contiguous(canvas, "canvas");
  check_same_shape(x0, canvas, "x0", "canvas");
  check_dtype(x0, at::kLong, "x0");
  check_contiguous(x0, "x0");
  check_same_device(x0, canvas, "x0", "canvas");
  check_same_shape(accepted, canvas, "accepted", "canvas");
  check_dtype(accepted, at::kBool, "accepted");
  check_contiguous(accepted, "accepted");
  check_same_device(accepted, canvas, "accepted", "canvas");
  if (remask.has_value()) {
    check_same_shape(*remask, canvas, "remask", "canvas");
    check_dtype(*remask, at::kBool, "remask");
    check_contiguous(*remask, "remask");
    check_same_device(*remask, canvas, "remask", "canvas");
    check_no_overlap(canvas, "canvas", *remask, "remask");
  }
  // Each position reads its own x0 element before writing its canvas element.
  check_no_overlap(canvas, "canvas", x0, "x0", /*same_elements_ok=*/true);
  check_no_overlap(canvas, "canvas", accepted, "accepted");
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_tokens_cpu_op(
    const at::Tensor& logits, const at::Tensor& suppress_ids, double temperature, int64_t seed,
    const c10::optional<at::Tensor>& noise_rows) {
  check_sample_tokens_args(logits, suppress_ids, temperature, noise_rows);
  const at::Tensor keys = noise_rows.has_value() ? noise_rows->contiguous() : at::Tensor();
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  // Ids outside [0, V) match no column; the CPU twin wants only real ones.
  at::Tensor ids = suppress_ids.masked_select((suppress_ids >= 0) & (suppress_ids < vocab)).contiguous();
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor confidence = at::empty({rows}, f32), margin = at::empty({rows}, f32),
             entropy = at::empty({rows}, f32);
  SampleTokensParams p{logits.data_ptr(), logits.stride(0), rows, vocab, logits_dtype(logits),
                       ids.data_ptr<int64_t>(), int32_t(ids.numel()), float(temperature),
                       uint64_t(seed), tokens.data_ptr<int64_t>(), confidence.data_ptr<float>(),
                       margin.data_ptr<float>(), entropy.data_ptr<float>(),
                       keys.defined() ? keys.data_ptr<int64_t>() : nullptr};
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { sample_tokens_cpu(p, begin, end); });
  return {tokens, confidence, margin, entropy};
}

at::Tensor select_positions_cpu_op(const at::Tensor& confidence, const at::Tensor& k, int64_t rule,
                                   double threshold, double factor, int64_t k_all) {
  check_select_positions_args(confidence, k, rule, threshold, factor, k_all);
  at::Tensor accepted = at::empty(confidence.sizes(), confidence.options().dtype(at::kBool));
  const at::Tensor k_dense = k.contiguous();  // k is often a column of a schedule
  const bool per_row = rule == int64_t(SelectionRule::kTopK) && k_all == -1;
  SelectPositionsParams p{confidence.data_ptr<float>(), confidence.size(0), confidence.size(1),
                          SelectionRule(rule), per_row ? k_dense.data_ptr<int64_t>() : nullptr,
                          k_all, float(threshold), float(factor), accepted.data_ptr<bool>()};
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) { select_positions_cpu(p, begin, end); });
  return accepted;
}

at::Tensor commit_tokens_cpu_op(at::Tensor& canvas, const at::Tensor& x0, const at::Tensor& accepted,
                                const c10::optional<at::Tensor>& remask, int64_t mask_id) {
  check_commit_tokens_args(canvas, x0, accepted, remask);
  at::Tensor remaining = at::empty({canvas.size(0)}, canvas.options());
  CommitTokensParams p{canvas.data_ptr<int64_t>(), x0.data_ptr<int64_t>(), accepted.data_ptr<bool>(),
                       remask.has_value() ? remask->data_ptr<bool>() : nullptr, canvas.size(0),
                       canvas.size(1), mask_id, remaining.data_ptr<int64_t>()};
  at::parallel_for(0, p.rows, 16, [&](int64_t begin, int64_t end) { commit_tokens_cpu(p, begin, end); });
  return remaining;
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY(llada, m) {
  m.def("sample_tokens(Tensor logits, Tensor suppress_ids, float temperature, int seed,"
        " Tensor? noise_rows=None) -> (Tensor tokens, Tensor confidence, Tensor margin, Tensor entropy)");
  m.def("select_positions(Tensor confidence, Tensor k, int rule, float threshold, float factor,"
        " int k_all=-1) -> Tensor");
  m.def("commit_tokens(Tensor(a!) canvas, Tensor x0, Tensor accepted, Tensor? remask, int mask_id)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(llada, CPU, m) {
  m.impl("sample_tokens", &llada::sample_tokens_cpu_op);
  m.impl("select_positions", &llada::select_positions_cpu_op);
  m.impl("commit_tokens", &llada::commit_tokens_cpu_op);
}
