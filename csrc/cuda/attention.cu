// CUDA kernels of attention.
//
// bf16 / fp16: a flash-attention-2 style kernel on tensor cores (mma.sync
// m16n8k16, fp32 accumulation). A thread block of 4 warps owns 64 query rows
// of one (batch, query head), 16 rows per warp; it streams the keys in tiles
// of 64 through shared memory, double-buffered with cp.async, and keeps the
// output accumulator and the online-softmax state (row max m, row sum l) in
// registers. The structure is that of the CPU twin (csrc/cpu/attention.cpp):
// S = Q K^T per key tile, mask, update m and l, rescale O, O += P V, and at
// the end O / l (zeros for a row with no valid key).
//
// When there are too few (batch, head, query tile) blocks to fill the device
// (decoding: 32 active queries against thousands of keys), the key tiles are
// split into chunks, one block per chunk; each writes its unnormalised O, m
// and l to a float32 workspace and a second kernel combines the chunks.
//
// float32: a simple kernel (one warp per query row, one key at a time), kept
// for testing; it is not meant to be fast.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "llada/kernels_cuda.h"

namespace llada {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockQ = 16 * kWarps;  // query rows per block: 16 per warp
constexpr int kBlockK = 64;           // keys per tile
constexpr int kPad = 8;               // 16 bytes of padding per shared row (see SharedLayout)
constexpr int kMaxSplits = 64;
constexpr float kLog2e = 1.4426950408889634f;

// Shared memory: Q [64][D + pad], then two stages of K [64][D + pad] and two
// of V. The padding makes a row 16 bytes longer than a multiple of 128, so
// the 8 row addresses of one ldmatrix 8x8 matrix fall in 8 different 16-byte
// bank groups (no conflicts), and every row still starts 16-byte aligned for
// cp.async and ldmatrix.
template <int D>
struct SharedLayout {
  static constexpr int kStride = D + kPad;           // elements per row
  static constexpr int kTile = kBlockK * kStride;    // elements per K or V tile
  static constexpr int kQ = kBlockQ * kStride;       // elements of the Q tile
  static constexpr size_t kBytes = size_t(kQ + 4 * kTile) * sizeof(uint16_t);
};

// ---------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}

// Copies 16 bytes global -> shared asynchronously; with valid == false the
// source size is 0, which writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i,
// and each thread receives, in r[i], row lane/4, columns 2*(lane%4) and +1 of
// matrix i (with .trans: column lane/4, rows 2*(lane%4) and +1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row))
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row))
               : "memory");
}

// The 16-bit input types: the mma instruction and float conversions.
struct Bf16 {
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Two floats as one register: `lo` in the low half (the lower column).
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ __forceinline__ static uint16_t from_float(float x) {
    const __nv_bfloat16 v = __float2bfloat16_rn(x);
    return *reinterpret_cast<const uint16_t*>(&v);
  }
};

struct Fp16 {
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ __forceinline__ static uint16_t from_float(float x) {
    const __half v = __float2half_rn(x);
    return *reinterpret_cast<const uint16_t*>(&v);
  }
};

// ---------------------------------------------------------------------------
// Tensor-core kernel
//
// Fragment layouts of mma.m16n8k16 (PTX ISA), with g = lane / 4 and
// t = lane % 4:
//   A (16x16, row-major) a[0]: row g, cols 2t..2t+1;   a[1]: row g+8, same cols;
//                        a[2]: row g, cols 2t+8..+9;   a[3]: row g+8, cols 2t+8..+9
//   B (16x8, k x n)      b0: k 2t..2t+1, col n = g;    b1: k 2t+8..+9, n = g
//   C (16x8, float)      c[0..1]: row g, cols 2t..2t+1; c[2..3]: row g+8, same cols
// Two C tiles side by side (16 columns) hold exactly the A fragment of a
// 16x16 tile, which is how P goes from the softmax straight into P V.
// ---------------------------------------------------------------------------

