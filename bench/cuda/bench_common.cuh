// Small helpers shared by the kernel microbenchmarks: error checks, flags,
// CUDA-event timing, fixed-seed random data and result lines.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "llada/common.h"

namespace bench {

#define CUDA_CHECK(expr)                                                           \
  do {                                                                             \
    cudaError_t err_ = (expr);                                                     \
    if (err_ != cudaSuccess) {                                                     \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(err_), \
                   __FILE__, __LINE__, cudaGetErrorString(err_));                  \
      std::exit(2);                                                                \
    }                                                                              \
  } while (0)

struct Options {
  int warmup = 10;
  int repeats = 100;
};

inline Options parse_options(int argc, char** argv) {
  // Line-buffered even into a file: a binary killed by a timeout (a hung
  // kernel) still leaves every line it printed before.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if ((a == "--repeats" || a == "--warmup") && i + 1 < argc) {
      int value = std::atoi(argv[++i]);
      if (value < 1) {
        std::fprintf(stderr, "%s: expected a positive integer\n", a.c_str());
        std::exit(2);
      }
      (a == "--repeats" ? o.repeats : o.warmup) = value;
    } else {
      std::fprintf(stderr, "usage: %s [--repeats N] [--warmup N]\n", argv[0]);
      std::exit(2);
    }
  }
  return o;
}

inline void print_device() {
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  std::printf("device: %s (sm_%d%d, %d SMs, L2 %.0f MiB)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, prop.l2CacheSize / 1048576.0);
}

inline int64_t l2_bytes() {
  int device = 0, bytes = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, device));
  return bytes;
}

// How many copies of an input of `bytes` to rotate through while timing so
// that every call reads from DRAM, not from the L2 the previous call filled
// (small cases would otherwise report cache bandwidth).
inline int copies_to_defeat_l2(int64_t bytes) {
  int64_t want = 3 * l2_bytes();
  int64_t copies = (want + bytes - 1) / std::max<int64_t>(bytes, 1);
  return int(std::clamp<int64_t>(copies, 1, 64));
}

// Mean microseconds per call of launch(i), i = 0, 1, ..., after a warm-up.
// launch returns the launcher's cudaError_t.
template <typename Launch>
double time_us(const Options& o, Launch&& launch) {
  for (int i = 0; i < o.warmup; ++i) CUDA_CHECK(launch(i));
  CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  CUDA_CHECK(cudaEventRecord(start));
  for (int i = 0; i < o.repeats; ++i) CUDA_CHECK(launch(i));
  CUDA_CHECK(cudaEventRecord(stop));
  CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  return 1000.0 * ms / o.repeats;
}

// Device-to-device copy bandwidth in GB/s (bytes read + bytes written): the
// practical ceiling for a kernel that streams its input once.
inline double copy_bandwidth_gbps(const Options& o, size_t bytes = size_t(1) << 30) {
  void *src = nullptr, *dst = nullptr;
  CUDA_CHECK(cudaMalloc(&src, bytes));
  CUDA_CHECK(cudaMalloc(&dst, bytes));
  CUDA_CHECK(cudaMemset(src, 1, bytes));
  Options copy_options = o;
  copy_options.repeats = std::min(o.repeats, 20);  // 1 GiB each: a few suffice
  copy_options.warmup = std::min(o.warmup, 3);
  double us = time_us(copy_options, [&](int) {
    return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0);
  });
  CUDA_CHECK(cudaFree(src));
  CUDA_CHECK(cudaFree(dst));
  double gbps = 2.0 * double(bytes) / (us * 1e3);
  std::printf("RESULT kernel=memcpy_d2d bytes=%zu us=%.1f GBps=%.1f ok\n", bytes, us, gbps);
  return gbps;
}

// ---------------------------------------------------------------------------
// Host data
// ---------------------------------------------------------------------------

