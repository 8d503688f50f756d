// Microbenchmark of sample_tokens: per row of logits [N, V], the chosen token,
// its probability, the top-1/top-2 margin and the entropy, in one pass.
//
// The kernel is bound by reading the logits once, so it is judged by GB/s and
// by that bandwidth as a share of a plain device-to-device copy.
//
//   bench_sample_tokens [--repeats N] [--warmup N]
#include <cuda_fp16.h>

#include "bench_common.cuh"
#include "llada/kernels_cuda.h"
#include "llada/sample_tokens.h"

namespace {

using llada::DType;
using llada::SampleTokensParams;

// Every CUDA implementation to validate and time. A new variant is one more
// line here (a launcher with the same signature).
struct Variant {
  const char* name;
  cudaError_t (*launch)(const SampleTokensParams&, cudaStream_t);
};
const Variant kVariants[] = {
    {"block_per_row_prefetch", llada::sample_tokens_cuda},
    {"block_per_row", llada::sample_tokens_cuda_without_prefetch},
};

struct Case {
  DType dtype;
  int64_t rows;
  int64_t vocab;
  float temperature;
  std::vector<int64_t> suppress;  // sorted, unique
};

size_t element_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// LM-head-like logits: N(0, 2.5) noise plus, per row, a few boosted tokens
// whose size varies by row, so the top probability ranges from ~0 to ~1
// (the sum of exp over 126k N(0, 2.5) logits is about e^15). Every 16th row
// repeats its maximum at a later column to exercise the lower-index tie-break,
// and every 8th row has a handful of -inf logits.
std::vector<float> make_logits(int64_t rows, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> noise(0.0f, 2.5f);
  std::uniform_real_distribution<float> boost(8.0f, 25.0f);
  std::uniform_int_distribution<int64_t> column(0, vocab - 1);
  std::vector<float> x(size_t(rows * vocab));
  for (auto& v : x) v = noise(rng);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x.data() + r * vocab;
    int boosted = 1 + int(r % 4);
    for (int b = 0; b < boosted; ++b) row[column(rng)] += boost(rng);
    if (r % 8 == 3)
      for (int b = 0; b < 5; ++b) row[column(rng)] = -INFINITY;
    if (r % 16 == 5) {
      int64_t argmax = std::max_element(row, row + vocab) - row;
      int64_t later = argmax + 1 + column(rng) % (vocab - argmax - 1 > 0 ? vocab - argmax - 1 : 1);
      if (later < vocab) row[later] = row[argmax];
    }
  }
  return x;
}

// The logits in the case's dtype, as raw bytes (what the kernels read).
std::vector<uint8_t> encode(const std::vector<float>& x, DType dtype) {
  std::vector<uint8_t> bytes(x.size() * element_size(dtype));
  if (dtype == DType::kFloat32) {
    std::memcpy(bytes.data(), x.data(), bytes.size());
  } else {
    auto* out = reinterpret_cast<uint16_t*>(bytes.data());
    for (size_t i = 0; i < x.size(); ++i) {
      if (dtype == DType::kBFloat16) {
        out[i] = bench::float_to_bf16(x[i]);
      } else {
        __half h = __float2half_rn(x[i]);
        std::memcpy(&out[i], &h, 2);
      }
    }
  }
  return bytes;
}

struct Outputs {
  std::vector<int64_t> tokens;
  std::vector<float> confidence, margin, entropy;
};

