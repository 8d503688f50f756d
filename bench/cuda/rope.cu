// Microbenchmark of rope: the half-split rotary embedding of [B, L, H, D]
// queries or keys by float32 cos/sin tables [B or 1, L, D]; and of its
// store_kv form, which writes the rotated keys into a key cache at scattered
// positions and copies the values beside them into a value cache.
//
// Every dtype is validated against the C++ CPU twin, run in float32 on the
// same rounded inputs and rounded once more for the 16-bit types: the kernel
// and the twin round every product and sum alike, so they must agree exactly.
// "packed" cases read the keys (and values) where the model's packed q/k/v
// projection leaves them: thirds of each position's [3 * H * D] row. GB/s
// counts the keys (and values) read once and written once and the tables read
// once.
//
//   bench_rope [--repeats N] [--warmup N]
#include <algorithm>
#include <numeric>

#include "bench_common.cuh"
#include "llada/kernels_cuda.h"
#include "llada/rope.h"

namespace {

using llada::DType;
using llada::RopeParams;

struct Case {
  int64_t b, l, h, d;
  bool per_row, packed;
  int64_t cache;  // store_kv into caches of this many positions; 0: rope
};

bool run_case(DType dtype, const Case& c, const bench::Options& o, uint64_t seed) {
  const int64_t b = c.b, l = c.l, h = c.h, d = c.d;
  const bool store = c.cache > 0;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int> position(0, 4095);
  const int64_t row = c.packed ? 3 * h * d : h * d;  // the position stride of x (and v)
  std::vector<float> x(static_cast<size_t>(b * l * row));
  for (auto& v : x) v = normal(rng);
  const int64_t tables = c.per_row ? b : 1;
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
  // store_kv: caches full of other values, and l distinct positions in them.
  const int64_t out_length = store ? c.cache : l;
  std::vector<float> want(static_cast<size_t>(b * out_length * h * d)), want_v(store ? want.size() : 0);
  for (auto& v : want) v = normal(rng);
  for (auto& v : want_v) v = normal(rng);
  std::vector<int64_t> positions(static_cast<size_t>(out_length));
  std::iota(positions.begin(), positions.end(), 0);
  std::shuffle(positions.begin(), positions.end(), rng);
  positions.resize(size_t(l));
  const std::vector<uint8_t> xb = bench::to_dtype(x, dtype), cache_kb = bench::to_dtype(want, dtype),
                             cache_vb = bench::to_dtype(want_v, dtype);

  RopeParams ref{};
  ref.x = x.data() + (c.packed ? h * d : 0);
  ref.cos = cos.data();
  ref.sin = sin.data();
  ref.out = want.data();
  ref.batch = b;
  ref.length = l;
  ref.heads = h;
  ref.head_dim = d;
  ref.tables_per_row = c.per_row && b > 1;
  ref.x_stride_batch = l * row;
  ref.x_stride_position = row;
  ref.x_stride_head = d;
  ref.dtype = DType::kFloat32;
  if (store) {
    ref.out_positions = positions.data();
    ref.out_length = out_length;
    ref.copy_x = x.data() + (c.packed ? 2 * h * d : 0);
    ref.copy_out = want_v.data();
    ref.copy_stride_batch = l * row;
    ref.copy_stride_position = row;
    ref.copy_stride_head = d;
  }
  llada::rope_cpu(ref, 0, b * l);
  const size_t el = dtype == DType::kFloat32 ? 4 : 2;
  if (dtype != DType::kFloat32)
    for (auto& v : want) v = bench::bits_to_float(bench::bits_from_float(v, dtype), dtype);

  bench::DeviceBuffer<uint8_t> dx(xb.size()), dout(want.size() * el), dout_v(want_v.size() * el);
  bench::DeviceBuffer<float> dcos(cos.size()), dsin(sin.size());
  bench::DeviceBuffer<int64_t> dpos(positions.size());
  dx.upload(xb);
  dcos.upload(cos);
  dsin.upload(sin);
  RopeParams p = ref;
  p.x = dx.ptr + (c.packed ? h * d : 0) * int64_t(el);
  p.cos = dcos.ptr;
  p.sin = dsin.ptr;
  p.out = dout.ptr;
  p.dtype = dtype;
  if (store) {
    dout.upload(cache_kb);
    dout_v.upload(cache_vb);
    dpos.upload(positions);
    p.out_positions = dpos.ptr;
    p.copy_x = dx.ptr + (c.packed ? 2 * h * d : 0) * int64_t(el);
    p.copy_out = dout_v.ptr;
  } else {
    dout.poison();
  }
  CUDA_CHECK(llada::rope_cuda(p, 0));
  CUDA_CHECK(cudaDeviceSynchronize());
  int64_t bad = bench::count_close_mismatches("out", bench::as_floats(dout.download(), dtype), want, 0.0f, 0.0f);
  if (store) bad += bench::count_close_mismatches("v", bench::as_floats(dout_v.download(), dtype), want_v, 0.0f, 0.0f);

  char label[224];
  std::snprintf(label, sizeof label,
                "kernel=rope variant=%s dtype=%s B=%lld L=%lld H=%lld D=%lld tables=%s x=%s cache=%lld",
                store ? "store_kv" : "thread_per_pair", bench::short_name(dtype), (long long)b, (long long)l,
                (long long)h, (long long)d, c.per_row ? "per_row" : "shared", c.packed ? "packed" : "contiguous",
                (long long)c.cache);
  if (bad != 0) {
    std::printf("RESULT %s mismatches=%lld FAIL\n", label, (long long)bad);
    return false;
  }
  const double moved = double(b * l * h * d) * double(el) * (store ? 4.0 : 2.0);
  const double bytes = moved + 2.0 * double(cos.size()) * 4.0;
  const double us = bench::time_us(o, [&](int) { return llada::rope_cuda(p, 0); });
  std::printf("RESULT %s us=%.2f GBps=%.1f ok\n", label, us, bytes / (us * 1e3));
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const bench::Options o = bench::parse_options(argc, argv);
  bench::print_device();
  // LLaDA-8B queries or keys of a cached block and of a full forward (alone
  // or out of the packed projection), a batch with per-row positions, small
  // odd shapes; and the keys and values of a cached block and of a full
  // forward stored into a 512-position cache.
  const Case cases[] = {{1, 32, 32, 128, false, false, 0}, {1, 32, 32, 128, false, true, 0},
                        {1, 512, 32, 128, false, false, 0}, {1, 512, 32, 128, false, true, 0},
                        {8, 1024, 32, 128, true, false, 0},  {3, 17, 5, 64, true, true, 0},
                        {1, 1, 1, 2, false, false, 0},       {1, 32, 32, 128, false, true, 512},
                        {1, 512, 32, 128, false, true, 512}, {3, 17, 5, 64, true, false, 40}};
  bool ok = true;
  uint64_t seed = 999;
  for (DType t : {DType::kBFloat16, DType::kFloat16, DType::kFloat32})
    for (const Case& c : cases) ok = run_case(t, c, o, seed++) && ok;
  std::printf("%s\n", ok ? "ALL OK" : "SOME CASES FAILED");
  return ok ? 0 : 1;
}