template <typename Traits, int D>
__global__ void __launch_bounds__(kThreads)
    attention_mma_kernel(AttentionParams p, int tiles_per_split, float* part_o, float* part_ml) {
  using L = SharedLayout<D>;
  constexpr int kStride = L::kStride;
  constexpr int kChunks = D / 8;      // 16-byte chunks per row
  constexpr int kDSteps = D / 16;     // k-steps of Q K^T, and 16-wide column pairs of O
  constexpr int kKeySteps = kBlockK / 16;
  constexpr int kKeyTiles8 = kBlockK / 8;  // n-tiles of S

  extern __shared__ __align__(16) unsigned char shared_raw[];
  uint16_t* s_q = reinterpret_cast<uint16_t*>(shared_raw);
  uint16_t* s_k = s_q + L::kQ;         // 2 stages
  uint16_t* s_v = s_k + 2 * L::kTile;  // 2 stages

  const int64_t q_tiles = (p.q_len + kBlockQ - 1) / kBlockQ;
  const int64_t q_tile = int64_t(blockIdx.x) % q_tiles;
  const int64_t bh = int64_t(blockIdx.x) / q_tiles;  // b * q_heads + h
  const int64_t h = bh % p.q_heads;
  const int64_t b = bh / p.q_heads;
  const int64_t h_kv = h / (p.q_heads / p.kv_heads);  // repeat_interleave grouping
  const int64_t q0 = q_tile * kBlockQ;

  const int64_t n_tiles = (p.kv_len + kBlockK - 1) / kBlockK;
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < n_tiles ? tile_begin + tiles_per_split : n_tiles;

  const int warp = int(threadIdx.x) / 32;
  const int lane = int(threadIdx.x) % 32;
  const int g = lane / 4;
  const int t4 = lane % 4;

  const uint16_t* q_base = static_cast<const uint16_t*>(p.q) + b * p.q_strides[0] + h * p.q_strides[2];
  const uint16_t* k_base = static_cast<const uint16_t*>(p.k) + b * p.k_strides[0] + h_kv * p.k_strides[2];
  const uint16_t* v_base = static_cast<const uint16_t*>(p.v) + b * p.v_strides[0] + h_kv * p.v_strides[2];
  const bool* mask = p.key_mask != nullptr ? p.key_mask + b * p.kv_len : nullptr;

  // Q tile; rows past the end are zero-filled (their results are dropped).
  for (int c = int(threadIdx.x); c < kBlockQ * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = q0 + r < p.q_len;
    const uint16_t* src = q_base + (valid ? q0 + r : 0) * p.q_strides[1] + col;
    cp_async_16(s_q + r * kStride + col, src, valid);
  }
  // K and V tiles; keys past the end are zero-filled, so P V never reads
  // garbage (0 * NaN would poison O).
  auto load_kv = [&](int64_t tile, int stage) {
    const int64_t k0 = tile * kBlockK;
    uint16_t* dk = s_k + stage * L::kTile;
    uint16_t* dv = s_v + stage * L::kTile;
    for (int c = int(threadIdx.x); c < kBlockK * kChunks; c += kThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const bool valid = k0 + r < p.kv_len;
      const int64_t key = valid ? k0 + r : 0;
      cp_async_16(dk + r * kStride + col, k_base + key * p.k_strides[1] + col, valid);
      cp_async_16(dv + r * kStride + col, v_base + key * p.v_strides[1] + col, valid);
    }
  };
  if (tile_begin < tile_end) load_kv(tile_begin, 0);
  cp_async_commit();  // group 0: Q and the first K/V tile

  // This thread's rows are g and g + 8 of the warp's 16; index 0 and 1 below.
  float o[2 * kDSteps][4];
#pragma unroll
  for (int i = 0; i < 2 * kDSteps; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max of the log2-scaled scores
  float l_run[2] = {0.0f, 0.0f};            // this thread's share of the row sum
  uint32_t q_frag[kDSteps][4];
  // A warp whose 16 rows all lie past the end of q only helps with the loads.
  const bool warp_active = q0 + warp * 16 < p.q_len;
  const float scale_log2 = p.scale * kLog2e;

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int stage = int((tile - tile_begin) & 1);
    if (tile + 1 < tile_end) {
      // The other stage was last read in the previous iteration, which ended
      // with __syncthreads(), so it is free to overwrite.
      load_kv(tile + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();  // everything but the tile just requested has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // every thread's copies of this tile are visible

    if (tile == tile_begin) {
#pragma unroll
      for (int kc = 0; kc < kDSteps; ++kc)
        ldmatrix_x4(q_frag[kc], s_q + (warp * 16 + (lane % 16)) * kStride + kc * 16 + (lane / 16) * 8);
    }

    if (warp_active) {
      const uint16_t* tk = s_k + stage * L::kTile;
      const uint16_t* tv = s_v + stage * L::kTile;

      // S = Q K^T for the warp's 16 rows x 64 keys: 8 n-tiles of 8 keys.
      float s[kKeyTiles8][4];
#pragma unroll
      for (int i = 0; i < kKeyTiles8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
      for (int kc = 0; kc < kDSteps; ++kc) {
#pragma unroll
        for (int np = 0; np < kKeyTiles8 / 2; ++np) {
          // Matrix i: keys np*16 + (i/2)*8 .. +7, dims kc*16 + (i%2)*8 .. +7;
          // stored key-major, which is B's column-major layout.
          uint32_t kb[4];
          const int i = lane / 8, r = lane % 8;
          ldmatrix_x4(kb, tk + (np * 16 + (i / 2) * 8 + r) * kStride + kc * 16 + (i % 2) * 8);
          Traits::mma(s[2 * np], q_frag[kc], kb[0], kb[1]);
          Traits::mma(s[2 * np + 1], q_frag[kc], kb[2], kb[3]);
        }
      }

      // Scale into the log2 domain; masked and absent keys get -inf.
      const int64_t k0 = tile * kBlockK;
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < kKeyTiles8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t key = k0 + nt * 8 + t4 * 2 + (e & 1);
          const bool valid = key < p.kv_len && (mask == nullptr || mask[key]);
          s[nt][e] = valid ? s[nt][e] * scale_log2 : -INFINITY;
          tile_max[e / 2] = fmaxf(tile_max[e / 2], s[nt][e]);
        }
      }
      // A row is spread over the 4 threads of a quad (same g).
      float m_use[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        const float m_new = fmaxf(m_run[r], tile_max[r]);
        // With no valid key yet (m_new = -inf) every p is exp2(-inf) = 0 and
        // O, l stay 0: subtract 0 instead of -inf to avoid -inf - -inf = NaN.
        m_use[r] = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = exp2f(m_run[r] - m_use[r]);  // 0 when m_run was -inf
        m_run[r] = m_new;
        l_run[r] *= alpha;
#pragma unroll
        for (int nt = 0; nt < 2 * kDSteps; ++nt) {
          o[nt][2 * r] *= alpha;
          o[nt][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (int nt = 0; nt < kKeyTiles8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = exp2f(s[nt][e] - m_use[e / 2]);
          l_run[e / 2] += s[nt][e];
        }
      }

      // O += P V: P (16 x 64) is the A operand, 16 keys per k-step.
#pragma unroll
      for (int kc = 0; kc < kKeySteps; ++kc) {
        uint32_t a[4];
        a[0] = Traits::pack(s[2 * kc][0], s[2 * kc][1]);
        a[1] = Traits::pack(s[2 * kc][2], s[2 * kc][3]);
        a[2] = Traits::pack(s[2 * kc + 1][0], s[2 * kc + 1][1]);
        a[3] = Traits::pack(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
        for (int dp = 0; dp < kDSteps; ++dp) {
          // Matrix i: keys kc*16 + (i%2)*8 .. +7, dims dp*16 + (i/2)*8 .. +7,
          // transposed on load so each thread gets two consecutive keys.
          uint32_t vb[4];
          const int i = lane / 8, r = lane % 8;
          ldmatrix_x4_trans(vb, tv + (kc * 16 + (i % 2) * 8 + r) * kStride + dp * 16 + (i / 2) * 8);
          Traits::mma(o[2 * dp], a, vb[0], vb[1]);
          Traits::mma(o[2 * dp + 1], a, vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // this stage is read; the next iteration may refill it
  }
  cp_async_wait<0>();  // nothing may be in flight at exit (no key tiles: Q only)

  // Whole row sums: add up the quad's shares.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
  }
  if (!warp_active) return;

  const int64_t total_rows = p.batch * p.q_heads * p.q_len;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = q0 + warp * 16 + g + 8 * r;
    if (row >= p.q_len) continue;
    if (part_o == nullptr) {
      const float inv = l_run[r] > 0.0f ? 1.0f / l_run[r] : 0.0f;  // no valid key: zeros
      uint16_t* dst = static_cast<uint16_t*>(p.out) + ((b * p.q_len + row) * p.q_heads + h) * D;
#pragma unroll
      for (int nt = 0; nt < 2 * kDSteps; ++nt)
        *reinterpret_cast<uint32_t*>(dst + nt * 8 + t4 * 2) =
            Traits::pack(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
    } else {
      const int64_t idx = int64_t(blockIdx.y) * total_rows + bh * p.q_len + row;
      float* dst = part_o + idx * D;
#pragma unroll
      for (int nt = 0; nt < 2 * kDSteps; ++nt)
        *reinterpret_cast<float2*>(dst + nt * 8 + t4 * 2) = make_float2(o[nt][2 * r], o[nt][2 * r + 1]);
      if (t4 == 0) {
        part_ml[2 * idx] = m_run[r];
        part_ml[2 * idx + 1] = l_run[r];
      }
    }
  }
}

// Combines the key chunks of one (batch, head, query) row per block, one
// thread per output element: O = sum_s w_s O_s / sum_s w_s l_s with
// w_s = 2^(m_s - max m).
template <typename Traits, int D>
__global__ void __launch_bounds__(D)
    attention_combine_kernel(AttentionParams p, int splits, const float* part_o, const float* part_ml) {
  const int64_t row_id = blockIdx.x;  // (b * q_heads + h) * q_len + q
  const int64_t total_rows = p.batch * p.q_heads * p.q_len;
  const int d = int(threadIdx.x);
  float m_max = -INFINITY;
  for (int s = 0; s < splits; ++s) m_max = fmaxf(m_max, part_ml[2 * (s * total_rows + row_id)]);
  float sum = 0.0f, acc = 0.0f;
  if (m_max != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const int64_t idx = s * total_rows + row_id;
      const float m = part_ml[2 * idx];
      if (m == -INFINITY) continue;  // a chunk with no valid key
      const float w = exp2f(m - m_max);
      sum += w * part_ml[2 * idx + 1];
      acc += w * part_o[idx * D + d];
    }
  }
  const int64_t q = row_id % p.q_len;
  const int64_t bh = row_id / p.q_len;
  const int64_t h = bh % p.q_heads, b = bh / p.q_heads;
  uint16_t* dst = static_cast<uint16_t*>(p.out) + ((b * p.q_len + q) * p.q_heads + h) * D;
  dst[d] = Traits::from_float(sum > 0.0f ? acc / sum : 0.0f);
}

// ---------------------------------------------------------------------------
// float32 kernel: one warp per output row (b, q, h); lane holds dims
// lane, lane + 32, ...; one key at a time with a warp-wide dot product.
// ---------------------------------------------------------------------------

template <int D>
__global__ void __launch_bounds__(kThreads) attention_fp32_kernel(AttentionParams p) {
  constexpr int E = D / 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = int(threadIdx.x) % 32;
  if (row >= p.batch * p.q_len * p.q_heads) return;  // whole warps leave together
  const int64_t h = row % p.q_heads;
  const int64_t q = (row / p.q_heads) % p.q_len;
  const int64_t b = row / p.q_heads / p.q_len;
  const int64_t h_kv = h / (p.q_heads / p.kv_heads);
  const float* qp = static_cast<const float*>(p.q) + b * p.q_strides[0] + q * p.q_strides[1] + h * p.q_strides[2];
  const float* kp = static_cast<const float*>(p.k) + b * p.k_strides[0] + h_kv * p.k_strides[2];
  const float* vp = static_cast<const float*>(p.v) + b * p.v_strides[0] + h_kv * p.v_strides[2];
  const bool* mask = p.key_mask != nullptr ? p.key_mask + b * p.kv_len : nullptr;
  const float scale_log2 = p.scale * kLog2e;

  float qv[E], acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    qv[e] = qp[lane + 32 * e] * scale_log2;
    acc[e] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int64_t key = 0; key < p.kv_len; ++key) {
    if (mask != nullptr && !mask[key]) continue;
    const float* kr = kp + key * p.k_strides[1];
    float dot = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) dot += qv[e] * kr[lane + 32 * e];
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float m_new = fmaxf(m, dot);
    const float alpha = exp2f(m - m_new);  // 0 for the first valid key
    const float pr = exp2f(dot - m_new);
    l = l * alpha + pr;
    const float* vr = vp + key * p.v_strides[1];
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = acc[e] * alpha + pr * vr[lane + 32 * e];
    m = m_new;
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  float* dst = static_cast<float*>(p.out) + row * D;  // out is [B, Lq, Hq, D]: row-major rows
#pragma unroll
  for (int e = 0; e < E; ++e) dst[lane + 32 * e] = acc[e] * inv;
}

// ---------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------

int64_t key_tiles(const AttentionParams& p) { return (p.kv_len + kBlockK - 1) / kBlockK; }
int64_t query_blocks(const AttentionParams& p) {
  return p.batch * p.q_heads * ((p.q_len + kBlockQ - 1) / kBlockQ);
}

template <typename Traits, int D>
cudaError_t prepare_mma_kernel() {
  return cudaFuncSetAttribute(attention_mma_kernel<Traits, D>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                              int(SharedLayout<D>::kBytes));
}

template <typename Traits, int D>
cudaError_t blocks_per_sm(int* out) {
  cudaError_t err = prepare_mma_kernel<Traits, D>();
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(out, attention_mma_kernel<Traits, D>, kThreads,
                                                       SharedLayout<D>::kBytes);
}

// Splits the key tiles into `want` chunks of equal tile counts; returns the
// chunk count actually used (no empty chunks) and the tiles per chunk.
void split_tiles(int64_t n_tiles, int want, int* splits, int* tiles_per_split) {
  if (n_tiles <= 1 || want <= 1) {
    *splits = 1;
    *tiles_per_split = int(n_tiles > 0 ? n_tiles : 1);
    return;
  }
  const int64_t s = want < n_tiles ? want : n_tiles;
  const int64_t per = (n_tiles + s - 1) / s;
  *tiles_per_split = int(per);
  *splits = int((n_tiles + per - 1) / per);
}

template <typename Traits, int D>
cudaError_t launch_mma(const AttentionParams& p, int want_splits, void* workspace, cudaStream_t stream) {
  const int64_t blocks = query_blocks(p);
  if (blocks > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
  int splits = 1, per = 1;
  split_tiles(key_tiles(p), want_splits, &splits, &per);
  if (splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = prepare_mma_kernel<Traits, D>();
  if (err != cudaSuccess) return err;
  const int64_t total_rows = p.batch * p.q_heads * p.q_len;
  float* part_o = nullptr;
  float* part_ml = nullptr;
  if (splits > 1) {
    part_o = static_cast<float*>(workspace);
    part_ml = part_o + int64_t(splits) * total_rows * D;
  }
  attention_mma_kernel<Traits, D>
      <<<dim3(unsigned(blocks), unsigned(splits)), kThreads, SharedLayout<D>::kBytes, stream>>>(
          p, per, part_o, part_ml);
  err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  if (total_rows > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
  attention_combine_kernel<Traits, D><<<unsigned(total_rows), D, 0, stream>>>(p, splits, part_o, part_ml);
  return cudaGetLastError();
}

template <typename Traits>
cudaError_t launch_mma_dim(const AttentionParams& p, int want_splits, void* workspace,
                           cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_mma<Traits, 64>(p, want_splits, workspace, stream);
    case 128: return launch_mma<Traits, 128>(p, want_splits, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

size_t attention_cuda_workspace_bytes(const AttentionParams& p, int num_splits) {
  if (num_splits <= 1 || p.dtype == DType::kFloat32) return 0;
  const int64_t total_rows = p.batch * p.q_heads * p.q_len;
  return size_t(num_splits) * size_t(total_rows) * size_t(p.head_dim + 2) * sizeof(float);
}

cudaError_t attention_cuda_plan(const AttentionParams& p, AttentionCudaPlan* plan) {
  plan->num_splits = 1;
  plan->workspace_bytes = 0;
  const int64_t n_tiles = key_tiles(p);
  if (p.dtype == DType::kFloat32 || query_blocks(p) == 0 || n_tiles < 2) return cudaSuccess;
  if (!attention_head_dim_supported(p.head_dim)) return cudaErrorInvalidValue;
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  // Occupancy depends only on the head dim (shared memory), not the dtype.
  err = p.head_dim == 64 ? blocks_per_sm<Bf16, 64>(&per_sm) : blocks_per_sm<Bf16, 128>(&per_sm);
  if (err != cudaSuccess) return err;
  const int64_t capacity = int64_t(sms) * (per_sm > 0 ? per_sm : 1);
  const int64_t blocks = query_blocks(p);
  // More than half a wave of blocks already keeps the device busy enough;
  // below that, split the keys so that about one full wave runs.
  if (2 * blocks > capacity) return cudaSuccess;
  int64_t want = (capacity + blocks - 1) / blocks;
  if (want > kMaxSplits) want = kMaxSplits;
  int splits = 1, per = 1;
  split_tiles(n_tiles, int(want), &splits, &per);
  plan->num_splits = splits;
  plan->workspace_bytes = attention_cuda_workspace_bytes(p, splits);
  return cudaSuccess;
}

cudaError_t attention_cuda(const AttentionParams& p, const AttentionCudaPlan& plan, void* workspace,
                           cudaStream_t stream) {
  if (p.batch == 0 || p.q_len == 0 || p.q_heads == 0) return cudaSuccess;
  if (p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kBFloat16: return launch_mma_dim<Bf16>(p, plan.num_splits, workspace, stream);
    case DType::kFloat16: return launch_mma_dim<Fp16>(p, plan.num_splits, workspace, stream);
    case DType::kFloat32: {
      const int64_t rows = p.batch * p.q_len * p.q_heads;
      const int64_t blocks = (rows + kWarps - 1) / kWarps;
      if (blocks > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
      if (p.head_dim == 64) {
        attention_fp32_kernel<64><<<unsigned(blocks), kThreads, 0, stream>>>(p);
      } else if (p.head_dim == 128) {
        attention_fp32_kernel<128><<<unsigned(blocks), kThreads, 0, stream>>>(p);
      } else {
        return cudaErrorInvalidValue;
      }
      return cudaGetLastError();
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace llada
