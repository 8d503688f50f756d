// The attention op: schema, argument checks (shared with the CUDA glue) and
// the CPU implementation.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "llada/attention.h"

namespace llada {

namespace {

void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.stride(3) == 1 || t.size(3) == 1, name,
                    ": expected a contiguous last (head) dimension, got strides ",
                    format_sizes(t.strides()), " (call .contiguous() first)");
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK_VALUE(t.stride(i) >= 0, name, ": expected non-negative strides, got ",
                      format_sizes(t.strides()));
}

}  // namespace

DType check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const c10::optional<at::Tensor>& key_mask,
                           const c10::optional<double>& scale, bool allow_half, float* scale_out) {
  check_dim(q, 4, "q", "[B, Lq, Hq, D]");
  check_dim(k, 4, "k", "[B, Lk, Hkv, D]");
  check_dim(v, 4, "v", "[B, Lk, Hkv, D]");
  const DType dtype = float_dtype(q, "q", allow_half);
  check_dtype(k, q.scalar_type(), "k");
  check_dtype(v, q.scalar_type(), "v");
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  const int64_t d = q.size(3);
  TORCH_CHECK_VALUE(attention_head_dim_supported(d), "q: expected head dim 64 or 128, got ",
                    num(d), " (shape ", shape_of(q), ")");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k: expected the batch size of q (", num(q.size(0)),
                    "), got shape ", shape_of(k));
  TORCH_CHECK_VALUE(k.size(3) == d, "k: expected the head dim of q (", num(d), "), got shape ",
                    shape_of(k));
  TORCH_CHECK_VALUE(k.size(2) >= 1 && q.size(2) % k.size(2) == 0,
                    "k: expected a number of kv heads that divides the query heads (",
                    num(q.size(2)), "), got shape ", shape_of(k));
  check_same_shape(v, k, "v", "k");
  TORCH_CHECK_VALUE(q.size(2) <= (int64_t(1) << 30) && q.size(1) < (int64_t(1) << 31),
                    "q: expected at most 2^30 heads and fewer than 2^31 queries, got shape ", shape_of(q));
  TORCH_CHECK_VALUE(k.size(1) < (int64_t(1) << 31), "k: expected fewer than 2^31 keys, got shape ",
                    shape_of(k));
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  if (key_mask.has_value()) {
    check_dim(*key_mask, 2, "key_mask", "[B, Lk]");
    check_dtype(*key_mask, at::kBool, "key_mask");
    check_same_device(*key_mask, q, "key_mask", "q");
    TORCH_CHECK_VALUE(key_mask->size(0) == k.size(0) && key_mask->size(1) == k.size(1),
                      "key_mask: expected shape [", num(k.size(0)), ", ", num(k.size(1)),
                      "] (batch and keys of k), got ", shape_of(*key_mask));
  }
  double s = 1.0 / std::sqrt(double(d));
  if (scale.has_value()) {
    // The kernels take it as a float32: a larger double would become inf.
    TORCH_CHECK_VALUE(std::isfinite(float(*scale)), "scale: expected a finite float32 number, got ",
                      num(*scale));
    s = *scale;
  }
  *scale_out = float(s);
  return dtype;
}

// Fills everything but the pointers' validity: the caller owns the tensors.
AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor* key_mask, at::Tensor& out, DType dtype,
                                      float scale) {
  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.key_mask = key_mask != nullptr ? key_mask->data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = q.stride(i);
    p.k_strides[i] = k.stride(i);
    p.v_strides[i] = v.stride(i);
  }
  p.batch = q.size(0);
  p.q_len = q.size(1);
  p.kv_len = k.size(1);
  p.q_heads = int32_t(q.size(2));
  p.kv_heads = int32_t(k.size(2));
  p.head_dim = int32_t(q.size(3));
  p.scale = scale;
  p.dtype = dtype;
  return p;
}

namespace {

at::Tensor attention_cpu_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& key_mask,
                            c10::optional<double> scale) {
  float s = 0;
  const DType dtype = check_attention_args(q, k, v, key_mask, scale, /*allow_half=*/false, &s);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  at::Tensor mask;
  if (key_mask.has_value()) mask = key_mask->contiguous();
  const AttentionParams p =
      make_attention_params(q, k, v, key_mask.has_value() ? &mask : nullptr, out, dtype, s);
  at::parallel_for(0, attention_cpu_num_tasks(p), 1,
                   [&](int64_t begin, int64_t end) { attention_cpu(p, begin, end); });
  return out;
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_FRAGMENT(llada, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask=None, float? scale=None)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(llada, CPU, m) { m.impl("attention", &llada::attention_cpu_op); }
