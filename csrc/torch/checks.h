// Argument checks shared by the CPU and CUDA glue. Each failure names the
// argument, what was expected and what was received.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <utility>

#include "llada/common.h"

namespace llada {

// Numbers in error messages are formatted here, not by stream insertion: with
// some toolchains a module's own copy of the numeric stream code crashes when
// it meets libtorch's streams.
inline std::string num(int64_t x) { return std::to_string(x); }
inline std::string num(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

// "[2, 10]": written out by hand to keep error paths free of stream overloads.
inline std::string format_sizes(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

inline std::string shape_of(const at::Tensor& t) { return format_sizes(t.sizes()); }

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, ": expected a ", num(dim), "-D tensor ", layout,
                    ", got shape ", shape_of(t));
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
                   t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected to be on the device of ",
                    ref_name, " (", ref.device(), "), got ", t.device());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, ": expected the shape of ", ref_name, " ",
                    shape_of(ref), ", got ", shape_of(t));
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name,
                    ": expected a contiguous tensor (call .contiguous() first), got strides ",
                    format_sizes(t.strides()));
}

// Whether the bytes two tensors reach, from their first element to their
// last, meet in one storage. get_overlap_status gives up (TooHard) on
// tensors that are not dense, such as a batch-sliced view; this coarser
// test then stands in, refusing some interleaved views that share no element.
inline bool spans_meet(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage() ||
      !a.storage().is_alias_of(b.storage()))
    return false;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;  // element offset of the last element; strides are never negative
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* begin = static_cast<const char*>(t.data_ptr());
    return std::make_pair(begin, begin + (last + 1) * int64_t(t.element_size()));
  };
  const auto [a_begin, a_end] = span(a);
  const auto [b_begin, b_end] = span(b);
  return a_begin < b_end && b_begin < a_end;
}

// Refuses an input that shares memory with a tensor the op writes: the
// kernels read and write in an order of their own, so the result would
// depend on it. ``same_elements_ok``: the op reads each element only where
// it writes that same element, so a full alias is harmless.
inline void check_no_overlap(const at::Tensor& written, const char* written_name, const at::Tensor& read,
                             const char* read_name, bool same_elements_ok = false) {
  const at::MemOverlapStatus status = at::get_overlap_status(written, read);
  TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Partial &&
                        (same_elements_ok || status != at::MemOverlapStatus::Full) &&
                        !(status == at::MemOverlapStatus::TooHard && spans_meet(written, read)),
                    read_name, ": shares memory with ", written_name, ", which the op writes; pass a copy (",
                    read_name, ".clone())");
}

// t itself when its last dimension is contiguous (kernels that take strides
// for the others read it where it lies), else a contiguous copy.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.dim() > 0 && t.stride(-1) == 1 ? t : t.contiguous();
}

// The element type of a floating-point input: float32, bfloat16, and float16
// where the implementation takes it (CUDA).
inline DType float_dtype(const at::Tensor& t, const char* name, bool allow_half) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf:
      if (allow_half) return DType::kFloat16;
      break;
    default: break;
  }
  TORCH_CHECK_TYPE(false, name, ": expected dtype ",
                   allow_half ? "float32, bfloat16 or float16" : "float32 or bfloat16 (on CPU)",
                   ", got ", t.scalar_type(), " on ", t.device());
  return DType::kFloat32;  // not reached
}

inline DType logits_dtype(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "logits: expected dtype float32, bfloat16 or float16, got ",
                       logits.scalar_type());
  }
}

// Each op's argument checks, run by its CPU and CUDA glue and by its check
// op (argument_checks.cpp); they throw on bad input. Those returning a DType
// give the element type. allow_half: whether float16 is taken (the CPU
// kernels have no float16).
void check_sample_tokens_args(const at::Tensor& logits, const at::Tensor& suppress_ids,
                              double temperature, const c10::optional<at::Tensor>& noise_rows);
void check_select_positions_args(const at::Tensor& confidence, const at::Tensor& k, int64_t rule,
                                 double threshold, double factor, int64_t k_all);
void check_commit_tokens_args(const at::Tensor& canvas, const at::Tensor& x0,
                              const at::Tensor& accepted, const c10::optional<at::Tensor>& remask);
// Also returns the softmax scale, as the kernels take it, in *scale_out.
DType check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const c10::optional<at::Tensor>& key_mask,
                           const c10::optional<double>& scale, bool allow_half, float* scale_out);
DType check_rms_norm_args(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                          const at::Tensor& weight, double eps, bool allow_half);
DType check_rope_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool allow_half,
                      const char* x_name = "x");
// Not the values of positions, which would need them on the host.
DType check_store_kv_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& positions,
                          bool allow_half);
DType check_silu_mul_args(const at::Tensor& gate, const at::Tensor& up, bool allow_half);

}  // namespace llada
