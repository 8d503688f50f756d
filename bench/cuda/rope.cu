// Microbenchmark of rope: the half-split rotary embedding of [B, L, H, D]
// queries or keys by float32 cos/sin tables [B or 1, L, D].
//
// Every dtype is validated against the C++ CPU twin, run in float32 on the
// same rounded inputs and rounded once more for the 16-bit types: the kernel
// and the twin round every product and sum alike, so they must agree exactly.
// GB/s counts x read once, out written once and the tables read once.
// "packed" cases read x where the model's packed q/k/v projection leaves the
// keys: the middle third of each position's [3 * H * D] row.
//
//   bench_rope [--repeats N] [--warmup N]
#include "bench_common.cuh"
#include "llada/kernels_cuda.h"
#include "llada/rope.h"

namespace {

using llada::DType;
using llada::RopeParams;

bool run_case(DType dtype, int64_t b, int64_t l, int64_t h, int64_t d, bool per_row, bool packed,
              const bench::Options& o, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int> position(0, 4095);
  const int64_t row = packed ? 3 * h * d : h * d;  // x's position stride
  const int64_t offset = packed ? h * d : 0;
  std::vector<float> x(static_cast<size_t>(b * l * row));
  for (auto& v : x) v = normal(rng);
  const int64_t tables = per_row ? b : 1;
  std::vector<float> cos(static_cast<size_t>(tables * l * d));
  std::vector<float> sin(cos.size());
  for (int64_t r = 0; r < tables * l; ++r) {  // LLaDA's tables at a random position
    const float pos = float(position(rng));
    for (int64_t i = 0; i < d / 2; ++i) {
      const float angle = pos * std::pow(500000.0f, -2.0f * float(i) / float(d));
      for (int64_t j : {i, i + d / 2}) {
        cos[size_t(r * d + j)] = std::cos(angle);
        sin[size_t(r * d + j)] = std::sin(angle);
      }
    }
  }
  const size_t el = dtype == DType::kFloat32 ? 4 : 2;
  std::vector<uint8_t> xb(x.size() * el);
  if (dtype == DType::kFloat32) {
    std::memcpy(xb.data(), x.data(), xb.size());
  } else {
    for (size_t i = 0; i < x.size(); ++i) {
      const uint16_t u = bench::bits_from_float(x[i], dtype);
      std::memcpy(xb.data() + 2 * i, &u, 2);
      x[i] = bench::bits_to_float(u, dtype);
    }
  }

  std::vector<float> want(static_cast<size_t>(b * l * h * d));
  RopeParams ref{};
  ref.x = x.data() + offset;
  ref.cos = cos.data();
  ref.sin = sin.data();
  ref.out = want.data();
  ref.batch = b;
  ref.length = l;
  ref.heads = h;
  ref.head_dim = d;
  ref.tables_per_row = per_row && b > 1;
  ref.x_stride_batch = l * row;
  ref.x_stride_position = row;
  ref.x_stride_head = d;
  ref.dtype = DType::kFloat32;
  llada::rope_cpu(ref, 0, b * l);
  if (dtype != DType::kFloat32)
    for (auto& v : want) v = bench::bits_to_float(bench::bits_from_float(v, dtype), dtype);

  bench::DeviceBuffer<uint8_t> dx(xb.size()), dout(want.size() * el);
  bench::DeviceBuffer<float> dcos(cos.size()), dsin(sin.size());
  dx.upload(xb);
  dcos.upload(cos);
  dsin.upload(sin);
  dout.poison();
  RopeParams p = ref;
  p.x = dx.ptr + offset * int64_t(el);
  p.cos = dcos.ptr;
  p.sin = dsin.ptr;
  p.out = dout.ptr;
  p.dtype = dtype;
  CUDA_CHECK(llada::rope_cuda(p, 0));
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = bench::as_floats(dout.download(), dtype);
  const int64_t bad = bench::count_close_mismatches("out", got, want, 0.0f, 0.0f);

  char label[192];
  std::snprintf(label, sizeof label,
                "kernel=rope variant=thread_per_pair dtype=%s B=%lld L=%lld H=%lld D=%lld tables=%s x=%s",
                bench::short_name(dtype), (long long)b, (long long)l, (long long)h, (long long)d,
                per_row ? "per_row" : "shared", packed ? "packed" : "contiguous");
  if (bad != 0) {
    std::printf("RESULT %s mismatches=%lld FAIL\n", label, (long long)bad);
    return false;
  }
  const double bytes = 2.0 * double(want.size()) * double(el) + 2.0 * double(cos.size()) * 4.0;
  const double us = bench::time_us(o, [&](int) { return llada::rope_cuda(p, 0); });
  std::printf("RESULT %s us=%.2f GBps=%.1f ok\n", label, us, bytes / (us * 1e3));
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const bench::Options o = bench::parse_options(argc, argv);
  bench::print_device();
  struct Shape {
    int64_t b, l, h, d;
    bool per_row, packed;
  };
  // LLaDA-8B queries or keys of a cached block and of a full forward (alone
  // or out of the packed projection), a batch with per-row positions, and
  // small odd shapes.
  const Shape shapes[] = {{1, 32, 32, 128, false, false}, {1, 32, 32, 128, false, true},
                          {1, 512, 32, 128, false, false}, {1, 512, 32, 128, false, true},
                          {8, 1024, 32, 128, true, false}, {3, 17, 5, 64, true, true},
                          {1, 1, 1, 2, false, false}};
  bool ok = true;
  uint64_t seed = 999;
  for (DType t : {DType::kBFloat16, DType::kFloat16, DType::kFloat32})
    for (const Shape& s : shapes) ok = run_case(t, s.b, s.l, s.h, s.d, s.per_row, s.packed, o, seed++) && ok;
  std::printf("%s\n", ok ? "ALL OK" : "SOME CASES FAILED");
  return ok ? 0 : 1;
}
