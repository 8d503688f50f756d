// CPU twin of the commit_tokens kernel.
#include "llada/commit_tokens.h"

namespace llada {

void commit_tokens_cpu(const CommitTokensParams& p, int64_t row_begin, int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    int64_t* canvas = p.canvas + row * p.length;
    const int64_t* x0 = p.x0 + row * p.length;
    const bool* accepted = p.accepted + row * p.length;
    const bool* remask = p.remask ? p.remask + row * p.length : nullptr;
    int64_t remaining = 0;
    for (int64_t i = 0; i < p.length; ++i) {
      int64_t token = accepted[i] ? x0[i] : canvas[i];
      if (remask && remask[i]) token = p.mask_id;
      canvas[i] = token;
      remaining += token == p.mask_id ? 1 : 0;
    }
    p.remaining[row] = remaining;
  }
}

}  // namespace llada
