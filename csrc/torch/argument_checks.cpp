// Each op's argument checks as an op of its own, registered for every
// device. Where no kernel runs (a GPU this build has no code for, or a build
// made without nvcc), llada.ops runs a torch reference in the op's place; it
// calls these first, so bad input is refused there exactly as the kernels
// refuse it.
#include <torch/library.h>

#include "checks.h"

namespace llada {
namespace {

// The CPU kernels have no float16; a reference on a GPU computes it.
bool half_allowed(const at::Tensor& t) { return !t.is_cpu(); }

void check_sample_tokens(const at::Tensor& logits, const at::Tensor& suppress_ids, double temperature,
                         const c10::optional<at::Tensor>& noise_rows) {
  check_sample_tokens_args(logits, suppress_ids, temperature, noise_rows);
}

void check_select_positions(const at::Tensor& confidence, const at::Tensor& k, int64_t rule, double threshold,
                            double factor, int64_t k_all) {
  check_select_positions_args(confidence, k, rule, threshold, factor, k_all);
}

void check_commit_tokens(const at::Tensor& canvas, const at::Tensor& x0, const at::Tensor& accepted,
                         const c10::optional<at::Tensor>& remask) {
  check_commit_tokens_args(canvas, x0, accepted, remask);
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& key_mask, c10::optional<double> scale) {
  float unused = 0;
  check_attention_args(q, k, v, key_mask, scale, half_allowed(q), &unused);
}

void check_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                    double eps) {
  check_rms_norm_args(x, residual, weight, eps, half_allowed(x));
}

void check_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rope_args(x, cos, sin, half_allowed(x));
}

void check_store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                    const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& positions) {
  check_store_kv_args(k, v, cos, sin, cache_k, cache_v, positions, half_allowed(k));
}

void check_silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_silu_mul_args(gate, up, half_allowed(gate));
}

// Each check as its op's kernel.
void register_checks(torch::Library& m) {
  m.impl("check_sample_tokens", &check_sample_tokens);
  m.impl("check_select_positions", &check_select_positions);
  m.impl("check_commit_tokens", &check_commit_tokens);
  m.impl("check_attention", &check_attention);
  m.impl("check_rms_norm", &check_rms_norm);
  m.impl("check_rope", &check_rope);
  m.impl("check_store_kv", &check_store_kv);
  m.impl("check_silu_mul", &check_silu_mul);
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_FRAGMENT(llada, m) {
  m.def("check_sample_tokens(Tensor logits, Tensor suppress_ids, float temperature, Tensor? noise_rows) -> ()");
  m.def("check_select_positions(Tensor confidence, Tensor k, int rule, float threshold, float factor,"
        " int k_all) -> ()");
  m.def("check_commit_tokens(Tensor canvas, Tensor x0, Tensor accepted, Tensor? remask) -> ()");
  m.def("check_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, float? scale) -> ()");
  m.def("check_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> ()");
  m.def("check_rope(Tensor x, Tensor cos, Tensor sin) -> ()");
  m.def("check_store_kv(Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor cache_k, Tensor cache_v,"
        " Tensor positions) -> ()");
  m.def("check_silu_mul(Tensor gate, Tensor up) -> ()");
}

// For the CPU (where the tests compare them with the kernels' errors) and
// for CUDA devices, with or without CUDA kernels in the build: the checks
// read only shapes, dtypes, devices and strides (and select_positions'
// per-row k, which fake tensors have not: their fake kernels, which check
// nothing, are in llada/ops.py).
TORCH_LIBRARY_IMPL(llada, CPU, m) { llada::register_checks(m); }
TORCH_LIBRARY_IMPL(llada, CUDA, m) { llada::register_checks(m); }
