// A seeded multi-step scenario for the distributed layer step: several prefill chunks then
// decode steps, data built from (seed, layer, token) so that any rank count sees the same
// inputs. Each rank runs ContextAttention; the oracle is reference_step over all tokens.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "test_data.h"
#include "tolerance.h"
#include "unshackle/cluster/communicator.h"
#include "unshackle/kernels/reference_step.h"
#include "unshackle/worker/context_attention.h"

namespace unshackle::testing {

struct Scenario {
  AttentionConfig config;
  int layers = 2, H = 4, G = 2, d = 16, d_c = 8;
  int64_t kv_block = 16;
  std::vector<int64_t> chunks = {40, 37, 50, 1, 1, 1, 1, 1};  // prefill chunks, then decode
  uint64_t seed = 7;
  double rope_theta = 10000.0;

  std::string name() const {
    return std::string(mode_name(config.mode)) + (config.evicts() ? "+lagkv" : "");
  }
  int64_t total() const {
    int64_t n = 0;
    for (int64_t c : chunks) n += c;
    return n;
  }
  // Rows of token t for (layer, which): which 0 = q [H*d], 1 = k [G*d], 2 = v [G*d].
  std::vector<float> rows(int layer, int which, int64_t t0, int64_t n) const {
    const int width = which == 0 ? H * d : G * d;
    const uint64_t stream = seed * 1000003ull + static_cast<uint64_t>(layer) * 17ull + static_cast<uint64_t>(which);
    return normal_vector(static_cast<size_t>(n) * width, stream, 1.0f, static_cast<uint64_t>(t0) * width);
  }
  CompressionWeights compression() const {
    CompressionWeights cw;
    cw.d_c = d_c;
    const float scale_q = 1.0f / std::sqrt(static_cast<float>(H * d)), scale_k = 1.0f / std::sqrt(static_cast<float>(G * d));
    for (int l = 0; l < layers; ++l) {
      cw.wq.push_back(normal_vector(static_cast<size_t>(d_c) * H * d, seed + 100 + l, scale_q));
      cw.wk.push_back(normal_vector(static_cast<size_t>(d_c) * G * d, seed + 200 + l, scale_k));
    }
    return cw;
  }
};

// One step's result on one rank, for one layer.
struct StepRecord {
  std::vector<float> o;
  std::vector<int64_t> selected, evicted;
  int64_t selected_count = 0, attended_local_rows = 0;
  AttentionShare share;
};

// Runs the whole scenario on this rank; returns records[step][layer].
inline std::vector<std::vector<StepRecord>> run_scenario(const Scenario& s, Backend& backend, Communicator& comm,
                                                         bool measure_share = false, bool record_selection = true) {
  const CompressionWeights cw = s.compression();
  ContextAttentionOptions options{.attention = s.config, .layers = s.layers, .H = s.H, .G = s.G, .d = s.d,
                                  .kv_dtype = DType::kF32, .kv_block = s.kv_block,
                                  .inv_freq = rope_inv_freq(s.d, s.rope_theta), .compression = &cw,
                                  .record_selection = record_selection};
  ContextAttention attention(backend, comm, options);
  attention.measure_attention_share(measure_share);
  std::vector<std::vector<StepRecord>> records;
  int64_t p = 0;
  for (int64_t l_C : s.chunks) {
    std::vector<StepRecord> per_layer;
    for (int layer = 0; layer < s.layers; ++layer) {
      const auto q = s.rows(layer, 0, p, l_C), k = s.rows(layer, 1, p, l_C), v = s.rows(layer, 2, p, l_C);
      StepRecord record;
      record.o.resize(q.size());
      attention.forward(layer, q.data(), k.data(), v.data(), l_C, record.o.data());
      record.selected = attention.last_stats(layer).selected;
      record.evicted = attention.last_stats(layer).evicted;
      record.selected_count = attention.last_stats(layer).selected_count;
      record.attended_local_rows = attention.last_stats(layer).attended_local_rows;
      record.share = attention.last_stats(layer).share;
      per_layer.push_back(std::move(record));
    }
    attention.commit_chunk(l_C);
    records.push_back(std::move(per_layer));
    p += l_C;
  }
  return records;
}

// The step (step, layer) as one case over all tokens [0, p + l_C).
inline StepCase step_case(const Scenario& s, int64_t p, int64_t l_C, int layer) {
  const CompressionWeights cw = s.compression();
  StepCase step;
  step.p = p;
  step.l_C = l_C;
  step.H = s.H;
  step.G = s.G;
  step.d = s.d;
  step.q = s.rows(layer, 0, p, l_C);
  step.k = s.rows(layer, 1, 0, p + l_C);
  step.v = s.rows(layer, 2, 0, p + l_C);
  if (s.config.needs_compression()) {
    step.d_c = s.d_c;
    step.wq = cw.wq[static_cast<size_t>(layer)];
    step.wk = cw.wk[static_cast<size_t>(layer)];
  }
  step.config = s.config;
  step.rope_theta = s.rope_theta;
  return step;
}

// The oracle for (step, layer): reference_step over all tokens [0, p + l_C).
inline StepResult oracle_step(const Scenario& s, int64_t p, int64_t l_C, int layer) {
  return reference_step(step_case(s, p, l_C, layer));
}

inline std::vector<Scenario> all_scenarios() {
  std::vector<Scenario> out;
  for (AttentionMode mode : {AttentionMode::kFull, AttentionMode::kEsa, AttentionMode::kExactTopk,
                             AttentionMode::kStreaming, AttentionMode::kBlock}) {
    for (bool evict : {false, true}) {
      Scenario s;
      s.config.mode = mode;
      s.config.l_I = 8;
      s.config.l_L = 32;
      s.config.top_k = 24;
      s.config.eps = 2;
      s.config.w = -1;
      s.config.block = 8;
      s.config.lag = 16;
      s.config.lag_ratio = evict ? 0.5 : 0.0;
      out.push_back(s);
    }
  }
  return out;
}

}  // namespace unshackle::testing
