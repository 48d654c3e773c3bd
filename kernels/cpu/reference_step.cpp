// SPEC §2-§5 for one step, all tokens in one place: the oracle of the distributed path.
#include "unshackle/kernels/reference_step.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "unshackle/common/check.h"
#include "unshackle/kernels/backend.h"

namespace unshackle {

void StepCase::validate() const {
  UNS_CHECK(H > 0 && G > 0 && H % G == 0, "H: query heads ({}) must be a positive multiple of G ({})", H, G);
  UNS_CHECK(d > 0 && d % 2 == 0, "d: head dim must be positive and even (got {})", d);
  UNS_CHECK(p >= 0, "p: must be >= 0 (got {})", p);
  UNS_CHECK(l_C > 0, "q: the chunk must hold at least one query (l_C = {})", l_C);
  config.validate(H, G);
  const auto n_tok = static_cast<size_t>(p + l_C);
  UNS_CHECK(q.size() == static_cast<size_t>(l_C) * H * d, "q: expected [{}, {}, {}] ({} values), got {}", l_C, H, d,
            static_cast<size_t>(l_C) * H * d, q.size());
  UNS_CHECK(k.size() == n_tok * G * d, "k: expected [{}, {}, {}], got {} values", n_tok, G, d, k.size());
  UNS_CHECK(v.size() == n_tok * G * d, "v: expected [{}, {}, {}], got {} values", n_tok, G, d, v.size());
  if (config.needs_compression()) {
    UNS_CHECK(d_c > 0, "wq: mode {} needs compression weights wq, wk", mode_name(config.mode));
    UNS_CHECK(wq.size() == static_cast<size_t>(d_c) * H * d, "wq: expected [{}, {}], got {} values", d_c, H * d,
              wq.size());
    UNS_CHECK(wk.size() == static_cast<size_t>(d_c) * G * d, "wk: expected [{}, {}], got {} values", d_c, G * d,
              wk.size());
  }
}

namespace {

std::vector<int32_t> iota_rows(int64_t begin, int64_t end) {
  std::vector<int32_t> rows;
  for (int64_t t = begin; t < end; ++t) rows.push_back(static_cast<int32_t>(t));
  return rows;
}

}  // namespace

std::vector<int64_t> reference_lag_evictions(const StepCase& step) {
  const AttentionConfig& cfg = step.config;
  const Segments seg = compute_segments(step.p, step.l_C, cfg.l_I, cfg.l_L);
  const int64_t partitions = lag_evictable_partitions(seg, cfg);
  if (partitions == 0) return {};
  auto backend = make_cpu_backend();
  const int width = step.G * step.d;
  const int64_t keep = lag_keep_count(cfg);
  std::vector<int64_t> evicted;
  std::vector<float> extrema(static_cast<size_t>(4 * width)), token_std(static_cast<size_t>(cfg.lag * 2 * step.G)),
      score(static_cast<size_t>(cfg.lag)), top_values(static_cast<size_t>(cfg.lag));
  std::vector<int64_t> tokens(static_cast<size_t>(cfg.lag)), top_tokens(static_cast<size_t>(cfg.lag));
  for (int64_t i = 0; i < partitions; ++i) {
    const int64_t begin = cfg.l_I + i * cfg.lag;
    const std::vector<int32_t> part = iota_rows(begin, begin + cfg.lag);
    const std::vector<int32_t> ref = iota_rows(begin + cfg.lag, begin + 2 * cfg.lag);
    backend->lag_reference_extrema({.k = step.k.data(), .v = step.v.data(), .kv_dtype = DType::kF32,
                                    .rows = ref.data(), .n = cfg.lag, .G = step.G, .d = step.d,
                                    .extrema = extrema.data()});
    backend->lag_token_std({.k = step.k.data(), .v = step.v.data(), .kv_dtype = DType::kF32, .rows = part.data(),
                            .n = cfg.lag, .G = step.G, .d = step.d, .extrema = extrema.data(),
                            .token_std = token_std.data()});
    backend->lag_partition_scores({.token_std = token_std.data(), .lag = cfg.lag, .G = step.G, .score = score.data()});
    std::iota(tokens.begin(), tokens.end(), begin);
    int64_t count = 0;
    backend->top_k({.values = score.data(), .tokens = tokens.data(), .n = cfg.lag, .k = keep,
                    .out_values = top_values.data(), .out_tokens = top_tokens.data(), .out_count = &count});
    std::vector<bool> kept(static_cast<size_t>(cfg.lag), false);
    for (int64_t j = 0; j < count; ++j) kept[static_cast<size_t>(top_tokens[static_cast<size_t>(j)] - begin)] = true;
    for (int64_t j = 0; j < cfg.lag; ++j)
      if (!kept[static_cast<size_t>(j)]) evicted.push_back(begin + j);
  }
  return evicted;
}

StepResult reference_step(const StepCase& step) {
  step.validate();
  const AttentionConfig& cfg = step.config;
  auto backend = make_cpu_backend();
  const Segments seg = compute_segments(step.p, step.l_C, cfg.l_I, cfg.l_L);
  const std::vector<float> inv_freq = rope_inv_freq(step.d, step.rope_theta, step.rope_scaling);
  const float scale = 1.0f / std::sqrt(static_cast<float>(step.d));
  const int64_t n_tok = step.p + step.l_C;

  StepResult result;
  result.evicted = reference_lag_evictions(step);
  std::vector<bool> alive(static_cast<size_t>(n_tok), true);
  for (int64_t t : result.evicted) alive[static_cast<size_t>(t)] = false;
  std::vector<int64_t> token_of_row(static_cast<size_t>(n_tok));
  std::iota(token_of_row.begin(), token_of_row.end(), 0);
  const auto survivors = [&](int64_t begin, int64_t end) {
    std::vector<int32_t> rows;
    for (int64_t t = begin; t < end; ++t)
      if (alive[static_cast<size_t>(t)]) rows.push_back(static_cast<int32_t>(t));
    return rows;
  };

  const size_t out_size = static_cast<size_t>(step.l_C) * step.H * step.d;
  const size_t lse_size = static_cast<size_t>(step.l_C) * step.H;
  AttendParams attend{.q = step.q.data(), .q_token0 = step.p, .k = step.k.data(), .v = step.v.data(),
                      .kv_dtype = DType::kF32, .key_tokens = token_of_row.data(), .l_C = static_cast<int>(step.l_C),
                      .H = step.H, .G = step.G, .d = step.d, .inv_freq = inv_freq.data(), .scale = scale};

  if (cfg.mode == AttentionMode::kFull) {  // causal, absolute positions = relative with origin 0
    const std::vector<int32_t> rows = survivors(0, n_tok);
    std::vector<float> lse(lse_size);
    result.o.resize(out_size);
    attend.rows = rows.data();
    attend.n = static_cast<int64_t>(rows.size());
    attend.causal = true;
    attend.positions = PositionScheme::kRelative;
    attend.origin = 0;
    attend.o = result.o.data();
    attend.lse = lse.data();
    backend->attend(attend);
    return result;
  }

  // ---- selection over M (SPEC §3; block mode §5) ----
  const std::vector<int32_t> middle = survivors(seg.m_begin, seg.m_end);
  if (cfg.selects() && !middle.empty()) {
    const bool exact = cfg.mode == AttentionMode::kExactTopk;
    const int d_c = exact ? step.G * step.d : step.d_c;
    std::vector<float> qc(static_cast<size_t>(step.l_C) * d_c);
    backend->compress_query({.q = step.q.data(), .wq = exact ? nullptr : step.wq.data(), .inv_freq = inv_freq.data(),
                             .position = cfg.global_query_position(), .q_out = qc.data(),
                             .l_C = static_cast<int>(step.l_C), .H = step.H, .G = step.G, .d = step.d, .d_c = d_c});
    std::vector<float> kc;
    if (!exact) {
      kc.resize(static_cast<size_t>(n_tok) * d_c);
      backend->compress_keys({.k = step.k.data(), .k_dtype = DType::kF32, .wk = step.wk.data(), .kc_out = kc.data(),
                              .kc_dtype = DType::kF32, .n = n_tok, .G = step.G, .d = step.d, .d_c = d_c});
    }
    const auto n_mid = static_cast<int64_t>(middle.size());
    ScoreParams score{.qc = qc.data(), .kc = exact ? step.k.data() : kc.data(), .kc_dtype = DType::kF32,
                      .rows = middle.data(), .n = n_mid, .l_C = static_cast<int>(step.l_C), .d_c = d_c};
    std::vector<float> row_max(static_cast<size_t>(step.l_C)), F(static_cast<size_t>(n_mid));
    if (step.l_C > 1) {
      score.query_max_out = row_max.data();
      backend->score_query_max(score);
      score.row_max = row_max.data();
    }
    score.score_out = F.data();
    backend->score_chunk(score);
    std::vector<int64_t> mid_tokens(middle.begin(), middle.end());

    if (cfg.mode != AttentionMode::kBlock && n_mid <= cfg.top_k) {
      result.selected = mid_tokens;  // SPEC §3: |M| <= k selects all of M
    } else if (cfg.mode == AttentionMode::kBlock) {  // SPEC §5: always the floor(k / block) best blocks
      const int64_t n_blocks = (seg.m_end - seg.m_begin + cfg.block - 1) / cfg.block;
      std::vector<float> block_score(static_cast<size_t>(n_blocks), -std::numeric_limits<float>::infinity());
      std::vector<int64_t> block_id(static_cast<size_t>(n_blocks));
      std::iota(block_id.begin(), block_id.end(), 0);
      for (int64_t i = 0; i < n_mid; ++i) {
        const auto b = static_cast<size_t>((mid_tokens[static_cast<size_t>(i)] - cfg.l_I) / cfg.block);
        block_score[b] = std::max(block_score[b], F[static_cast<size_t>(i)]);
      }
      // A block whose tokens were all evicted is no candidate.
      for (int64_t b = 0; b < n_blocks; ++b) {
        bool any = false;
        for (int64_t t = seg.m_begin + b * cfg.block; t < std::min(seg.m_end, seg.m_begin + (b + 1) * cfg.block); ++t)
          any = any || alive[static_cast<size_t>(t)];
        if (!any) block_id[static_cast<size_t>(b)] = -1;
      }
      const int64_t want = cfg.top_k / cfg.block;
      std::vector<float> top_values(static_cast<size_t>(want));
      std::vector<int64_t> top_blocks(static_cast<size_t>(want));
      int64_t count = 0;
      backend->top_k({.values = block_score.data(), .tokens = block_id.data(), .n = n_blocks, .k = want,
                      .out_values = top_values.data(), .out_tokens = top_blocks.data(), .out_count = &count});
      std::vector<bool> chosen(static_cast<size_t>(n_blocks), false);
      for (int64_t j = 0; j < count; ++j) chosen[static_cast<size_t>(top_blocks[static_cast<size_t>(j)])] = true;
      for (int64_t t : mid_tokens)
        if (chosen[static_cast<size_t>((t - cfg.l_I) / cfg.block)]) result.selected.push_back(t);
    } else {
      std::vector<float> F_prox(static_cast<size_t>(n_mid));
      backend->proximity({.score = F.data(), .tokens = mid_tokens.data(), .n = n_mid, .eps = cfg.eps,
                          .out = F_prox.data()});
      std::vector<float> top_values(static_cast<size_t>(cfg.top_k));
      std::vector<int64_t> top_tokens(static_cast<size_t>(cfg.top_k));
      int64_t count = 0;
      backend->top_k({.values = F_prox.data(), .tokens = mid_tokens.data(), .n = n_mid, .k = cfg.top_k,
                      .out_values = top_values.data(), .out_tokens = top_tokens.data(), .out_count = &count});
      result.selected.assign(top_tokens.begin(), top_tokens.begin() + count);
      std::sort(result.selected.begin(), result.selected.end());
    }
  }

  // ---- global part over I ∪ M_k: keys unrotated, queries at w, non-causal ----
  std::vector<int32_t> global_rows = survivors(0, seg.i_end);
  for (int64_t t : result.selected) global_rows.push_back(static_cast<int32_t>(t));
  std::vector<float> o_parts(2 * out_size), lse_parts(2 * lse_size);
  attend.rows = global_rows.data();
  attend.n = static_cast<int64_t>(global_rows.size());
  attend.causal = false;
  attend.positions = PositionScheme::kGlobal;
  attend.query_position = cfg.global_query_position();
  attend.o = o_parts.data();
  attend.lse = lse_parts.data();
  backend->attend(attend);

  // ---- local part over L ∪ C: positions from s0, causal inside C ----
  const std::vector<int32_t> local_rows = survivors(seg.s0(), n_tok);
  attend.rows = local_rows.data();
  attend.n = static_cast<int64_t>(local_rows.size());
  attend.causal = true;
  attend.positions = PositionScheme::kRelative;
  attend.origin = seg.s0();
  attend.o = o_parts.data() + out_size;
  attend.lse = lse_parts.data() + lse_size;
  backend->attend(attend);

  result.o.resize(out_size);
  backend->merge({.o_parts = o_parts.data(), .lse_parts = lse_parts.data(), .n_parts = 2,
                  .rows = static_cast<int64_t>(lse_size), .d = step.d, .o = result.o.data()});
  return result;
}

}  // namespace unshackle
