// Microbenchmark of commit_tokens: canvas[accepted] = x0[accepted], then
// canvas[remask] = mask_id, and the masked count left per row.
//
// The kernel streams canvas (read + write), x0, accepted and remask once;
// GB/s counts all of them (x0 in full: the loads are sector-sized anyway).
//
//   bench_commit_tokens [--repeats N] [--warmup N]
#include "bench_common.cuh"
#include "llada/commit_tokens.h"
#include "llada/kernels_cuda.h"

namespace {

using llada::CommitTokensParams;

// Every CUDA implementation to validate and time; add variants here.
struct Variant {
  const char* name;
  cudaError_t (*launch)(const CommitTokensParams&, cudaStream_t);
};
const Variant kVariants[] = {
    {"block_per_row", llada::commit_tokens_cuda},
};

constexpr int64_t kMaskId = 126336;

struct Inputs {
  std::vector<int64_t> canvas, x0;
  std::vector<uint8_t> accepted, remask;
};

// A canvas mid-decoding: a prompt prefix, then a mix of decoded tokens and
// masks; a step accepts some masked positions (and, rarely, an unmasked one),
// and re-masks a few decoded ones.
Inputs make_inputs(int64_t rows, int64_t length, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> token(0, 126463);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  const size_t n = size_t(rows * length);
  Inputs in{std::vector<int64_t>(n), std::vector<int64_t>(n), std::vector<uint8_t>(n),
            std::vector<uint8_t>(n)};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < length; ++i) {
      size_t at = size_t(r * length + i);
      bool prompt = i < length / 4;
      bool masked = !prompt && u(rng) < 0.6f;
      in.canvas[at] = masked ? kMaskId : token(rng);
      in.x0[at] = token(rng);
      in.accepted[at] = masked ? u(rng) < 0.1f : u(rng) < 0.01f;
      in.remask[at] = !prompt && !masked && u(rng) < 0.02f;
    }
  }
  return in;
}

bool run_case(int64_t rows, int64_t length, bool with_remask, const bench::Options& o,
              uint64_t seed) {
  const Inputs in = make_inputs(rows, length, seed);

  std::vector<int64_t> want_canvas = in.canvas;
  std::vector<int64_t> want_remaining(static_cast<size_t>(rows));
  CommitTokensParams p{};
  p.canvas = want_canvas.data();
  p.x0 = in.x0.data();
  p.accepted = reinterpret_cast<const bool*>(in.accepted.data());
  p.remask = with_remask ? reinterpret_cast<const bool*>(in.remask.data()) : nullptr;
  p.rows = rows;
  p.length = length;
  p.mask_id = kMaskId;
  p.remaining = want_remaining.data();
  llada::commit_tokens_cpu(p, 0, rows);

  const size_t n = in.canvas.size();
  bench::DeviceBuffer<int64_t> d_canvas(n), d_x0(n), d_remaining(static_cast<size_t>(rows));
  bench::DeviceBuffer<uint8_t> d_accepted(n), d_remask(n);
  d_x0.upload(in.x0);
  d_accepted.upload(in.accepted);
  d_remask.upload(in.remask);
  CommitTokensParams dp = p;
  dp.canvas = d_canvas.ptr;
  dp.x0 = d_x0.ptr;
  dp.accepted = reinterpret_cast<const bool*>(d_accepted.ptr);
  dp.remask = with_remask ? reinterpret_cast<const bool*>(d_remask.ptr) : nullptr;
  dp.remaining = d_remaining.ptr;

  const double bytes = double(n) * (8 + 8 + 8 + 1 + (with_remask ? 1 : 0)) + double(rows) * 8;
  bool all_ok = true;
  for (const Variant& variant : kVariants) {
    d_canvas.upload(in.canvas);  // the kernel works in place: fresh canvas per variant
    d_remaining.poison();
    CUDA_CHECK(variant.launch(dp, 0));
    CUDA_CHECK(cudaDeviceSynchronize());
    int64_t bad = bench::count_exact_mismatches("canvas", d_canvas.download(), want_canvas);
    bad += bench::count_exact_mismatches("remaining", d_remaining.download(), want_remaining);

    char label[256];
    std::snprintf(label, sizeof(label), "kernel=commit_tokens variant=%s B=%lld L=%lld remask=%d",
                  variant.name, (long long)rows, (long long)length, int(with_remask));
    if (bad != 0) {
      std::printf("RESULT %s mismatches=%lld FAIL\n", label, (long long)bad);
      all_ok = false;
      continue;
    }
    // Repeated calls keep committing into the same canvas; the memory traffic
    // per call is the same whatever the canvas holds.
    double us = bench::time_us(o, [&](int) { return variant.launch(dp, 0); });
    std::printf("RESULT %s us=%.2f GBps=%.1f ok\n", label, us, bytes / (us * 1e3));
  }
  return all_ok;
}

}  // namespace

int main(int argc, char** argv) {
  const bench::Options o = bench::parse_options(argc, argv);
  bench::print_device();
  struct Shape {
    int64_t rows, length;
  };
  const Shape shapes[] = {{1, 256}, {8, 256}, {8, 4096}, {64, 4096}};
  bool ok = true;
  uint64_t seed = 4242;
  for (const Shape& s : shapes)
    for (bool remask : {false, true}) ok = run_case(s.rows, s.length, remask, o, seed++) && ok;
  std::printf("%s\n", ok ? "ALL OK" : "SOME CASES FAILED");
  return ok ? 0 : 1;
}
