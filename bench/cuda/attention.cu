// Microbenchmark of attention: softmax(q k^T * scale) v, non-causal, GQA,
// optional key padding.
//
// Every variant (the automatic plan; 16 or 32 query rows per warp, each with
// no key split and with forced key splits; on an H100/H200 built for sm_90a,
// the Hopper kernel, with each of its pipelines for more than 64 queries) is
// first validated against the
// C++ CPU twin, run in float32 on the same rounded inputs: small ragged
// shapes in full (lengths that are not multiples of the 64-row tiles, GQA,
// padding rows with one valid key and with none), the timed shapes on their
// first and last (batch, head). Then the timed shapes run under CUDA events;
// TFLOP/s counts 4 B Hq Lq Lk D flops per call.
//
//   bench_attention [--repeats N] [--warmup N]
#include "bench_common.cuh"
#include "llada/attention.h"
#include "llada/kernels_cuda.h"

namespace {

using llada::AttentionCudaPlan;
using llada::AttentionParams;
using llada::DType;

struct Case {
  DType dtype;
  int64_t batch, q_len, kv_len;
  int q_heads, kv_heads, head_dim;
  bool mask;    // key padding: row 0 random, row 1 one valid key, row 2 none
  bool timed;   // timed (and validated on two heads) or validated in full
};

// Rounds `x` to the dtype in place (so the reference sees the kernel's
// inputs) and returns the 16-bit encoding.
std::vector<uint16_t> round_to(std::vector<float>& x, DType t) {
  std::vector<uint16_t> bits(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    bits[i] = bench::bits_from_float(x[i], t);
    x[i] = bench::bits_to_float(bits[i], t);
  }
  return bits;
}

std::vector<float> randn(size_t n, float scale, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
}

// Contiguous [B, L, H, D] strides.
void set_strides(int64_t (&s)[3], int64_t len, int heads, int d) {
  s[0] = len * heads * d;
  s[1] = int64_t(heads) * d;
  s[2] = d;
}

using llada::Sm90Pipeline;
struct Variant {
  std::string name;
  int splits;         // 0: the automatic plan
  int rows_per_warp;  // ignored by the automatic plan
  llada::Sm90Use sm90 = llada::Sm90Use::kNever;  // for the automatic plan
  bool persistent = true;                         // of the Hopper kernel
  Sm90Pipeline pipeline = Sm90Pipeline::kOneQuery;  // of the Hopper kernel, for more than 64 queries
  std::string pipeline_name = "";                   // its name, for the other pipelines
};
// The Hopper kernel's pipelines besides the plan's are "sm90-<name>".
std::vector<Variant> variants() {
  std::vector<Variant> all = {
      {"auto", 0, 0},          {"rows16", 1, 16},         {"rows16-split2", 2, 16},
      {"rows16-split3", 3, 16}, {"rows16-split4", 4, 16},  {"rows16-split8", 8, 16},
      {"rows16-split16", 16, 16}, {"rows16-split32", 32, 16}, {"rows32", 1, 32},
      {"rows32-split3", 3, 32}, {"sm90", 0, 0, llada::Sm90Use::kAlways},
      {"sm90-block-per-tile", 0, 0, llada::Sm90Use::kAlways, false}};
  for (const llada::Sm90PipelineName& named : llada::kSm90Pipelines)
    if (named.pipeline != Sm90Pipeline::kOneQuery)
      all.push_back({std::string("sm90-") + named.name, 0, 0, llada::Sm90Use::kAlways, true, named.pipeline,
                     named.name});
  return all;
}

// LLADA_ATTENTION_SM90=0 leaves the Hopper kernel out, as it does the op's.
bool sm90_left_out() {
  const char* value = std::getenv("LLADA_ATTENTION_SM90");
  return value != nullptr && std::string(value) == "0";
}

// LLADA_BENCH_SM90_PIPELINES, when set, lists the pipelines (by name,
// space-separated) to run; the others are left out.
bool pipeline_left_out(const Variant& variant) {
  const char* value = std::getenv("LLADA_BENCH_SM90_PIPELINES");
  if (value == nullptr || variant.pipeline_name.empty()) return false;
  const std::string wanted = std::string(" ") + value + " ";
  return wanted.find(" " + variant.pipeline_name + " ") == std::string::npos;
}

// Where the wrong elements of one (batch, head) lie: counts by query row
// within a 128-row tile (groups of 16) and by dim (groups of 16), which
// tells a tile-layout mistake from a numerical one.
void print_error_map(const std::vector<char>& bad_at, int64_t lq, int d) {
  int64_t by_row[8] = {}, by_dim[16] = {};
  for (int64_t i = 0; i < lq; ++i)
    for (int e = 0; e < d; ++e)
      if (bad_at[size_t(i * d + e)]) {
        ++by_row[(i % 128) / 16];
        ++by_dim[e / 16];
      }
  std::printf("  bad by row%%128/16:");
  for (int64_t n : by_row) std::printf(" %lld", (long long)n);
  std::printf("\n  bad by dim/16:");
  for (int i = 0; i < d / 16; ++i) std::printf(" %lld", (long long)by_dim[i]);
  std::printf("\n");
}

bool run_case(const Case& c, const bench::Options& o, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t b = c.batch, lq = c.q_len, lk = c.kv_len;
  const int hq = c.q_heads, hkv = c.kv_heads, d = c.head_dim;
  std::vector<float> q = randn(size_t(b * lq * hq * d), 2.0f, rng);  // scores ~ N(0, 4)
  std::vector<float> k = randn(size_t(b * lk * hkv * d), 1.0f, rng);
  std::vector<float> v = randn(size_t(b * lk * hkv * d), 1.0f, rng);
  const size_t el = c.dtype == DType::kFloat32 ? 4 : 2;
  std::vector<uint8_t> qb(q.size() * el), kb(k.size() * el), vb(v.size() * el);
  if (c.dtype == DType::kFloat32) {
    std::memcpy(qb.data(), q.data(), qb.size());
    std::memcpy(kb.data(), k.data(), kb.size());
    std::memcpy(vb.data(), v.data(), vb.size());
  } else {
    auto qs = round_to(q, c.dtype), ks = round_to(k, c.dtype), vs = round_to(v, c.dtype);
    std::memcpy(qb.data(), qs.data(), qb.size());
    std::memcpy(kb.data(), ks.data(), kb.size());
    std::memcpy(vb.data(), vs.data(), vb.size());
  }
  std::vector<uint8_t> mask_bytes;  // bool storage
  if (c.mask) {
    mask_bytes.assign(size_t(b * lk), 1);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    for (int64_t j = 0; j < lk; ++j) mask_bytes[size_t(j)] = (u(rng) > 0.3f && j >= lk / 5) || j == lk - 1;
    if (b > 1) {
      for (int64_t j = 0; j < lk; ++j) mask_bytes[size_t(lk + j)] = 0;
      mask_bytes[size_t(lk + lk / 2)] = 1;
    }
    if (b > 2)
      for (int64_t j = 0; j < lk; ++j) mask_bytes[size_t(2 * lk + j)] = 0;
  }

  // Reference: the CPU twin in float32 on the rounded inputs.
  AttentionParams ref{};
  ref.q = q.data();
  ref.k = k.data();
  ref.v = v.data();
  ref.key_mask = c.mask ? reinterpret_cast<const bool*>(mask_bytes.data()) : nullptr;
  std::vector<float> want(q.size(), 0.0f);
  ref.out = want.data();
  set_strides(ref.q_strides, lq, hq, d);
  set_strides(ref.k_strides, lk, hkv, d);
  set_strides(ref.v_strides, lk, hkv, d);
  ref.batch = b;
  ref.q_len = lq;
  ref.kv_len = lk;
  ref.q_heads = hq;
  ref.kv_heads = hkv;
  ref.head_dim = d;
  ref.scale = 1.0f / std::sqrt(float(d));
  ref.dtype = DType::kFloat32;
  // Which output rows are checked: all, or those of the first and last
  // (batch, head) for the big timed shapes (the CPU twin is single-threaded).
  std::vector<char> checked(size_t(b * hq), c.timed ? 0 : 1);
  checked.front() = checked.back() = 1;
  const int64_t q_tiles = (lq + llada::kAttentionCpuQueryTile - 1) / llada::kAttentionCpuQueryTile;
  for (int64_t bh = 0; bh < b * hq; ++bh)
    if (checked[size_t(bh)]) llada::attention_cpu(ref, bh * q_tiles, (bh + 1) * q_tiles);

  bench::DeviceBuffer<uint8_t> dq(qb.size()), dk(kb.size()), dv(vb.size()), dout(qb.size());
  bench::DeviceBuffer<uint8_t> dmask(std::max<size_t>(mask_bytes.size(), 1));
  dq.upload(qb);
  dk.upload(kb);
  dv.upload(vb);
  if (c.mask) dmask.upload(mask_bytes);
  AttentionParams p = ref;
  p.q = dq.ptr;
  p.k = dk.ptr;
  p.v = dv.ptr;
  p.key_mask = c.mask ? reinterpret_cast<const bool*>(dmask.ptr) : nullptr;
  p.out = dout.ptr;
  p.dtype = c.dtype;

  // Tolerances: P goes through the 16-bit type before P V, and the output is
  // rounded once; float32 only differs in summation order.
  const float atol = c.dtype == DType::kBFloat16 ? 1.5e-2f : c.dtype == DType::kFloat16 ? 4e-3f : 1e-5f;
  const float rtol = c.dtype == DType::kBFloat16 ? 1e-2f : c.dtype == DType::kFloat16 ? 2e-3f : 1e-4f;
  const double flops = 4.0 * double(b) * hq * double(lq) * double(lk) * d;
  bool all_ok = true;
  for (const Variant& variant : variants()) {
    if (c.dtype == DType::kFloat32 && variant.splits != 0) continue;  // fp32 never splits
    // Timed: rows32 on the full shapes (with 32 queries, most of its tiles
    // would be padding) and the forced splits on the cached-decoding shapes,
    // where the automatic plan's split count matters.
    if (c.timed && variant.rows_per_warp == 32 && (c.q_len < 128 || variant.splits > 1)) continue;
    if (c.timed && variant.splits > 1 && c.q_len >= 128) continue;
    // Up to 64 queries, the Hopper kernel has one pipeline.
    if (variant.pipeline != Sm90Pipeline::kOneQuery && c.q_len <= 64) continue;
    if (pipeline_left_out(variant)) continue;
    AttentionCudaPlan plan;
    if (variant.splits == 0) {
      CUDA_CHECK(llada::attention_cuda_plan(p, &plan, variant.sm90));
      if (variant.sm90 != llada::Sm90Use::kNever && !plan.sm90) continue;  // not this device or shape
      if (plan.sm90 && sm90_left_out()) continue;
      plan.sm90_persistent = variant.persistent;
      plan.sm90_pipeline = variant.pipeline;
    } else {
      plan.num_splits = variant.splits;
      plan.rows_per_warp = variant.rows_per_warp;
      plan.workspace_bytes = llada::attention_cuda_workspace_bytes(p, variant.splits);
    }
    bench::DeviceBuffer<uint8_t> workspace(std::max<size_t>(plan.workspace_bytes, 1));
    workspace.poison();  // a chunk the combine reads but nobody wrote shows up as NaN
    dout.poison();
    CUDA_CHECK(llada::attention_cuda(p, plan, workspace.ptr, 0));
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<uint8_t> out_bytes = dout.download();

    int64_t bad = 0;
    double max_err = 0.0;
    std::vector<char> bad_at;  // of the first (batch, head) with a wrong element
    int64_t mapped_bh = -1;
    for (int64_t bi = 0; bi < b; ++bi)
      for (int64_t i = 0; i < lq; ++i)
        for (int h = 0; h < hq; ++h) {
          if (!checked[size_t(bi * hq + h)]) continue;
          const size_t base = size_t(((bi * lq + i) * hq + h) * d);
          for (int e = 0; e < d; ++e) {
            const size_t idx = base + size_t(e);
            float got;
            if (c.dtype == DType::kFloat32) {
              std::memcpy(&got, out_bytes.data() + 4 * idx, 4);
            } else {
              uint16_t u;
              std::memcpy(&u, out_bytes.data() + 2 * idx, 2);
              got = bench::bits_to_float(u, c.dtype);
            }
            const float w = want[idx];
            if (std::isfinite(got)) max_err = std::max(max_err, double(std::fabs(got - w)));
            if (!bench::close(got, w, rtol, atol)) {
              if (mapped_bh < 0) {
                mapped_bh = bi * hq + h;
                bad_at.assign(size_t(lq * d), 0);
              }
              if (mapped_bh == bi * hq + h) bad_at[size_t(i * d + e)] = 1;
              if (bad < 5)
                std::printf("  MISMATCH out[b=%lld q=%lld h=%d d=%d]: got %.6g, want %.6g\n",
                            (long long)bi, (long long)i, h, e, got, w);
              ++bad;
            }
          }
        }

    char label[256];
    std::snprintf(label, sizeof label,
                  "kernel=attention variant=%s dtype=%s B=%lld Lq=%lld Lk=%lld Hq=%d Hkv=%d D=%d mask=%d "
                  "splits=%d rows_per_warp=%d sm90=%d",
                  variant.name.c_str(), bench::short_name(c.dtype), (long long)b, (long long)lq, (long long)lk, hq, hkv,
                  d, int(c.mask), plan.num_splits, plan.rows_per_warp, int(plan.sm90));
    if (bad != 0) {
      std::printf("RESULT %s max_err=%.3g mismatches=%lld FAIL\n", label, max_err, (long long)bad);
      print_error_map(bad_at, lq, d);
      all_ok = false;
      continue;
    }
    if (!c.timed) {
      std::printf("RESULT %s max_err=%.3g validated ok\n", label, max_err);
      continue;
    }
    const double us = bench::time_us(o, [&](int) { return llada::attention_cuda(p, plan, workspace.ptr, 0); });
    std::printf("RESULT %s max_err=%.3g us=%.1f TFLOPs=%.1f ok\n", label, max_err, us, flops / us / 1e6);
  }
  return all_ok;
}

}  // namespace

