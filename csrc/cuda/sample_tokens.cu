// CUDA kernel of sample_tokens: one thread block per row of logits.
//
// The row is streamed once with 16-byte loads, several in flight per thread.
// Each thread keeps an online-softmax state (running max and its index, the
// runner-up, sum of exp, sum of exp times logit offset for the entropy) and
// the best Gumbel score when sampling. The states are
// merged across the block; the softmax is never written out.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "llada/kernels_cuda.h"

namespace llada {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();

struct RowState {
  float max = kNegInf;     // running maximum of the logits (the top-1 logit)
  int32_t max_index = -1;  // its first index
  float second = kNegInf;  // second largest logit (equal to max on ties)
  float sum = 0.0f;        // sum of exp(x - max)
  float wsum = 0.0f;       // sum of exp(x - max) * (x - max) * log2(e)
  float best = kNegInf;    // best Gumbel score ...
  int32_t best_index = -1; // ... and its index
  bool nan = false;        // whether a logit is NaN (the max and sums skip it)
};

// 2^x in one special-function instruction (relative error ~2^-22; results
// below 2^-126 flush to 0, which only drops terms that cannot move the sums).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Exponent of x relative to the maximum, in base 2: (x - max) * log2(e).
// Subtracting first keeps it finite for every x <= max: x * log2(e) and
// max * log2(e) overflow float32 for logits below -FLT_MAX / log2(e), which
// torch.finfo(dtype).min is, a common mask value. -inf and NaN offsets are
// clamped to a finite one whose exp is exactly 0, so they add nothing and
// never make 0 * inf.
__device__ __forceinline__ float offset_log2(float x, float max) {
  return fmaxf((x - max) * kLog2e, -1.0e4f);
}

// Re-expresses the sums relative to a new, larger maximum.
__device__ __forceinline__ void rescale(RowState& s, float new_max) {
  if (s.sum > 0.0f) {
    float shift = (s.max - new_max) * kLog2e;
    float a = fast_exp2(shift);
    // A factor of 0 drops the old terms outright: the shift may be -inf or
    // so large that sum * shift is, and 0 * inf would be NaN.
    s.wsum = a > 0.0f ? a * (s.wsum + s.sum * shift) : 0.0f;
    s.sum *= a;
  }
  s.max = new_max;
}

__device__ __forceinline__ void merge(RowState& a, const RowState& b) {
  bool b_first = b.max_index >= 0 &&
                 (a.max_index < 0 || b.max > a.max || (b.max == a.max && b.max_index < a.max_index));
  a.second = fmaxf(fmaxf(a.second, b.second), b_first ? a.max : b.max);
  float m = fmaxf(a.max, b.max);
  if (m != kNegInf) {
    RowState bb = b;
    rescale(a, m);
    rescale(bb, m);
    a.sum += bb.sum;
    a.wsum += bb.wsum;
  }
  if (b_first) a.max_index = b.max_index;
  a.nan = a.nan || b.nan;
  if (b.best_index >= 0 &&
      (a.best_index < 0 || b.best > a.best || (b.best == a.best && b.best_index < a.best_index))) {
    a.best = b.best;
    a.best_index = b.best_index;
  }
}

// Folds N consecutive logits starting at column col0 into the state. A
// thread visits its columns in increasing order, so keeping the first
// maximum gives the lowest index on ties.
template <int N>
__device__ __forceinline__ void accumulate(RowState& s, float (&v)[N], int32_t col0,
                                           const int32_t* suppress, int num_suppress,
                                           bool sampling, GumbelScale scale, GumbelKey key) {
  for (int q = 0; q < num_suppress; ++q) {
    int32_t offset = suppress[q] - col0;
    if (offset >= 0 && offset < N) {
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (j == offset) v[j] = kNegInf;
    }
  }
  float chunk_max = v[0];
#pragma unroll
  for (int j = 1; j < N; ++j) chunk_max = fmaxf(chunk_max, v[j]);
#pragma unroll
  for (int j = 0; j < N; ++j) s.nan = s.nan || v[j] != v[j];
  if (chunk_max > s.max) {
    // A new maximum: rare after the first chunks, so the per-element work
    // of locating it and of finding the chunk's runner-up is done only here.
    int first = -1;
    float runner_up = kNegInf;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (first < 0 && v[j] == chunk_max) first = j;
      else runner_up = fmaxf(runner_up, v[j]);
    }
    s.second = fmaxf(s.max, runner_up);
    rescale(s, chunk_max);
    s.max_index = col0 + first;
  } else {
    s.second = fmaxf(s.second, chunk_max);
  }
  if (s.max != kNegInf) {
    float chunk_sum = 0.0f, chunk_wsum = 0.0f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float t = offset_log2(v[j], s.max);
      float e = fast_exp2(t);
      chunk_sum += e;
      chunk_wsum = fmaf(e, t, chunk_wsum);
    }
    s.sum += chunk_sum;
    s.wsum += chunk_wsum;
  }
  if (sampling) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (!(v[j] > kNegInf)) continue;  // -inf or NaN: never sampled
      float score = gumbel_score(v[j], scale, key, uint32_t(col0 + j));
      if (score > s.best || s.best_index < 0) {
        s.best = score;
        s.best_index = col0 + j;
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ float load_one(const T* p);
template <>
__device__ __forceinline__ float load_one<float>(const float* p) { return __ldg(p); }
template <>
__device__ __forceinline__ float load_one<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}
template <>
__device__ __forceinline__ float load_one<__half>(const __half* p) { return __half2float(__ldg(p)); }

