#include "unshackle/kernels/attention_config.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "unshackle/common/check.h"

namespace unshackle {

std::string_view mode_name(AttentionMode mode) {
  switch (mode) {
    case AttentionMode::kFull: return "full";
    case AttentionMode::kEsa: return "esa";
    case AttentionMode::kExactTopk: return "exact-topk";
    case AttentionMode::kStreaming: return "streaming";
    case AttentionMode::kBlock: return "block";
  }
  return "?";
}

AttentionMode parse_mode(std::string_view name) {
  for (AttentionMode m : {AttentionMode::kFull, AttentionMode::kEsa, AttentionMode::kExactTopk,
                          AttentionMode::kStreaming, AttentionMode::kBlock}) {
    if (mode_name(m) == name) return m;
  }
  fail(ErrorKind::kInvalidArgument,
       fmt::format("mode: unknown attention mode '{}' (expected full, esa, exact-topk, streaming or block)", name));
}

void AttentionConfig::validate(int num_heads, int num_kv_heads) const {
  UNS_CHECK(num_kv_heads > 0 && num_heads > 0 && num_heads % num_kv_heads == 0,
            "H: query heads ({}) must be a positive multiple of KV heads G ({})", num_heads, num_kv_heads);
  UNS_CHECK(top_k > 0, "top_k: must be > 0 (got {})", top_k);
  UNS_CHECK(l_I >= 0, "l_I: must be >= 0 (got {})", l_I);
  UNS_CHECK(l_L >= 0, "l_L: must be >= 0 (got {})", l_L);
  UNS_CHECK(eps >= 0, "eps: must be >= 0 (got {})", eps);
  UNS_CHECK(w >= -1, "w: must be >= 0, or -1 for l_L (got {})", w);
  UNS_CHECK(mode != AttentionMode::kBlock || block > 0, "block: must be > 0 in block mode (got {})", block);
  UNS_CHECK(std::isfinite(lag_ratio) && lag_ratio >= 0 && lag_ratio <= 1,
            "lag_ratio: must be in [0, 1] (got {})", lag_ratio);
  if (evicts()) {
    UNS_CHECK(lag > 0, "lag: must be > 0 with eviction (got {})", lag);
    UNS_CHECK(l_L >= lag, "l_L: must be >= lag ({}) with eviction, so a partition's reference exists (got {})",
              lag, l_L);
  }
}

Segments compute_segments(int64_t p, int64_t l_C, int64_t l_I, int64_t l_L) {
  UNS_CHECK(p >= 0 && l_C >= 0, "bad step: p = {}, l_C = {}", p, l_C);
  Segments s;
  s.p = p;
  s.l_C = l_C;
  s.i_end = std::min(l_I, p);
  s.m_begin = s.i_end;
  s.m_end = std::max(p - l_L, s.i_end);
  s.c_end = p + l_C;
  return s;
}

int64_t lag_evictable_partitions(const Segments& seg, const AttentionConfig& config) {
  if (!config.evicts() || seg.m_end <= config.l_I) return 0;
  return (seg.m_end - config.l_I) / config.lag;  // partitions wholly inside [l_I, s0)
}

int64_t lag_keep_count(const AttentionConfig& config) {
  const double keep = std::ceil((1.0 - config.lag_ratio) * static_cast<double>(config.lag) - 1e-9);
  return std::clamp<int64_t>(static_cast<int64_t>(keep), 0, config.lag);
}

std::vector<float> rope_inv_freq(int head_dim, double theta, const RopeScaling& scaling) {
  UNS_CHECK(head_dim > 0 && head_dim % 2 == 0, "head_dim: must be even (got {})", head_dim);
  UNS_CHECK(theta > 0, "rope_theta: must be > 0 (got {})", theta);
  const int half = head_dim / 2;
  std::vector<float> inv(half);
  for (int i = 0; i < half; ++i) {
    double f = 1.0 / std::pow(theta, (2.0 * i) / head_dim);
    switch (scaling.type) {
      case RopeScaling::Type::kNone: break;
      case RopeScaling::Type::kLinear: f /= scaling.factor; break;
      case RopeScaling::Type::kLlama3: {
        // transformers' _compute_llama3_parameters
        const double low_wavelen = scaling.original_max_position / scaling.low_freq_factor;
        const double high_wavelen = scaling.original_max_position / scaling.high_freq_factor;
        const double wavelen = 2 * std::numbers::pi / f;
        if (wavelen > low_wavelen) {
          f = f / scaling.factor;
        } else if (wavelen >= high_wavelen) {
          const double smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) /
                                (scaling.high_freq_factor - scaling.low_freq_factor);
          f = (1 - smooth) * f / scaling.factor + smooth * f;
        }
        break;
      }
    }
    inv[i] = static_cast<float>(f);
  }
  return inv;
}

void rope_rotate(float* x, int head_dim, const float* inv_freq, int64_t position) {
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    const double angle = static_cast<double>(position) * static_cast<double>(inv_freq[i]);
    const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * c - x2 * s;         // x * cos + rotate_half(x) * sin, rotate_half = (-x2, x1)
    x[i + half] = x2 * c + x1 * s;
  }
}

}  // namespace unshackle