int main(int argc, char** argv) {
  const bench::Options o = bench::parse_options(argc, argv);
  bench::print_device();
  const DType bf16 = DType::kBFloat16, fp16 = DType::kFloat16, fp32 = DType::kFloat32;
  const std::vector<Case> cases = {
      // Validated in full: ragged lengths, GQA, padding, both head dims.
      {bf16, 1, 1, 1, 1, 1, 64, false, false},
      {bf16, 3, 17, 1000, 8, 2, 128, true, false},
      {fp16, 3, 17, 1000, 8, 2, 128, true, false},
      {fp16, 1, 255, 255, 4, 4, 64, false, false},
      {bf16, 3, 33, 77, 4, 1, 64, true, false},
      {bf16, 1, 300, 4097, 2, 1, 128, false, false},
      {bf16, 2, 130, 130, 32, 8, 128, true, false},
      {fp32, 3, 17, 300, 8, 2, 64, true, false},
      {fp32, 1, 65, 129, 2, 2, 128, false, false},
      {bf16, 1, 200, 1, 4, 4, 128, false, false},     // one key
      {bf16, 2, 256, 384, 4, 2, 128, false, false},   // whole 128-row tiles only
      // More 128-row items than an H100 has multiprocessors: persistent
      // blocks take 2 or 3 items each, so their Q buffers are reused.
      {bf16, 3, 333, 300, 32, 8, 128, true, false},
      // Timed: full shapes (Lq = Lk) and cached decoding (32 queries).
      {bf16, 1, 512, 512, 32, 32, 128, false, true},
      {bf16, 1, 1024, 1024, 32, 32, 128, false, true},
      {bf16, 1, 2048, 2048, 32, 32, 128, false, true},
      {bf16, 1, 4096, 4096, 32, 32, 128, false, true},
      {bf16, 8, 1024, 1024, 32, 32, 128, false, true},
      {bf16, 1, 32, 512, 32, 32, 128, false, true},
      {bf16, 1, 32, 1024, 32, 32, 128, false, true},
      {bf16, 1, 32, 2048, 32, 32, 128, false, true},
      {bf16, 1, 32, 4096, 32, 32, 128, false, true},
      {bf16, 8, 32, 1024, 32, 32, 128, false, true},
      {fp16, 1, 1024, 1024, 32, 32, 128, false, true},
  };
  bool ok = true;
  uint64_t seed = 20240601;
  for (const Case& c : cases) ok = run_case(c, o, seed++) && ok;
  std::printf("%s\n", ok ? "ALL OK" : "SOME CASES FAILED");
  return ok ? 0 : 1;
}
