// Masked-logit softmax / token choice: per row of logits [N, V], in one pass
// over the row, the chosen token, its probability, the top-1 minus top-2
// probability margin and the entropy of softmax(logits). Never materialises
// the softmax.
#pragma once

#include <cstdint>

#include "llada/common.h"

namespace llada {

struct SampleTokensParams {
  const void* logits;        // [rows, vocab], element type `dtype`
  int64_t row_stride;        // in elements; columns are contiguous
  int64_t rows;
  int64_t vocab;
  DType dtype;
  const int64_t* suppress;   // sorted ascending, unique, all in [0, vocab)
  int32_t num_suppress;
  float temperature;         // 0: argmax; > 0: Gumbel-max sample
  uint64_t seed;
  int64_t* tokens;           // [rows]; -1 when a row has no finite logit
  float* confidence;         // [rows]; -inf when a row has no finite logit
  float* margin;             // [rows]
  float* entropy;            // [rows]
  // [rows] or null: the key of each row's noise, in place of its index, so
  // that a position keeps its noise whichever other rows are sampled with it.
  const int64_t* noise_rows;
};

// The CPU twin; processes rows [row_begin, row_end) so callers may split rows
// across threads. `suppress` points to host memory.
void sample_tokens_cpu(const SampleTokensParams& p, int64_t row_begin, int64_t row_end);

}  // namespace llada
