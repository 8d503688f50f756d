// CUDA kernels of attention.
//
// bf16 / fp16: a flash-attention-2 style kernel on tensor cores (mma.sync
// m16n8k16, fp32 accumulation). A thread block of 4 warps owns 64 or 128
// query rows of one (batch, query head), 16 or 32 rows per warp; it streams
// the keys in tiles of 64 through shared memory, double-buffered with
// cp.async, and keeps the output accumulator and the online-softmax state
// (row max m, row sum l) in registers. The structure is that of the CPU twin
// (csrc/cpu/attention.cpp): S = Q K^T per key tile, mask, update m and l,
// rescale O, O += P V, and at the end O / l (zeros for a row with no valid key).
//
// 32 rows per warp do more work per shared-memory load and are used when
// there are enough query tiles to fill the device. When there are too few
// (batch, head, query tile) blocks even with 16 rows per warp (decoding: 32
// active queries against thousands of keys), the key tiles are split into
// chunks, one block per chunk; each writes its unnormalised O, m and l to a
// float32 workspace and a second kernel combines the chunks.
//
// float32: a simple kernel (one warp per query row, one key at a time), kept
// for testing; it is not meant to be fast.
//
// On Hopper the plan may instead pick the warpgroup-MMA kernel of
// attention_sm90.cu (see attention_cuda_plan), which reuses the combine
// kernel for its split keys.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "llada/kernels_cuda.h"