// Widens the 16 bytes in `raw` into 16 / sizeof(T) floats.
template <typename T>
__device__ __forceinline__ void widen(const uint4& raw, float (&v)[16 / sizeof(T)]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < int(16 / sizeof(T)); ++j) {
    if constexpr (sizeof(T) == 4) v[j] = reinterpret_cast<const float*>(&raw)[j];
    else if constexpr (std::is_same_v<T, __nv_bfloat16>) v[j] = __bfloat162float(e[j]);
    else v[j] = __half2float(e[j]);
  }
}

__device__ __forceinline__ RowState shuffle_xor(const RowState& s, int offset) {
  RowState o;
  o.max = __shfl_xor_sync(0xffffffffu, s.max, offset);
  o.max_index = __shfl_xor_sync(0xffffffffu, s.max_index, offset);
  o.second = __shfl_xor_sync(0xffffffffu, s.second, offset);
  o.sum = __shfl_xor_sync(0xffffffffu, s.sum, offset);
  o.wsum = __shfl_xor_sync(0xffffffffu, s.wsum, offset);
  o.best = __shfl_xor_sync(0xffffffffu, s.best, offset);
  o.best_index = __shfl_xor_sync(0xffffffffu, s.best_index, offset);
  o.nan = __shfl_xor_sync(0xffffffffu, int(s.nan), offset) != 0;
  return o;
}

__device__ RowState block_merge(RowState s) {
  __shared__ RowState partial[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    merge(s, shuffle_xor(s, offset));
  }
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? partial[lane] : RowState{};
    for (int offset = 16; offset > 0; offset >>= 1) {
      merge(s, shuffle_xor(s, offset));
    }
  }
  return s;  // complete in thread 0
}

constexpr int kMaxSuppress = 64;

// Loads the kUnroll 16-byte vectors of thread group start i.
__device__ __forceinline__ void load_group(uint4 (&raw)[kUnroll], const uint4* xv, int32_t i) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) raw[u] = __ldg(xv + i + u * kThreads);
}

