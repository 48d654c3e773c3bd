// SPEC §2-§5 written again, independently of kernels/, in float64 and the plainest loops:
// the formula every CPU operation is tested against.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "unshackle/kernels/reference_step.h"

namespace unshackle::naive {

using Vec = std::vector<double>;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// RoPE rotate-half at `pos`, inv_freq[i] = theta^(-2i/d).
inline Vec rope(const double* x, int d, double pos, double theta) {
  Vec out(x, x + d);
  for (int i = 0; i < d / 2; ++i) {
    const double angle = pos * std::pow(theta, -2.0 * i / d);
    out[static_cast<size_t>(i)] = x[i] * std::cos(angle) - x[i + d / 2] * std::sin(angle);
    out[static_cast<size_t>(i + d / 2)] = x[i + d / 2] * std::cos(angle) + x[i] * std::sin(angle);
  }
  return out;
}

struct Case {  // a StepCase in doubles
  int64_t p, l_C;
  int H, G, d, d_c;
  Vec q, k, v, wq, wk;
  AttentionConfig cfg;
  double theta;
  explicit Case(const StepCase& s)
      : p(s.p), l_C(s.l_C), H(s.H), G(s.G), d(s.d), d_c(s.d_c), q(s.q.begin(), s.q.end()), k(s.k.begin(), s.k.end()),
        v(s.v.begin(), s.v.end()), wq(s.wq.begin(), s.wq.end()), wk(s.wk.begin(), s.wk.end()), cfg(s.config),
        theta(s.rope_theta) {}
  const double* key(int64_t t, int g) const { return k.data() + (static_cast<size_t>(t) * G + g) * d; }
  const double* value(int64_t t, int g) const { return v.data() + (static_cast<size_t>(t) * G + g) * d; }
  const double* query(int64_t c, int h) const { return q.data() + (static_cast<size_t>(c) * H + h) * d; }
  double w() const { return static_cast<double>(cfg.w >= 0 ? cfg.w : cfg.l_L); }
};

// f(m, c) = sum_h RoPE(q_{h,c}, w) · k_{g(h), m}
inline double f_exact(const Case& s, int64_t m, int64_t c) {
  double sum = 0;
  for (int h = 0; h < s.H; ++h) {
    const Vec rq = rope(s.query(c, h), s.d, s.w(), s.theta);
    const double* km = s.key(m, h / (s.H / s.G));
    for (int i = 0; i < s.d; ++i) sum += rq[static_cast<size_t>(i)] * km[i];
  }
  return sum;
}

// s(m, c) = (Wq · concat_h RoPE(q_h, w)) · (Wk · concat_g k_g)
inline double s_compressed(const Case& s, int64_t m, int64_t c) {
  const int dH = s.H * s.d, dK = s.G * s.d;
  Vec rq;
  for (int h = 0; h < s.H; ++h) {
    const Vec part = rope(s.query(c, h), s.d, s.w(), s.theta);
    rq.insert(rq.end(), part.begin(), part.end());
  }
  double sum = 0;
  for (int j = 0; j < s.d_c; ++j) {
    double qj = 0, kj = 0;
    for (int i = 0; i < dH; ++i) qj += s.wq[static_cast<size_t>(j) * dH + i] * rq[static_cast<size_t>(i)];
    for (int i = 0; i < dK; ++i) kj += s.wk[static_cast<size_t>(j) * dK + i] * s.k[static_cast<size_t>(m) * dK + i];
    sum += qj * kj;
  }
  return sum;
}

// LagKV (SPEC §5) over the whole context: the evicted tokens, ascending.
inline std::vector<int64_t> lag_evictions(const Case& s) {
  const AttentionConfig& c = s.cfg;
  if (!(c.lag_ratio > 0)) return {};
  const int64_t s0 = std::max(s.p - c.l_L, std::min(c.l_I, s.p));
  std::vector<int64_t> evicted;
  for (int64_t begin = c.l_I; begin + c.lag <= s0; begin += c.lag) {
    Vec score(static_cast<size_t>(c.lag), 0.0);
    for (int kv = 0; kv < 2; ++kv) {
      for (int g = 0; g < s.G; ++g) {
        Vec stds(static_cast<size_t>(c.lag));
        for (int64_t t = 0; t < c.lag; ++t) {
          Vec x(static_cast<size_t>(s.d));
          for (int ch = 0; ch < s.d; ++ch) {
            double lo = INFINITY, hi = -INFINITY;
            for (int64_t r = begin + c.lag; r < begin + 2 * c.lag; ++r) {
              const double y = (kv == 0 ? s.key(r, g) : s.value(r, g))[ch];
              lo = std::min(lo, y);
              hi = std::max(hi, y);
            }
            const double y = (kv == 0 ? s.key(begin + t, g) : s.value(begin + t, g))[ch];
            x[static_cast<size_t>(ch)] = (y - lo) / std::max(hi - lo, 1e-6);
          }
          const double mean = std::accumulate(x.begin(), x.end(), 0.0) / s.d;
          double var = 0;
          for (double y : x) var += (y - mean) * (y - mean);
          stds[static_cast<size_t>(t)] = std::sqrt(var / (s.d - 1));
        }
        const double mx = *std::max_element(stds.begin(), stds.end());
        double z = 0;
        for (double y : stds) z += std::exp(y - mx);
        for (int64_t t = 0; t < c.lag; ++t)
          score[static_cast<size_t>(t)] += std::exp(stds[static_cast<size_t>(t)] - mx) / z / 2.0 / s.G;
      }
    }
    const auto keep = static_cast<int64_t>(std::ceil((1.0 - c.lag_ratio) * static_cast<double>(c.lag) - 1e-9));
    std::vector<int64_t> order(static_cast<size_t>(c.lag));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return score[static_cast<size_t>(a)] > score[static_cast<size_t>(b)]; });
    for (size_t i = static_cast<size_t>(keep); i < order.size(); ++i) evicted.push_back(begin + order[i]);
  }
  std::sort(evicted.begin(), evicted.end());
  return evicted;
}

