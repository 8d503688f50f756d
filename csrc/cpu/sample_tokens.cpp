// CPU twin of the sample_tokens kernel.
//
// Each row is widened to float32 once into a per-thread buffer (a LLaDA row,
// 126464 floats, stays in the core's cache), then read by short loops that the
// compiler vectorises: the maximum, then the sums of exp(x - max) that give
// the probability, margin and entropy. The hot loops are compiled twice, for
// x86-64-v3 (AVX2, FMA) and for the baseline; the loader picks one by the
// instruction sets the processor has.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "llada/sample_tokens.h"

namespace llada {
namespace {


LLADA_MULTIVERSION
void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

LLADA_MULTIVERSION
void widen_f16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}

LLADA_MULTIVERSION
float row_max(const float* x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

struct RowSums {
  double sum_exp = 0;           // sum of exp(x - max)
  double sum_exp_shifted = 0;   // sum of exp(x - max) * (x - max)
  int64_t count_max = 0;        // how many entries equal the max
  float second = kNegInf;       // largest entry below the max
};

// Float partial sums over short chunks, added up in double, keep the sums
// accurate to ~1e-7 relative over a 126k-entry row.
LLADA_MULTIVERSION
RowSums row_sums(const float* x, int64_t n, float m) {
  RowSums out;
  constexpr int64_t kChunk = 1024;
  for (int64_t start = 0; start < n; start += kChunk) {
    int64_t end = start + kChunk < n ? start + kChunk : n;
    float s = 0, w = 0, second = kNegInf;
    int64_t count = 0;
#pragma omp simd reduction(+ : s, w, count) reduction(max : second)
    for (int64_t i = start; i < end; ++i) {
      float t = x[i] - m;
      float e = exp_nonpositive(t);
      s += e;
      w += e * (t < -87.0f ? 0.0f : t);
      count += x[i] == m ? 1 : 0;
      float below = x[i] < m ? x[i] : kNegInf;
      second = below > second ? below : second;
    }
    out.sum_exp += s;
    out.sum_exp_shifted += w;
    out.count_max += count;
    out.second = second > out.second ? second : out.second;
  }
  return out;
}

int64_t first_index_of(const float* x, int64_t n, float value) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] == value) return i;
  return -1;
}

// The noise is computed for the whole row first (a loop that vectorises), then
// the first maximal score is taken. A row whose every score overflowed to
// -inf falls back to its first finite logit, as the GPU kernel does.
LLADA_MULTIVERSION
void gumbel_scores(const float* x, float* score, int64_t n, GumbelScale scale, GumbelKey key) {
  for (int64_t i = 0; i < n; ++i)
    score[i] = x[i] == kNegInf ? kNegInf : gumbel_score(x[i], scale, key, uint32_t(i));
}

int64_t gumbel_argmax(const float* x, float* score, int64_t n, float temperature, uint64_t seed,
                      int64_t row) {
  gumbel_scores(x, score, n, gumbel_scale(temperature), gumbel_row_key(seed, row));
  const float best = row_max(score, n);
  if (best == kNegInf) {
    for (int64_t i = 0; i < n; ++i)
      if (x[i] != kNegInf) return i;
  }
  return first_index_of(score, n, best);
}

void sample_row(const SampleTokensParams& p, int64_t row, std::vector<float>& buffer) {
  const int64_t v = p.vocab;
  // The widened row, followed by room for the Gumbel scores when sampling.
  buffer.resize(size_t(p.temperature > 0.0f ? 2 * v : v));
  float* x = buffer.data();
  const char* base = static_cast<const char*>(p.logits);
  switch (p.dtype) {
    case DType::kFloat32: {
      const float* src = reinterpret_cast<const float*>(base) + row * p.row_stride;
      std::memcpy(x, src, size_t(v) * sizeof(float));
      break;
    }
    case DType::kBFloat16:
      widen_bf16(reinterpret_cast<const uint16_t*>(base) + row * p.row_stride, x, v);
      break;
    case DType::kFloat16:
      widen_f16(reinterpret_cast<const uint16_t*>(base) + row * p.row_stride, x, v);
      break;
  }
  for (int32_t i = 0; i < p.num_suppress; ++i) x[p.suppress[i]] = kNegInf;

  const float m = row_max(x, v);
  if (m == kNegInf) {  // nothing can be chosen in this row
    p.tokens[row] = -1;
    p.confidence[row] = kNegInf;
    p.margin[row] = 0.0f;
    p.entropy[row] = 0.0f;
    return;
  }
  const RowSums sums = row_sums(x, v, m);
  const int64_t token = p.temperature > 0.0f
                            ? gumbel_argmax(x, x + v, v, p.temperature, p.seed,
                                            p.noise_rows != nullptr ? p.noise_rows[row] : row)
                            : first_index_of(x, v, m);
  const double s = sums.sum_exp;
  p.tokens[row] = token;
  p.confidence[row] = float(std::exp(double(x[token]) - double(m)) / s);
  const double second = sums.count_max > 1 ? 1.0 : std::exp(double(sums.second) - double(m));
  p.margin[row] = float((1.0 - second) / s);
  p.entropy[row] = float(std::log(s) - sums.sum_exp_shifted / s);
}

}  // namespace

void sample_tokens_cpu(const SampleTokensParams& p, int64_t row_begin, int64_t row_end) {
  thread_local std::vector<float> buffer;
  for (int64_t row = row_begin; row < row_end; ++row) sample_row(p, row, buffer);
}

}  // namespace llada
