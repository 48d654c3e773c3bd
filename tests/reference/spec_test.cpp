// The CPU reference (kernels/cpu) against SPEC written again in float64 (support/naive_spec.h),
// op by op and whole steps, plus properties that cannot pass by accident.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numeric>

#include "naive_spec.h"
#include "test_data.h"
#include "tolerance.h"
#include "unshackle/kernels/backend.h"
#include "unshackle/kernels/reference_step.h"

namespace unshackle {
namespace {

using testing::normal_vector;
using testing::relative_error;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

StepCase make_case(AttentionMode mode, int64_t p, int64_t l_C, uint64_t seed, double lag_ratio = 0, int d_c = 6) {
  StepCase c;
  c.p = p; c.l_C = l_C; c.H = 4; c.G = 2; c.d = 8; c.d_c = d_c;
  c.q = normal_vector(static_cast<size_t>(l_C * c.H * c.d), seed);
  c.k = normal_vector(static_cast<size_t>((p + l_C) * c.G * c.d), seed + 1);
  c.v = normal_vector(static_cast<size_t>((p + l_C) * c.G * c.d), seed + 2);
  c.wq = normal_vector(static_cast<size_t>(d_c * c.H * c.d), seed + 3, 0.3f);
  c.wk = normal_vector(static_cast<size_t>(d_c * c.G * c.d), seed + 4, 0.3f);
  c.config.mode = mode;
  c.config.l_I = 4; c.config.l_L = 16; c.config.top_k = 10; c.config.eps = 1; c.config.block = 4;
  c.config.lag = 8; c.config.lag_ratio = lag_ratio;
  c.rope_theta = 10000;
  return c;
}

TEST(Rope, MatchesFormulaIdentityAtZeroAndKeepsNorm) {
  const int d = 64;
  const auto inv = rope_inv_freq(d, 500000.0);
  for (int i = 0; i < d / 2; ++i)  // inv_freq is the float32 of theta^(-2i/d), as transformers keeps it
    EXPECT_EQ(inv[static_cast<size_t>(i)], static_cast<float>(std::pow(500000.0, -2.0 * i / d)));
  for (double pos : {0.0, 1.0, 977.0, 1.0e6}) {
    auto x = normal_vector(d, 11);
    const std::vector<double> x64(x.begin(), x.end());
    rope_rotate(x.data(), d, inv.data(), static_cast<int64_t>(pos));
    std::vector<double> want(x64);  // rotate-half with the same (float32) frequencies, in double
    for (int i = 0; i < d / 2; ++i) {
      const double angle = pos * static_cast<double>(inv[static_cast<size_t>(i)]);
      want[static_cast<size_t>(i)] = x64[static_cast<size_t>(i)] * std::cos(angle) - x64[static_cast<size_t>(i + d / 2)] * std::sin(angle);
      want[static_cast<size_t>(i + d / 2)] = x64[static_cast<size_t>(i + d / 2)] * std::cos(angle) + x64[static_cast<size_t>(i)] * std::sin(angle);
    }
    EXPECT_LT(relative_error(x, want), tolerance::kF32) << "pos " << pos;
    if (pos < 1e3) {
      EXPECT_LT(relative_error(x, naive::rope(x64.data(), d, pos, 500000.0)), tolerance::kF32) << "pos " << pos;
    }
    EXPECT_NEAR(testing::norm(x), testing::norm(x64), 1e-5 * testing::norm(x64));
    if (pos == 0) {
      EXPECT_EQ(std::vector<double>(x.begin(), x.end()), x64);
    }
  }
}

TEST(Rope, Llama3ScalingAsTransformersComputesIt) {
  RopeScaling scaling{.type = RopeScaling::Type::kLlama3, .factor = 8, .low_freq_factor = 1, .high_freq_factor = 4,
                      .original_max_position = 8192};
  const auto inv = rope_inv_freq(128, 500000.0, scaling);
  for (int i = 0; i < 64; ++i) {  // transcribed from transformers' _compute_llama3_parameters
    const double f = std::pow(500000.0, -2.0 * i / 128), wavelen = 2 * M_PI / f;
    double want = f;
    if (wavelen > 8192.0 / 1) want = f / 8;
    else if (wavelen >= 8192.0 / 4) {
      const double smooth = (8192.0 / wavelen - 1) / (4 - 1);
      want = (1 - smooth) * f / 8 + smooth * f;
    }
    EXPECT_NEAR(inv[static_cast<size_t>(i)], want, 1e-6 * want) << i;
  }
}

TEST(Segments, EdgeCases) {
  struct Row { int64_t p, l_I, l_L, i_end, m_begin, m_end; };
  for (const Row& r : std::vector<Row>{{0, 4, 16, 0, 0, 0},   {3, 4, 16, 3, 3, 3},   {4, 4, 16, 4, 4, 4},
                                       {20, 4, 16, 4, 4, 4},  {21, 4, 16, 4, 4, 5},  {100, 0, 16, 0, 0, 84},
                                       {100, 4, 0, 4, 4, 100}, {10, 4, 3, 4, 4, 7}}) {
    const Segments s = compute_segments(r.p, 5, r.l_I, r.l_L);
    EXPECT_EQ(s.i_end, r.i_end) << r.p;
    EXPECT_EQ(s.m_begin, r.m_begin) << r.p;
    EXPECT_EQ(s.m_end, r.m_end) << r.p;
    EXPECT_EQ(s.c_end, r.p + 5);
  }
}

TEST(Ops, CompressedScoresAndExactFold) {
  auto backend = make_cpu_backend();
  const StepCase c = make_case(AttentionMode::kEsa, 50, 3, 21);
  const naive::Case s(c);
  const auto inv = rope_inv_freq(c.d, c.rope_theta);
  for (bool exact : {false, true}) {
    const int d_c = exact ? c.G * c.d : c.d_c;
    std::vector<float> qc(static_cast<size_t>(c.l_C * d_c)), kc(static_cast<size_t>((c.p + c.l_C) * d_c));
    backend->compress_query({.q = c.q.data(), .wq = exact ? nullptr : c.wq.data(), .inv_freq = inv.data(),
                             .position = c.config.global_query_position(), .q_out = qc.data(), .l_C = 3, .H = c.H,
                             .G = c.G, .d = c.d, .d_c = d_c});
    const void* keys = c.k.data();
    if (!exact) {
      backend->compress_keys({.k = c.k.data(), .wk = c.wk.data(), .kc_out = kc.data(), .n = c.p + c.l_C, .G = c.G,
                              .d = c.d, .d_c = d_c});
      keys = kc.data();
    }
    const std::vector<int32_t> rows = {0, 7, 8, 30, 49};
    std::vector<float> qmax(3), score(rows.size());
    ScoreParams sp{.qc = qc.data(), .kc = keys, .rows = rows.data(), .n = 5, .l_C = 3, .d_c = d_c,
                   .query_max_out = qmax.data(), .score_out = score.data()};
    backend->score_query_max(sp);
    std::vector<double> want_max(3, -INFINITY), want_f(rows.size(), -INFINITY);
    for (int q = 0; q < 3; ++q)
      for (int32_t m : rows) want_max[static_cast<size_t>(q)] = std::max(want_max[static_cast<size_t>(q)], exact ? naive::f_exact(s, m, q) : naive::s_compressed(s, m, q));
    EXPECT_LT(relative_error(qmax, want_max), tolerance::kF32);
    sp.row_max = qmax.data();
    backend->score_chunk(sp);
    for (size_t i = 0; i < rows.size(); ++i)
      for (int q = 0; q < 3; ++q)
        want_f[i] = std::max(want_f[i], (exact ? naive::f_exact(s, rows[i], q) : naive::s_compressed(s, rows[i], q)) - want_max[static_cast<size_t>(q)]);
    for (size_t i = 0; i < rows.size(); ++i) EXPECT_NEAR(score[i], want_f[i], 1e-4) << i;
    // An empty row set: maxima are -inf.
    sp.n = 0;
    backend->score_query_max(sp);
    for (float x : qmax) EXPECT_EQ(x, kNegInf);
  }
}

TEST(Ops, ProximityAndTopKTieRule) {
  auto backend = make_cpu_backend();
  const std::vector<float> F = {1, 5, 2, 2, 9, 0, 3};
  const std::vector<int64_t> tokens = {10, 11, 12, 20, 21, 23, 24};  // gaps: evicted tokens absent
  std::vector<float> out(F.size());
  backend->proximity({.score = F.data(), .tokens = tokens.data(), .n = 7, .eps = 0, .out = out.data()});
  EXPECT_EQ(out, F);  // eps = 0 is the identity
  backend->proximity({.score = F.data(), .tokens = tokens.data(), .n = 7, .eps = 1, .out = out.data()});
  EXPECT_EQ(out, (std::vector<float>{5, 5, 5, 9, 9, 3, 3}));
  backend->proximity({.score = F.data(), .tokens = tokens.data(), .n = 7, .eps = 2, .out = out.data()});
  EXPECT_EQ(out, (std::vector<float>{5, 5, 5, 9, 9, 9, 3}));

  const std::vector<float> values = {3, 7, 7, NAN, 7, 1, 2};
  const std::vector<int64_t> toks = {5, 9, 4, 1, -1, 6, 2};  // -1 is padding
  std::vector<float> top_v(5);
  std::vector<int64_t> top_t(5);
  int64_t count = 0;
  backend->top_k({.values = values.data(), .tokens = toks.data(), .n = 7, .k = 3, .out_values = top_v.data(),
                  .out_tokens = top_t.data(), .out_count = &count});
  EXPECT_EQ(count, 3);
  EXPECT_EQ(std::vector<int64_t>(top_t.begin(), top_t.begin() + 3), (std::vector<int64_t>{4, 9, 5}));  // ties: lower token
  backend->top_k({.values = values.data(), .tokens = toks.data(), .n = 7, .k = 5, .out_values = top_v.data(),
                  .out_tokens = top_t.data(), .out_count = &count});
  backend->top_k({.values = values.data(), .tokens = toks.data(), .n = 7, .k = 5, .out_values = top_v.data(),
                  .out_tokens = top_t.data(), .out_count = &count});
  EXPECT_EQ(top_t, (std::vector<int64_t>{4, 9, 5, 2, 6}));
  std::vector<float> all_v(8);
  std::vector<int64_t> all_t(8);
  backend->top_k({.values = values.data(), .tokens = toks.data(), .n = 7, .k = 8, .out_values = all_v.data(),
                  .out_tokens = all_t.data(), .out_count = &count});
  EXPECT_EQ(count, 6);  // k >= n: everything but padding, NaN last, then padding slots
  EXPECT_EQ(all_t, (std::vector<int64_t>{4, 9, 5, 2, 6, 1, -1, -1}));
}

TEST(Ops, AttendBothSchemesGqaBf16AndEmpty) {
  auto backend = make_cpu_backend();
  StepCase c = make_case(AttentionMode::kFull, 40, 3, 31);
  // Make each KV head's values distinguishable: a wrong head mapping cannot pass.
  for (size_t i = 0; i < c.v.size(); ++i) c.v[i] += static_cast<float>((i / c.d) % c.G) * 5.0f;
  const naive::Case s(c);
  const auto inv = rope_inv_freq(c.d, c.rope_theta);
  std::vector<int64_t> tokens(static_cast<size_t>(c.p + c.l_C));
  std::iota(tokens.begin(), tokens.end(), 0);
  const std::vector<int32_t> rows = {0, 3, 17, 39, 40, 41, 42};
  for (bool global : {false, true}) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      std::vector<uint16_t> kb(c.k.size()), vb(c.v.size());
      convert_from_f32(c.k.data(), DType::kBF16, kb.data(), kb.size());
      convert_from_f32(c.v.data(), DType::kBF16, vb.data(), vb.size());
      std::vector<float> o(static_cast<size_t>(c.l_C * c.H * c.d)), lse(static_cast<size_t>(c.l_C * c.H));
      backend->attend({.q = c.q.data(), .q_token0 = c.p,
                       .k = dtype == DType::kF32 ? static_cast<const void*>(c.k.data()) : kb.data(),
                       .v = dtype == DType::kF32 ? static_cast<const void*>(c.v.data()) : vb.data(), .kv_dtype = dtype,
                       .key_tokens = tokens.data(), .rows = rows.data(), .n = 7, .l_C = 3, .H = c.H, .G = c.G,
                       .d = c.d, .causal = !global,
                       .positions = global ? PositionScheme::kGlobal : PositionScheme::kRelative, .origin = 2,
                       .query_position = c.config.global_query_position(), .inv_freq = inv.data(),
                       .scale = 1 / std::sqrt(8.0f), .o = o.data(), .lse = lse.data()});
      std::vector<double> want_o, want_lse;
      for (int q = 0; q < 3; ++q)
        for (int h = 0; h < c.H; ++h) {
          const auto [wo, wl] = naive::attend(s, q, h, {0, 3, 17, 39, 40, 41, 42}, global, 2, !global);
          want_o.insert(want_o.end(), wo.begin(), wo.end());
          want_lse.push_back(wl);
        }
      const double tol = dtype == DType::kF32 ? tolerance::kF32 : tolerance::kBF16;
      EXPECT_LT(relative_error(o, want_o), tol) << global << " " << dtype_name(dtype);
      EXPECT_LT(relative_error(lse, want_lse), tol);
    }
  }
  std::vector<float> o(static_cast<size_t>(c.H * c.d), 7.0f), lse(static_cast<size_t>(c.H), 7.0f);
  backend->attend({.q = c.q.data(), .q_token0 = c.p, .k = c.k.data(), .v = c.v.data(), .key_tokens = tokens.data(),
                   .n = 0, .l_C = 1, .H = c.H, .G = c.G, .d = c.d, .inv_freq = inv.data(), .scale = 0.3f,
                   .o = o.data(), .lse = lse.data()});
  for (float x : o) EXPECT_EQ(x, 0.0f);
  for (float x : lse) EXPECT_EQ(x, kNegInf);
}