// float -> bfloat16 bits, round to nearest even (inputs here are finite or inf).
// The dtype as the RESULT lines spell it.
inline const char* short_name(llada::DType t) {
  switch (t) {
    case llada::DType::kFloat32: return "fp32";
    case llada::DType::kBFloat16: return "bf16";
    case llada::DType::kFloat16: return "fp16";
  }
  return "?";
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline uint16_t to_half_bits(float x) {
  const __half h = __float2half_rn(x);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

// 16-bit encodings of `t` (bfloat16 or float16) to and from float,
// rounding to nearest even.
inline float bits_to_float(uint16_t u, llada::DType t) {
  if (t == llada::DType::kBFloat16) return llada::bf16_to_float(u);
  __half_raw raw;
  raw.x = u;
  return __half2float(__half(raw));
}

inline uint16_t bits_from_float(float x, llada::DType t) {
  return t == llada::DType::kBFloat16 ? float_to_bf16(x) : to_half_bits(x);
}

// `values` as the bytes of dtype `t`, rounding `values` in place to what
// those bytes hold (so a reference computed from them sees the same inputs).
inline std::vector<uint8_t> to_dtype(std::vector<float>& values, llada::DType t) {
  std::vector<uint8_t> bytes(values.size() * (t == llada::DType::kFloat32 ? 4 : 2));
  if (t == llada::DType::kFloat32) {
    std::memcpy(bytes.data(), values.data(), bytes.size());
    return bytes;
  }
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t u = bits_from_float(values[i], t);
    std::memcpy(bytes.data() + 2 * i, &u, 2);
    values[i] = bits_to_float(u, t);
  }
  return bytes;
}

// The elements of `bytes` (float32, or 16-bit encodings of `t`) as floats.
inline std::vector<float> as_floats(const std::vector<uint8_t>& bytes, llada::DType t) {
  const size_t size = t == llada::DType::kFloat32 ? 4 : 2;
  std::vector<float> out(bytes.size() / size);
  for (size_t i = 0; i < out.size(); ++i) {
    if (size == 4) {
      std::memcpy(&out[i], bytes.data() + 4 * i, 4);
    } else {
      uint16_t u;
      std::memcpy(&u, bytes.data() + 2 * i, 2);
      out[i] = bits_to_float(u, t);
    }
  }
  return out;
}

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(size_t n) : count(n) { CUDA_CHECK(cudaMalloc(&ptr, n * sizeof(T) + 1)); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void upload(const T* host) { CUDA_CHECK(cudaMemcpy(ptr, host, count * sizeof(T), cudaMemcpyHostToDevice)); }
  void upload(const std::vector<T>& host) { upload(host.data()); }
  std::vector<T> download() const {
    std::vector<T> host(count);
    CUDA_CHECK(cudaMemcpy(host.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  // Fill with 0xff bytes so an element the kernel forgets to write shows up
  // (-1 for integers, NaN for floats, true for bools).
  void poison() { CUDA_CHECK(cudaMemset(ptr, 0xff, count * sizeof(T))); }
};

// Floats agree when |a - b| <= atol + rtol * |b|; equal infinities agree.
inline bool close(float a, float b, float rtol, float atol) {
  if (std::isnan(a) || std::isnan(b)) return false;
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= atol + rtol * std::fabs(b);
}

// Counts mismatches of integer-like arrays, printing the first few.
template <typename T>
int64_t count_exact_mismatches(const char* what, const std::vector<T>& got,
                               const std::vector<T>& want) {
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (got[i] == want[i]) continue;
    if (bad < 5)
      std::printf("  MISMATCH %s[%zu]: got %lld, want %lld\n", what, i, (long long)got[i],
                  (long long)want[i]);
    ++bad;
  }
  return bad;
}

inline int64_t count_close_mismatches(const char* what, const std::vector<float>& got,
                                      const std::vector<float>& want, float rtol, float atol) {
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (close(got[i], want[i], rtol, atol)) continue;
    if (bad < 5)
      std::printf("  MISMATCH %s[%zu]: got %.9g, want %.9g\n", what, i, got[i], want[i]);
    ++bad;
  }
  return bad;
}

}  // namespace bench
