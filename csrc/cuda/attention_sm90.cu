// Attention on Hopper (sm_90a): warpgroup MMAs fed by the tensor memory
// accelerator, for bf16 / fp16 with head dim 128.
//
// The Ampere-style kernel (attention.cu) issues mma.sync from every warp and
// tops out near 300 TFLOP/s on an H100; Hopper's tensor cores reach their
// rate only through wgmma, which reads its B operand (and here A of Q K^T)
// straight from shared memory in a swizzled layout, asynchronously. So this
// kernel is built around two roles in one thread block:
//
//   the last warpgroup      one thread issues TMA copies of the Q tile and of
//   (the producer)          every K and V tile into a ring of stages, and
//                           waits on "empty" barriers before reusing one;
//   warpgroups 0 (and 1)    each owns 64 query rows: S = Q K^T (wgmma, both
//   (the consumers)         operands in shared memory), online softmax in
//                           registers, O += P V (wgmma, P from registers).
//
// With many query rows (full forwards), blocks of 128 rows have two
// consumers that take turns on the tensor cores (a "ping-pong" on two named
// barriers): one issues its P V of the previous tile and its Q K^T of this
// tile back to back while the other computes its softmax, whose
// exponentials would otherwise leave the tensor cores idle.
//
// Those blocks of 128 rows have variants of their pipeline (Sm90Pipeline),
// which bench/cuda/attention.cu and bench/bench_attention.py time side by
// side (the plan keeps the first, until another measures faster): a second
// Q buffer, so that the next item's Q loads while this one runs instead of
// after its last Q K^T; that, and O written out through its item's Q buffer
// by a TMA store (each thread's 32 four-byte global stores, 8 rows apart,
// become 32 conflict-free shared stores and one bulk copy per warpgroup);
// either of those with an item's last P V issued together with the next
// item's first Q K^T (its output written after them), so that the tensor
// cores see no gap between items; or three K/V stages instead of two. And
// a leaner softmax, alone or with the chained items and the TMA store: on
// whole tiles the scale goes into the exponent's FMA (64 multiplies fewer
// per thread and tile), and a warp whose rows' maxima all stayed skips the
// rescale of O (64 more). Or, within each consumer, the softmax of a tile
// overlapped with its own P V of the tile before: the Q K^T and the P V of
// a step become two groups of MMAs, and the softmax waits only for the
// first (alone, with the leaner softmax, with the TMA store of O, or with
// three K/V stages: a stage of V is free only once the softmax after its
// P V is done, which leaves the producer less time to refill it).
//
// Few queries against many keys (cached decoding: 32 queries, thousands of
// keys) take a second shape: one consumer warpgroup (64 query rows), a ring
// of three stages, and the keys split across thread blocks so that about one
// runs per multiprocessor; each block then writes its unnormalised O, row max
// and row sum, and attention.cu's combine kernel merges them. That shape is
// bound by reading K and V, and the deeper ring keeps more of them in flight.
//
// The producer is a whole warpgroup, not one warp, because registers are
// handed out per quarter of the multiprocessor (one per warp scheduler,
// warps dealt round-robin, 16K registers each). Two consumers and one
// producer warp make 9 warps, 3 of them on one quarter: at the ~200
// registers a consumer needs that quarter overflows and the launch fails.
// With 12 warps every quarter holds 1 producer and 2 consumer warps, and
// `setmaxnreg` moves registers from the producer (to 40) to the consumers (to
// 232; they use about 200).
//
// Shared tiles are 128 rows of keys (or queries) by 128 dims, stored as two
// halves of 64 dims; a half row is 128 bytes, written by TMA with the 128-byte
// swizzle (16-byte chunk c of row r lands at chunk c ^ (r % 8)), which is the
// layout wgmma's descriptors name. K is the "K-major" B operand of Q K^T (its
// rows are keys, contiguous along the reduced dim); V is the "MN-major" B
// operand of P V (rows are keys = the reduced dim, contiguous along D).
//
// Out-of-range rows of a tile (past Lq or Lk) arrive as zeros from TMA; the
// softmax masks keys past Lk and the padding mask as the other kernel does,
// and a row with no valid key gets zeros.
//
// The barrier protocol (the ring, Q's turns across persistent items, the
// consumers' turns) is model-checked by scripts/sm90_protocol_check.py, a
// transcription of its control flow: change the two together.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "llada/kernels_cuda.h"