TEST(Ops, MergeOfSplitsEqualsWholeInAnyOrder) {
  auto backend = make_cpu_backend();
  const StepCase c = make_case(AttentionMode::kFull, 60, 1, 41);
  const auto inv = rope_inv_freq(c.d, c.rope_theta);
  std::vector<int64_t> tokens(61);
  std::iota(tokens.begin(), tokens.end(), 0);
  const size_t od = static_cast<size_t>(c.H * c.d), ol = static_cast<size_t>(c.H);
  const auto attend_rows = [&](const std::vector<int32_t>& rows, float* o, float* lse) {
    backend->attend({.q = c.q.data(), .q_token0 = 60, .k = c.k.data(), .v = c.v.data(), .key_tokens = tokens.data(),
                     .rows = rows.data(), .n = static_cast<int64_t>(rows.size()), .l_C = 1, .H = c.H, .G = c.G,
                     .d = c.d, .causal = true, .positions = PositionScheme::kRelative, .inv_freq = inv.data(),
                     .scale = 0.35f, .o = o, .lse = lse});
  };
  std::vector<int32_t> all(61);
  std::iota(all.begin(), all.end(), 0);
  std::vector<float> whole_o(od), whole_lse(ol);
  attend_rows(all, whole_o.data(), whole_lse.data());
  // Four parts (one empty), merged in two orders and two groupings.
  const std::vector<std::vector<int32_t>> parts = {{0, 5, 9, 33}, {}, {1, 2, 3, 4, 6, 7, 8}, {}};
  std::vector<int32_t> rest;
  for (int32_t r : all)
    if (std::none_of(parts.begin(), parts.end(), [&](auto& p) { return std::count(p.begin(), p.end(), r); })) rest.push_back(r);
  std::vector<std::vector<int32_t>> split = parts;
  split.push_back(rest);
  std::vector<float> o_parts(split.size() * od), lse_parts(split.size() * ol);
  for (size_t i = 0; i < split.size(); ++i) attend_rows(split[i], o_parts.data() + i * od, lse_parts.data() + i * ol);
  std::vector<float> merged(od), merged_lse(ol);
  backend->merge({.o_parts = o_parts.data(), .lse_parts = lse_parts.data(), .n_parts = static_cast<int>(split.size()),
                  .rows = c.H, .d = c.d, .o = merged.data(), .lse = merged_lse.data()});
  EXPECT_LT(relative_error(merged, whole_o), tolerance::kF32);
  EXPECT_LT(relative_error(merged_lse, whole_lse), tolerance::kF32);
  // Reversed order.
  std::vector<float> rev_o, rev_l;
  for (size_t i = split.size(); i-- > 0;) {
    rev_o.insert(rev_o.end(), o_parts.begin() + static_cast<std::ptrdiff_t>(i * od), o_parts.begin() + static_cast<std::ptrdiff_t>((i + 1) * od));
    rev_l.insert(rev_l.end(), lse_parts.begin() + static_cast<std::ptrdiff_t>(i * ol), lse_parts.begin() + static_cast<std::ptrdiff_t>((i + 1) * ol));
  }
  std::vector<float> reversed(od);
  backend->merge({.o_parts = rev_o.data(), .lse_parts = rev_l.data(), .n_parts = static_cast<int>(split.size()),
                  .rows = c.H, .d = c.d, .o = reversed.data()});
  EXPECT_LT(relative_error(reversed, whole_o), tolerance::kF32);
  // Grouping: merge the first three, then with the rest.
  std::vector<float> first(od), first_lse(ol);
  backend->merge({.o_parts = o_parts.data(), .lse_parts = lse_parts.data(), .n_parts = 3, .rows = c.H, .d = c.d,
                  .o = first.data(), .lse = first_lse.data()});
  std::vector<float> two_o(first), two_l(first_lse);
  for (size_t i = 3; i < split.size(); ++i) {
    std::vector<float> pair_o(two_o), pair_l(two_l), next(od), next_l(ol);
    pair_o.insert(pair_o.end(), o_parts.begin() + static_cast<std::ptrdiff_t>(i * od), o_parts.begin() + static_cast<std::ptrdiff_t>((i + 1) * od));
    pair_l.insert(pair_l.end(), lse_parts.begin() + static_cast<std::ptrdiff_t>(i * ol), lse_parts.begin() + static_cast<std::ptrdiff_t>((i + 1) * ol));
    backend->merge({.o_parts = pair_o.data(), .lse_parts = pair_l.data(), .n_parts = 2, .rows = c.H, .d = c.d,
                    .o = next.data(), .lse = next_l.data()});
    two_o = next;
    two_l = next_l;
  }
  EXPECT_LT(relative_error(two_o, whole_o), tolerance::kF32);
  // All parts empty: o = 0, lse = -inf, no NaN.
  std::vector<float> empty_lse(2 * ol, kNegInf), out(od, 5), out_l(ol, 5);
  backend->merge({.o_parts = o_parts.data(), .lse_parts = empty_lse.data(), .n_parts = 2, .rows = c.H, .d = c.d,
                  .o = out.data(), .lse = out_l.data()});
  for (float x : out) EXPECT_EQ(x, 0.0f);
  for (float x : out_l) EXPECT_EQ(x, kNegInf);
}

