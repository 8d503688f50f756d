// The element types of the elementwise CUDA kernels: the CUDA type of each
// DType, widened to float32 on load and rounded to nearest even on store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "llada/common.h"

namespace llada {

template <DType T>
struct Element;
template <>
struct Element<DType::kFloat32> {
  using type = float;
  __device__ __forceinline__ static float load(float v) { return v; }
  __device__ __forceinline__ static float store(float v) { return v; }
};
template <>
struct Element<DType::kBFloat16> {
  using type = __nv_bfloat16;
  __device__ __forceinline__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Element<DType::kFloat16> {
  using type = __half;
  __device__ __forceinline__ static float load(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half store(float v) { return __float2half_rn(v); }
};

}  // namespace llada
