// Autograd for the ops that write their arguments in place: store_kv (the
// caches) and commit_tokens (the canvas). Neither has a backward, and torch
// takes no Python autograd formula for an op that mutates, so these C++
// kernels do the two things autograd needs of such an op:
// - Autograd: refuse float inputs that require grad, which would otherwise
//   be written into the caches with no history, their gradient silently lost;
// - ADInplaceOrView: bump the version counter of every tensor written, so a
//   tensor that autograd saved and an op then overwrote is caught at
//   backward (torch.gather saves its index, which may be the canvas).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>

namespace llada {
namespace {

c10::OperatorHandle op_named(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

using StoreKvSignature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               at::Tensor&, at::Tensor&, const at::Tensor&);

const c10::TypedOperatorHandle<StoreKvSignature>& store_kv_op() {
  static const auto op = op_named("llada::store_kv").typed<StoreKvSignature>();
  return op;
}

void refuse_gradient(const at::Tensor& t, const char* name) {
  TORCH_CHECK(!(c10::GradMode::is_enabled() && t.requires_grad()), name,
              ": requires grad, but llada::store_kv writes the caches in place and has no backward; call it "
              "under torch.no_grad() or torch.inference_mode(), or for a gradient compute rope(k) and "
              "index_copy_ it into the caches with torch ops");
}

void store_kv_autograd(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                       at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& positions) {
  refuse_gradient(k, "k");
  refuse_gradient(v, "v");
  refuse_gradient(cos, "cos");
  refuse_gradient(sin, "sin");
  refuse_gradient(cache_k, "cache_k");
  refuse_gradient(cache_v, "cache_v");
  at::AutoDispatchBelowAutograd below;
  store_kv_op().call(k, v, cos, sin, cache_k, cache_v, positions);
}

void store_kv_version(c10::DispatchKeySet keys, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache_k, at::Tensor& cache_v,
                      const at::Tensor& positions) {
  {
    at::AutoDispatchBelowADInplaceOrView below;
    store_kv_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, k, v, cos, sin, cache_k, cache_v, positions);
  }
  torch::autograd::impl::bump_version(cache_k);
  torch::autograd::impl::bump_version(cache_v);
}

at::Tensor commit_tokens_version(c10::DispatchKeySet keys, at::Tensor& canvas, const at::Tensor& x0,
                                 const at::Tensor& accepted, const std::optional<at::Tensor>& remask,
                                 int64_t mask_id) {
  static const auto op = op_named("llada::commit_tokens")
      .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        int64_t)>();
  at::Tensor remaining;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    remaining = op.redispatch(keys & c10::after_ADInplaceOrView_keyset, canvas, x0, accepted, remask, mask_id);
  }
  torch::autograd::impl::bump_version(canvas);
  return remaining;
}

}  // namespace
}  // namespace llada

// commit_tokens writes only integer tensors, which cannot require grad, so
// it needs no Autograd kernel.
TORCH_LIBRARY_IMPL(llada, Autograd, m) {
  m.impl("store_kv", &llada::store_kv_autograd);
}

TORCH_LIBRARY_IMPL(llada, ADInplaceOrView, m) {
  m.impl("store_kv", &llada::store_kv_version);
  m.impl("commit_tokens", &llada::commit_tokens_version);
}