TEST(LagKV, MatchesFormulaAndEvictsExactlyPerPartition) {
  for (double ratio : {0.25, 0.5, 0.9}) {
    StepCase c = make_case(AttentionMode::kStreaming, 140, 1, 51, ratio);
    const auto got = reference_lag_evictions(c);
    EXPECT_EQ(got, naive::lag_evictions(naive::Case(c))) << ratio;
    const Segments seg = compute_segments(c.p, 1, c.config.l_I, c.config.l_L);
    const int64_t partitions = (seg.m_end - c.config.l_I) / c.config.lag;
    ASSERT_GT(partitions, 0);
    const int64_t per = c.config.lag - static_cast<int64_t>(std::ceil((1 - ratio) * static_cast<double>(c.config.lag)));
    EXPECT_EQ(static_cast<int64_t>(got.size()), partitions * per);
    for (int64_t t : got) {
      EXPECT_GE(t, c.config.l_I) << "never I";
      EXPECT_LT(t, c.config.l_I + partitions * c.config.lag) << "only whole partitions inside M, never L";
    }
  }
}

class WholeStep : public ::testing::TestWithParam<std::tuple<int, int64_t, int64_t, double>> {};

TEST_P(WholeStep, EqualsFloat64Spec) {
  const auto [mode_index, p, l_C, ratio] = GetParam();
  const auto mode = static_cast<AttentionMode>(mode_index);
  const StepCase c = make_case(mode, p, l_C, 61 + static_cast<uint64_t>(p * 7 + l_C), ratio);
  const StepResult got = reference_step(c);
  const naive::StepOut want = naive::step(c);
  EXPECT_EQ(got.evicted, want.evicted);
  EXPECT_LT(relative_error(got.o, want.o), tolerance::kF32) << testing::first_offenders(got.o, want.o, 1e-4);
  if (got.selected != want.selected) {
    // Only a float32 near-tie at the selection boundary may differ: check the gap.
    std::vector<int64_t> diff;
    std::set_symmetric_difference(got.selected.begin(), got.selected.end(), want.selected.begin(), want.selected.end(),
                                  std::back_inserter(diff));
    for (int64_t t : diff) {
      const auto i = static_cast<size_t>(std::find(want.middle.begin(), want.middle.end(), t) - want.middle.begin());
      double boundary = INFINITY;
      for (int64_t u : want.selected)
        boundary = std::min(boundary, want.score[static_cast<size_t>(std::find(want.middle.begin(), want.middle.end(), u) - want.middle.begin())]);
      EXPECT_NEAR(want.score[i], boundary, 1e-5 * (1 + std::fabs(boundary))) << "token " << t << " is no near-tie";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Modes, WholeStep,
    ::testing::Combine(::testing::Values(0, 1, 2, 3, 4), ::testing::Values<int64_t>(0, 3, 19, 20, 21, 90),
                       ::testing::Values<int64_t>(1, 6), ::testing::Values(0.0, 0.5)));

TEST(Properties, KAtLeastMSelectsAllOfM) {
  for (AttentionMode mode : {AttentionMode::kEsa, AttentionMode::kExactTopk, AttentionMode::kBlock}) {
    StepCase c = make_case(mode, 60, 1, 71);
    c.config.top_k = 40;  // |M| = 60 - 16 - 4 = 40
    const StepResult r = reference_step(c);
    std::vector<int64_t> all(40);
    std::iota(all.begin(), all.end(), 4);
    EXPECT_EQ(r.selected, all) << mode_name(mode);
  }
}

TEST(Properties, ExactTopkFindsPlantedNeedles) {
  StepCase c = make_case(AttentionMode::kExactTopk, 200, 1, 81);
  c.config.eps = 0;
  c.config.top_k = 5;
  const naive::Case s(c);
  const std::vector<int64_t> needles = {9, 50, 77, 120, 150};
  for (int64_t t : needles)  // keys aligned with the folded, rotated query
    for (int g = 0; g < c.G; ++g)
      for (int i = 0; i < c.d; ++i) {
        double dir = 0;
        for (int h = g * (c.H / c.G); h < (g + 1) * (c.H / c.G); ++h)
          dir += naive::rope(s.query(0, h), c.d, s.w(), c.rope_theta)[static_cast<size_t>(i)];
        c.k[(static_cast<size_t>(t) * c.G + g) * c.d + i] = static_cast<float>(3 * dir);
      }
  EXPECT_EQ(reference_step(c).selected, needles);
}

TEST(Properties, EsaWithExactCompressionEqualsExactTopk) {
  StepCase esa = make_case(AttentionMode::kEsa, 120, 4, 91, 0, /*d_c=*/4 * 8);
  const int dH = esa.H * esa.d, dK = esa.G * esa.d;
  esa.wq.assign(static_cast<size_t>(dH * dH), 0.0f);  // identity
  for (int i = 0; i < dH; ++i) esa.wq[static_cast<size_t>(i * dH + i)] = 1;
  esa.wk.assign(static_cast<size_t>(dH * dK), 0.0f);  // repeat each KV head for its query heads
  for (int h = 0; h < esa.H; ++h)
    for (int i = 0; i < esa.d; ++i) esa.wk[static_cast<size_t>((h * esa.d + i) * dK + (h / 2) * esa.d + i)] = 1;
  StepCase exact = esa;
  exact.config.mode = AttentionMode::kExactTopk;
  const StepResult a = reference_step(esa), b = reference_step(exact);
  EXPECT_FALSE(a.selected.empty());
  EXPECT_EQ(a.selected, b.selected);
  EXPECT_LT(relative_error(a.o, b.o), tolerance::kF32);
}

TEST(Properties, BlockModeSelectsWholeBlocksAndStreamingOnlyWindow) {
  StepCase c = make_case(AttentionMode::kBlock, 120, 1, 101);
  c.config.top_k = 12;  // 3 blocks of 4
  const StepResult r = reference_step(c);
  ASSERT_EQ(r.selected.size(), 12u);
  for (int64_t t : r.selected)
    for (int64_t u = 4 + (t - 4) / 4 * 4; u < 4 + (t - 4) / 4 * 4 + 4; ++u)
      EXPECT_TRUE(std::binary_search(r.selected.begin(), r.selected.end(), u)) << "block of " << t << " incomplete";
  // Streaming equals ESA with nothing selected: perturbing M's values changes nothing.
  StepCase s = make_case(AttentionMode::kStreaming, 120, 1, 111);
  const auto before = reference_step(s).o;
  for (int64_t t = 4; t < 120 - 16; ++t)
    for (int j = 0; j < s.G * s.d; ++j) s.v[static_cast<size_t>(t * s.G * s.d + j)] += 100.0f;
  EXPECT_EQ(reference_step(s).o, before);
}

}  // namespace
}  // namespace unshackle