namespace llada {
namespace {

constexpr int kHeadDim = 128;
constexpr int kBlockK = 128;                // keys per tile
constexpr int kTileBytes = 128 * 128 * 2;   // 128 keys x 128 dims, two halves of 64 dims
constexpr int kHalfBytes = kTileBytes / 2;
constexpr float kLog2e = 1.4426950408889634f;

// A thread block of kConsumers warpgroups of 64 query rows each, a producer
// warpgroup, kStages stages of K and V and kQBuffers of Q. Shared memory:
// the Q buffers (each two halves of kRows x 64 dims), the K stages, the V
// stages, then the barriers; every tile 1024-byte aligned (the swizzle
// repeats every 1024 bytes, and both TMA and wgmma apply it to address
// bits). With kStoreO, O leaves through its item's Q buffer (free once the
// item's last Q K^T is done) by a TMA store, and the buffer is released
// only after the store has read it: that needs a second Q buffer, for the
// next item's Q. With kChain, an item's last P V is issued with the next
// item's first Q K^T (so the next Q must be loaded by then: two buffers).
// kLean trims the softmax (see there). With kOverlap, a step's Q K^T and
// P V are two groups of MMAs, Q K^T first: the softmax of the new scores
// starts once they are in and runs while the tensor cores do the P V; O is
// rescaled and the new P packed only after it (P V still reads the old P
// from registers).
template <int kConsumers_, int kStages_, int kQBuffers_ = 1, bool kStoreO_ = false, bool kChain_ = false,
          bool kLean_ = false, bool kOverlap_ = false>
struct Config {
  static constexpr int kConsumers = kConsumers_;
  static constexpr int kStages = kStages_;
  static constexpr int kQBuffers = kQBuffers_;
  static constexpr bool kStoreO = kStoreO_;
  static constexpr bool kChain = kChain_;
  static constexpr bool kLean = kLean_;
  static constexpr bool kOverlap = kOverlap_;
  static_assert(!kStoreO || kQBuffers == 2, "O goes out through a Q buffer while the next item's Q loads");
  static_assert(!kChain || kQBuffers == 2, "the next item's Q is read while this one finishes");
  static_assert(!(kChain && kOverlap), "one or the other: an item's first step differs in each");
  static constexpr int kRows = 64 * kConsumers;  // query rows per block
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr int kThreads = kConsumerThreads + 128;  // + the producer warpgroup
  // Per-thread registers after the hand-over (0: none; the launch's own
  // budget of 65536 / kThreads, at most 255, is enough). The hand-over only
  // moves registers: a producer warp and kConsumers consumer warps share a
  // quarter, so their new budgets may not exceed their launch budgets.
  static constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
  static constexpr int kProducerRegs = kConsumers == 2 ? 40 : 0;
  static constexpr int kConsumerRegs = kConsumers == 2 ? 232 : 0;
  static_assert(kProducerRegs + kConsumers * kConsumerRegs <= (1 + kConsumers) * kLaunchRegs,
                "the register hand-over must fit the registers the launch holds");
  static constexpr int kQHalfBytes = kRows * 128;
  static constexpr int kQBytes = 2 * kQHalfBytes;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQBuffers * kQBytes;
  static constexpr int kV = kK + kStages * kTileBytes;
  static constexpr int kBarriers = kV + kStages * kTileBytes;
  // q_full[Q], q_empty[Q], k_full[S], v_full[S], k_empty[S], v_empty[S]
  static constexpr int kNumBarriers = 2 * kQBuffers + 4 * kStages;
  static constexpr int kBytes = kBarriers + 8 * kNumBarriers;
  static constexpr int kAlloc = kBytes + 1024;  // room to align the base
  static_assert(kAlloc <= 227 * 1024, "more shared memory than a block may have");
  // Arrivals that free a Q buffer: every consumer thread once its last
  // Q K^T is done or, with kStoreO, one thread per consumer warpgroup once
  // its TMA store has read the buffer.
  static constexpr int kQEmptyArrivals = kStoreO ? kConsumers : kConsumerThreads;
};
using ManyQueries = Config<2, 2>;  // 128 query rows, ping-pong consumers
using FewQueries = Config<1, 3>;   // 64 query rows, a deeper ring, split keys
// The variants of ManyQueries (Sm90Pipeline).
using ManyQueriesTwoQ = Config<2, 2, 2>;
using ManyQueriesStoreO = Config<2, 2, 2, true>;
using ManyQueriesThreeStages = Config<2, 3>;
using ManyQueriesChain = Config<2, 2, 2, false, true>;
using ManyQueriesChainStoreO = Config<2, 2, 2, true, true>;
using ManyQueriesLean = Config<2, 2, 1, false, false, true>;
using ManyQueriesChainStoreOLean = Config<2, 2, 2, true, true, true>;
using ManyQueriesOverlap = Config<2, 2, 1, false, false, false, true>;
using ManyQueriesLeanOverlap = Config<2, 2, 1, false, false, true, true>;
using ManyQueriesStoreOOverlap = Config<2, 2, 2, true, false, false, true>;
using ManyQueriesThreeStagesOverlap = Config<2, 3, 1, false, false, false, true>;

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LLADA_SM90_DEVICE 1
#endif

// ---------------------------------------------------------------------------
// PTX wrappers: barriers, TMA, wgmma
// ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void barrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Arrives on `bar` and tells it `bytes` more will land by TMA this phase.
__device__ __forceinline__ void barrier_expect_bytes(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Register hand-over between warpgroups: every warp of a warpgroup runs the
// same one. Raising blocks until the lowered registers are back in the pool.
template <int kRegs>
__device__ __forceinline__ void registers_down() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <int kRegs>
__device__ __forceinline__ void registers_up() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

__device__ __forceinline__ void barrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ bool barrier_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

// Waits until the phase of parity `parity` of `bar` has completed. A wait
// of seconds can only be a bug (a phase that never completes); it traps, so
// that the launch fails with an error instead of hanging the device.
__device__ __forceinline__ void barrier_wait(uint32_t bar, uint32_t parity) {
  if (barrier_try_wait(bar, parity)) return;
  constexpr long long kHangCycles = 1LL << 35;  // about 20 s
  const long long start = clock64();
  while (!barrier_try_wait(bar, parity))
    if (clock64() - start > kHangCycles) asm volatile("trap;");
}

// One box of a 4-d tensor map (dims: D, position, head, batch) into shared
// memory; completion is counted in bytes on `bar`.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int d, int pos, int head, int batch,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(d), "r"(pos), "r"(head), "r"(batch), "r"(bar)
      : "memory");
}

// A box of shared memory out to a 4-d tensor map (rows past the tensor's
// end are not written), then the bulk-group bookkeeping of such stores:
// commit, and wait until the committed stores have read shared memory
// (`read`) or have completed.
__device__ __forceinline__ void tma_store(const CUtensorMap* map, uint32_t src, int d, int pos, int head, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(d), "r"(pos), "r"(head), "r"(batch)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// Makes this thread's writes to shared memory visible to the TMA unit (the
// "async proxy"), before a barrier after which one thread stores them.
__device__ __forceinline__ void fence_shared_for_tma() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void store_shared(uint32_t address, uint32_t value) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(address), "r"(value) : "memory");
}