// kPrefetch issues the loads of a thread's next group before folding the
// current one, so its loads stay in flight while it computes; two blocks
// must still fit on a multiprocessor (64 registers per thread), hence the
// launch bound.
template <typename T, bool kPrefetch>
__global__ void __launch_bounds__(kThreads, 2) sample_tokens_kernel(SampleTokensParams p) {
  constexpr int kVec = 16 / sizeof(T);
  __shared__ int32_t suppress[kMaxSuppress];
  const int num_suppress = p.num_suppress;
  // Ids outside the vocabulary match no column (-1), also those that int32 would wrap into it.
  for (int i = threadIdx.x; i < num_suppress; i += kThreads) {
    const int64_t id = p.suppress[i];
    suppress[i] = id >= 0 && id < p.vocab ? int32_t(id) : -1;
  }
  __syncthreads();

  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  const int32_t vocab = int32_t(p.vocab);
  const bool sampling = p.temperature > 0.0f;
  const GumbelScale scale = gumbel_scale(p.temperature);
  const GumbelKey key = gumbel_row_key(p.seed, p.noise_rows != nullptr ? p.noise_rows[row] : row);
  RowState s;
  auto fold_group = [&](const uint4 (&raw)[kUnroll], int32_t i) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float v[kVec];
      widen<T>(raw[u], v);
      accumulate(s, v, (i + u * kThreads) * kVec, suppress, num_suppress, sampling, scale, key);
    }
  };

  // 16-byte loads when the row start allows them; the tail goes one by one.
  const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15) == 0;
  const int32_t num_vec = aligned ? vocab / kVec : 0;
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  const int32_t groups_end = num_vec - (kUnroll - 1) * kThreads;  // a whole group starts below
  int32_t i = threadIdx.x;
  if constexpr (kPrefetch) {
    if (i < groups_end) {
      uint4 raw[kUnroll];
      load_group(raw, xv, i);
      for (;;) {
        const int32_t next = i + kUnroll * kThreads;
        const bool more = next < groups_end;
        uint4 ahead[kUnroll];
        if (more) load_group(ahead, xv, next);
        fold_group(raw, i);
        i = next;
        if (!more) break;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) raw[u] = ahead[u];
      }
    }
  } else {
    for (; i < groups_end; i += kUnroll * kThreads) {
      uint4 raw[kUnroll];
      load_group(raw, xv, i);
      fold_group(raw, i);
    }
  }
  for (; i < num_vec; i += kThreads) {
    float v[kVec];
    widen<T>(__ldg(xv + i), v);
    accumulate(s, v, i * kVec, suppress, num_suppress, sampling, scale, key);
  }
  // 64-bit: with vocab near 2^31 the last step past it would wrap an int32.
  for (int64_t col = int64_t(num_vec) * kVec + threadIdx.x; col < vocab; col += kThreads) {
    float v[1] = {load_one(x + col)};
    accumulate(s, v, int32_t(col), suppress, num_suppress, sampling, scale, key);
  }

  s = block_merge(s);
  if (threadIdx.x != 0) return;
  const int32_t token = sampling ? s.best_index : s.max_index;
  if (token < 0) {
    p.tokens[row] = -1;
    p.confidence[row] = kNegInf;
    p.margin[row] = 0.0f;
    p.entropy[row] = 0.0f;
    return;
  }
  const float chosen = token == s.max_index ? s.max : load_one(x + token);
  // The maximum's own term, exactly as the sums took it (offset 0): a row
  // with one finite logit gets a confidence of exactly 1.
  const float top = fast_exp2(0.0f);
  p.tokens[row] = token;
  p.confidence[row] = fast_exp2(offset_log2(chosen, s.max)) / s.sum;
  p.margin[row] = (top - fast_exp2(offset_log2(s.second, s.max))) / s.sum;
  // When the other terms vanish next to the top one the sum is that one term
  // and the entropy is exactly 0, as on the CPU, whatever products too small
  // to move the sum the weighted sum kept. Elsewhere rounding must not take
  // it below 0, which no distribution has.
  p.entropy[row] = s.sum == top ? 0.0f : fmaxf(0.0f, logf(s.sum) - s.wsum / (s.sum * kLog2e));
  // As on the CPU, where a NaN logit, or a +inf one (inf - inf), makes the
  // row's sums NaN; here both terms were dropped from the sums.
  if (s.nan || s.max == -kNegInf) {
    p.confidence[row] = p.margin[row] = p.entropy[row] = __int_as_float(0x7fc00000);
  }
}

}  // namespace

namespace {

template <bool kPrefetch>
cudaError_t launch(const SampleTokensParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.num_suppress > kMaxSuppress || p.vocab >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  dim3 grid(unsigned(p.rows));
  switch (p.dtype) {
    case DType::kFloat32:
      sample_tokens_kernel<float, kPrefetch><<<grid, kThreads, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      sample_tokens_kernel<__nv_bfloat16, kPrefetch><<<grid, kThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      sample_tokens_kernel<__half, kPrefetch><<<grid, kThreads, 0, stream>>>(p);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t sample_tokens_cuda(const SampleTokensParams& p, cudaStream_t stream) {
  return launch<true>(p, stream);
}

cudaError_t sample_tokens_cuda_without_prefetch(const SampleTokensParams& p, cudaStream_t stream) {
  return launch<false>(p, stream);
}

}  // namespace llada
