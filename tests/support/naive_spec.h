// SPEC §1-§5 written again from the SPEC text alone, in float64 and the plainest loops: the
// formulas the CPU reference backend (kernels/cpu) is tested against. Nothing here calls
// kernels/ code; only the plain data types (StepCase, AttentionConfig) are shared.
//
// Where SPEC is silent this file follows the project's written choices (docs/spec_notes.md),
// each marked "choice:" below. Where SPEC is explicit it follows SPEC, even when the code
// does otherwise; a deliberate exception is a flag in `Choices` whose default is SPEC's text.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numbers>
#include <utility>
#include <vector>

#include "unshackle/kernels/reference_step.h"

namespace unshackle::naive {

using Vec = std::vector<double>;
inline constexpr double kNegInf = -std::numeric_limits<double>::infinity();

inline size_t at(int64_t i) { return static_cast<size_t>(i); }

// bf16 round-to-nearest-even of a float (NaN kept quiet): what bf16 storage does to an input.
inline float round_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u) {
    bits &= 0xffff0000u;
    if (std::isnan(x)) bits |= 0x00400000u;
  } else {
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// ---------------------------------------------------------------------------------------
// §1 RoPE, Hugging Face Llama: inv_freq[i] = theta^(-2i/d), rotate-half pairs (i, i + d/2),
// then the model's rope_scaling as transformers' modeling_rope_utils computes it.
// ---------------------------------------------------------------------------------------

// transformers' _compute_llama3_parameters / _compute_linear_scaling_rope_parameters,
// transcribed line by line (torch.where becomes ?:). Returns the frequencies in double.
inline Vec inv_freq_exact(int d, double theta, const RopeScaling& scaling = {}) {
  Vec inv(at(d / 2));
  for (int i = 0; i < d / 2; ++i) inv[at(i)] = 1.0 / std::pow(theta, static_cast<double>(2 * i) / d);
  if (scaling.type == RopeScaling::Type::kLinear) {
    for (double& f : inv) f /= scaling.factor;
  } else if (scaling.type == RopeScaling::Type::kLlama3) {
    const double factor = scaling.factor, low_freq_factor = scaling.low_freq_factor,
                 high_freq_factor = scaling.high_freq_factor, old_context_len = scaling.original_max_position;
    const double low_freq_wavelen = old_context_len / low_freq_factor;
    const double high_freq_wavelen = old_context_len / high_freq_factor;
    for (double& inv_freq : inv) {
      const double wavelen = 2 * std::numbers::pi / inv_freq;
      // inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
      double inv_freq_llama = wavelen > low_freq_wavelen ? inv_freq / factor : inv_freq;
      const double smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
      const double smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama;
      const bool is_medium_freq = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
      inv_freq_llama = is_medium_freq ? smoothed_inv_freq : inv_freq_llama;
      inv_freq = inv_freq_llama;
    }
  }
  return inv;
}

// transformers keeps inv_freq as a float32 buffer: the frequencies a model was trained with.
inline Vec inv_freq_f32(int d, double theta, const RopeScaling& scaling = {}) {
  Vec inv = inv_freq_exact(d, theta, scaling);
  for (double& f : inv) f = static_cast<double>(static_cast<float>(f));
  return inv;
}

// x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[d/2:], x[:d/2]); angles in double.
inline Vec rope(const double* x, int d, double pos, const Vec& inv) {
  const int half = d / 2;
  Vec out(at(d));
  for (int i = 0; i < half; ++i) {
    const double angle = pos * inv[at(i)];
    out[at(i)] = x[i] * std::cos(angle) - x[i + half] * std::sin(angle);
    out[at(i + half)] = x[i + half] * std::cos(angle) + x[i] * std::sin(angle);
  }
  return out;
}

inline double dot(const double* a, const double* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---------------------------------------------------------------------------------------
// §2 Segments: s0 = max(p - l_L, min(l_I, p)); I = [0, min(l_I, p)), M = [min(l_I, p), s0),
// L = [s0, p), C = [p, p + l_C).
// ---------------------------------------------------------------------------------------
struct Seg {
  int64_t i_end, s0;
};
inline Seg segments(int64_t p, int64_t l_I, int64_t l_L) {
  const int64_t i_end = std::min(l_I, p);
  return {i_end, std::max(p - l_L, i_end)};
}

// ---------------------------------------------------------------------------------------
// Softmax attention of one query over a list of keys, in double. Each key carries its
// token (for the causal mask) and the position it is rotated to (NaN: unrotated).
// Returns (o, lse); no visible key gives (0, -inf).
// ---------------------------------------------------------------------------------------
struct Key {
  const double* k;
  const double* v;
  int64_t token;
  double pos;  // NaN = unrotated (position 0 of SPEC §4's global part; rotation by 0 is identity)
};

inline std::pair<Vec, double> softmax_attend(const Vec& rotated_q, int d, const std::vector<Key>& keys,
                                             int64_t query_token, bool causal, const Vec& inv) {
  std::vector<double> logits;
  std::vector<const double*> vals;
  for (const Key& key : keys) {
    if (causal && key.token > query_token) continue;
    const Vec rk = std::isnan(key.pos) ? Vec(key.k, key.k + d) : rope(key.k, d, key.pos, inv);
    logits.push_back(dot(rotated_q.data(), rk.data(), d) / std::sqrt(static_cast<double>(d)));
    vals.push_back(key.v);
  }
  Vec o(at(d), 0.0);
  if (logits.empty()) return {o, kNegInf};
  const double mx = *std::max_element(logits.begin(), logits.end());
  double z = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const double w = std::exp(logits[i] - mx);
    z += w;
    for (int j = 0; j < d; ++j) o[at(j)] += w * vals[i][j];
  }
  for (double& x : o) x /= z;
  return {o, mx + std::log(z)};
}

// §4 merge: o = sum e^{lse_i} o_i / sum e^{lse_i}, max subtracted first; empty parts skipped.
inline std::pair<Vec, double> lse_merge(const std::vector<std::pair<Vec, double>>& parts, int d) {
  double mx = kNegInf;
  for (const auto& part : parts) mx = std::max(mx, part.second);
  Vec o(at(d), 0.0);
  if (mx == kNegInf) return {o, kNegInf};
  double z = 0;
  for (const auto& part : parts) {
    if (part.second == kNegInf) continue;
    const double w = std::exp(part.second - mx);
    z += w;
    for (int j = 0; j < d; ++j) o[at(j)] += w * part.first[at(j)];
  }
  for (double& x : o) x /= z;
  return {o, mx + std::log(z)};
}

// ---------------------------------------------------------------------------------------
// A StepCase in doubles, with the rotated and compressed queries precomputed.
// ---------------------------------------------------------------------------------------
struct Case {
  int64_t p, l_C;
  int H, G, d, d_c;
  Vec q, k, v, wq, wk;
  AttentionConfig cfg;
  Vec inv;                      // float32 frequencies with the model's rope_scaling
  std::vector<Vec> q_global;    // [l_C] concat_h RoPE(q_{h,c}, w), width H*d
  std::vector<Vec> q_fold;      // [l_C] per KV head sum of its query heads' RoPE(q, w), width G*d
  std::vector<Vec> q_compressed;  // [l_C] Wq · q_global, width d_c
  mutable std::vector<Vec> k_compressed;  // lazily: Wk · k_m

  explicit Case(const StepCase& s)
      : p(s.p), l_C(s.l_C), H(s.H), G(s.G), d(s.d), d_c(s.d_c), q(s.q.begin(), s.q.end()), k(s.k.begin(), s.k.end()),
        v(s.v.begin(), s.v.end()), wq(s.wq.begin(), s.wq.end()), wk(s.wk.begin(), s.wk.end()), cfg(s.config),
        inv(inv_freq_f32(s.d, s.rope_theta, s.rope_scaling)) {
    const double w = static_cast<double>(cfg.w >= 0 ? cfg.w : cfg.l_L);  // SPEC §1: w = l_L
    for (int64_t c = 0; c < l_C; ++c) {
      Vec rq, fold(at(G * d), 0.0), qc(at(d_c), 0.0);
      for (int h = 0; h < H; ++h) {
        const Vec part = rope(query(c, h), d, w, inv);
        rq.insert(rq.end(), part.begin(), part.end());
        for (int i = 0; i < d; ++i) fold[at(kv_head(h) * d + i)] += part[at(i)];
      }
      if (!wq.empty())
        for (int j = 0; j < d_c; ++j) qc[at(j)] = dot(wq.data() + at(j) * at(H * d), rq.data(), H * d);
      q_global.push_back(rq);
      q_fold.push_back(fold);
      q_compressed.push_back(qc);
    }
    k_compressed.resize(at(p + l_C));
  }
  int kv_head(int h) const { return h / (H / G); }  // g(h) = h / (H/G)
  const double* key(int64_t t, int g) const { return k.data() + (at(t) * at(G) + at(g)) * at(d); }
  const double* value(int64_t t, int g) const { return v.data() + (at(t) * at(G) + at(g)) * at(d); }
  const double* query(int64_t c, int h) const { return q.data() + (at(c) * at(H) + at(h)) * at(d); }
  double w() const { return static_cast<double>(cfg.w >= 0 ? cfg.w : cfg.l_L); }

  // f(m, c) = sum_h RoPE(q_{h,c}, w) · k_{g(h), m}, summed head by head.
  double f(int64_t m, int64_t c) const {
    double sum = 0;
    for (int h = 0; h < H; ++h) sum += dot(q_global[at(c)].data() + at(h * d), key(m, kv_head(h)), d);
    return sum;
  }
  // s(m, c) = q'_c · k'_m with k'_m = Wk · concat_g k_{g,m}.
  double s(int64_t m, int64_t c) const {
    Vec& kc = k_compressed[at(m)];
    if (kc.empty()) {
      kc.resize(at(d_c));
      for (int j = 0; j < d_c; ++j) kc[at(j)] = dot(wk.data() + at(j) * at(G * d), key(m, 0), G * d);
    }
    return dot(q_compressed[at(c)].data(), kc.data(), d_c);
  }
};

// ---------------------------------------------------------------------------------------
// §5 LagKV over the whole context for a step at p: the evicted tokens, ascending.
// choice: partition i is scored against partition i+1 as it was before any eviction.
// ---------------------------------------------------------------------------------------

// ceil((1 - ratio) * lag). The ratio is a decimal (case-file metadata), so the product is meant
// exactly: 0.3 * 10 must keep 7, although (1 - 0.3) * 10 is 7.000000000000001 in doubles.
// Any representation error is far below 1e-9 for lag < 1e6.
inline int64_t lag_keep(double ratio, int64_t lag) {
  return static_cast<int64_t>(std::ceil((1.0 - ratio) * static_cast<double>(lag) - 1e-9));
}

// The partition's scores: per KV head and K/V, min/max per channel over the reference,
// normalise, unbiased std over the d channels, softmax over the partition's tokens; mean of
// the K and V scores; mean over heads.
inline Vec lag_scores(const Case& s, int64_t begin, int64_t lag) {
  Vec score(at(lag), 0.0);
  for (int g = 0; g < s.G; ++g) {
    Vec kv_score[2];
    for (int which = 0; which < 2; ++which) {
      const auto x = [&](int64_t t, int ch) { return (which == 0 ? s.key(t, g) : s.value(t, g))[ch]; };
      Vec lo(at(s.d), INFINITY), hi(at(s.d), -INFINITY);
      for (int64_t r = begin + lag; r < begin + 2 * lag; ++r)
        for (int ch = 0; ch < s.d; ++ch) {
          lo[at(ch)] = std::min(lo[at(ch)], x(r, ch));
          hi[at(ch)] = std::max(hi[at(ch)], x(r, ch));
        }
      Vec stds;
      for (int64_t t = begin; t < begin + lag; ++t) {
        Vec y;
        for (int ch = 0; ch < s.d; ++ch) y.push_back((x(t, ch) - lo[at(ch)]) / std::max(hi[at(ch)] - lo[at(ch)], 1e-6));
        double mean = 0;
        for (double e : y) mean += e;
        mean /= s.d;
        double ss = 0;
        for (double e : y) ss += (e - mean) * (e - mean);
        stds.push_back(std::sqrt(ss / (s.d - 1)));
      }
      const double mx = *std::max_element(stds.begin(), stds.end());
      double z = 0;
      for (double e : stds) z += std::exp(e - mx);
      for (double e : stds) kv_score[which].push_back(std::exp(e - mx) / z);
    }
    for (int64_t t = 0; t < lag; ++t) score[at(t)] += (kv_score[0][at(t)] + kv_score[1][at(t)]) / 2 / s.G;
  }
  return score;
}

// Indices in [0, n) of the `keep` largest scores (ties: lower index).
inline std::vector<int64_t> best(const Vec& score, int64_t keep) {
  std::vector<int64_t> order;
  for (int64_t i = 0; i < static_cast<int64_t>(score.size()); ++i) order.push_back(i);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return score[at(a)] != score[at(b)] ? score[at(a)] > score[at(b)] : a < b;
  });
  order.resize(at(std::min<int64_t>(keep, static_cast<int64_t>(order.size()))));
  return order;
}