namespace llada {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockK = 64;           // keys per tile
constexpr int kPad = 8;               // 16 bytes of padding per shared row (see below)
constexpr int kMaxSplits = 64;
constexpr float kLog2e = 1.4426950408889634f;

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

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i
// (shared-window byte addresses), and each thread receives, in r[i], row
// lane/4, columns 2*(lane%4) and +1 of matrix i (with .trans: column lane/4,
// rows 2*(lane%4) and +1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row)
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
//
// A warp owns kMTiles 16-row tiles of queries. With two, every K or V
// fragment loaded from shared memory feeds twice the MMAs; the Q fragments
// are then re-read from shared memory for each key tile instead of held in
// registers, which would not fit beside the doubled accumulator.
//
// The per-tile work outside the MMAs is kept small; with two warps per
// scheduler there is little to hide it behind. (A version that checked every
// key against the length and mask with 64-bit index math issued about ten
// instructions per MMA; this one about four.) Key tiles that lie wholly
// inside the sequence with no padding mask skip the per-key checks, copies
// step a pointer, ldmatrix takes 32-bit shared addresses, and exponentials
// are single ex2.approx instructions.
// ---------------------------------------------------------------------------

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x; exact 0 for -inf
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <int kMTiles>
struct QueryTile {
  static constexpr int kRowsPerWarp = 16 * kMTiles;
  static constexpr int kRows = kRowsPerWarp * kWarps;  // query rows per block
};

// Shared memory: the Q tile [rows][D + pad], then two stages of K [64][D + pad]
// and two of V. The padding makes a row 16 bytes longer than a multiple of
// 128, so the 8 row addresses of one ldmatrix 8x8 matrix fall in 8 different
// 16-byte bank groups (no conflicts), and every row still starts 16-byte
// aligned for cp.async and ldmatrix.
template <int D, int kMTiles>
struct SharedLayout {
  static constexpr int kStride = D + kPad;                            // elements per row
  static constexpr int kTile = kBlockK * kStride;                     // elements per K or V tile
  static constexpr int kQ = QueryTile<kMTiles>::kRows * kStride;      // elements of the Q tile
  static constexpr size_t kBytes = size_t(kQ + 4 * kTile) * sizeof(uint16_t);
};

template <typename Traits, int D, int kMTiles>
__global__ void __launch_bounds__(kThreads)
    attention_mma_kernel(AttentionParams p, int tiles_per_split, float* part_o, float* part_ml) {
  using L = SharedLayout<D, kMTiles>;
  constexpr int kRowsPerWarp = QueryTile<kMTiles>::kRowsPerWarp;
  constexpr int kBlockQ = QueryTile<kMTiles>::kRows;
  constexpr int kStride = L::kStride;
  constexpr int kChunks = D / 8;                 // 16-byte chunks per row
  constexpr int kCopyRows = kThreads / kChunks;  // rows one pass of the block copies
  constexpr int kCopyPasses = kBlockK / kCopyRows;
  constexpr int kDSteps = D / 16;                // k-steps of Q K^T, and 16-wide column pairs of O
  constexpr int kKeySteps = kBlockK / 16;
  constexpr int kKeyTiles8 = kBlockK / 8;        // n-tiles of S
  constexpr bool kQInRegisters = kMTiles == 1;
  static_assert(kThreads % kChunks == 0 && kBlockK % kCopyRows == 0, "copy slots must tile K/V");

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
  const int tile_begin = int(blockIdx.y) * tiles_per_split;  // the launch checked n_tiles fits an int
  const int tile_end = int(tile_begin + tiles_per_split < n_tiles ? tile_begin + tiles_per_split : n_tiles);

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
  // K and V tiles. This thread copies the 16 bytes at column copy_col of rows
  // copy_row + i * kCopyRows. Keys past the end are zero-filled, so P V never
  // reads garbage (0 * NaN would poison O).
  const int copy_row = int(threadIdx.x) / kChunks;
  const int copy_col = (int(threadIdx.x) % kChunks) * 8;
  const int64_t k_pass = int64_t(kCopyRows) * p.k_strides[1];
  const int64_t v_pass = int64_t(kCopyRows) * p.v_strides[1];
  auto load_kv = [&](int tile, int stage) {
    const int64_t k0 = int64_t(tile) * kBlockK;
    uint16_t* dk = s_k + stage * L::kTile + copy_row * kStride + copy_col;
    uint16_t* dv = s_v + stage * L::kTile + copy_row * kStride + copy_col;
    const uint16_t* sk = k_base + (k0 + copy_row) * p.k_strides[1] + copy_col;
    const uint16_t* sv = v_base + (k0 + copy_row) * p.v_strides[1] + copy_col;
    if (k0 + kBlockK <= p.kv_len) {
#pragma unroll
      for (int i = 0; i < kCopyPasses; ++i) {
        cp_async_16(dk + i * kCopyRows * kStride, sk + i * k_pass, true);
        cp_async_16(dv + i * kCopyRows * kStride, sv + i * v_pass, true);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kCopyPasses; ++i) {
        // An absent row reads nothing, but still gets an address inside the tensor.
        const bool valid = k0 + copy_row + i * kCopyRows < p.kv_len;
        cp_async_16(dk + i * kCopyRows * kStride, valid ? sk + i * k_pass : k_base + copy_col, valid);
        cp_async_16(dv + i * kCopyRows * kStride, valid ? sv + i * v_pass : v_base + copy_col, valid);
      }
    }
  };
  if (tile_begin < tile_end) load_kv(tile_begin, 0);
  cp_async_commit();  // group 0: Q and the first K/V tile

  // Row tile mt of the warp holds its rows warp * kRowsPerWarp + mt * 16 ..
  // +15; this thread's are g and g + 8 of each, index r = 0 and 1 below.
  float o[kMTiles][2 * kDSteps][4];
  float m_run[kMTiles][2];  // running max of the log2-scaled scores
  float l_run[kMTiles][2];  // this thread's share of the row sum
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int i = 0; i < 2 * kDSteps; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.0f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.0f;
  }
  // Shared-window byte addresses of this lane's rows for the ldmatrix loads
  // (see the matrix layouts at the loads below).
  constexpr uint32_t kRowBytes = kStride * 2;
  const int quarter = lane / 8, lane8 = lane % 8;
  const uint32_t q_lane =
      shared_address(s_q) + (warp * kRowsPerWarp + lane % 16) * kRowBytes + (lane / 16) * 16;
  const uint32_t k_lane = shared_address(s_k) + ((quarter / 2) * 8 + lane8) * kRowBytes + (quarter % 2) * 16;
  const uint32_t v_lane = shared_address(s_v) + ((quarter % 2) * 8 + lane8) * kRowBytes + (quarter / 2) * 16;
  uint32_t q_held[kQInRegisters ? kDSteps : 1][4];
  // A warp whose rows all lie past the end of q only helps with the loads.
  const bool warp_active = q0 + warp * kRowsPerWarp < p.q_len;
  const float scale_log2 = p.scale * kLog2e;

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int stage = (tile - tile_begin) & 1;
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

