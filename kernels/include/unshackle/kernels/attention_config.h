// Attention settings of SPEC §1-§5 and the segment arithmetic of SPEC §2.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace unshackle {

enum class AttentionMode : uint8_t {
  kFull,       // causal attention, absolute positions (the exactness baseline)
  kEsa,        // compressed scores pick top-k middle tokens (SPEC §3-4)
  kExactTopk,  // SPEC §3 with s = f: what compression costs
  kStreaming,  // I ∪ L ∪ C only
  kBlock,      // InfLLM/Quest-like: best whole blocks of M by max F
};

std::string_view mode_name(AttentionMode mode);
// Throws Error naming the field `mode` when unknown.
AttentionMode parse_mode(std::string_view name);

struct AttentionConfig {
  AttentionMode mode = AttentionMode::kEsa;
  int64_t l_I = 128;    // initial (sink) tokens
  int64_t l_L = 4096;   // local window
  int64_t top_k = 2048; // middle tokens selected per step
  int64_t eps = 1;      // proximity influence distance
  int64_t w = -1;       // query position in the global part; -1 means l_L (SPEC §1)
  int64_t block = 64;   // block mode's block length (esa.block)
  int64_t lag = 128;    // LagKV partition length
  double lag_ratio = 0; // LagKV eviction ratio; 0 = no eviction

  bool evicts() const { return lag_ratio > 0; }
  bool selects() const {
    return mode == AttentionMode::kEsa || mode == AttentionMode::kExactTopk || mode == AttentionMode::kBlock;
  }
  // ESA and block mode score with the compressed q', k' and so need Wq, Wk.
  bool needs_compression() const { return mode == AttentionMode::kEsa || mode == AttentionMode::kBlock; }
  int64_t global_query_position() const { return w >= 0 ? w : l_L; }
  // Throws Error(kInvalidArgument) naming the offending field.
  void validate(int num_heads, int num_kv_heads) const;
};

// SPEC §2: for a chunk starting at token p, [0, p) splits into I, M, L; C = [p, p + l_C).
struct Segments {
  int64_t p = 0, l_C = 0;
  int64_t i_end = 0;    // I = [0, i_end)
  int64_t m_begin = 0;  // M = [m_begin, m_end)
  int64_t m_end = 0;    // = s0, the origin of local positions
  int64_t c_end = 0;    // = p + l_C

  int64_t s0() const { return m_end; }
  int64_t m_size() const { return m_end - m_begin; }
  bool in_I(int64_t t) const { return t >= 0 && t < i_end; }
  bool in_M(int64_t t) const { return t >= m_begin && t < m_end; }
  bool in_L(int64_t t) const { return t >= m_end && t < p; }
  bool in_C(int64_t t) const { return t >= p && t < c_end; }
};

Segments compute_segments(int64_t p, int64_t l_C, int64_t l_I, int64_t l_L);

// LagKV (SPEC §5): partition i is [l_I + i*lag, l_I + (i+1)*lag), scored against partition i+1;
// it may be evicted from once it lies wholly inside M. Returns how many partitions are
// evictable for a step with segments `seg` (partitions 0 .. n-1).
int64_t lag_evictable_partitions(const Segments& seg, const AttentionConfig& config);
// Tokens kept per evictable partition: ceil((1 - ratio) * lag).
int64_t lag_keep_count(const AttentionConfig& config);

// RoPE frequencies, Hugging Face Llama layout (rotate-half), with the model's rope_scaling.
struct RopeScaling {
  enum class Type : uint8_t { kNone, kLinear, kLlama3 } type = Type::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;    // llama3
  double high_freq_factor = 4.0;   // llama3
  double original_max_position = 8192;  // llama3
};

// inv_freq[i] = theta^(-2i/d), i < d/2, adjusted by `scaling` as transformers does.
std::vector<float> rope_inv_freq(int head_dim, double theta, const RopeScaling& scaling = {});

// Rotates x [d] in place at `position` (rotate-half: pairs (i, i + d/2)). Angles in double.
void rope_rotate(float* x, int head_dim, const float* inv_freq, int64_t position);

}  // namespace unshackle
