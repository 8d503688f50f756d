// CUDA implementation of the attention op: checks, device guard, workspace,
// stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "checks.h"
#include "llada/kernels_cuda.h"

namespace llada {

// Defined in attention.cpp.
AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor* key_mask, at::Tensor& out, DType dtype,
                                      float scale);

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "llada.attention: ", what, " failed: ", cudaGetErrorString(err));
}

// The tensor-core kernel copies 16-byte chunks, so rows must start on
// 16-byte boundaries; anything else (rare: odd views) is copied first.
at::Tensor aligned_for_copy(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) ok = ok && (t.stride(i) % 8 == 0 || t.size(i) == 1);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// LLADA_ATTENTION_SM90 chooses when the Hopper kernel may run: unset or "1"
// where it measured faster (many long query tiles, or few queries over many
// keys), "0" never, "always" wherever it can (for testing).
Sm90Use sm90_use() {
  const char* value = std::getenv("LLADA_ATTENTION_SM90");
  if (value == nullptr || std::strcmp(value, "") == 0 || std::strcmp(value, "1") == 0) return Sm90Use::kWhereFaster;
  if (std::strcmp(value, "0") == 0) return Sm90Use::kNever;
  if (std::strcmp(value, "always") == 0) return Sm90Use::kAlways;
  TORCH_CHECK(false, "llada.attention: LLADA_ATTENTION_SM90 must be unset, 0, 1 or always; got '", value, "'");
}

// LLADA_ATTENTION_SM90_PIPELINE picks the Hopper kernel's pipeline for more
// than 64 queries by name (kSm90Pipelines), for benchmarks that compare
// them; unset, the plan's. Returns nullptr when it is unset.
const Sm90Pipeline* sm90_pipeline() {
  const char* value = std::getenv("LLADA_ATTENTION_SM90_PIPELINE");
  if (value == nullptr || std::strcmp(value, "") == 0) return nullptr;
  std::string names;
  for (const Sm90PipelineName& named : kSm90Pipelines) {
    if (std::strcmp(value, named.name) == 0) return &named.pipeline;
    names += names.empty() ? named.name : std::string(", ") + named.name;
  }
  TORCH_CHECK(false, "llada.attention: LLADA_ATTENTION_SM90_PIPELINE must be unset or one of ", names, "; got '",
              value, "'");
}

at::Tensor attention_cuda_op(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                             const c10::optional<at::Tensor>& key_mask,
                             c10::optional<double> scale) {
  float s = 0;
  const DType dtype =
      check_attention_args(q_in, k_in, v_in, key_mask, scale, /*allow_half=*/true, &s);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out =
      at::empty(q_in.sizes(), q_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const bool tensor_cores = dtype != DType::kFloat32;
  at::Tensor q = tensor_cores ? aligned_for_copy(q_in) : q_in;
  at::Tensor k = tensor_cores ? aligned_for_copy(k_in) : k_in;
  at::Tensor v = tensor_cores ? aligned_for_copy(v_in) : v_in;
  at::Tensor mask;
  if (key_mask.has_value()) mask = key_mask->contiguous();
  const AttentionParams p =
      make_attention_params(q, k, v, key_mask.has_value() ? &mask : nullptr, out, dtype, s);
  AttentionCudaPlan plan;
  const Sm90Pipeline* pipeline = sm90_pipeline();
  check_cuda(attention_cuda_plan(p, &plan, sm90_use()), "planning");
  if (pipeline != nullptr) plan.sm90_pipeline = *pipeline;
  at::Tensor workspace;
  if (plan.workspace_bytes > 0)
    workspace = at::empty({int64_t(plan.workspace_bytes)}, q.options().dtype(at::kByte));
  check_cuda(attention_cuda(p, plan, plan.workspace_bytes > 0 ? workspace.data_ptr() : nullptr,
                            c10::cuda::getCurrentCUDAStream()),
             "launch");
  return out;
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_IMPL(llada, CUDA, m) { m.impl("attention", &llada::attention_cuda_op); }