    if (kQInRegisters && tile == tile_begin) {
#pragma unroll
      for (int kc = 0; kc < kDSteps; ++kc) ldmatrix_x4(q_held[kc], q_lane + kc * 32);
    }

    if (warp_active) {
      const uint32_t tk = k_lane + stage * L::kTile * 2;
      const uint32_t tv = v_lane + stage * L::kTile * 2;

      // S = Q K^T for the warp's rows x 64 keys: 8 n-tiles of 8 keys.
      float s[kMTiles][kKeyTiles8][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int i = 0; i < kKeyTiles8; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.0f;
#pragma unroll
      for (int kc = 0; kc < kDSteps; ++kc) {
        uint32_t qf[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          if constexpr (kQInRegisters) {
#pragma unroll
            for (int j = 0; j < 4; ++j) qf[mt][j] = q_held[kc][j];
          } else {
            ldmatrix_x4(qf[mt], q_lane + mt * 16 * kRowBytes + kc * 32);
          }
        }
#pragma unroll
        for (int np = 0; np < kKeyTiles8 / 2; ++np) {
          // Matrix i (= quarter): keys np*16 + (i/2)*8 .. +7, dims kc*16 +
          // (i%2)*8 .. +7; stored key-major, which is B's column-major layout.
          uint32_t kb[4];
          ldmatrix_x4(kb, tk + np * 16 * kRowBytes + kc * 32);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            Traits::mma(s[mt][2 * np], qf[mt], kb[0], kb[1]);
            Traits::mma(s[mt][2 * np + 1], qf[mt], kb[2], kb[3]);
          }
        }
      }

      // Scale into the log2 domain. Masked and absent keys get -inf; a tile
      // inside the sequence with no padding mask needs no check.
      const int64_t k0 = int64_t(tile) * kBlockK;
      if (mask == nullptr && k0 + kBlockK <= p.kv_len) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int nt = 0; nt < kKeyTiles8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][nt][e] *= scale_log2;
      } else {
#pragma unroll
        for (int nt = 0; nt < kKeyTiles8; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {  // this thread's keys: columns 2t and 2t + 1 of n-tile nt
            const int64_t key = k0 + nt * 8 + t4 * 2 + j;
            bool valid = key < p.kv_len;
            if (mask != nullptr) valid = valid && mask[valid ? key : 0];
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
              s[mt][nt][j] = valid ? s[mt][nt][j] * scale_log2 : -INFINITY;
              s[mt][nt][j + 2] = valid ? s[mt][nt][j + 2] * scale_log2 : -INFINITY;
            }
          }
        }
      }

      // Online softmax per row; a row is spread over the 4 threads of a quad
      // (same g). P is rounded to the 16-bit type as the A fragments of P V.
      uint32_t pa[kMTiles][kKeySteps][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        float m_use[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float tile_max = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kKeyTiles8; ++nt)
            tile_max = fmaxf(tile_max, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
          const float m_new = fmaxf(m_run[mt][r], tile_max);
          // With no valid key yet (m_new = -inf) every p is 2^-inf = 0 and
          // O, l stay 0: subtract 0 instead of -inf to avoid -inf - -inf = NaN.
          m_use[r] = m_new == -INFINITY ? 0.0f : m_new;
          const float alpha = fast_exp2(m_run[mt][r] - m_use[r]);  // 0 when m_run was -inf
          m_run[mt][r] = m_new;
          l_run[mt][r] *= alpha;
#pragma unroll
          for (int nt = 0; nt < 2 * kDSteps; ++nt) {
            o[mt][nt][2 * r] *= alpha;
            o[mt][nt][2 * r + 1] *= alpha;
          }
        }
#pragma unroll
        for (int nt = 0; nt < kKeyTiles8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][nt][e] = fast_exp2(s[mt][nt][e] - m_use[e / 2]);
            l_run[mt][e / 2] += s[mt][nt][e];
          }
        }
