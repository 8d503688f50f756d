// Remask scatter / commit: canvas[accepted] = x0[accepted], then
// canvas[remask] = mask_id, and the masked count left in each row.
#pragma once

#include <cstdint>

namespace llada {

struct CommitTokensParams {
  int64_t* canvas;          // [rows, length], updated in place
  const int64_t* x0;        // [rows, length]
  const bool* accepted;     // [rows, length]
  const bool* remask;       // [rows, length] or nullptr
  int64_t rows;
  int64_t length;
  int64_t mask_id;
  int64_t* remaining;       // [rows]
};

void commit_tokens_cpu(const CommitTokensParams& p, int64_t row_begin, int64_t row_end);

}  // namespace llada
