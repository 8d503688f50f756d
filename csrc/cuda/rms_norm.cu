// CUDA kernel of rms_norm: one block per row. A first pass reads the row with
// 16-byte loads (when its start and length allow) and sums the squares in
// float32 (with a residual: of the rounded sums, which it writes out); the
// block reduces them; a second pass re-reads the row (now in cache), scales,
// rounds and multiplies by the weight, as the CPU twin does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "llada/kernels_cuda.h"

namespace llada {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// float32 <-> the storage type, rounding to nearest even.
template <DType T>
struct Storage;
template <>
struct Storage<DType::kFloat32> {
  using type = float;
  __device__ __forceinline__ static float load(float v) { return v; }
  __device__ __forceinline__ static float round(float v) { return v; }
  __device__ __forceinline__ static float store(float v) { return v; }
};
template <>
struct Storage<DType::kBFloat16> {
  using type = uint16_t;
  __device__ __forceinline__ static float load(uint16_t v) { return __uint_as_float(uint32_t(v) << 16); }
  __device__ __forceinline__ static uint16_t store(float v) {
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    return *reinterpret_cast<const uint16_t*>(&b);
  }
  __device__ __forceinline__ static float round(float v) { return load(store(v)); }
};
template <>
struct Storage<DType::kFloat16> {
  using type = uint16_t;
  __device__ __forceinline__ static float load(uint16_t v) {
    __half_raw raw;
    raw.x = v;
    return __half2float(__half(raw));
  }
  __device__ __forceinline__ static uint16_t store(float v) {
    const __half h = __float2half_rn(v);
    return *reinterpret_cast<const uint16_t*>(&h);
  }
  __device__ __forceinline__ static float round(float v) { return load(store(v)); }
};

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += partial[w];
  return total;
}

// The row's value at one element: x, or with a residual the rounded sum
// x + residual (which the first pass also writes out).
template <DType T, bool kResidual>
__device__ __forceinline__ float value(const typename Storage<T>::type* x, const typename Storage<T>::type* r,
                                       int64_t j) {
  using S = Storage<T>;
  if constexpr (kResidual) return S::round(__fadd_rn(S::load(x[j]), S::load(r[j])));
  else return S::load(x[j]);
}

template <DType T, bool kResidual>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(RmsNormParams p) {
  using S = Storage<T>;
  using E = typename S::type;
  constexpr int kVec = 16 / sizeof(E);
  const int64_t row = blockIdx.x;
  const E* x = static_cast<const E*>(p.x) + row * p.dim;
  const E* res = kResidual ? static_cast<const E*>(p.residual) + row * p.dim : nullptr;
  E* sum_out = kResidual ? static_cast<E*>(p.sum) + row * p.dim : nullptr;
  const E* w = static_cast<const E*>(p.weight);
  E* out = static_cast<E*>(p.out) + row * p.dim;
  const bool vectors =
      p.dim % kVec == 0 && (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w) |
                            reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(res) |
                            reinterpret_cast<uintptr_t>(sum_out)) % 16 == 0;
  const int64_t n_vec = vectors ? p.dim / kVec : 0;

  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x) + i);
    uint4 raw_res{};
    if constexpr (kResidual) raw_res = __ldg(reinterpret_cast<const uint4*>(res) + i);
    E sums[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float v = value<T, kResidual>(reinterpret_cast<const E*>(&raw), reinterpret_cast<const E*>(&raw_res), j);
      if constexpr (kResidual) sums[j] = S::store(v);
      sum += v * v;
    }
    if constexpr (kResidual) {
      uint4 packed;
      memcpy(&packed, sums, sizeof packed);
      reinterpret_cast<uint4*>(sum_out)[i] = packed;
    }
  }
  for (int64_t i = n_vec * kVec + threadIdx.x; i < p.dim; i += kThreads) {
    const float v = value<T, kResidual>(x, res, i);
    if constexpr (kResidual) sum_out[i] = S::store(v);
    sum += v * v;
  }
  const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fdiv_rn(block_sum(sum), float(p.dim)) + p.eps));

  // The second pass recomputes the row's values from its inputs (now in
  // cache) rather than reading back what other threads wrote.
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x) + i);
    uint4 raw_res{};
    if constexpr (kResidual) raw_res = __ldg(reinterpret_cast<const uint4*>(res) + i);
    const uint4 wraw = __ldg(reinterpret_cast<const uint4*>(w) + i);
    const E* we = reinterpret_cast<const E*>(&wraw);
    uint4 result;
    E* r = reinterpret_cast<E*>(&result);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float v = value<T, kResidual>(reinterpret_cast<const E*>(&raw), reinterpret_cast<const E*>(&raw_res), j);
      r[j] = S::store(__fmul_rn(S::load(we[j]), S::round(__fmul_rn(v, inv))));
    }
    reinterpret_cast<uint4*>(out)[i] = result;
  }
  for (int64_t i = n_vec * kVec + threadIdx.x; i < p.dim; i += kThreads)
    out[i] = S::store(__fmul_rn(S::load(w[i]), S::round(__fmul_rn(value<T, kResidual>(x, res, i), inv))));
}

template <DType T>
cudaError_t launch(const RmsNormParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.rows));
  if (p.residual != nullptr) rms_norm_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  else rms_norm_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm_cuda(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return cudaSuccess;
  if (p.rows > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
  if ((p.residual == nullptr) != (p.sum == nullptr)) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return launch<DType::kFloat32>(p, stream);
    case DType::kBFloat16: return launch<DType::kBFloat16>(p, stream);
    case DType::kFloat16: return launch<DType::kFloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace llada
