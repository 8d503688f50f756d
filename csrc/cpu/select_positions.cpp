// CPU twin of the select_positions kernel: rank each row's candidates with one
// sort of packed (confidence, position) keys, then accept a prefix.
#include <algorithm>
#include <vector>

#include "llada/select_positions.h"

namespace llada {

void select_positions_cpu(const SelectPositionsParams& p, int64_t row_begin, int64_t row_end) {
  std::vector<uint64_t> keys(size_t(p.length));
  for (int64_t row = row_begin; row < row_end; ++row) {
    const float* c = p.confidence + row * p.length;
    bool* accepted = p.accepted + row * p.length;
    int64_t candidates = 0;
    for (int64_t i = 0; i < p.length; ++i) {
      keys[size_t(i)] = ranking_key(c[i], i);
      candidates += is_candidate(c[i]) ? 1 : 0;
    }
    std::sort(keys.begin(), keys.end());

    int64_t take = 0;
    if (p.rule == SelectionRule::kTopK) {
      take = std::min(p.k[row], candidates);
    } else {
      for (int64_t j = 0; j < candidates; ++j) {
        float cj = c[keys[size_t(j)] & 0xffffffffu];
        if (passes_rule(p.rule, cj, j, p.threshold, p.factor)) take = j + 1;
      }
      if (candidates > 0) take = std::max<int64_t>(take, 1);
    }
    for (int64_t j = 0; j < p.length; ++j)
      accepted[keys[size_t(j)] & 0xffffffffu] = j < take;
  }
}

}  // namespace llada
