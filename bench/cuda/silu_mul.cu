// Microbenchmark of silu_mul: out = round(round(silu(gate)) * up) per
// element, float32 inside.
//
// Every dtype is validated against the C++ CPU twin, run in float32 on the
// same rounded inputs (with up = 1 for silu alone), the 16-bit path's two
// roundings redone here. The twin's exp is a polynomial and the kernel's is
// expf, so float32 agrees to a few ulps and 16-bit results within 2 ulps.
// "packed" cases read gate and up as the halves of one [rows, 2 * dim]
// projection, as the model's packed MLP GEMM leaves them. GB/s counts gate
// and up read once and out written once.
//
//   bench_silu_mul [--repeats N] [--warmup N]
#include "bench_common.cuh"
#include "llada/kernels_cuda.h"
#include "llada/silu_mul.h"

namespace {

using llada::DType;
using llada::SiluMulParams;

bool run_case(DType dtype, int64_t rows, int64_t dim, bool packed, const bench::Options& o, uint64_t seed) {
  std::mt19937_64 rng(seed);
  // Values about -12 .. 12: silu's saturated, curved and linear regimes.
  std::normal_distribution<float> normal(0.0f, 4.0f);
  // One buffer holds gate then up, per row when packed, else one after the other.
  std::vector<float> x(static_cast<size_t>(2 * rows * dim));
  for (auto& v : x) v = normal(rng);
  const std::vector<uint8_t> xb = bench::to_dtype(x, dtype);
  const int64_t stride = packed ? 2 * dim : dim;
  const int64_t up_offset = packed ? dim : rows * dim;

  SiluMulParams ref{x.data(), x.data() + up_offset, nullptr, rows, dim, stride, stride, DType::kFloat32};
  std::vector<float> want(static_cast<size_t>(rows * dim)), silu(want.size()), ones(x.size(), 1.0f);
  ref.out = want.data();
  llada::silu_mul_cpu(ref, 0, rows);
  SiluMulParams ref_silu = ref;
  ref_silu.up = ones.data();
  ref_silu.out = silu.data();
  llada::silu_mul_cpu(ref_silu, 0, rows);
  auto round = [&](float v) { return bench::bits_to_float(bench::bits_from_float(v, dtype), dtype); };
  if (dtype != DType::kFloat32)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < dim; ++i) {
        const size_t at = size_t(r * dim + i);
        want[at] = round(round(silu[at]) * x[size_t(up_offset + r * stride + i)]);
      }

  const size_t el = dtype == DType::kFloat32 ? 4 : 2;
  bench::DeviceBuffer<uint8_t> dx(xb.size()), dout(want.size() * el);
  dx.upload(xb);
  dout.poison();
  SiluMulParams p = ref;
  p.gate = dx.ptr;
  p.up = dx.ptr + up_offset * int64_t(el);
  p.out = dout.ptr;
  p.dtype = dtype;
  CUDA_CHECK(llada::silu_mul_cuda(p, 0));
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = bench::as_floats(dout.download(), dtype);
  const float rtol = dtype == DType::kBFloat16 ? 0x1p-6f : dtype == DType::kFloat16 ? 0x1p-9f : 1e-6f;
  const int64_t bad = bench::count_close_mismatches("out", got, want, rtol, 1e-30f);

  char label[160];
  std::snprintf(label, sizeof label, "kernel=silu_mul variant=thread_per_element dtype=%s rows=%lld dim=%lld x=%s",
                bench::short_name(dtype), (long long)rows, (long long)dim, packed ? "packed" : "separate");
  if (bad != 0) {
    std::printf("RESULT %s mismatches=%lld FAIL\n", label, (long long)bad);
    return false;
  }
  const double bytes = 3.0 * double(rows * dim) * double(el);
  const double us = bench::time_us(o, [&](int) { return llada::silu_mul_cuda(p, 0); });
  std::printf("RESULT %s us=%.2f GBps=%.1f ok\n", label, us, bytes / (us * 1e3));
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const bench::Options o = bench::parse_options(argc, argv);
  bench::print_device();
  struct Shape {
    int64_t rows, dim;
    bool packed;
  };
  // LLaDA-8B's MLP for a cached block and a full forward (packed, as the
  // model runs it, and separate), and odd small shapes.
  const Shape shapes[] = {{32, 12288, true},   {32, 12288, false}, {512, 12288, true},
                          {512, 12288, false}, {5, 4095, true},    {3, 17, false}};
  bool ok = true;
  uint64_t seed = 555;
  for (DType t : {DType::kBFloat16, DType::kFloat16, DType::kFloat32})
    for (const Shape& s : shapes) ok = run_case(t, s.rows, s.dim, s.packed, o, seed++) && ok;
  std::printf("%s\n", ok ? "ALL OK" : "SOME CASES FAILED");
  return ok ? 0 : 1;
}