inline std::vector<int64_t> lag_evictions(const Case& s) {
  const AttentionConfig& c = s.cfg;
  if (!(c.lag_ratio > 0)) return {};
  const Seg seg = segments(s.p, c.l_I, c.l_L);
  std::vector<int64_t> evicted;
  // Partitions start after the sink [0, l_I); evictable when wholly inside M.
  for (int64_t begin = c.l_I; begin >= seg.i_end && begin + c.lag <= seg.s0; begin += c.lag) {
    const Vec score = lag_scores(s, begin, c.lag);
    std::vector<bool> kept(at(c.lag), false);
    for (int64_t i : best(score, lag_keep(c.lag_ratio, c.lag))) kept[at(i)] = true;
    for (int64_t t = 0; t < c.lag; ++t)
      if (!kept[at(t)]) evicted.push_back(begin + t);
  }
  return evicted;
}

// ---------------------------------------------------------------------------------------
// One step (§2-§5).
// ---------------------------------------------------------------------------------------
struct Choices {
  // SPEC §5 says block mode selects the floor(k / block) best blocks; SPEC §3's "|M| <= k:
  // M_k = M" is stated for ESA. The code also selects all of M in block mode when |M| <= k
  // (docs/spec_notes.md §2); true follows the code, false SPEC's text.
  bool block_all_of_m_when_it_fits = false;
};

