// The single-process oracle for one attention step (SPEC §2-§5): every token of the context
// in one place, the plain composition of the CPU operations. The distributed layer step
// (worker/) must equal it: same selected sets, output within float32 merge rounding.
#pragma once

#include <cstdint>
#include <vector>

#include "unshackle/kernels/attention_config.h"

namespace unshackle {

// The contents of a SPEC §9 case file, float32.
struct StepCase {
  int64_t p = 0;    // tokens before the chunk
  int64_t l_C = 0;  // chunk length
  int H = 0, G = 0, d = 0;
  int d_c = 0;      // compressed width d' (rows of wq/wk); 0 when wq/wk are absent
  std::vector<float> q;       // [l_C, H, d] pre-RoPE
  std::vector<float> k, v;    // [p + l_C, G, d] pre-RoPE, the last l_C rows are the chunk
  std::vector<float> wq;      // [d_c, H*d]
  std::vector<float> wk;      // [d_c, G*d]
  AttentionConfig config;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;

  // Shapes, sizes and settings; throws Error naming the field.
  void validate() const;
};

struct StepResult {
  std::vector<float> o;           // [l_C, H, d]
  std::vector<int64_t> selected;  // ascending global indices of M_k
  std::vector<int64_t> evicted;   // ascending global indices evicted by LagKV
};

StepResult reference_step(const StepCase& step);

// LagKV alone: the tokens of [0, p) evicted for a step at p (ascending), over full K, V.
std::vector<int64_t> reference_lag_evictions(const StepCase& step);

}  // namespace unshackle
