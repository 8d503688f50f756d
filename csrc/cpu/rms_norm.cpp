// CPU twin of rms_norm: per row, the sum of squares in float32 over 16
// interleaved partial sums (so the loop vectorises), then one pass that
// scales, rounds and multiplies by the weight. With a residual, the row's
// rounded sum x + residual is written out first and normalised from there.
#include "llada/rms_norm.h"

#include <cmath>

#include "cpu_math.h"

namespace llada {
namespace {

constexpr int kLanes = 16;

LLADA_MULTIVERSION
float sum_of_squares(const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * x[i + j];
  for (; i < n; ++i) acc[i % kLanes] += x[i] * x[i];
  float sum = 0.0f;
  for (int j = 0; j < kLanes; ++j) sum += acc[j];
  return sum;
}

float inverse_rms(float sum_sq, int64_t dim, float eps) {
  return 1.0f / std::sqrt(sum_sq / float(dim) + eps);
}

// The row to normalise: x's, or with a residual the sum, written out here.
LLADA_MULTIVERSION
const float* row_float32(const RmsNormParams& p, int64_t r) {
  const float* x = static_cast<const float*>(p.x) + r * p.dim;
  if (p.residual == nullptr) return x;
  const float* res = static_cast<const float*>(p.residual) + r * p.dim;
  float* sum = static_cast<float*>(p.sum) + r * p.dim;
#pragma omp simd
  for (int64_t i = 0; i < p.dim; ++i) sum[i] = x[i] + res[i];
  return sum;
}

LLADA_MULTIVERSION
const uint16_t* row_bfloat16(const RmsNormParams& p, int64_t r) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + r * p.dim;
  if (p.residual == nullptr) return x;
  const uint16_t* res = static_cast<const uint16_t*>(p.residual) + r * p.dim;
  uint16_t* sum = static_cast<uint16_t*>(p.sum) + r * p.dim;
  for (int64_t i = 0; i < p.dim; ++i) sum[i] = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(res[i]));
  return sum;
}

LLADA_MULTIVERSION
void rows_float32(const RmsNormParams& p, int64_t begin, int64_t end) {
  const float* w = static_cast<const float*>(p.weight);
  for (int64_t r = begin; r < end; ++r) {
    const float* x = row_float32(p, r);
    float* out = static_cast<float*>(p.out) + r * p.dim;
    const float inv = inverse_rms(sum_of_squares(x, p.dim), p.dim, p.eps);
#pragma omp simd
    for (int64_t i = 0; i < p.dim; ++i) out[i] = w[i] * (x[i] * inv);
  }
}

LLADA_MULTIVERSION
void rows_bfloat16(const RmsNormParams& p, int64_t begin, int64_t end) {
  constexpr int64_t kChunk = 256;  // widened in pieces that stay in L1
  const uint16_t* w = static_cast<const uint16_t*>(p.weight);
  float buf[kChunk];
  for (int64_t r = begin; r < end; ++r) {
    const uint16_t* x = row_bfloat16(p, r);
    uint16_t* out = static_cast<uint16_t*>(p.out) + r * p.dim;
    float acc = 0.0f;
    for (int64_t c = 0; c < p.dim; c += kChunk) {
      const int64_t n = p.dim - c < kChunk ? p.dim - c : kChunk;
      for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(x[c + i]);
      acc += sum_of_squares(buf, n);
    }
    const float inv = inverse_rms(acc, p.dim, p.eps);
    for (int64_t i = 0; i < p.dim; ++i) {
      const float y = bf16_to_float(float_to_bf16(bf16_to_float(x[i]) * inv));
      out[i] = float_to_bf16(bf16_to_float(w[i]) * y);
    }
  }
}

}  // namespace

void rms_norm_cpu(const RmsNormParams& p, int64_t row_begin, int64_t row_end) {
  if (p.dtype == DType::kFloat32) rows_float32(p, row_begin, row_end);
  else rows_bfloat16(p, row_begin, row_end);
}

}  // namespace llada