// Returns false on a mismatch. GB/s counts the logits read once plus the
// four outputs written.
bool run_case(const Case& c, const bench::Options& o, double copy_gbps, uint64_t seed) {
  const int64_t n = c.rows, v = c.vocab;
  const std::vector<uint8_t> logits = encode(make_logits(n, v, seed), c.dtype);
  const size_t logits_bytes = logits.size();
  const uint64_t sample_seed = 1234567;

  // Reference: the C++ CPU twin, single-threaded.
  Outputs want{std::vector<int64_t>(n), std::vector<float>(n), std::vector<float>(n),
               std::vector<float>(n)};
  SampleTokensParams p{};
  p.logits = logits.data();
  p.row_stride = v;
  p.rows = n;
  p.vocab = v;
  p.dtype = c.dtype;
  p.suppress = c.suppress.data();
  p.num_suppress = int32_t(c.suppress.size());
  p.temperature = c.temperature;
  p.seed = sample_seed;
  p.tokens = want.tokens.data();
  p.confidence = want.confidence.data();
  p.margin = want.margin.data();
  p.entropy = want.entropy.data();
  llada::sample_tokens_cpu(p, 0, n);

  // Several copies of the logits when they would fit in L2, so timed calls
  // stream from DRAM as they do in decoding.
  const int copies = bench::copies_to_defeat_l2(int64_t(logits_bytes));
  std::vector<bench::DeviceBuffer<uint8_t>*> d_logits;
  for (int i = 0; i < copies; ++i) {
    d_logits.push_back(new bench::DeviceBuffer<uint8_t>(logits_bytes));
    d_logits.back()->upload(logits);
  }
  bench::DeviceBuffer<int64_t> d_suppress(std::max<size_t>(c.suppress.size(), 1));
  if (!c.suppress.empty()) d_suppress.upload(c.suppress);
  bench::DeviceBuffer<int64_t> d_tokens(n);
  bench::DeviceBuffer<float> d_conf(n), d_margin(n), d_entropy(n);

  SampleTokensParams dp = p;
  dp.logits = d_logits[0]->ptr;
  dp.suppress = d_suppress.ptr;
  dp.tokens = d_tokens.ptr;
  dp.confidence = d_conf.ptr;
  dp.margin = d_margin.ptr;
  dp.entropy = d_entropy.ptr;

  const double bytes = double(logits_bytes) + double(n) * (8 + 4 + 4 + 4);
  bool all_ok = true;
  for (const Variant& variant : kVariants) {
    d_tokens.poison();
    d_conf.poison();
    d_margin.poison();
    d_entropy.poison();
    CUDA_CHECK(variant.launch(dp, 0));
    CUDA_CHECK(cudaDeviceSynchronize());

    // Tokens exactly (the Gumbel noise is bit-identical by design); the
    // probabilities to float32 accuracy. atol covers margins of near-ties,
    // where 1 - exp(top2 - top1) loses relative precision.
    int64_t bad = bench::count_exact_mismatches("tokens", d_tokens.download(), want.tokens);
    bad += bench::count_close_mismatches("confidence", d_conf.download(), want.confidence, 1e-4f, 1e-6f);
    bad += bench::count_close_mismatches("margin", d_margin.download(), want.margin, 1e-4f, 1e-6f);
    bad += bench::count_close_mismatches("entropy", d_entropy.download(), want.entropy, 1e-4f, 1e-5f);

    char label[256];
    std::snprintf(label, sizeof(label),
                  "kernel=sample_tokens variant=%s dtype=%s N=%lld V=%lld T=%g suppress=%zu",
                  variant.name, bench::short_name(c.dtype), (long long)n, (long long)v, c.temperature,
                  c.suppress.size());
    if (bad != 0) {
      std::printf("RESULT %s mismatches=%lld FAIL\n", label, (long long)bad);
      all_ok = false;
      continue;
    }
    double us = bench::time_us(o, [&](int i) {
      SampleTokensParams q = dp;
      q.logits = d_logits[size_t(i % copies)]->ptr;
      return variant.launch(q, 0);
    });
    double gbps = bytes / (us * 1e3);
    std::printf("RESULT %s us=%.2f GBps=%.1f pct_copy=%.1f ok\n", label, us, gbps,
                100.0 * gbps / copy_gbps);
  }
  for (auto* b : d_logits) delete b;
  return all_ok;
}

}  // namespace

int main(int argc, char** argv) {
  const bench::Options o = bench::parse_options(argc, argv);
  bench::print_device();
  const double copy_gbps = bench::copy_bandwidth_gbps(o);

  const int64_t V = 126464;                              // LLaDA-8B vocabulary
  const std::vector<int64_t> eos_eot = {126081, 126348}; // EOS, EoT
  const std::vector<Case> cases = {
      {DType::kBFloat16, 256, V, 0.0f, {}},  // the main case: bf16 logits of a 256-token block
      {DType::kFloat32, 256, V, 0.0f, {}},
      {DType::kFloat16, 256, V, 0.0f, {}},
      {DType::kBFloat16, 32, V, 0.0f, {}},   // a 32-token block
      {DType::kBFloat16, 256, V, 0.0f, eos_eot},
      {DType::kBFloat16, 256, V, 0.7f, {}},  // Gumbel-max sampling
      {DType::kFloat32, 32, V, 1.0f, eos_eot},
  };
  bool ok = true;
  uint64_t seed = 20240601;
  for (const Case& c : cases) ok = run_case(c, o, copy_gbps, seed++) && ok;
  std::printf("%s\n", ok ? "ALL OK" : "SOME CASES FAILED");
  return ok ? 0 : 1;
}