// Named barriers 1 and 2 order the consumers' turns on the tensor cores
// (0 is __syncthreads). Both consumer warpgroups count: one syncs, the other
// arrives. Barriers 3 and 4 gather one warpgroup each (kStoreO).
template <int kCount>
__device__ __forceinline__ void named_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kCount) : "memory");
}
template <int kCount>
__device__ __forceinline__ void named_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(kCount) : "memory");
}

// A shared-memory matrix descriptor with the 128-byte swizzle. `lead` and
// `stride` are the byte offsets between 8x(16-byte) core-matrix groups along
// the leading and the strided dimension (see the callers).
__device__ __forceinline__ uint64_t descriptor(uint32_t address, uint32_t lead, uint32_t stride) {
  return uint64_t((address & 0x3FFFF) >> 4) | (uint64_t((lead >> 4) & 0x3FFF) << 16) |
         (uint64_t((stride >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Waits for every committed group of MMAs but the last one.
__device__ __forceinline__ void wgmma_wait_all_but_last() {
  asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
}

// Keeps the compiler from moving reads or writes of a register across the
// asynchronous MMAs (it does not know they finish only at the wait).
__device__ __forceinline__ void pin(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void pin(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }

#define LLADA_ACC8(d, i)                                                                            \
  "+f"(d[i + 0]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define LLADA_ACC64(d)                                                                               \
  LLADA_ACC8(d, 0), LLADA_ACC8(d, 8), LLADA_ACC8(d, 16), LLADA_ACC8(d, 24), LLADA_ACC8(d, 32),       \
      LLADA_ACC8(d, 40), LLADA_ACC8(d, 48), LLADA_ACC8(d, 56)
#define LLADA_ACC64_TEXT                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "     \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, " \
  "%39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "  \
  "%58, %59, %60, %61, %62, %63}"

// d[64] (+)= A B for a 64x128 tile, k = 16: A and B from shared memory, B
// K-major. With accumulate == 0, d = A B.
#define LLADA_WGMMA_SS(TYPE)                                                                 \
  asm volatile(                                                                              \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                           \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " LLADA_ACC64_TEXT      \
      ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                      \
      : LLADA_ACC64(d)                                                                       \
      : "l"(a), "l"(b), "r"(accumulate))
// d[64] += A B for a 64x128 tile, k = 16: A from registers, B MN-major.
#define LLADA_WGMMA_RS(TYPE)                                                                 \
  asm volatile(                                                                              \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                             \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " LLADA_ACC64_TEXT      \
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                         \
      : LLADA_ACC64(d)                                                                       \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b))

// The 16-bit input types: the MMAs and the packing of P (`lo` in the low
// half, the lower column).
template <bool kBf16>
struct Half16 {
  __device__ __forceinline__ static void mma_ss(float (&d)[64], uint64_t a, uint64_t b, uint32_t accumulate) {
    if constexpr (kBf16) {
      LLADA_WGMMA_SS("bf16");
    } else {
      LLADA_WGMMA_SS("f16");
    }
  }
  __device__ __forceinline__ static void mma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    if constexpr (kBf16) {
      LLADA_WGMMA_RS("bf16");
    } else {
      LLADA_WGMMA_RS("f16");
    }
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    if constexpr (kBf16) {
      const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
      return *reinterpret_cast<const uint32_t*>(&v);
    } else {
      const __half2 v = __floats2half2_rn(lo, hi);
      return *reinterpret_cast<const uint32_t*>(&v);
    }
  }
};
using Bf16 = Half16<true>;
using Fp16 = Half16<false>;

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x; exact 0 for -inf
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------
// The kernel
//
// Accumulator layout of a 64xN wgmma tile (PTX ISA): warp w of the
// warpgroup holds rows 16w .. 16w+15; with g = lane / 4 and t = lane % 4,
// register 4c + r holds row g + 8 (r / 2), column 8c + 2t + (r % 2). The A
// fragment of a 64x16 register operand holds, for k-step columns 16kc ..:
// a0 (row g, cols 2t, 2t+1), a1 (row g+8, same), a2 (row g, cols 2t+8, +9),
// a3 (row g+8, same): exactly S's registers 8kc .. 8kc+7 in pairs, which is
// how P goes from the softmax into P V without shared memory.
// ---------------------------------------------------------------------------

struct Maps {
  CUtensorMap q, k, v;
  CUtensorMap out;  // boxes of 64 rows (a consumer's), for kStoreO
};

// A work item is one tile of query rows of one (batch, head) against one
// chunk of its key tiles: item x + n_x * y takes query tile x (of n_x) and
// key chunk y, tiles y * tiles_per_split onwards. A block takes items
// blockIdx.x, + gridDim.x, ... (one each, or a persistent loop when the grid
// is smaller): the producer then loads the next item's Q and first K/V
// tiles while the consumers finish the last one and write it out (a block's
// item c reads Q buffer c % kQBuffers). With part_o set, an item writes its
// chunk's unnormalised O [rows, D] and (row max, row sum) per row there (the
// layout of attention.cu's combine kernel) instead of the output.
template <typename Traits, typename C>
__global__ void __launch_bounds__(C::kThreads, 1)
    attention_sm90_kernel(const __grid_constant__ Maps maps, AttentionParams p, int64_t n_x, int64_t n_items,
                          int tiles_per_split, float* part_o, float* part_ml) {
#ifdef LLADA_SM90_DEVICE
  constexpr int kStages = C::kStages;
  extern __shared__ unsigned char shared_raw[];
  const uint32_t raw = shared_address(shared_raw);
  const uint32_t base = (raw + 1023) & ~1023u;
  const uint32_t s_q = base + C::kQ;
  const uint32_t s_k = base + C::kK;
  const uint32_t s_v = base + C::kV;
  const uint32_t bars = base + C::kBarriers;
  constexpr int kQB = C::kQBuffers;
  auto q_full = [&](int i) { return bars + 8 * i; };
  auto q_empty = [&](int i) { return bars + 8 * (kQB + i); };
  auto k_full = [&](int s) { return bars + 8 * (2 * kQB + s); };
  auto v_full = [&](int s) { return bars + 8 * (2 * kQB + kStages + s); };
  auto k_empty = [&](int s) { return bars + 8 * (2 * kQB + 2 * kStages + s); };
  auto v_empty = [&](int s) { return bars + 8 * (2 * kQB + 3 * kStages + s); };

  const int64_t q_tiles = (p.q_len + C::kRows - 1) / C::kRows;
  const int all_tiles = int((p.kv_len + kBlockK - 1) / kBlockK);
  struct Item {
    int b, h, h_kv, q0, split, first_tile, n_tiles;
    int64_t bh;
  };
  auto item_at = [&](int64_t item) {
    Item it;
    const int64_t x = item % n_x;
    it.split = int(item / n_x);
    it.bh = x / q_tiles;  // b * q_heads + h
    it.q0 = int(x % q_tiles) * C::kRows;
    it.h = int(it.bh % p.q_heads);
    it.b = int(it.bh / p.q_heads);
    it.h_kv = it.h / (p.q_heads / p.kv_heads);
    // Never no tiles: the launch makes no empty chunk.
    it.first_tile = it.split * tiles_per_split;
    it.n_tiles = min(tiles_per_split, all_tiles - it.first_tile);
    return it;
  };

  if (threadIdx.x == 0) {
    for (int i = 0; i < kQB; ++i) {
      barrier_init(q_full(i), 1);
      barrier_init(q_empty(i), C::kQEmptyArrivals);
    }
    for (int s = 0; s < kStages; ++s) {
      barrier_init(k_full(s), 1);
      barrier_init(v_full(s), 1);
      barrier_init(k_empty(s), C::kConsumerThreads);
      barrier_init(v_empty(s), C::kConsumerThreads);
    }
    // Make the initialised barriers visible to the TMA unit.
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (threadIdx.x >= C::kConsumerThreads) {
    // Producer: one thread issues every copy, in the order the consumers
    // read them. Its whole warpgroup first gives registers back.
    if constexpr (C::kProducerRegs > 0) registers_down<C::kProducerRegs>();
    if (threadIdx.x != C::kConsumerThreads) return;
    uint32_t tile_count = 0;  // K/V tiles issued so far: the ring position
    uint32_t item_count = 0;
    for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x, ++item_count) {
      const Item w = item_at(item);
      const int qb = int(item_count % kQB);
      const uint32_t q_round = item_count / kQB;
      const uint32_t q_dst = s_q + qb * C::kQBytes;
      if (q_round > 0) barrier_wait(q_empty(qb), (q_round - 1) & 1);
      barrier_expect_bytes(q_full(qb), C::kQBytes);
      tma_load(q_dst, &maps.q, 0, w.q0, w.h, w.b, q_full(qb));
      tma_load(q_dst + C::kQHalfBytes, &maps.q, 64, w.q0, w.h, w.b, q_full(qb));
      for (int j = 0; j < w.n_tiles; ++j, ++tile_count) {
        const int s = int(tile_count % kStages);
        const uint32_t round = tile_count / kStages;
        const int key0 = (w.first_tile + j) * kBlockK;
        if (round > 0) barrier_wait(k_empty(s), (round - 1) & 1);
        barrier_expect_bytes(k_full(s), kTileBytes);
        tma_load(s_k + s * kTileBytes, &maps.k, 0, key0, w.h_kv, w.b, k_full(s));
        tma_load(s_k + s * kTileBytes + kHalfBytes, &maps.k, 64, key0, w.h_kv, w.b, k_full(s));
        if (round > 0) barrier_wait(v_empty(s), (round - 1) & 1);
        barrier_expect_bytes(v_full(s), kTileBytes);
        tma_load(s_v + s * kTileBytes, &maps.v, 0, key0, w.h_kv, w.b, v_full(s));
        tma_load(s_v + s * kTileBytes + kHalfBytes, &maps.v, 64, key0, w.h_kv, w.b, v_full(s));
      }
    }
    return;
  }

  // Consumers.
  if constexpr (C::kConsumerRegs > 0) registers_up<C::kConsumerRegs>();
  const int wg = int(threadIdx.x) / 128;        // rows 64 wg .. 64 wg + 63 of the block's
  const int warp = (int(threadIdx.x) / 32) % 4;  // rows 16 warp .. of the warpgroup's 64
  const int lane = int(threadIdx.x) % 32;
  const int g = lane / 4, t4 = lane % 4;
  const float scale_log2 = p.scale * kLog2e;
  Item w = item_at(blockIdx.x);  // the item being computed
  const bool* mask = nullptr;
  uint32_t s_q_item = s_q;  // its Q buffer
  int qb = 0;

  // Descriptors. Q and K are K-major: 8-row groups 1024 bytes apart, and a
  // k-step of 16 dims moves 32 bytes along the (swizzled) row, or to the
  // other half for dims 64 .. 127. V is MN-major: 8-key groups 1024 bytes
  // apart, the two 64-dim halves kHalfBytes apart, a k-step of 16 keys 2048
  // bytes.
  auto q_desc = [&](int kd) {
    return descriptor(s_q_item + (kd / 4) * C::kQHalfBytes + wg * 64 * 128 + (kd % 4) * 32, 16, 1024);
  };
  auto k_desc = [&](int s, int kd) {
    return descriptor(s_k + s * kTileBytes + (kd / 4) * kHalfBytes + (kd % 4) * 32, 16, 1024);
  };
  auto v_desc = [&](int s, int kc) { return descriptor(s_v + s * kTileBytes + kc * 2048, kHalfBytes, 1024); };

  float o[64];
  float s_acc[64];
  uint32_t pa[8][4];  // P of the previous tile, the A operand of its P V
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.0f;
#pragma unroll
  for (int i = 0; i < 64; ++i) s_acc[i] = 0.0f;
#pragma unroll
  for (int kc = 0; kc < 8; ++kc) pa[kc][0] = pa[kc][1] = pa[kc][2] = pa[kc][3] = 0u;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max of the log2-scaled scores, rows g and g + 8
  float l_run[2] = {0.0f, 0.0f};            // this thread's share of the row sums

  float alpha[2] = {1.0f, 1.0f};  // the last softmax's rescale of O and the row sums, rows g and g + 8
  // O's rescale by alpha. kLean: a row whose max stayed has alpha 1, and a
  // warp whose rows all kept theirs (most tiles after the first few) skips it.
  auto rescale_o = [&] {
    if (!C::kLean || __any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
      for (int c = 0; c < 16; ++c) {
        o[4 * c + 0] *= alpha[0];
        o[4 * c + 1] *= alpha[0];
        o[4 * c + 2] *= alpha[1];
        o[4 * c + 3] *= alpha[1];
      }
    }
  };
  auto pack_p = [&] {
#pragma unroll
    for (int kc = 0; kc < 8; ++kc) {
      pa[kc][0] = Traits::pack(s_acc[8 * kc + 0], s_acc[8 * kc + 1]);
      pa[kc][1] = Traits::pack(s_acc[8 * kc + 2], s_acc[8 * kc + 3]);
      pa[kc][2] = Traits::pack(s_acc[8 * kc + 4], s_acc[8 * kc + 5]);
      pa[kc][3] = Traits::pack(s_acc[8 * kc + 6], s_acc[8 * kc + 7]);
    }
  };

  // Masking, scaling and the online softmax of local tile j: rescales the
  // row sums and O, and leaves P in `pa`. With kOverlap it leaves O and `pa`
  // alone (the step's P V may still be reading them) and P in s_acc, for
  // rescale_o and pack_p once the P V is done.
  auto softmax = [&](int j) {
    // Scale into the log2 domain; masked keys and keys past the end get -inf.
    // kLean folds the scale of a whole tile into the exponent's FMA instead
    // (with a scale of at least 0, the largest raw score is the largest
    // scaled one); k_exp is what the scores are still to be multiplied by.
    const int64_t k0 = int64_t(w.first_tile + j) * kBlockK;
    const bool whole = mask == nullptr && k0 + kBlockK <= p.kv_len;
    float k_exp = 1.0f;
    if (C::kLean && whole && !(scale_log2 < 0.0f)) {
      k_exp = scale_log2;
    } else if (whole) {
#pragma unroll
      for (int i = 0; i < 64; ++i) s_acc[i] *= scale_log2;
    } else {
#pragma unroll
      for (int c = 0; c < 16; ++c) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t key = k0 + 8 * c + 2 * t4 + e;
          bool valid = key < p.kv_len;
          if (mask != nullptr) valid = valid && mask[valid ? key : 0];
          s_acc[4 * c + e] = valid ? s_acc[4 * c + e] * scale_log2 : -INFINITY;
          s_acc[4 * c + 2 + e] = valid ? s_acc[4 * c + 2 + e] * scale_log2 : -INFINITY;
        }
      }
    }
    // Online softmax; a row is spread over the 4 threads of a quad.
    float m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int c = 0; c < 16; ++c) tile_max = fmaxf(tile_max, fmaxf(s_acc[4 * c + 2 * r], s_acc[4 * c + 2 * r + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      if constexpr (C::kLean) tile_max *= k_exp;  // raw scores are finite: no 0 * inf
      const float m_new = fmaxf(m_run[r], tile_max);
      // No valid key yet: subtract 0, not -inf (-inf - -inf is NaN).
      m_use[r] = m_new == -INFINITY ? 0.0f : m_new;
      alpha[r] = fast_exp2(m_run[r] - m_use[r]);
      m_run[r] = m_new;
      l_run[r] *= alpha[r];
    }
    if constexpr (!C::kOverlap) rescale_o();
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      if constexpr (C::kLean) {
        s_acc[i] = fast_exp2(fmaf(s_acc[i], k_exp, -m_use[(i / 2) % 2]));
      } else {
        s_acc[i] = fast_exp2(s_acc[i] - m_use[(i / 2) % 2]);
      }
      l_run[(i / 2) % 2] += s_acc[i];
    }
    if constexpr (!C::kOverlap) pack_p();
  };

  // Issuing the MMAs of one step; the loops are fully unrolled so that the
  // instructions are not in a divergent path (which makes the compiler
  // serialise them).
  auto issue_pv = [&](int stage) {
#pragma unroll
    for (int kc = 0; kc < 8; ++kc) Traits::mma_rs(o, pa[kc], v_desc(stage, kc));
  };
  auto issue_qk = [&](int stage) {
#pragma unroll
    for (int kd = 0; kd < 8; ++kd) Traits::mma_ss(s_acc, q_desc(kd), k_desc(stage, kd), kd > 0 ? 1u : 0u);
  };
  // kOverlap, after a step's Q K^T group (its P V may still run): the scores
  // are final.
  auto settle_scores = [&] {
    wgmma_wait_all_but_last();
#pragma unroll
    for (int i = 0; i < 64; ++i) pin(s_acc[i]);
  };
  // After the wait: the MMAs' registers are final (and must not have been
  // reused before it).
  auto settle = [&] {
    wgmma_wait_all();
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      pin(o[i]);
      pin(s_acc[i]);
    }
#pragma unroll
    for (int kc = 0; kc < 8; ++kc)
#pragma unroll
      for (int e = 0; e < 4; ++e) pin(pa[kc][e]);
  };
  // Turns, with two consumers: one syncs on its own named barrier before
  // issuing and then arrives on the other's. The second consumer's very last
  // tile hands no turn over (the first has no tile left to take it).
  constexpr bool kPingPong = C::kConsumers == 2;
  bool last_item = false;
  auto take_turn = [&] {
    if constexpr (kPingPong) named_sync<256>(1 + wg);
  };
  auto pass_turn = [&](int j) {
    if constexpr (kPingPong) {
      if (!(wg == 1 && last_item && j == w.n_tiles - 1)) named_arrive<256>(2 - wg);
    }
  };
  if (kPingPong && wg == 1) named_arrive<256>(1);  // the first consumer goes first

  // Writes item `it`'s output from o, l_run and m_run: its normalised rows
  // or, with part_o, its chunk's partial results. With kStoreO the rows go
  // out through the item's Q buffer `it_qb`, which is then freed.
  auto write_out = [&](const Item& it, int it_qb, bool it_last) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    }
    const int64_t total_rows = p.batch * p.q_heads * p.q_len;
    const uint32_t q_buffer = s_q + it_qb * C::kQBytes;
    const bool store_o = C::kStoreO && part_o == nullptr;
    if (store_o) {
      // O into this warpgroup's rows of the item's Q buffer, which its own
      // Q K^T were the last to read, in the TMA boxes' swizzled layout
      // (16-byte chunk c of row r at chunk c ^ (r % 8); conflict-free: the
      // 8 rows of a store instruction have 8 different r % 8).
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float inv = l_run[r] > 0.0f ? 1.0f / l_run[r] : 0.0f;  // no valid key: zeros
        const int row = wg * 64 + warp * 16 + g + 8 * r;
#pragma unroll
        for (int c = 0; c < 16; ++c)
          store_shared(q_buffer + (c / 8) * C::kQHalfBytes + row * 128 + (((c % 8) ^ (row % 8)) * 16) + 4 * t4,
                       Traits::pack(o[4 * c + 2 * r] * inv, o[4 * c + 2 * r + 1] * inv));
      }
      fence_shared_for_tma();
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t row = int64_t(it.q0) + wg * 64 + warp * 16 + g + 8 * r;
        if (row >= p.q_len) continue;
        if (part_o == nullptr) {
          const float inv = l_run[r] > 0.0f ? 1.0f / l_run[r] : 0.0f;  // no valid key: zeros
          uint16_t* dst =
              static_cast<uint16_t*>(p.out) + ((int64_t(it.b) * p.q_len + row) * p.q_heads + it.h) * kHeadDim;
#pragma unroll
          for (int c = 0; c < 16; ++c)
            *reinterpret_cast<uint32_t*>(dst + 8 * c + 2 * t4) =
                Traits::pack(o[4 * c + 2 * r] * inv, o[4 * c + 2 * r + 1] * inv);
        } else {
          const int64_t idx = int64_t(it.split) * total_rows + it.bh * p.q_len + row;
          float* dst = part_o + idx * kHeadDim;
#pragma unroll
          for (int c = 0; c < 16; ++c)
            *reinterpret_cast<float2*>(dst + 8 * c + 2 * t4) = make_float2(o[4 * c + 2 * r], o[4 * c + 2 * r + 1]);
          if (t4 == 0) {
            part_ml[2 * idx] = m_run[r];
            part_ml[2 * idx + 1] = l_run[r];
          }
        }
      }
    }
    if constexpr (C::kStoreO) {
      // The warpgroup's MMAs and writes are done: one thread stores its 64
      // rows (the map leaves out rows past the end) and, once the store has
      // read them, frees the Q buffer.
      named_sync<128>(3 + wg);
      if (threadIdx.x % 128 == 0) {
        const int row0 = it.q0 + wg * 64;
        if (store_o && row0 < p.q_len) {
          const uint32_t src = q_buffer + wg * 64 * 128;
          tma_store(&maps.out, src, 0, row0, it.h, it.b);
          tma_store(&maps.out, src + C::kQHalfBytes, 64, row0, it.h, it.b);
          bulk_commit();
          // The block's last stores are waited for until they are out.
          if (it_last) {
            bulk_wait();
          } else {
            bulk_wait_read();
          }
        }
        barrier_arrive(q_empty(it_qb));
      }
    }
  };
  auto restart = [&] {  // a new item's accumulators
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;
    m_run[0] = m_run[1] = -INFINITY;
    l_run[0] = l_run[1] = 0.0f;
  };

  uint32_t tile_count = 0;  // K/V tiles consumed so far: the ring position
  uint32_t item_count = 0;
  int s = 0;                // the stage of the tile being consumed
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x, ++item_count) {
    // With kChain, the previous item's last P V is still to issue: it goes
    // with this item's first Q K^T, and the previous item's output is
    // written after them.
    const bool chained = C::kChain && item_count > 0;
    const Item done = w;
    const int done_qb = qb;
    w = item_at(item);
    last_item = item + gridDim.x >= n_items;
    mask = p.key_mask != nullptr ? p.key_mask + int64_t(w.b) * p.kv_len : nullptr;
    if (!chained) restart();
    qb = int(item_count % kQB);
    s_q_item = s_q + qb * C::kQBytes;
    barrier_wait(q_full(qb), (item_count / kQB) & 1);

    // Tile 0: Q K^T only (chained: after the previous item's last P V).
    // With kChain every item's first step issues a P V, so that no MMA sits
    // under a run-time condition (the compiler would serialise them all): a
    // block's first item multiplies the zeros in P and O by its own first V
    // tile, which adds nothing.
    const int done_stage = s;
    s = int(tile_count % kStages);
    barrier_wait(k_full(s), (tile_count / kStages) & 1);
    const int pv_stage = chained ? done_stage : s;
    if (C::kChain) barrier_wait(v_full(pv_stage), ((chained ? tile_count - 1 : tile_count) / kStages) & 1);
    take_turn();
    wgmma_fence();
    if constexpr (C::kChain) issue_pv(pv_stage);
    issue_qk(s);
    wgmma_commit();
    pass_turn(0);
    settle();
    if (chained) barrier_arrive(v_empty(done_stage));
    barrier_arrive(k_empty(s));
    if (!C::kStoreO && w.n_tiles == 1) barrier_arrive(q_empty(qb));  // Q is read: another item's may land
    if (chained) {
      write_out(done, done_qb, false);
      restart();
    }
    softmax(0);
    if constexpr (C::kOverlap) {
      rescale_o();
      pack_p();
    }

    // Tiles 1 .. n-1: P V of the previous tile, then Q K^T of this one.
    // kOverlap: a step's P V is waited for at the top of the next step (or
    // after the loop), then O rescaled and the new P packed. Waiting at the
    // end of the step would let the compiler schedule the softmax below the
    // wait, since nothing in the softmax depends on it; the loop's back edge
    // keeps the two apart.
    int pv_in_flight = -1;  // kOverlap: the stage whose P V is still running
    auto finish_pv = [&] {
      if (pv_in_flight < 0) return;
      settle();
      barrier_arrive(v_empty(pv_in_flight));
      rescale_o();
      pack_p();
      pv_in_flight = -1;
    };
    for (int j = 1; j < w.n_tiles; ++j) {
      const int prev = s;
      ++tile_count;
      s = int(tile_count % kStages);
      if constexpr (C::kOverlap) finish_pv();
      barrier_wait(k_full(s), (tile_count / kStages) & 1);
      barrier_wait(v_full(prev), ((tile_count - 1) / kStages) & 1);
      take_turn();
      wgmma_fence();
      if constexpr (C::kOverlap) {
        issue_qk(s);
        wgmma_commit();
        issue_pv(prev);
        wgmma_commit();
        pv_in_flight = prev;
        pass_turn(j);
        settle_scores();
        barrier_arrive(k_empty(s));
        if (!C::kStoreO && j == w.n_tiles - 1) barrier_arrive(q_empty(qb));
        softmax(j);  // while the tensor cores do the P V
      } else {
        issue_pv(prev);
        issue_qk(s);
        wgmma_commit();
        pass_turn(j);
        settle();
        barrier_arrive(v_empty(prev));
        barrier_arrive(k_empty(s));
        if (!C::kStoreO && j == w.n_tiles - 1) barrier_arrive(q_empty(qb));
        softmax(j);
      }
    }
    if constexpr (C::kOverlap) finish_pv();
    ++tile_count;
    if (C::kChain && !last_item) continue;  // the last P V goes with the next item's first Q K^T

    // P V of the last tile.
    barrier_wait(v_full(s), ((tile_count - 1) / kStages) & 1);
    wgmma_fence();
    issue_pv(s);
    wgmma_commit();
    settle();
    barrier_arrive(v_empty(s));
    write_out(w, qb, last_item);
  }