// Softmax attention of query (c, h) over `tokens`; positions per SPEC §4 (`global`: keys at
// 0, query at w; else key at t - origin, query at (p + c) - origin). Returns (o, lse).
inline std::pair<Vec, double> attend(const Case& s, int64_t c, int h, const std::vector<int64_t>& tokens, bool global,
                                     int64_t origin, bool causal) {
  const int g = h / (s.H / s.G);
  const double qpos = global ? s.w() : static_cast<double>(s.p + c - origin);
  const Vec rq = rope(s.query(c, h), s.d, qpos, s.theta);
  std::vector<double> logits;
  std::vector<int64_t> used;
  for (int64_t t : tokens) {
    if (causal && t > s.p + c) continue;
    const Vec rk = global ? Vec(s.key(t, g), s.key(t, g) + s.d) : rope(s.key(t, g), s.d, static_cast<double>(t - origin), s.theta);
    double dot = 0;
    for (int i = 0; i < s.d; ++i) dot += rq[static_cast<size_t>(i)] * rk[static_cast<size_t>(i)];
    logits.push_back(dot / std::sqrt(static_cast<double>(s.d)));
    used.push_back(t);
  }
  Vec o(static_cast<size_t>(s.d), 0.0);
  if (logits.empty()) return {o, kNegInf};
  const double mx = *std::max_element(logits.begin(), logits.end());
  double z = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const double w = std::exp(logits[i] - mx);
    z += w;
    for (int j = 0; j < s.d; ++j) o[static_cast<size_t>(j)] += w * s.value(used[i], g)[j];
  }
  for (double& x : o) x /= z;
  return {o, mx + std::log(z)};
}

struct StepOut {
  Vec o;                          // [l_C, H, d]
  std::vector<int64_t> selected;  // ascending
  std::vector<int64_t> evicted;
  std::vector<int64_t> middle;    // surviving M tokens
  Vec score;                      // F' (or block score per token) for `middle`, in ranking units
};

