// Microbenchmark of rms_norm: out = weight * round(x * rsqrt(mean(x^2) + eps))
// per row, float32 inside; and of its residual form (add_rms_norm), which
// first replaces x by the rounded sum x + residual and writes that out too.
//
// Every dtype is validated against the C++ CPU twin, run in float32 on the
// same rounded inputs, with the 16-bit path's two roundings redone on its
// normalisation: where the float32 normalisation differs in its last bit, a
// rounding may go the other way, so 16-bit results must agree within 2 ulps. GB/s counts x read once, out written once
// and the weight; the model's shapes are small enough that x often comes from
// L2, as it does in the model (the previous kernel just wrote it).
//
//   bench_rms_norm [--repeats N] [--warmup N]
#include "bench_common.cuh"
#include "llada/kernels_cuda.h"
#include "llada/rms_norm.h"

namespace {

using llada::DType;
using llada::RmsNormParams;

bool run_case(DType dtype, int64_t rows, int64_t dim, bool residual, const bench::Options& o, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(rows * dim)), res(residual ? x.size() : 0);
  std::vector<float> w(static_cast<size_t>(dim));
  for (int64_t r = 0; r < rows; ++r) {
    const float scale = std::pow(10.0f, float(r % 7) - 3.0f);  // rows at 1e-3 .. 1e3
    for (int64_t i = 0; i < dim; ++i) x[size_t(r * dim + i)] = scale * normal(rng);
  }
  for (auto& v : res) v = normal(rng);
  for (auto& v : w) v = 1.0f + 0.5f * normal(rng);
  const float eps = 1e-5f;
  const size_t el = dtype == DType::kFloat32 ? 4 : 2;

  // Inputs in the dtype; the float32 copies hold the rounded values.
  const std::vector<uint8_t> xb = bench::to_dtype(x, dtype), rb = bench::to_dtype(res, dtype),
                             wb = bench::to_dtype(w, dtype);
  auto round = [&](float v) {
    return dtype == DType::kFloat32 ? v : bench::bits_to_float(bench::bits_from_float(v, dtype), dtype);
  };
  // What gets normalised: x, or the rounded sum x + residual.
  std::vector<float> sum = x;
  for (size_t i = 0; i < res.size(); ++i) sum[i] = round(x[i] + res[i]);

  // Reference: the CPU twin in float32 on the rounded inputs, then the two
  // roundings of the 16-bit path redone here from its normalisation.
  std::vector<float> want(x.size());
  RmsNormParams ref{sum.data(), w.data(), want.data(), rows, dim, eps, DType::kFloat32};
  std::vector<float> ones(static_cast<size_t>(dim), 1.0f);
  std::vector<float> normalised(x.size());
  RmsNormParams ref_plain{sum.data(), ones.data(), normalised.data(), rows, dim, eps, DType::kFloat32};
  llada::rms_norm_cpu(ref, 0, rows);
  llada::rms_norm_cpu(ref_plain, 0, rows);
  if (dtype != DType::kFloat32)
    for (size_t i = 0; i < want.size(); ++i) want[i] = round(w[i % size_t(dim)] * round(normalised[i]));

  bench::DeviceBuffer<uint8_t> dx(xb.size()), dr(rb.size()), dw(wb.size()), dout(xb.size()), dsum(rb.size());
  dx.upload(xb);
  dw.upload(wb);
  dout.poison();
  RmsNormParams p{dx.ptr, dw.ptr, dout.ptr, rows, dim, eps, dtype};
  if (residual) {
    dr.upload(rb);
    dsum.poison();
    p.residual = dr.ptr;
    p.sum = dsum.ptr;
  }
  CUDA_CHECK(llada::rms_norm_cuda(p, 0));
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = bench::as_floats(dout.download(), dtype);
  // 2 ulps of the dtype (relative), or a few float32 ulps.
  const float rtol = dtype == DType::kBFloat16 ? 0x1p-6f : dtype == DType::kFloat16 ? 0x1p-9f : 1e-5f;
  int64_t bad = bench::count_close_mismatches("out", got, want, rtol, 1e-30f);
  if (residual) bad += bench::count_close_mismatches("sum", bench::as_floats(dsum.download(), dtype), sum, 0.0f, 0.0f);

  char label[160];
  std::snprintf(label, sizeof label, "kernel=rms_norm variant=block_per_row%s dtype=%s rows=%lld dim=%lld",
                residual ? "_residual" : "", bench::short_name(dtype), (long long)rows, (long long)dim);
  if (bad != 0) {
    std::printf("RESULT %s mismatches=%lld FAIL\n", label, (long long)bad);
    return false;
  }
  // x (and the residual) read once, out (and the sum) written once, the weight.
  const double bytes = double(el) * ((residual ? 4.0 : 2.0) * double(rows * dim) + double(dim));
  const double us = bench::time_us(o, [&](int) { return llada::rms_norm_cuda(p, 0); });
  std::printf("RESULT %s us=%.2f GBps=%.1f ok\n", label, us, bytes / (us * 1e3));
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const bench::Options o = bench::parse_options(argc, argv);
  bench::print_device();
  struct Shape {
    int64_t rows, dim;
  };
  // A cached 8B block, a full 8B forward, a long batch; odd widths take the
  // element-by-element path.
  const Shape shapes[] = {{32, 4096}, {512, 4096}, {8192, 4096}, {5, 4095}, {3, 130}, {1, 1}};
  bool ok = true;
  uint64_t seed = 777;
  for (bool residual : {false, true})
    for (DType t : {DType::kBFloat16, DType::kFloat16, DType::kFloat32})
      for (const Shape& s : shapes) ok = run_case(t, s.rows, s.dim, residual, o, seed++) && ok;
  std::printf("%s\n", ok ? "ALL OK" : "SOME CASES FAILED");
  return ok ? 0 : 1;
}
