// The rope and store_kv ops: schemas, argument checks (shared with the CUDA
// glue: rope_call.h) and the CPU implementations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "rope_call.h"

namespace llada {

// x_name: "k" when store_kv checks its keys.
DType check_rope_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool allow_half,
                      const char* x_name) {
  check_dim(x, 4, x_name, "[B, L, H, D]");
  const DType dtype = float_dtype(x, x_name, allow_half);
  TORCH_CHECK_VALUE(x.size(3) % 2 == 0, x_name, ": expected an even head dim, got shape ", shape_of(x));
  check_dim(cos, 3, "cos", "[B or 1, L, D]");
  check_dtype(cos, at::kFloat, "cos");
  check_same_device(cos, x, "cos", x_name);
  TORCH_CHECK_VALUE((cos.size(0) == x.size(0) || cos.size(0) == 1) && cos.size(1) == x.size(1) &&
                        cos.size(2) == x.size(3),
                    "cos: expected shape [", x.size(0) == 1 ? std::string("1") : num(x.size(0)) + " or 1", ", ",
                    num(x.size(1)), ", ", num(x.size(3)),
                    "] for ", x_name, " of shape ", shape_of(x), ", got ", shape_of(cos));
  check_dim(sin, 3, "sin", "[B or 1, L, D]");
  check_dtype(sin, at::kFloat, "sin");
  check_same_device(sin, x, "sin", x_name);
  check_same_shape(sin, cos, "sin", "cos");
  return dtype;
}

namespace {

// The parameters of rotating x into out ([B, L, H, D] contiguous).
RopeCall rope_call(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, DType dtype) {
  RopeCall c;
  c.x = last_dim_contiguous(x_in);
  c.cos = cos_in.contiguous();
  c.sin = sin_in.contiguous();
  RopeParams& p = c.params;
  p.x = c.x.data_ptr();
  p.cos = c.cos.data_ptr<float>();
  p.sin = c.sin.data_ptr<float>();
  p.batch = c.x.size(0);
  p.length = c.x.size(1);
  p.heads = c.x.size(2);
  p.head_dim = c.x.size(3);
  p.tables_per_row = c.cos.size(0) == c.x.size(0) && c.x.size(0) > 1;
  p.x_stride_batch = c.x.stride(0);
  p.x_stride_position = c.x.stride(1);
  p.x_stride_head = c.x.stride(2);
  p.dtype = dtype;
  return c;
}

void check_cache(const at::Tensor& cache, const at::Tensor& k, const char* name) {
  check_dim(cache, 4, name, "[B, T, H, D]");
  check_dtype(cache, k.scalar_type(), name);
  check_same_device(cache, k, name, "k");
  TORCH_CHECK_VALUE(cache.size(0) == k.size(0) && cache.size(2) == k.size(2) && cache.size(3) == k.size(3), name,
                    ": expected shape [", num(k.size(0)), ", T, ", num(k.size(2)), ", ", num(k.size(3)),
                    "] for k of shape ", shape_of(k), ", got ", shape_of(cache));
  check_contiguous(cache, name);
}

}  // namespace

DType check_store_kv_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& positions,
                          bool allow_half) {
  const DType dtype = check_rope_args(k, cos, sin, allow_half, "k");
  check_dtype(v, k.scalar_type(), "v");
  check_same_device(v, k, "v", "k");
  check_same_shape(v, k, "v", "k");
  check_cache(cache_k, k, "cache_k");
  check_cache(cache_v, k, "cache_v");
  check_same_shape(cache_v, cache_k, "cache_v", "cache_k");
  TORCH_CHECK_VALUE(!cache_v.is_same(cache_k), "cache_v: must be another tensor than cache_k");
  check_no_overlap(cache_k, "cache_k", cache_v, "cache_v");
  for (const at::Tensor* cache : {&cache_k, &cache_v}) {
    const char* name = cache == &cache_k ? "cache_k" : "cache_v";
    check_no_overlap(*cache, name, k, "k");
    check_no_overlap(*cache, name, v, "v");
    check_no_overlap(*cache, name, cos, "cos");
    check_no_overlap(*cache, name, sin, "sin");
  }
  check_dim(positions, 1, "positions", "[L]");
  check_dtype(positions, at::kLong, "positions");
  check_same_device(positions, k, "positions", "k");
  TORCH_CHECK_VALUE(positions.size(0) == k.size(1), "positions: expected ", num(k.size(1)),
                    " entries (one per position of k, shape ", shape_of(k), "), got ", num(positions.size(0)));
  return dtype;
}

RopeCall prepare_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool allow_half) {
  RopeCall c = rope_call(x, cos, sin, check_rope_args(x, cos, sin, allow_half));
  c.out = at::empty(c.x.sizes(), c.x.options());
  c.params.out = c.out.data_ptr();
  return c;
}

RopeCall prepare_store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& positions,
                          bool allow_half) {
  const DType dtype = check_store_kv_args(k, v, cos, sin, cache_k, cache_v, positions, allow_half);
  RopeCall c = rope_call(k, cos, sin, dtype);
  c.out = cache_k;
  c.copy_x = last_dim_contiguous(v);
  c.positions = positions.contiguous();
  RopeParams& p = c.params;
  p.out = cache_k.data_ptr();
  p.out_positions = c.positions.data_ptr<int64_t>();
  p.out_length = cache_k.size(1);
  p.copy_x = c.copy_x.data_ptr();
  p.copy_out = cache_v.data_ptr();
  p.copy_stride_batch = c.copy_x.stride(0);
  p.copy_stride_position = c.copy_x.stride(1);
  p.copy_stride_head = c.copy_x.stride(2);
  return c;
}

namespace {

void run_cpu(const RopeCall& c) {
  const RopeParams& p = c.params;
  if (p.batch * p.length * p.heads * p.head_dim == 0) return;
  const int64_t per_position = p.heads * p.head_dim;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(per_position, 1));
  at::parallel_for(0, p.batch * p.length, grain, [&](int64_t begin, int64_t end) { rope_cpu(p, begin, end); });
}

at::Tensor rope_cpu_op(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const RopeCall c = prepare_rope(x, cos, sin, /*allow_half=*/false);
  run_cpu(c);
  return c.out;
}

void store_kv_cpu_op(const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                     at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& positions) {
  const RopeCall c = prepare_store_kv(k, v, cos, sin, cache_k, cache_v, positions, /*allow_half=*/false);
  const int64_t* at = c.positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.positions.numel(); ++i)
    TORCH_CHECK_VALUE(at[i] >= 0 && at[i] < cache_k.size(1), "positions: entry ", num(i), " is ", num(at[i]),
                      ", outside the caches' ", num(cache_k.size(1)), " positions");
  run_cpu(c);
}

}  // namespace
}  // namespace llada

TORCH_LIBRARY_FRAGMENT(llada, m) {
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("store_kv(Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) cache_k, Tensor(b!) cache_v, "
        "Tensor positions) -> ()");
}

TORCH_LIBRARY_IMPL(llada, CPU, m) {
  m.impl("rope", &llada::rope_cpu_op);
  m.impl("store_kv", &llada::store_kv_cpu_op);
}