#pragma unroll
        for (int kc = 0; kc < kKeySteps; ++kc) {
          pa[mt][kc][0] = Traits::pack(s[mt][2 * kc][0], s[mt][2 * kc][1]);
          pa[mt][kc][1] = Traits::pack(s[mt][2 * kc][2], s[mt][2 * kc][3]);
          pa[mt][kc][2] = Traits::pack(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
          pa[mt][kc][3] = Traits::pack(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
        }
      }

      // O += P V: P (rows x 64) is the A operand, 16 keys per k-step.
#pragma unroll
      for (int kc = 0; kc < kKeySteps; ++kc) {
#pragma unroll
        for (int dp = 0; dp < kDSteps; ++dp) {
          // Matrix i (= quarter): keys kc*16 + (i%2)*8 .. +7, dims dp*16 +
          // (i/2)*8 .. +7, transposed on load so each thread gets two
          // consecutive keys.
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, tv + kc * 16 * kRowBytes + dp * 32);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            Traits::mma(o[mt][2 * dp], pa[mt][kc], vb[0], vb[1]);
            Traits::mma(o[mt][2 * dp + 1], pa[mt][kc], vb[2], vb[3]);
          }
        }
      }
    }
    __syncthreads();  // this stage is read; the next iteration may refill it
  }
  cp_async_wait<0>();  // nothing may be in flight at exit (no key tiles: Q only)

  // Whole row sums: add up the quad's shares.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_run[mt][r] += __shfl_xor_sync(0xffffffffu, l_run[mt][r], 1);
      l_run[mt][r] += __shfl_xor_sync(0xffffffffu, l_run[mt][r], 2);
    }
  }
  if (!warp_active) return;

  const int64_t total_rows = p.batch * p.q_heads * p.q_len;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = q0 + warp * kRowsPerWarp + mt * 16 + g + 8 * r;
      if (row >= p.q_len) continue;
      if (part_o == nullptr) {
        const float inv = l_run[mt][r] > 0.0f ? 1.0f / l_run[mt][r] : 0.0f;  // no valid key: zeros
        uint16_t* dst = static_cast<uint16_t*>(p.out) + ((b * p.q_len + row) * p.q_heads + h) * D;
#pragma unroll
        for (int nt = 0; nt < 2 * kDSteps; ++nt)
          *reinterpret_cast<uint32_t*>(dst + nt * 8 + t4 * 2) =
              Traits::pack(o[mt][nt][2 * r] * inv, o[mt][nt][2 * r + 1] * inv);
      } else {
        const int64_t idx = int64_t(blockIdx.y) * total_rows + bh * p.q_len + row;
        float* dst = part_o + idx * D;
#pragma unroll
        for (int nt = 0; nt < 2 * kDSteps; ++nt)
          *reinterpret_cast<float2*>(dst + nt * 8 + t4 * 2) = make_float2(o[mt][nt][2 * r], o[mt][nt][2 * r + 1]);
        if (t4 == 0) {
          part_ml[2 * idx] = m_run[mt][r];
          part_ml[2 * idx + 1] = l_run[mt][r];
        }
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
  for (int s = 0; s < splits; ++s) {
    const int64_t idx = s * total_rows + row_id;
    const float l = part_ml[2 * idx + 1];
    // A chunk with no valid key has l = 0 (and m = -inf, which must not meet
    // -inf - -inf). Any other chunk has l >= 1, or l = NaN when its inputs
    // hold a NaN: that chunk is kept, so the row comes out NaN as it does
    // without a split.
    if (l == 0.0f) continue;
    const float w = exp2f(part_ml[2 * idx] - m_max);
    sum += w * l;
    acc += w * part_o[idx * D + d];
  }
  const int64_t q = row_id % p.q_len;
  const int64_t bh = row_id / p.q_len;
  const int64_t h = bh % p.q_heads, b = bh / p.q_heads;
  uint16_t* dst = static_cast<uint16_t*>(p.out) + ((b * p.q_len + q) * p.q_heads + h) * D;
  dst[d] = Traits::from_float(sum == 0.0f ? 0.0f : acc / sum);  // no valid key: zeros
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
int64_t query_blocks(const AttentionParams& p, int rows_per_warp) {
  const int64_t rows = int64_t(rows_per_warp) * kWarps;
  return p.batch * p.q_heads * ((p.q_len + rows - 1) / rows);
}

template <typename Traits, int D, int kMTiles>
cudaError_t prepare_mma_kernel() {
  return cudaFuncSetAttribute(attention_mma_kernel<Traits, D, kMTiles>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                              int(SharedLayout<D, kMTiles>::kBytes));
}

template <int D, int kMTiles>
cudaError_t blocks_per_sm(int device, int* out) {
  // A layout larger than one block may have does not run on this device at
  // all: head dim 128 with 32 rows per warp takes 102 KB, more than the
  // 99 KB of compute capability 8.6, 8.9 and 12.x (A10, L4, RTX 3090/4090/5090);
  // 8.0 and 9.0 allow 163 and 227 KB.
  int most = 0;
  cudaError_t err = cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (SharedLayout<D, kMTiles>::kBytes > size_t(most)) {
    *out = 0;
    return cudaSuccess;
  }
  // Occupancy depends on the head dim and row tiles (shared memory,
  // registers), not on the 16-bit type.
  err = prepare_mma_kernel<Bf16, D, kMTiles>();
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(out, attention_mma_kernel<Bf16, D, kMTiles>, kThreads,
                                                       SharedLayout<D, kMTiles>::kBytes);
}

cudaError_t blocks_per_sm(int device, int head_dim, int rows_per_warp, int* out) {
  if (head_dim == 64) {
    return rows_per_warp == 32 ? blocks_per_sm<64, 2>(device, out) : blocks_per_sm<64, 1>(device, out);
  }
  return rows_per_warp == 32 ? blocks_per_sm<128, 2>(device, out) : blocks_per_sm<128, 1>(device, out);
}

// Blocks of the tensor-core kernel the current device runs at once, for a
// head dim and rows per warp (0: that layout does not fit the device); asked
// of the driver once per device.
cudaError_t device_capacity(int head_dim, int rows_per_warp, int64_t* out) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cache[kMaxDevices][2][2];  // 0: not asked yet
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::atomic<int64_t>* slot =
      device < kMaxDevices ? &cache[device][head_dim == 128][rows_per_warp == 32] : nullptr;
  if (slot != nullptr && slot->load() > 0) {
    *out = slot->load() - 1;
    return cudaSuccess;
  }
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = blocks_per_sm(device, head_dim, rows_per_warp, &per_sm);
  if (err != cudaSuccess) return err;
  *out = int64_t(sms) * per_sm;
  if (slot != nullptr) slot->store(*out + 1);
  return cudaSuccess;
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

// The combine kernel over `splits` chunks of partial results in `workspace`.
template <typename Traits>
cudaError_t launch_combine(const AttentionParams& p, int splits, void* workspace, cudaStream_t stream) {
  const int64_t total_rows = p.batch * p.q_heads * p.q_len;
  if (total_rows > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
  const float* part_o = static_cast<const float*>(workspace);
  const float* part_ml = part_o + int64_t(splits) * total_rows * p.head_dim;
  if (p.head_dim == 64) {
    attention_combine_kernel<Traits, 64><<<unsigned(total_rows), 64, 0, stream>>>(p, splits, part_o, part_ml);
  } else if (p.head_dim == 128) {
    attention_combine_kernel<Traits, 128><<<unsigned(total_rows), 128, 0, stream>>>(p, splits, part_o, part_ml);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename Traits, int D, int kMTiles>
cudaError_t launch_mma(const AttentionParams& p, int want_splits, void* workspace, cudaStream_t stream) {
  const int64_t blocks = query_blocks(p, 16 * kMTiles);
  if (blocks > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
  if (key_tiles(p) > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
  int splits = 1, per = 1;
  split_tiles(key_tiles(p), want_splits, &splits, &per);
  if (splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = prepare_mma_kernel<Traits, D, kMTiles>();
  if (err != cudaSuccess) return err;
  const int64_t total_rows = p.batch * p.q_heads * p.q_len;
  float* part_o = nullptr;
  float* part_ml = nullptr;
  if (splits > 1) {
    part_o = static_cast<float*>(workspace);
    part_ml = part_o + int64_t(splits) * total_rows * D;
  }
  attention_mma_kernel<Traits, D, kMTiles>
      <<<dim3(unsigned(blocks), unsigned(splits)), kThreads, SharedLayout<D, kMTiles>::kBytes, stream>>>(
          p, per, part_o, part_ml);
  err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  return launch_combine<Traits>(p, splits, workspace, stream);
}

template <typename Traits>
cudaError_t launch_mma_shape(const AttentionParams& p, const AttentionCudaPlan& plan, void* workspace,
                             cudaStream_t stream) {
  const bool tall = plan.rows_per_warp == 32;
  switch (p.head_dim) {
    case 64:
      return tall ? launch_mma<Traits, 64, 2>(p, plan.num_splits, workspace, stream)
                  : launch_mma<Traits, 64, 1>(p, plan.num_splits, workspace, stream);
    case 128:
      return tall ? launch_mma<Traits, 128, 2>(p, plan.num_splits, workspace, stream)
                  : launch_mma<Traits, 128, 1>(p, plan.num_splits, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Whether the current device runs sm_90a code (exactly compute capability
// 9.0), asked once per device.
cudaError_t device_is_sm90(bool* out) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0: not asked, 1: no, 2: yes
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && cache[device].load() != 0) {
    *out = cache[device].load() == 2;
    return cudaSuccess;
  }
  int major = 0, minor = 0;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return err;
  *out = major == 9 && minor == 0;
  if (device < kMaxDevices) cache[device].store(*out ? 2 : 1);
  return cudaSuccess;
}

// The Ampere-style kernel's plan.
cudaError_t mma_plan(const AttentionParams& p, AttentionCudaPlan* plan) {
  *plan = AttentionCudaPlan{};
  if (p.dtype == DType::kFloat32 || query_blocks(p, 16) == 0) return cudaSuccess;
  if (!attention_head_dim_supported(p.head_dim)) return cudaErrorInvalidValue;
  int64_t capacity_tall = 0, capacity = 0;
  cudaError_t err = device_capacity(int(p.head_dim), 32, &capacity_tall);
  if (err == cudaSuccess) err = device_capacity(int(p.head_dim), 16, &capacity);
  if (err != cudaSuccess) return err;
  if (capacity == 0) return cudaErrorNotSupported;  // not even 16 rows per warp fit (no such GPU of 8.0+)
  // More than half a wave of blocks keeps the device busy enough. 32 rows
  // per warp are preferred when they get there and their taller tiles add
  // few padding rows (not for 32 queries, say: 128-row tiles would be three
  // quarters padding); otherwise 16 rows per warp, with the keys split so
  // that about one block runs per multiprocessor. (On an H100, 32 queries x
  // 32 heads against 512 to 4096 keys ran fastest with 4 splits, 128 blocks;
  // 8 and more were up to 1.45x slower.)
  const int64_t tall_rows = (p.q_len + 127) / 128 * 128, rows = (p.q_len + 63) / 64 * 64;
  if (capacity_tall > 0 && 2 * query_blocks(p, 32) > capacity_tall && 8 * tall_rows <= 9 * rows) {
    plan->rows_per_warp = 32;
    return cudaSuccess;
  }
  const int64_t blocks = query_blocks(p, 16);
  const int64_t n_tiles = key_tiles(p);
  if (n_tiles < 2 || 2 * blocks > capacity) return cudaSuccess;
  int device = 0, sms = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  int64_t want = sms / blocks;
  if (want > kMaxSplits) want = kMaxSplits;
  int splits = 1, per = 1;
  split_tiles(n_tiles, int(want), &splits, &per);
  plan->num_splits = splits;
  plan->workspace_bytes = attention_cuda_workspace_bytes(p, splits);
  return cudaSuccess;
}

}  // namespace

size_t attention_cuda_workspace_bytes(const AttentionParams& p, int num_splits) {
  if (num_splits <= 1 || p.dtype == DType::kFloat32) return 0;
  const int64_t total_rows = p.batch * p.q_heads * p.q_len;
  return size_t(num_splits) * size_t(total_rows) * size_t(p.head_dim + 2) * sizeof(float);
}

#ifndef LLADA_WITH_SM90
bool attention_sm90_supports(const AttentionParams&) { return false; }
int attention_sm90_key_tile() { return 128; }
cudaError_t attention_sm90_cuda(const AttentionParams&, int, bool, Sm90Pipeline, void*, cudaStream_t) {
  return cudaErrorNotSupported;
}
#endif

cudaError_t attention_cuda_plan(const AttentionParams& p, AttentionCudaPlan* plan, Sm90Use sm90) {
  cudaError_t err = mma_plan(p, plan);
  if (err != cudaSuccess || sm90 == Sm90Use::kNever || !attention_sm90_supports(p)) return err;
  // Where it measured faster (bench_attention on an H200, bf16, 32 heads,
  // D = 128): 1.5-1.9x the other kernel on full shapes of 512 to 4096 tokens
  // (batch 1 and 8); with 32 queries 0.9x against 512 and 1024 keys, even at
  // 2048 and 1.12x at 4096. 65 to 255 queries stay with the other kernel
  // until measured.
  const bool faster = p.q_len >= 256 || (p.q_len <= 64 && p.kv_len > 2048);
  if (sm90 == Sm90Use::kWhereFaster && !faster) return cudaSuccess;
  bool on_sm90 = false;
  err = device_is_sm90(&on_sm90);
  if (err != cudaSuccess || !on_sm90) return err;
  // Its blocks take 64 query rows (up to 64 queries) or 128, and one runs per
  // multiprocessor: with fewer blocks than multiprocessors, the keys are
  // split so that about one block runs on each.
  int device = 0, sms = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t rows = p.q_len <= 64 ? 64 : 128;
  const int64_t blocks = p.batch * p.q_heads * ((p.q_len + rows - 1) / rows);
  const int64_t n_tiles = (p.kv_len + attention_sm90_key_tile() - 1) / attention_sm90_key_tile();
  int splits = 1, per = 1;
  if (blocks > 0 && blocks < sms) {
    split_tiles(n_tiles, int(std::min<int64_t>(sms / blocks, kMaxSplits)), &splits, &per);
  }
  *plan = AttentionCudaPlan{};
  plan->sm90 = true;
  plan->num_splits = splits;
  plan->workspace_bytes = attention_cuda_workspace_bytes(p, splits);
  return cudaSuccess;
}

cudaError_t attention_cuda(const AttentionParams& p, const AttentionCudaPlan& plan, void* workspace,
                           cudaStream_t stream) {
  if (plan.sm90) {
    cudaError_t err =
        attention_sm90_cuda(p, plan.num_splits, plan.sm90_persistent, plan.sm90_pipeline, workspace, stream);
    if (err != cudaSuccess || plan.num_splits == 1 || p.batch * p.q_len * p.q_heads == 0) return err;
    return p.dtype == DType::kBFloat16 ? launch_combine<Bf16>(p, plan.num_splits, workspace, stream)
                                       : launch_combine<Fp16>(p, plan.num_splits, workspace, stream);
  }
  if (p.batch == 0 || p.q_len == 0 || p.q_heads == 0) return cudaSuccess;
  if (p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0) return cudaErrorInvalidValue;
  if (plan.rows_per_warp != 16 && plan.rows_per_warp != 32) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kBFloat16: return launch_mma_shape<Bf16>(p, plan, workspace, stream);
    case DType::kFloat16: return launch_mma_shape<Fp16>(p, plan, workspace, stream);
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