#endif
}

// ---------------------------------------------------------------------------
// Host side: tensor maps and the launch
// ---------------------------------------------------------------------------

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's tensor-map encoder, looked up once (the runtime library
// does not export it, and linking the driver library directly would tie the
// build to one driver).
cudaError_t encoder(EncodeTiled* out) {
  static EncodeTiled fn = nullptr;
  static cudaError_t status = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                                       &found);
    if (err == cudaSuccess && found != cudaDriverEntryPointSuccess) err = cudaErrorNotSupported;
    fn = reinterpret_cast<EncodeTiled>(ptr);
    return err;
  }();
  *out = fn;
  return status;
}

// A map of [B, L, H, 128] with element strides `strides` (batch, position,
// head) and boxes of 64 dims x `rows` positions, swizzled for wgmma. Strides
// of dimensions of size 1 are never followed; they are replaced by a valid one.
cudaError_t make_map(CUtensorMap* map, const void* data, CUtensorMapDataType type, int64_t batch, int64_t len,
                     int64_t heads, const int64_t (&strides)[3], int rows) {
  EncodeTiled encode = nullptr;
  cudaError_t err = encoder(&encode);
  if (err != cudaSuccess) return err;
  const int64_t fallback = len * heads * kHeadDim * 2;
  auto stride_bytes = [&](int64_t size, int64_t stride) -> cuuint64_t {
    return cuuint64_t(size == 1 ? fallback : stride * 2);
  };
  const cuuint64_t dims[4] = {cuuint64_t(kHeadDim), cuuint64_t(len), cuuint64_t(heads), cuuint64_t(batch)};
  const cuuint64_t byte_strides[3] = {stride_bytes(len, strides[1]), stride_bytes(heads, strides[2]),
                                      stride_bytes(batch, strides[0])};
  const cuuint32_t box[4] = {64, cuuint32_t(rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, type, 4, const_cast<void*>(data), dims, byte_strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

int64_t key_tiles(const AttentionParams& p) { return (p.kv_len + kBlockK - 1) / kBlockK; }

template <typename Traits, typename C>
cudaError_t launch(const AttentionParams& p, CUtensorMapDataType type, int num_splits, bool persistent,
                   void* workspace, cudaStream_t stream) {
  Maps maps;
  cudaError_t err = make_map(&maps.q, p.q, type, p.batch, p.q_len, p.q_heads, p.q_strides, C::kRows);
  if (err == cudaSuccess)
    err = make_map(&maps.k, p.k, type, p.batch, p.kv_len, p.kv_heads, p.k_strides, kBlockK);
  if (err == cudaSuccess)
    err = make_map(&maps.v, p.v, type, p.batch, p.kv_len, p.kv_heads, p.v_strides, kBlockK);
  if (err == cudaSuccess && C::kStoreO) {
    const int64_t out_strides[3] = {p.q_len * p.q_heads * kHeadDim, int64_t(p.q_heads) * kHeadDim, kHeadDim};
    err = make_map(&maps.out, p.out, type, p.batch, p.q_len, p.q_heads, out_strides, 64);
  }
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(attention_sm90_kernel<Traits, C>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             C::kAlloc);
  if (err != cudaSuccess) return err;
  // Chunks of equal tile counts; the plan chose num_splits so that none is empty.
  const int64_t tiles = key_tiles(p);
  const int64_t per = (tiles + num_splits - 1) / num_splits;
  const int64_t splits = (tiles + per - 1) / per;
  float* part_o = nullptr;
  float* part_ml = nullptr;
  if (splits > 1) {
    part_o = static_cast<float*>(workspace);
    part_ml = part_o + splits * p.batch * p.q_heads * p.q_len * kHeadDim;
  }
  const int64_t n_x = p.batch * p.q_heads * ((p.q_len + C::kRows - 1) / C::kRows);
  const int64_t n_items = n_x * splits;
  // One block per multiprocessor fits (shared memory); a persistent grid has
  // no more blocks than that, and each loops over its items.
  int64_t grid = n_items;
  if (persistent) {
    int device = 0, sms = 0;
    err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    grid = std::min<int64_t>(n_items, sms);
  }
  if (grid > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
  attention_sm90_kernel<Traits, C><<<unsigned(grid), C::kThreads, C::kAlloc, stream>>>(maps, p, n_x, n_items,
                                                                                       int(per), part_o, part_ml);
  return cudaGetLastError();
}

template <typename Traits>
cudaError_t launch_shape(const AttentionParams& p, CUtensorMapDataType type, int num_splits, bool persistent,
                         Sm90Pipeline pipeline, void* workspace, cudaStream_t stream) {
  if (p.q_len <= FewQueries::kRows)
    return launch<Traits, FewQueries>(p, type, num_splits, persistent, workspace, stream);
  switch (pipeline) {
    case Sm90Pipeline::kOneQuery:
      return launch<Traits, ManyQueries>(p, type, num_splits, persistent, workspace, stream);
    case Sm90Pipeline::kTwoQueries:
      return launch<Traits, ManyQueriesTwoQ>(p, type, num_splits, persistent, workspace, stream);
    case Sm90Pipeline::kTwoQueriesStoreO:
      return launch<Traits, ManyQueriesStoreO>(p, type, num_splits, persistent, workspace, stream);
    case Sm90Pipeline::kThreeStages:
      return launch<Traits, ManyQueriesThreeStages>(p, type, num_splits, persistent, workspace, stream);
    case Sm90Pipeline::kTwoQueriesChain:
      return launch<Traits, ManyQueriesChain>(p, type, num_splits, persistent, workspace, stream);
    case Sm90Pipeline::kTwoQueriesChainStoreO:
      return launch<Traits, ManyQueriesChainStoreO>(p, type, num_splits, persistent, workspace, stream);
    case Sm90Pipeline::kOneQueryLean:
      return launch<Traits, ManyQueriesLean>(p, type, num_splits, persistent, workspace, stream);
    case Sm90Pipeline::kTwoQueriesChainStoreOLean:
      return launch<Traits, ManyQueriesChainStoreOLean>(p, type, num_splits, persistent, workspace, stream);
    case Sm90Pipeline::kOneQueryOverlap:
      return launch<Traits, ManyQueriesOverlap>(p, type, num_splits, persistent, workspace, stream);
    case Sm90Pipeline::kOneQueryLeanOverlap:
      return launch<Traits, ManyQueriesLeanOverlap>(p, type, num_splits, persistent, workspace, stream);
    case Sm90Pipeline::kTwoQueriesStoreOOverlap:
      return launch<Traits, ManyQueriesStoreOOverlap>(p, type, num_splits, persistent, workspace, stream);
    case Sm90Pipeline::kThreeStagesOverlap:
      return launch<Traits, ManyQueriesThreeStagesOverlap>(p, type, num_splits, persistent, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

bool attention_sm90_supports(const AttentionParams& p) {
  if (p.dtype == DType::kFloat32 || p.head_dim != kHeadDim || p.kv_len < 1) return false;
  if (p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0) return false;
  // TMA coordinates are 32-bit, and so is the grid.
  const int64_t limit = int64_t(0x7fffffff) - kBlockK;
  if (p.q_len > limit || p.kv_len > limit || p.batch > limit || p.q_heads > limit) return false;
  if (p.batch * p.q_heads * ((p.q_len + FewQueries::kRows - 1) / FewQueries::kRows) > int64_t(0x7fffffff))
    return false;
  // TMA wants 16-byte aligned bases and strides.
  for (const void* ptr : {p.q, p.k, p.v, static_cast<const void*>(p.out)})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (const int64_t* s : {p.q_strides, p.k_strides, p.v_strides})
    for (int i = 0; i < 3; ++i)
      if (s[i] % 8 != 0) return false;
  // A dimension read with stride 0 (an expanded tensor) is left to the other
  // kernel: the tensor map is not documented to take one.
  const int64_t q_sizes[3] = {p.batch, p.q_len, p.q_heads}, kv_sizes[3] = {p.batch, p.kv_len, p.kv_heads};
  for (int i = 0; i < 3; ++i) {
    if (q_sizes[i] > 1 && p.q_strides[i] == 0) return false;
    if (kv_sizes[i] > 1 && (p.k_strides[i] == 0 || p.v_strides[i] == 0)) return false;
  }
  return true;
}

int attention_sm90_key_tile() { return kBlockK; }

cudaError_t attention_sm90_cuda(const AttentionParams& p, int num_splits, bool persistent, Sm90Pipeline pipeline,
                                void* workspace, cudaStream_t stream) {
  if (!attention_sm90_supports(p) || num_splits < 1 || num_splits > key_tiles(p)) return cudaErrorInvalidValue;
  // Chunks of ceil(tiles / num_splits) tiles: a count that leaves one empty
  // would launch fewer splits than the combine step reads back.
  const int64_t per = (key_tiles(p) + num_splits - 1) / num_splits;
  if ((key_tiles(p) + per - 1) / per != num_splits) return cudaErrorInvalidValue;
  if (num_splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.q_len == 0 || p.q_heads == 0) return cudaSuccess;
  if (p.dtype == DType::kBFloat16)
    return launch_shape<Bf16>(p, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, num_splits, persistent, pipeline, workspace,
                              stream);
  return launch_shape<Fp16>(p, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, num_splits, persistent, pipeline, workspace,
                            stream);
}

}  // namespace llada
