// Confidence ranking / selection: which positions of confidence [B, L] to
// commit. Candidates are the entries that are not -inf (NaN counts as -inf),
// ranked by confidence descending with the lower position first on ties. The
// accepted set is a prefix of that ranking whose length the rule decides.
#pragma once

#include <cstdint>

#include "llada/common.h"

namespace llada {

struct SelectPositionsParams {
  const float* confidence;  // [rows, length], contiguous
  int64_t rows;
  int64_t length;
  SelectionRule rule;
  const int64_t* k;         // [rows], for kTopK; values >= 0; null: every row takes k_all
  int64_t k_all;            // for kTopK without k; >= 0
  float threshold;          // for kThreshold
  float factor;             // for kFactor
  bool* accepted;           // [rows, length], every element written
};

// False for -inf and NaN, true for every other value.
LLADA_HD bool is_candidate(float c) { return c >= -3.402823466e38f; }

// Whether rank j (0-based) of the ranking, holding confidence c, passes the
// threshold or factor test. The accepted prefix ends at the last rank that
// passes (at least one candidate is always accepted).
LLADA_HD bool passes_rule(SelectionRule rule, float c, int64_t j, float threshold, float factor) {
  if (rule == SelectionRule::kThreshold) return c >= threshold;
  // Factor rule: n = j + 1 accepted tokens are safe when (n + 1) (1 - c_n) < f.
  return float(j + 2) * (1.0f - c) < factor;
}

// Sort key: ascending key order = descending confidence, then ascending
// position; non-candidates sort last. -0.0 and +0.0 are equal confidences
// (as a caller's scores may hold both: a negated 0 is -0.0), so adding +0.0
// first turns -0.0 into +0.0 before the bits are compared.
LLADA_HD uint64_t ranking_key(float c, int64_t position) {
  uint32_t order = is_candidate(c) ? ~ordered_bits(c + 0.0f) : 0xffffffffu;
  return (uint64_t(order) << 32) | uint64_t(uint32_t(position));
}

void select_positions_cpu(const SelectPositionsParams& p, int64_t row_begin, int64_t row_end);

}  // namespace llada
