// CPU twin of the select_positions kernel. Each rule does only the ordering
// work it needs: top-k partitions the packed (confidence, position) keys
// around the k-th, threshold needs no ordering beyond the best candidate, and
// only the factor rule sorts the row.
#include <algorithm>
#include <vector>

#include "llada/select_positions.h"

namespace llada {
namespace {

int64_t position_of(uint64_t key) { return int64_t(key & 0xffffffffu); }

void select_row(const SelectPositionsParams& p, int64_t row, std::vector<uint64_t>& keys) {
  const float* c = p.confidence + row * p.length;
  bool* accepted = p.accepted + row * p.length;
  std::fill(accepted, accepted + p.length, false);

  keys.clear();
  for (int64_t i = 0; i < p.length; ++i)
    if (is_candidate(c[i])) keys.push_back(ranking_key(c[i], i));
  const int64_t candidates = int64_t(keys.size());
  if (candidates == 0) return;

  switch (p.rule) {
    case SelectionRule::kTopK: {
      const int64_t take = std::min(p.k != nullptr ? p.k[row] : p.k_all, candidates);
      if (take == 0) return;
      std::nth_element(keys.begin(), keys.begin() + (take - 1), keys.end());
      for (int64_t j = 0; j < take; ++j) accepted[position_of(keys[size_t(j)])] = true;
      return;
    }
    case SelectionRule::kThreshold: {
      bool any = false;
      for (int64_t i = 0; i < p.length; ++i) {
        if (is_candidate(c[i]) && passes_rule(p.rule, c[i], 0, p.threshold, p.factor)) {
          accepted[i] = true;
          any = true;
        }
      }
      if (!any) accepted[position_of(*std::min_element(keys.begin(), keys.end()))] = true;
      return;
    }
    case SelectionRule::kFactor: {
      std::sort(keys.begin(), keys.end());
      int64_t take = 1;
      for (int64_t j = 0; j < candidates; ++j)
        if (passes_rule(p.rule, c[position_of(keys[size_t(j)])], j, p.threshold, p.factor))
          take = j + 1;
      for (int64_t j = 0; j < take; ++j) accepted[position_of(keys[size_t(j)])] = true;
      return;
    }
  }
}

}  // namespace

void select_positions_cpu(const SelectPositionsParams& p, int64_t row_begin, int64_t row_end) {
  std::vector<uint64_t> keys;
  keys.reserve(size_t(p.length));
  for (int64_t row = row_begin; row < row_end; ++row) select_row(p, row, keys);
}

}  // namespace llada
