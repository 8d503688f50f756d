// CPU twin of the attention kernel: tiled attention with an online softmax,
// the same algorithm as the CUDA kernel (S = Q K^T per key tile, mask, update
// the running max m and sum l, rescale O, O += P V, finally O / l).
//
// A task is one (batch, query head, tile of up to 256 query rows). The
// tile's queries are widened to float32, pre-scaled and packed transposed
// once, Q^T [D][queries]; then the keys are streamed in tiles of 128. The
// scores are computed transposed, S^T = K Q^T, so K's rows are used as they
// lie in memory (in place for float32, widened for bfloat16), and the softmax
// loops run along contiguous queries. O += P V reads P through a transposed
// view of S^T and V packed per tile. Both products use one register-blocked
// micro-kernel written with vector types, which compiles to AVX2 FMAs in the
// x86-64-v3 clone. Large query tiles matter for long sequences: every tile
// streams all of its head's keys and values once.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_math.h"
#include "llada/attention.h"

namespace llada {
namespace {

constexpr int kQueryTile = int(kAttentionCpuQueryTile);
constexpr int kKeyTile = 128;

// Eight floats; in the default clone the compiler splits it into SSE halves.
// Values of this type only pass between always-inlined functions of this
// file, so GCC's note that their calling convention differs without AVX
// concerns no real call.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float Vec8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline Vec8 load8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) inline void store8(float* p, const Vec8& v) { std::memcpy(p, &v, sizeof v); }

// C[R][N] = A[R][K] * B[K][N], or C += A B with `accumulate`, for R rows, N a
// multiple of 16. A's element
// (r, k) is a[r * a_row + k * a_col], so A may be read transposed. B is
// packed in panels of 16 columns, each panel K x 16 contiguous, so the
// micro-kernel streams it from L1 with unit stride whatever B's source layout
// (rows of one head lie H * D floats apart: a power of two that maps them all
// onto the same L1 set). Each panel keeps its R x 16 accumulators in
// registers across the whole K loop. Always inlined, so that each clone of
// the caller compiles it for its own instruction set.
template <int R>
__attribute__((always_inline)) inline void gemm_rows(const float* a, int64_t a_row, int64_t a_col,
                                                     const float* b_panels, float* c, int64_t ldc,
                                                     int n, int k, bool accumulate) {
  for (int j = 0; j < n; j += 16) {
    const float* b = b_panels + size_t(j) * k;
    Vec8 acc[R][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = accumulate ? load8(c + r * ldc + j) : Vec8{};
      acc[r][1] = accumulate ? load8(c + r * ldc + j + 8) : Vec8{};
    }
    for (int kk = 0; kk < k; ++kk) {
      const Vec8 b0 = load8(b + kk * 16);
      const Vec8 b1 = load8(b + kk * 16 + 8);
      for (int r = 0; r < R; ++r) {
        const float x = a[r * a_row + kk * a_col];
        acc[r][0] += x * b0;
        acc[r][1] += x * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store8(c + r * ldc + j, acc[r][0]);
      store8(c + r * ldc + j + 8, acc[r][1]);
    }
  }
}

LLADA_MULTIVERSION
void gemm(const float* a, int64_t a_row, int64_t a_col, const float* b_panels, float* c, int64_t ldc,
          int m, int n, int k, bool accumulate) {
  int i = 0;
  for (; i + 6 <= m; i += 6)
    gemm_rows<6>(a + i * a_row, a_row, a_col, b_panels, c + i * ldc, ldc, n, k, accumulate);
  const float* a_rest = a + i * a_row;
  float* c_rest = c + i * ldc;
  switch (m - i) {
    case 5: gemm_rows<5>(a_rest, a_row, a_col, b_panels, c_rest, ldc, n, k, accumulate); break;
    case 4: gemm_rows<4>(a_rest, a_row, a_col, b_panels, c_rest, ldc, n, k, accumulate); break;
    case 3: gemm_rows<3>(a_rest, a_row, a_col, b_panels, c_rest, ldc, n, k, accumulate); break;
    case 2: gemm_rows<2>(a_rest, a_row, a_col, b_panels, c_rest, ldc, n, k, accumulate); break;
    case 1: gemm_rows<1>(a_rest, a_row, a_col, b_panels, c_rest, ldc, n, k, accumulate); break;
    default: break;
  }
}

// The online-softmax step for one key tile, on the transposed scores
// st[key][query] (so every loop runs along contiguous queries and
// vectorises): updates the running max m and sum l of each query over the
// valid keys, turns the scores into probabilities in place (0 for a masked
// key) and writes the factor by which each query's accumulated output must
// shrink into alpha. Rows of st are ld floats apart; tile_max is scratch of
// `cols` floats.
LLADA_MULTIVERSION
void softmax_update(float* st, int64_t ld, int n, int cols, const bool* key_valid, float* m, float* l,
                    float* alpha, float* tile_max) {
  for (int r = 0; r < cols; ++r) tile_max[r] = kNegInf;
  for (int j = 0; j < n; ++j) {
    if (!key_valid[j]) continue;
    const float* row = st + j * ld;
    for (int r = 0; r < cols; ++r) tile_max[r] = row[r] > tile_max[r] ? row[r] : tile_max[r];
  }
  // With no valid key yet (max -inf), O and l stay 0 and alpha is 0:
  // subtract 0 rather than -inf to avoid -inf - -inf = NaN.
  for (int r = 0; r < cols; ++r) {
    const float m_new = tile_max[r] > m[r] ? tile_max[r] : m[r];
    const float m_use = m_new == kNegInf ? 0.0f : m_new;
    alpha[r] = exp_nonpositive(m[r] - m_use);  // 0 when m was -inf
    m[r] = m_new;
    tile_max[r] = m_use;
    l[r] *= alpha[r];
  }
  for (int j = 0; j < n; ++j) {
    float* row = st + j * ld;
    if (!key_valid[j]) {
      std::fill(row, row + cols, 0.0f);
      continue;
    }
    for (int r = 0; r < cols; ++r) {
      row[r] = exp_nonpositive(row[r] - tile_max[r]);
      l[r] += row[r];
    }
  }
}

LLADA_MULTIVERSION
void scale_row(float* x, int n, float factor) {
  for (int i = 0; i < n; ++i) x[i] *= factor;
}

// Reads `n` elements of type `dtype` at `src` into float32.
LLADA_MULTIVERSION
void widen(const void* src, DType dtype, float* dst, int n) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, src, size_t(n) * sizeof(float));
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    if (dtype == DType::kBFloat16) {
      for (int i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
    } else {
      for (int i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
    }
  }
}

size_t element_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

const char* element_at(const void* base, DType t, int64_t offset) {
  return static_cast<const char*>(base) + offset * int64_t(element_size(t));
}

// Copies `n` floats into a B operand packed in panels of 16 columns (see
// gemm_rows): element (row, col) of a matrix with `k` rows goes to
// panels[(col / 16) * k * 16 + row * 16 + col % 16].
inline void pack_row(const float* src, int n, float* panels, int k, int row) {
  for (int c = 0; c < n; c += 16) std::memcpy(panels + size_t(c) * k + row * 16, src + c, 16 * sizeof(float));
}

// Per-thread buffers. Scores are kept transposed, st[key][query]: S^T = K Q^T
// takes K's rows as its A operand (read row by row, no transpose per tile)
// and Q^T, packed once per task, as its B operand; P V reads P through a
// transposed view of S^T and takes V, packed per tile, as B.
struct Workspace {
  std::vector<float> q_panels, k, v_panels, st, o, m, l, alpha, tmp;
  std::unique_ptr<bool[]> key_valid;
  explicit Workspace(int d)
      : q_panels(size_t(d) * kQueryTile), k(size_t(kKeyTile) * d), v_panels(size_t(kKeyTile) * d),
        st(size_t(kKeyTile) * (kQueryTile + 16)), o(size_t(kQueryTile) * d), m(kQueryTile),
        l(kQueryTile), alpha(kQueryTile), tmp(std::max(kQueryTile, d)), key_valid(new bool[kKeyTile]) {}
};

void attention_task(const AttentionParams& p, int64_t task, Workspace& w) {
  const int d = p.head_dim;
  const int64_t q_tiles = (p.q_len + kQueryTile - 1) / kQueryTile;
  const int64_t q_tile = task % q_tiles;
  const int64_t h = (task / q_tiles) % p.q_heads;
  const int64_t b = task / q_tiles / p.q_heads;
  const int64_t h_kv = h / (p.q_heads / p.kv_heads);  // repeat_interleave grouping
  const int64_t q0 = q_tile * kQueryTile;
  const int rows = int(p.q_len - q0 < kQueryTile ? p.q_len - q0 : kQueryTile);
  // The query count rounded up to the 16-wide panels of the products; the
  // extra queries are zero and their results are dropped.
  const int cols = (rows + 15) / 16 * 16;
  // Rows of S^T are padded by one panel: P V reads S^T down its columns, and
  // with rows a power-of-two bytes apart those reads would all fall into a
  // few L1 sets.
  const int64_t ld_st = cols + 16;

  // Q^T [D][cols] in panels, pre-scaled so the scores come out of the
  // product scaled.
  std::fill(w.q_panels.begin(), w.q_panels.begin() + size_t(d) * cols, 0.0f);
  for (int i = 0; i < rows; ++i) {
    const int64_t off = b * p.q_strides[0] + (q0 + i) * p.q_strides[1] + h * p.q_strides[2];
    widen(element_at(p.q, p.dtype, off), p.dtype, w.tmp.data(), d);
    float* column = w.q_panels.data() + size_t(i / 16) * d * 16 + i % 16;
    for (int c = 0; c < d; ++c) column[c * 16] = w.tmp[c] * p.scale;
  }
  std::fill(w.o.begin(), w.o.begin() + size_t(cols) * d, 0.0f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);

  const int64_t row_bytes = int64_t(d) * int64_t(element_size(p.dtype));
  for (int64_t k0 = 0; k0 < p.kv_len; k0 += kKeyTile) {
    const int n = int(p.kv_len - k0 < kKeyTile ? p.kv_len - k0 : kKeyTile);
    bool any_valid = false;
    for (int j = 0; j < n; ++j) {
      w.key_valid[j] = p.key_mask == nullptr || p.key_mask[b * p.kv_len + k0 + j];
      any_valid = any_valid || w.key_valid[j];
    }
    if (!any_valid) continue;  // a fully masked tile changes nothing

    // This tile's V in panels and, unless they can be read in place
    // (float32), its K rows contiguous, as float32. The rows of one head lie
    // H * D elements apart, too far for the hardware prefetcher: each row
    // read asks for the same row of the next tile.
    const int64_t k_first = b * p.k_strides[0] + k0 * p.k_strides[1] + h_kv * p.k_strides[2];
    const int64_t v_first = b * p.v_strides[0] + k0 * p.v_strides[1] + h_kv * p.v_strides[2];
    const int next_n = int(std::min<int64_t>(p.kv_len - k0 - kKeyTile, kKeyTile));
    const bool f32 = p.dtype == DType::kFloat32;
    for (int j = 0; j < n; ++j) {
      const char* k_row = element_at(p.k, p.dtype, k_first + j * p.k_strides[1]);
      const char* v_row = element_at(p.v, p.dtype, v_first + j * p.v_strides[1]);
      if (j < next_n) {
        for (int64_t off = 0; off < row_bytes; off += 64) {
          __builtin_prefetch(k_row + kKeyTile * p.k_strides[1] * int64_t(element_size(p.dtype)) + off);
          __builtin_prefetch(v_row + kKeyTile * p.v_strides[1] * int64_t(element_size(p.dtype)) + off);
        }
      }
      if (!f32) widen(k_row, p.dtype, w.k.data() + size_t(j) * d, d);
      const float* v_f32 = reinterpret_cast<const float*>(v_row);
      if (!f32) {
        widen(v_row, p.dtype, w.tmp.data(), d);
        v_f32 = w.tmp.data();
      }
      pack_row(v_f32, d, w.v_panels.data(), n, j);
    }
    const float* k_rows = f32 ? static_cast<const float*>(p.k) + k_first : w.k.data();
    const int64_t k_ld = f32 ? p.k_strides[1] : d;

    // S^T [n][cols] = K [n][D] Q^T [D][cols].
    gemm(k_rows, k_ld, 1, w.q_panels.data(), w.st.data(), ld_st, n, cols, d, /*accumulate=*/false);
    softmax_update(w.st.data(), ld_st, n, cols, w.key_valid.get(), w.m.data(), w.l.data(), w.alpha.data(),
                   w.tmp.data());
    for (int i = 0; i < rows; ++i)
      if (w.alpha[i] != 1.0f) scale_row(w.o.data() + size_t(i) * d, d, w.alpha[i]);
    // O [rows][D] += P [rows][n] V [n][D], P read from S^T (P[i][j] = st[j][i]).
    gemm(w.st.data(), 1, ld_st, w.v_panels.data(), w.o.data(), d, rows, d, n, /*accumulate=*/true);
  }

  for (int i = 0; i < rows; ++i) {
    // A row with no valid key has l = 0 and outputs zeros.
    const float inv = w.l[i] > 0.0f ? 1.0f / w.l[i] : 0.0f;
    float* o_row = w.o.data() + size_t(i) * d;
    scale_row(o_row, d, inv);
    const int64_t off = ((b * p.q_len + q0 + i) * p.q_heads + h) * d;
    if (p.dtype == DType::kFloat32) {
      std::memcpy(static_cast<float*>(p.out) + off, o_row, size_t(d) * sizeof(float));
    } else {
      uint16_t* dst = static_cast<uint16_t*>(p.out) + off;
      for (int c = 0; c < d; ++c) dst[c] = float_to_bf16(o_row[c]);
    }
  }
}

}  // namespace

int64_t attention_cpu_num_tasks(const AttentionParams& p) {
  return p.batch * p.q_heads * ((p.q_len + kQueryTile - 1) / kQueryTile);
}

void attention_cpu(const AttentionParams& p, int64_t task_begin, int64_t task_end) {
  if (task_begin >= task_end) return;
  Workspace w(p.head_dim);
  for (int64_t t = task_begin; t < task_end; ++t) attention_task(p, t, w);
}

}  // namespace llada
