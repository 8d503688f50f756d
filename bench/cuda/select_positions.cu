// Microbenchmark of select_positions: rank each row of confidence [B, L] and
// accept a prefix of the ranking by the top-k, threshold or factor rule.
//
// At sampler shapes the kernel is latency bound (a few KiB per row), so the
// time per call matters more than the GB/s, which is printed for reference.
//
//   bench_select_positions [--repeats N] [--warmup N]
#include "bench_common.cuh"
#include "llada/kernels_cuda.h"
#include "llada/select_positions.h"

namespace {

using llada::SelectionRule;
using llada::SelectPositionsParams;

// Every CUDA implementation to validate and time; add variants here.
struct Variant {
  const char* name;
  cudaError_t (*launch)(const SelectPositionsParams&, cudaStream_t);
};
const Variant kVariants[] = {
    {"bitonic_shared", llada::select_positions_cuda},
};

const char* rule_name(SelectionRule r) {
  switch (r) {
    case SelectionRule::kTopK: return "topk";
    case SelectionRule::kThreshold: return "threshold";
    case SelectionRule::kFactor: return "factor";
  }
  return "?";
}

// Sampler-like confidences: about a third of the positions are not
// candidates (-inf: already decoded or right of the block; a few NaN), the
// rest are probabilities skewed toward 1 so the threshold and factor rules
// accept a few. Values are rounded to 1/1024 so ties occur, and the last row
// has no candidate at all.
std::vector<float> make_confidence(int64_t rows, int64_t length, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> c(size_t(rows * length));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < length; ++i) {
      float draw = u(rng);
      float value;
      if (rows > 1 && r == rows - 1) value = -INFINITY;
      else if (draw < 0.30f) value = -INFINITY;
      else if (draw < 0.31f) value = NAN;
      else value = std::round(std::pow(u(rng), 0.25f) * 1024.0f) / 1024.0f;
      c[size_t(r * length + i)] = value;
    }
  }
  return c;
}

bool run_case(int64_t rows, int64_t length, SelectionRule rule, const bench::Options& o,
              uint64_t seed) {
  const std::vector<float> confidence = make_confidence(rows, length, seed);
  // k per row: what a schedule would ask (a few), and with several rows one
  // row asking for more than it has candidates.
  std::vector<int64_t> k(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) k[size_t(r)] = 1 + (r * 7 + length / 32) % 16;
  if (rows > 1) k[1] = length;
  const float threshold = 0.9f, factor = 1.0f;

  std::vector<uint8_t> want(size_t(rows * length));
  SelectPositionsParams p{};
  p.confidence = confidence.data();
  p.rows = rows;
  p.length = length;
  p.rule = rule;
  p.k = k.data();
  p.threshold = threshold;
  p.factor = factor;
  p.accepted = reinterpret_cast<bool*>(want.data());
  llada::select_positions_cpu(p, 0, rows);

  bench::DeviceBuffer<float> d_conf(confidence.size());
  bench::DeviceBuffer<int64_t> d_k(k.size());
  bench::DeviceBuffer<uint8_t> d_accepted(want.size());
  d_conf.upload(confidence);
  d_k.upload(k);
  SelectPositionsParams dp = p;
  dp.confidence = d_conf.ptr;
  dp.k = d_k.ptr;
  dp.accepted = reinterpret_cast<bool*>(d_accepted.ptr);

  int64_t accepted_count = 0;
  for (uint8_t a : want) accepted_count += a;
  const double bytes = double(rows * length) * (4 + 1) + double(rows) * 8;
  bool all_ok = true;
  for (const Variant& variant : kVariants) {
    d_accepted.poison();
    CUDA_CHECK(variant.launch(dp, 0));
    CUDA_CHECK(cudaDeviceSynchronize());
    int64_t bad = bench::count_exact_mismatches("accepted", d_accepted.download(), want);

    char label[256];
    std::snprintf(label, sizeof(label),
                  "kernel=select_positions variant=%s rule=%s B=%lld L=%lld accepted=%lld",
                  variant.name, rule_name(rule), (long long)rows, (long long)length,
                  (long long)accepted_count);
    if (bad != 0) {
      std::printf("RESULT %s mismatches=%lld FAIL\n", label, (long long)bad);
      all_ok = false;
      continue;
    }
    double us = bench::time_us(o, [&](int) { return variant.launch(dp, 0); });
    std::printf("RESULT %s us=%.2f GBps=%.2f ok\n", label, us, bytes / (us * 1e3));
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
  // A 32-token block, a batch of 256-token canvases, one long canvas.
  const Shape shapes[] = {{1, 32}, {8, 256}, {1, 4096}, {8, 4096}};
  const SelectionRule rules[] = {SelectionRule::kTopK, SelectionRule::kThreshold,
                                 SelectionRule::kFactor};
  bool ok = true;
  uint64_t seed = 777;
  for (const Shape& s : shapes)
    for (SelectionRule rule : rules) ok = run_case(s.rows, s.length, rule, o, seed++) && ok;
  std::printf("%s\n", ok ? "ALL OK" : "SOME CASES FAILED");
  return ok ? 0 : 1;
}