struct StepOut {
  Vec o;                          // [l_C, H, d]
  std::vector<int64_t> selected;  // ascending
  std::vector<int64_t> evicted;   // ascending
  std::vector<int64_t> middle;    // surviving M tokens, ascending
  Vec rank_score;                 // per `middle` token: F' (esa, exact-topk) or its block's score
  double score_scale = 0;         // max |s(m, c)| over M and C: the size of the scores' rounding
  // Softmax mass on I, M_k and L ∪ C, mean over (chunk token, head); all 0 in `full` mode.
  double share_initial = 0, share_selected = 0, share_local = 0;
};

// `forced` (optional) replaces the selection when computing o: to price a near-tie.
inline StepOut step(const StepCase& input, const Choices& choices = {}, const std::vector<int64_t>* forced = nullptr) {
  const Case s(input);
  const AttentionConfig& c = s.cfg;
  const Seg seg = segments(s.p, c.l_I, c.l_L);
  StepOut out;
  out.evicted = lag_evictions(s);
  const auto alive = [&](int64_t t) { return !std::binary_search(out.evicted.begin(), out.evicted.end(), t); };
  for (int64_t t = seg.i_end; t < seg.s0; ++t)
    if (alive(t)) out.middle.push_back(t);
  const int64_t n_mid = static_cast<int64_t>(out.middle.size());

  const bool selects = c.mode == AttentionMode::kEsa || c.mode == AttentionMode::kExactTopk || c.mode == AttentionMode::kBlock;
  if (selects && n_mid > 0) {
    // §3: F(m) = max_c ( s(m,c) - max_{m'} s(m',c) ); exact-topk uses s = f.
    std::vector<Vec> sc(at(s.l_C));
    for (int64_t q = 0; q < s.l_C; ++q)
      for (int64_t m : out.middle) {
        const double value = c.mode == AttentionMode::kExactTopk ? s.f(m, q) : s.s(m, q);
        sc[at(q)].push_back(value);
        out.score_scale = std::max(out.score_scale, std::fabs(value));
      }
    Vec F(at(n_mid), kNegInf);
    for (int64_t q = 0; q < s.l_C; ++q) {
      const double mx = *std::max_element(sc[at(q)].begin(), sc[at(q)].end());
      for (int64_t i = 0; i < n_mid; ++i) F[at(i)] = std::max(F[at(i)], sc[at(q)][at(i)] - mx);
    }
    if (c.mode == AttentionMode::kBlock) {
      // §5: block b = [l_I + b*block, l_I + (b+1)*block) clipped to M (and to survivors);
      // score = max F over its tokens; the floor(k / block) best blocks (ties: lower block).
      const auto block_of = [&](int64_t t) { return (t - c.l_I) / c.block; };
      const int64_t n_blocks = block_of(out.middle.back()) + 1;
      Vec block_score(at(n_blocks), kNegInf);
      std::vector<bool> has_survivor(at(n_blocks), false);
      for (int64_t i = 0; i < n_mid; ++i) {
        const int64_t b = block_of(out.middle[at(i)]);
        block_score[at(b)] = std::max(block_score[at(b)], F[at(i)]);
        has_survivor[at(b)] = true;
      }
      std::vector<int64_t> blocks;
      for (int64_t b = 0; b < n_blocks; ++b)
        if (has_survivor[at(b)]) blocks.push_back(b);
      std::sort(blocks.begin(), blocks.end(), [&](int64_t a, int64_t b) {
        return block_score[at(a)] != block_score[at(b)] ? block_score[at(a)] > block_score[at(b)] : a < b;
      });
      size_t want = std::min(blocks.size(), at(c.top_k / c.block));
      if (choices.block_all_of_m_when_it_fits && n_mid <= c.top_k) want = blocks.size();
      std::vector<bool> chosen(at(n_blocks), false);
      for (size_t i = 0; i < want; ++i) chosen[at(blocks[i])] = true;
      for (int64_t i = 0; i < n_mid; ++i) {
        const int64_t b = block_of(out.middle[at(i)]);
        out.rank_score.push_back(block_score[at(b)]);
        if (chosen[at(b)]) out.selected.push_back(out.middle[at(i)]);
      }
    } else {
      // F'(j) = max { F(i) : i in M, |i - j| <= eps }, by brute force over surviving M.
      for (int64_t j = 0; j < n_mid; ++j) {
        double fj = kNegInf;
        for (int64_t i = 0; i < n_mid; ++i)
          if (std::llabs(out.middle[at(i)] - out.middle[at(j)]) <= c.eps) fj = std::max(fj, F[at(i)]);
        out.rank_score.push_back(fj);
      }
      // M_k: the k largest F' (ties: lower token); |M| <= k gives all of M.
      for (int64_t i : best(out.rank_score, c.top_k)) out.selected.push_back(out.middle[at(i)]);
      std::sort(out.selected.begin(), out.selected.end());
    }
  }
  const std::vector<int64_t>& selected = forced ? *forced : out.selected;

  // §4 / §5 attention, per query head and chunk token.
  out.o.assign(at(s.l_C) * at(s.H) * at(s.d), 0.0);
  const int64_t n_tok = s.p + s.l_C;
  for (int64_t q = 0; q < s.l_C; ++q) {
    const int64_t q_token = s.p + q;
    for (int h = 0; h < s.H; ++h) {
      const int g = s.kv_head(h);
      std::vector<std::pair<Vec, double>> parts;
      if (c.mode == AttentionMode::kFull) {  // causal, absolute positions, over survivors
        std::vector<Key> keys;
        for (int64_t t = 0; t < n_tok; ++t)
          if (alive(t)) keys.push_back({s.key(t, g), s.value(t, g), t, static_cast<double>(t)});
        parts.push_back(softmax_attend(rope(s.query(q, h), s.d, static_cast<double>(q_token), s.inv), s.d, keys,
                                       q_token, true, s.inv));
      } else {
        // global part: I ∪ M_k, keys unrotated, query at w, non-causal; attended as I and
        // M_k apart (the same result after the merge) so that each part's mass is known
        std::vector<Key> initial, middle;
        for (int64_t t = 0; t < seg.i_end; ++t) initial.push_back({s.key(t, g), s.value(t, g), t, NAN});
        for (int64_t t : selected) middle.push_back({s.key(t, g), s.value(t, g), t, NAN});
        const Vec q_global = rope(s.query(q, h), s.d, s.w(), s.inv);
        parts.push_back(softmax_attend(q_global, s.d, initial, q_token, false, s.inv));
        parts.push_back(softmax_attend(q_global, s.d, middle, q_token, false, s.inv));
        // local part: L ∪ C, positions from s0, causal inside C
        std::vector<Key> local;
        for (int64_t t = seg.s0; t < n_tok; ++t)
          if (alive(t)) local.push_back({s.key(t, g), s.value(t, g), t, static_cast<double>(t - seg.s0)});
        parts.push_back(softmax_attend(rope(s.query(q, h), s.d, static_cast<double>(q_token - seg.s0), s.inv), s.d,
                                       local, q_token, true, s.inv));
      }
      const auto [o, lse] = lse_merge(parts, s.d);
      if (parts.size() == 3) {
        const double rows = static_cast<double>(s.l_C) * s.H;
        out.share_initial += std::exp(parts[0].second - lse) / rows;
        out.share_selected += std::exp(parts[1].second - lse) / rows;
        out.share_local += std::exp(parts[2].second - lse) / rows;
      }
      std::copy(o.begin(), o.end(), out.o.begin() + static_cast<std::ptrdiff_t>((at(q) * at(s.H) + at(h)) * at(s.d)));
    }
  }
  return out;
}

}  // namespace unshackle::naive
