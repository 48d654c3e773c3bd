// reference_step (one whole attention step, every mode) against SPEC written again in float64
// (support/naive_spec.h), plus properties that cannot pass by accident.
//
// Selections are compared as sets. The code ranks float32 scores, the naive float64 ones; when
// two tokens straddle the selection boundary closer than float32 rounding can resolve, either
// choice is right. So a differing selection passes only if (a) it has the same size, (b) every
// token in the symmetric difference has a float64 score within kTieGap of the boundary score,
// and (c) the output equals the naive output computed with the code's selection.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "naive_spec.h"
#include "test_data.h"
#include "tolerance.h"
#include "unshackle/kernels/attention_config.h"
#include "unshackle/kernels/reference_step.h"

namespace unshackle {
namespace {

using naive::at;
using testing::first_offenders;
using testing::normal_vector;
using testing::relative_error;

// Scores are float32 dot products of float32-rounded q', k' (d' up to H*d terms): their error
// is a few hundred float32 ulps of the largest score at most. 1e-5 of it is ~170 ulps, while
// neighbouring ranks of ~1000 random scores lie ~1e-3 of it apart.
constexpr double kTieGap = 1e-5;

// The project's choice where it differs from SPEC's text (see the SpecText test below).
constexpr naive::Choices kProjectChoices{.block_all_of_m_when_it_fits = false};  // SPEC §5 literally

struct Shape {
  const char* name;
  int H, G, d, d_c;
  int64_t l_I, l_L, top_k, eps, block, lag;
  RopeScaling scaling;
};

StepCase make_case(const Shape& s, AttentionMode mode, int64_t p, int64_t l_C, double ratio, uint64_t seed) {
  StepCase c;
  c.p = p;
  c.l_C = l_C;
  c.H = s.H;
  c.G = s.G;
  c.d = s.d;
  c.d_c = s.d_c;
  c.q = normal_vector(at(l_C) * at(s.H) * at(s.d), seed);
  c.k = normal_vector(at(p + l_C) * at(s.G) * at(s.d), seed + 1);
  c.v = normal_vector(at(p + l_C) * at(s.G) * at(s.d), seed + 2);
  c.wq = normal_vector(at(s.d_c) * at(s.H) * at(s.d), seed + 3, 1.0f / std::sqrt(static_cast<float>(s.H * s.d)));
  c.wk = normal_vector(at(s.d_c) * at(s.G) * at(s.d), seed + 4, 1.0f / std::sqrt(static_cast<float>(s.G * s.d)));
  c.config.mode = mode;
  c.config.l_I = s.l_I;
  c.config.l_L = s.l_L;
  c.config.top_k = s.top_k;
  c.config.eps = s.eps;
  c.config.block = s.block;
  c.config.lag = s.lag;
  c.config.lag_ratio = ratio;
  c.rope_theta = 10000;
  c.rope_scaling = s.scaling;
  return c;
}

// The selection check of the header comment; returns true when the sets are equal.
bool expect_same_selection(const std::vector<int64_t>& got, const naive::StepOut& want, const std::string& label) {
  if (got == want.selected) return true;
  EXPECT_EQ(got.size(), want.selected.size()) << label;
  std::vector<int64_t> diff;
  std::set_symmetric_difference(got.begin(), got.end(), want.selected.begin(), want.selected.end(),
                                std::back_inserter(diff));
  const auto score_of = [&](int64_t t) {
    const auto it = std::lower_bound(want.middle.begin(), want.middle.end(), t);
    EXPECT_TRUE(it != want.middle.end() && *it == t) << label << ": token " << t << " is not a surviving M token";
    return it != want.middle.end() && *it == t ? want.rank_score[at(it - want.middle.begin())] : naive::kNegInf;
  };
  double boundary = INFINITY;
  for (int64_t t : want.selected) boundary = std::min(boundary, score_of(t));
  for (int64_t t : diff)
    EXPECT_LE(std::fabs(score_of(t) - boundary), kTieGap * want.score_scale)
        << label << ": token " << t << " differs and is no float32 near-tie (score " << score_of(t) << ", boundary "
        << boundary << ")";
  return false;
}

// Full comparison of one step against the naive.
void expect_step_matches(const StepCase& c, const std::string& label) {
  const StepResult got = reference_step(c);
  const naive::StepOut want = naive::step(c, kProjectChoices);
  EXPECT_EQ(got.evicted, want.evicted) << label;
  EXPECT_TRUE(std::is_sorted(got.selected.begin(), got.selected.end())) << label;
  for (float x : got.o) ASSERT_FALSE(std::isnan(x)) << label;
  naive::Vec want_o = want.o;
  if (!expect_same_selection(got.selected, want, label)) want_o = naive::step(c, kProjectChoices, &got.selected).o;
  EXPECT_LT(relative_error(got.o, want_o), tolerance::kF32) << label << "\n"
                                                           << first_offenders(got.o, want_o, 10 * tolerance::kF32);
}

// ---------------------------------------------------------------------------------------
// Every mode, with and without eviction, short and long contexts, decode and chunks.
// ---------------------------------------------------------------------------------------

const Shape kSmall{"small", 4, 2, 8, 6, 4, 16, 10, 1, 4, 8, {}};
const Shape kGqa4{"gqa4_llama3", 8, 2, 16, 12, 7, 24, 21, 2, 5, 8,
                  // original context 256: all three llama3 bands at d = 16, theta 1e4
                  {.type = RopeScaling::Type::kLlama3, .factor = 8, .low_freq_factor = 1, .high_freq_factor = 4,
                   .original_max_position = 256}};
const Shape kMhaNoSink{"mha_no_sink", 3, 3, 8, 5, 0, 9, 7, 0, 3, 9, {}};
const Shape kNoWindow{"no_window", 2, 1, 8, 4, 3, 0, 5, 1, 2, 0, {}};

struct StepParam {
  Shape shape;
  AttentionMode mode;
  int64_t p, l_C;
  double ratio;
};

std::vector<StepParam> step_params() {
  std::vector<StepParam> out;
  const std::vector<std::pair<Shape, std::vector<int64_t>>> shapes = {
      // p = 0, p < l_I, p = l_I, p = l_I + l_L, +1 (|M| = 1), |M| = 9 < k, long
      {kSmall, {0, 3, 4, 20, 21, 29, 97}},
      {kGqa4, {250, 1003}},
      {kMhaNoSink, {1, 97}},
      {kNoWindow, {50}},
  };
  for (const auto& [shape, ps] : shapes)
    for (AttentionMode mode : {AttentionMode::kFull, AttentionMode::kEsa, AttentionMode::kExactTopk,
                               AttentionMode::kStreaming, AttentionMode::kBlock})
      for (int64_t p : ps)
        for (int64_t l_C : {1, 7})
          for (double ratio : {0.0, 0.5})
            if (ratio == 0 || (shape.lag > 0 && shape.l_L >= shape.lag)) out.push_back({shape, mode, p, l_C, ratio});
  return out;
}

class WholeStep : public ::testing::TestWithParam<StepParam> {};

TEST_P(WholeStep, EqualsTheFloat64Spec) {
  const StepParam& sp = GetParam();
  const StepCase c = make_case(sp.shape, sp.mode, sp.p, sp.l_C, sp.ratio, 1000 + at(sp.p) * 7 + at(sp.l_C));
  expect_step_matches(c, std::string(sp.shape.name) + " " + std::string(mode_name(sp.mode)));
}

std::string step_name(const ::testing::TestParamInfo<StepParam>& param) {
  const StepParam& sp = param.param;
  std::string name = std::string(sp.shape.name) + "_" + std::string(mode_name(sp.mode)) + "_p" + std::to_string(sp.p) +
                     "_lC" + std::to_string(sp.l_C) + (sp.ratio > 0 ? "_lag" : "");
  std::replace(name.begin(), name.end(), '-', '_');
  return name;
}

INSTANTIATE_TEST_SUITE_P(Modes, WholeStep, ::testing::ValuesIn(step_params()), step_name);

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

std::vector<int64_t> surviving_middle(const StepCase& c, const std::vector<int64_t>& evicted) {
  const naive::Seg seg = naive::segments(c.p, c.config.l_I, c.config.l_L);
  std::vector<int64_t> out;
  for (int64_t t = seg.i_end; t < seg.s0; ++t)
    if (!std::binary_search(evicted.begin(), evicted.end(), t)) out.push_back(t);
  return out;
}

TEST(Properties, KAtLeastMSelectsAllOfM) {  // SPEC §3's rule: ESA and exact-topk (block mode: SpecText below)
  for (AttentionMode mode : {AttentionMode::kEsa, AttentionMode::kExactTopk})
    for (double ratio : {0.0, 0.5})
      for (int64_t extra : {0, 5}) {
        StepCase c = make_case(kGqa4, mode, 97, 7, ratio, 2000);
        const std::vector<int64_t> middle = surviving_middle(c, reference_lag_evictions(c));
        ASSERT_GT(middle.size(), 20u);
        c.config.top_k = static_cast<int64_t>(middle.size()) + extra;
        EXPECT_EQ(reference_step(c).selected, middle) << mode_name(mode) << " ratio " << ratio << " extra " << extra;
      }
}

// Keys planted along a query's direction: f(needle, c) = 3 |fold_c|^2 dwarfs random keys' f.
std::vector<int64_t> plant_needles(StepCase& c, const std::vector<std::pair<int64_t, int64_t>>& needle_query) {
  const naive::Case s(c);
  std::vector<int64_t> needles;
  for (const auto& [t, q] : needle_query) {
    for (int i = 0; i < c.G * c.d; ++i) c.k[at(t) * at(c.G * c.d) + at(i)] = static_cast<float>(3 * s.q_fold[at(q)][at(i)]);
    needles.push_back(t);
  }
  std::sort(needles.begin(), needles.end());
  return needles;
}

TEST(Properties, ExactTopkFindsPlantedNeedles) {
  // Decode: five needles for the one query. Chunk: one needle per query, each the best of its
  // own query, so F (score minus that query's maximum) is 0 for all seven and below 0 elsewhere.
  for (int64_t l_C : {1, 7}) {
    StepCase c = make_case(kGqa4, AttentionMode::kExactTopk, 1003, l_C, 0, 2100 + at(l_C));
    c.config.eps = 0;
    std::vector<std::pair<int64_t, int64_t>> plan;
    for (int64_t i = 0; i < (l_C == 1 ? 5 : 7); ++i) plan.push_back({9 + 131 * i, l_C == 1 ? 0 : i});
    const std::vector<int64_t> needles = plant_needles(c, plan);
    c.config.top_k = static_cast<int64_t>(needles.size());
    const StepResult r = reference_step(c);
    EXPECT_EQ(r.selected, needles) << "l_C " << l_C;
    expect_step_matches(c, "needles l_C " + std::to_string(l_C));
  }
}

TEST(Properties, EsaWithLosslessCompressionEqualsExactTopk) {
  // Wq = identity (d' = H*d) and Wk = the block-repeat matrix (row h*d+i picks k_{g(h), i}):
  // then s(m, c) = q'_c · k'_m = f(m, c) exactly, so ESA must select what exact-topk selects.
  Shape shape = kGqa4;
  const int dH = shape.H * shape.d, dK = shape.G * shape.d;
  shape.d_c = dH;
  for (int64_t l_C : {1, 7}) {
    StepCase esa = make_case(shape, AttentionMode::kEsa, 1003, l_C, 0, 2200 + at(l_C));
    esa.wq.assign(at(dH) * at(dH), 0.0f);
    for (int i = 0; i < dH; ++i) esa.wq[at(i) * at(dH) + at(i)] = 1;
    esa.wk.assign(at(dH) * at(dK), 0.0f);
    for (int h = 0; h < shape.H; ++h)
      for (int i = 0; i < shape.d; ++i) esa.wk[at(h * shape.d + i) * at(dK) + at((h / (shape.H / shape.G)) * shape.d + i)] = 1;
    StepCase exact = esa;
    exact.config.mode = AttentionMode::kExactTopk;
    const naive::StepOut want = naive::step(exact);
    const StepResult a = reference_step(esa), b = reference_step(exact);
    ASSERT_EQ(a.selected.size(), static_cast<size_t>(shape.top_k));
    const bool a_same = expect_same_selection(a.selected, want, "esa l_C " + std::to_string(l_C));
    const bool b_same = expect_same_selection(b.selected, want, "exact l_C " + std::to_string(l_C));
    if (a_same && b_same) {
      EXPECT_LT(relative_error(a.o, b.o), tolerance::kF32) << "l_C " << l_C;
    }
    expect_step_matches(esa, "esa lossless l_C " + std::to_string(l_C));
  }
}

TEST(Properties, BlockModeSelectsWholeBlocks) {
  for (double ratio : {0.0, 0.5})
    for (int64_t l_C : {1, 7}) {
      const StepCase c = make_case(kGqa4, AttentionMode::kBlock, 1003, l_C, ratio, 2300 + at(l_C));
      const StepResult r = reference_step(c);
      const std::vector<int64_t> middle = surviving_middle(c, r.evicted);
      const int64_t B = c.config.block, l_I = c.config.l_I;
      std::vector<int64_t> blocks;
      for (int64_t t : r.selected) {
        ASSERT_TRUE(std::binary_search(middle.begin(), middle.end(), t)) << t << " is no surviving M token";
        const int64_t b = (t - l_I) / B;
        if (blocks.empty() || blocks.back() != b) blocks.push_back(b);
        // every surviving M token of the block [l_I + b*B, l_I + (b+1)*B) is selected
        for (int64_t u = l_I + b * B; u < l_I + (b + 1) * B; ++u)
          if (std::binary_search(middle.begin(), middle.end(), u)) {
            EXPECT_TRUE(std::binary_search(r.selected.begin(), r.selected.end(), u)) << "block of " << t << " lacks " << u;
          }
      }
      EXPECT_EQ(static_cast<int64_t>(blocks.size()), c.config.top_k / B) << "ratio " << ratio;
      expect_step_matches(c, "block ratio " + std::to_string(ratio));
    }
}

TEST(Properties, BlockModeWithKBelowOneBlockSelectsNothing) {
  // floor(k / block) = floor(3 / 5) = 0 blocks while |M| > k: nothing is selected, and the
  // output is the streaming one.
  StepCase c = make_case(kGqa4, AttentionMode::kBlock, 250, 7, 0, 2350);
  c.config.top_k = 3;
  const StepResult r = reference_step(c);
  EXPECT_TRUE(r.selected.empty());
  StepCase streaming = c;
  streaming.config.mode = AttentionMode::kStreaming;
  EXPECT_EQ(r.o, reference_step(streaming).o);
  expect_step_matches(c, "block k < block");
}

TEST(Properties, StreamingAttendsOnlyInitialLocalAndChunk) {
  const StepCase base = make_case(kGqa4, AttentionMode::kStreaming, 250, 7, 0, 2400);
  const auto before = reference_step(base).o;
  const naive::Seg seg = naive::segments(base.p, base.config.l_I, base.config.l_L);
  const size_t width = at(base.G) * at(base.d);
  const auto perturbed = [&](int64_t begin, int64_t end) {
    StepCase c = base;
    for (size_t i = at(begin) * width; i < at(end) * width; ++i) {
      c.k[i] += 1.0f;
      c.v[i] += 10.0f;
    }
    return reference_step(c).o;
  };
  EXPECT_EQ(perturbed(seg.i_end, seg.s0), before) << "M must not be attended";
  EXPECT_GT(relative_error(perturbed(0, 1), before), 1e-3) << "I must be attended";
  EXPECT_GT(relative_error(perturbed(seg.s0, seg.s0 + 1), before), 1e-3) << "L must be attended";
  EXPECT_GT(relative_error(perturbed(base.p, base.p + 1), before), 1e-3) << "C must be attended";
}

TEST(Properties, FullModeIsCausalAttentionWithAbsolutePositions) {
  // A later token of the chunk never changes an earlier query's output; and the output equals
  // the plain softmax over [0, p + c] at absolute positions (the naive).
  const StepCase c = make_case(kGqa4, AttentionMode::kFull, 1003, 7, 0, 2500);
  expect_step_matches(c, "full");
  StepCase later = c;
  const size_t width = at(c.G) * at(c.d);
  for (size_t i = at(c.p + 6) * width; i < at(c.p + 7) * width; ++i) later.v[i] += 10.0f;
  const auto a = reference_step(c).o, b = reference_step(later).o;
  const size_t per_query = at(c.H) * at(c.d);
  EXPECT_TRUE(std::equal(a.begin(), a.begin() + static_cast<std::ptrdiff_t>(6 * per_query), b.begin()));
  EXPECT_FALSE(std::equal(a.begin() + static_cast<std::ptrdiff_t>(6 * per_query), a.end(),
                          b.begin() + static_cast<std::ptrdiff_t>(6 * per_query)));
}

// ---------------------------------------------------------------------------------------
// SPEC's text where an earlier version of the code read it otherwise.
// ---------------------------------------------------------------------------------------

TEST(SpecText, BlockModeSelectsFloorKOverBlockBlocksEvenWhenMFits) {
  // SPEC §5: "the floor(k / block) best blocks are selected". With |M| = 9, k = 10, block = 4
  // that is 2 blocks (8 tokens), not all 9 tokens of M (docs/spec_notes.md §2).
  const StepCase c = make_case(kSmall, AttentionMode::kBlock, 29, 1, 0, 2600);
  const naive::StepOut spec = naive::step(c);
  ASSERT_EQ(spec.selected.size(), 8u);
  EXPECT_EQ(reference_step(c).selected, spec.selected);
  expect_step_matches(c, "block, |M| <= k");
}

}  // namespace
}  // namespace unshackle