inline StepOut step(const StepCase& input) {
  const Case s(input);
  const AttentionConfig& c = s.cfg;
  StepOut out;
  out.evicted = lag_evictions(s);
  const auto alive = [&](int64_t t) { return !std::binary_search(out.evicted.begin(), out.evicted.end(), t); };
  const int64_t n = s.p + s.l_C;
  const int64_t i_end = std::min(c.l_I, s.p), s0 = std::max(s.p - c.l_L, i_end);
  for (int64_t t = i_end; t < s0; ++t)
    if (alive(t)) out.middle.push_back(t);
  const bool selects = c.mode == AttentionMode::kEsa || c.mode == AttentionMode::kExactTopk || c.mode == AttentionMode::kBlock;
  if (selects && !out.middle.empty()) {
    // F(m) = max_c (s(m,c) - max_m' s(m',c)); decode ranks by s (docs/spec_notes.md §1).
    std::vector<Vec> sc(static_cast<size_t>(s.l_C));
    for (int64_t q = 0; q < s.l_C; ++q)
      for (int64_t m : out.middle)
        sc[static_cast<size_t>(q)].push_back(c.mode == AttentionMode::kExactTopk ? f_exact(s, m, q) : s_compressed(s, m, q));
    Vec F(out.middle.size(), kNegInf);
    for (int64_t q = 0; q < s.l_C; ++q) {
      const auto& row = sc[static_cast<size_t>(q)];
      const double mx = s.l_C > 1 ? *std::max_element(row.begin(), row.end()) : 0.0;
      for (size_t i = 0; i < row.size(); ++i) F[i] = std::max(F[i], row[i] - mx);
    }
    std::vector<size_t> order(out.middle.size());
    std::iota(order.begin(), order.end(), 0);
    if (c.mode == AttentionMode::kBlock) {
      Vec block_best;
      for (size_t i = 0; i < F.size(); ++i) {
        const auto b = static_cast<size_t>((out.middle[i] - i_end) / c.block);
        if (block_best.size() <= b) block_best.resize(b + 1, kNegInf);
        block_best[b] = std::max(block_best[b], F[i]);
      }
      out.score.resize(F.size());
      for (size_t i = 0; i < F.size(); ++i) out.score[i] = block_best[static_cast<size_t>((out.middle[i] - i_end) / c.block)];
      std::vector<int64_t> blocks;
      for (size_t b = 0; b < block_best.size(); ++b)
        if (block_best[b] > kNegInf) blocks.push_back(static_cast<int64_t>(b));
      std::stable_sort(blocks.begin(), blocks.end(), [&](int64_t a, int64_t b2) {
        return block_best[static_cast<size_t>(a)] > block_best[static_cast<size_t>(b2)];
      });
      const bool all = static_cast<int64_t>(out.middle.size()) <= c.top_k;
      const size_t want = all ? blocks.size() : std::min(blocks.size(), static_cast<size_t>(c.top_k / c.block));
      std::vector<int64_t> chosen(blocks.begin(), blocks.begin() + static_cast<std::ptrdiff_t>(want));
      for (int64_t t : out.middle)
        if (std::find(chosen.begin(), chosen.end(), (t - i_end) / c.block) != chosen.end()) out.selected.push_back(t);
    } else {
      out.score.assign(F.size(), kNegInf);  // F'(j) = max { F(i) : |i - j| <= eps }
      for (size_t j = 0; j < F.size(); ++j)
        for (size_t i = 0; i < F.size(); ++i)
          if (std::llabs(out.middle[i] - out.middle[j]) <= c.eps) out.score[j] = std::max(out.score[j], F[i]);
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return out.score[a] > out.score[b]; });
      for (size_t i = 0; i < std::min(order.size(), static_cast<size_t>(c.top_k)); ++i)
        out.selected.push_back(out.middle[order[i]]);
      std::sort(out.selected.begin(), out.selected.end());
    }
  }
  out.o.assign(static_cast<size_t>(s.l_C) * s.H * s.d, 0.0);
  for (int64_t q = 0; q < s.l_C; ++q) {
    for (int h = 0; h < s.H; ++h) {
      std::vector<std::pair<Vec, double>> parts;
      if (c.mode == AttentionMode::kFull) {
        std::vector<int64_t> all;
        for (int64_t t = 0; t < n; ++t)
          if (alive(t)) all.push_back(t);
        parts.push_back(attend(s, q, h, all, false, 0, true));
      } else {
        std::vector<int64_t> global, local;
        for (int64_t t = 0; t < i_end; ++t) global.push_back(t);
        global.insert(global.end(), out.selected.begin(), out.selected.end());
        for (int64_t t = s0; t < n; ++t) local.push_back(t);
        parts.push_back(attend(s, q, h, global, true, 0, false));
        parts.push_back(attend(s, q, h, local, false, s0, true));
      }
      double mx = kNegInf;
      for (auto& part : parts) mx = std::max(mx, part.second);
      double z = 0;
      Vec o(static_cast<size_t>(s.d), 0.0);
      for (auto& part : parts) {
        if (part.second == kNegInf) continue;
        const double w = std::exp(part.second - mx);
        z += w;
        for (int j = 0; j < s.d; ++j) o[static_cast<size_t>(j)] += w * part.first[static_cast<size_t>(j)];
      }
      for (int j = 0; j < s.d; ++j)
        out.o[(static_cast<size_t>(q) * s.H + h) * s.d + j] = z > 0 ? o[static_cast<size_t>(j)] / z : 0.0;
    }
  }
  return out;
}

}  // namespace unshackle::naive
