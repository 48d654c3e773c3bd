// SPEC §7 on in-process ranks: for P = 1..4, every mode, with and without LagKV, several
// prefill chunks then decode steps: selected and evicted sets equal the oracle's exactly,
// outputs within 1e-5 relative of the oracle, and every rank holds the same output.
#include <gtest/gtest.h>

#include <mutex>

#include "unshackle/common/check.h"

#include "naive_spec.h"
#include "scenario.h"

namespace unshackle::testing {
namespace {

// The scenario on `ranks` in-process ranks, each with its own CPU backend: records[rank][step][layer].
std::vector<std::vector<std::vector<StepRecord>>> run_on_local_ranks(const Scenario& s, int ranks, bool measure_share) {
  std::vector<std::vector<std::vector<StepRecord>>> per_rank(static_cast<size_t>(ranks));
  run_local_ranks(ranks, [&](int rank, Communicator& comm) {
    auto backend = make_cpu_backend();
    per_rank[static_cast<size_t>(rank)] = run_scenario(s, *backend, comm, measure_share);
  });
  return per_rank;
}

class DistributedStep : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(DistributedStep, MatchesOracleAndSingleRank) {
  const auto [ranks, scenario_index] = GetParam();
  const Scenario s = all_scenarios().at(static_cast<size_t>(scenario_index));
  SCOPED_TRACE(s.name() + " P=" + std::to_string(ranks));
  const auto per_rank = run_on_local_ranks(s, ranks, /*measure_share=*/false);

  std::vector<std::vector<int64_t>> evicted_so_far(static_cast<size_t>(s.layers));
  int64_t p = 0;
  bool saw_selection = false, saw_eviction = false;
  for (size_t step = 0; step < s.chunks.size(); ++step) {
    const int64_t l_C = s.chunks[step];
    for (int layer = 0; layer < s.layers; ++layer) {
      const StepResult want = oracle_step(s, p, l_C, layer);
      const StepRecord& got = per_rank[0][step][static_cast<size_t>(layer)];
      auto& evicted = evicted_so_far[static_cast<size_t>(layer)];
      evicted.insert(evicted.end(), got.evicted.begin(), got.evicted.end());
      std::sort(evicted.begin(), evicted.end());
      EXPECT_EQ(got.selected, want.selected) << "step " << step << " layer " << layer;
      EXPECT_EQ(evicted, want.evicted) << "step " << step << " layer " << layer;
      const double err = relative_error(got.o, want.o);
      EXPECT_LT(err, tolerance::kDistributed) << "step " << step << " layer " << layer << "\n"
                                              << first_offenders(got.o, want.o, tolerance::kDistributed);
      EXPECT_GT(norm(want.o), 0.0);
      for (int r = 1; r < ranks; ++r) {
        const StepRecord& other = per_rank[static_cast<size_t>(r)][step][static_cast<size_t>(layer)];
        EXPECT_EQ(other.o, got.o) << "rank " << r << " differs from rank 0";
        EXPECT_EQ(other.selected, got.selected);
      }
      saw_selection = saw_selection || !want.selected.empty();
      saw_eviction = saw_eviction || !want.evicted.empty();
    }
    p += l_C;
  }
  // The scenario must exercise what it claims to (cannot pass by selecting nothing).
  if (s.config.selects()) {
    EXPECT_TRUE(saw_selection);
  }
  if (s.config.evicts()) {
    EXPECT_TRUE(saw_eviction);
  }
}

std::string scenario_name(const ::testing::TestParamInfo<std::tuple<int, int>>& param_info) {
  const int ranks = std::get<0>(param_info.param);
  std::string name = all_scenarios().at(static_cast<size_t>(std::get<1>(param_info.param))).name();
  for (char& c : name)
    if (c == '-' || c == '+') c = '_';
  return name + "_P" + std::to_string(ranks);
}

INSTANTIATE_TEST_SUITE_P(AllModes, DistributedStep,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4), ::testing::Range(0, 10)), scenario_name);

// record_selection = false (the service's setting) keeps M_k on the backend: the same o on
// every rank as with it (bit for bit: the same ops, only the read-back for the statistics
// is gone), the selection's size still right without the set, and attended_local_rows
// counting the row list's entries instead of the rows. With it, the rows attended summed
// over the ranks are I ∪ M_k ∪ L ∪ C exactly.
class RecordSelection : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(RecordSelection, OffGivesTheSameOutputAndCount) {
  const auto [ranks, scenario_index] = GetParam();
  const Scenario s = all_scenarios().at(static_cast<size_t>(scenario_index));
  SCOPED_TRACE(s.name() + " P=" + std::to_string(ranks));
  ASSERT_TRUE(s.config.mode == AttentionMode::kEsa || s.config.mode == AttentionMode::kExactTopk);
  std::vector<std::vector<std::vector<StepRecord>>> on(static_cast<size_t>(ranks)), off(static_cast<size_t>(ranks));
  run_local_ranks(ranks, [&](int rank, Communicator& comm) {
    auto backend = make_cpu_backend();
    on[static_cast<size_t>(rank)] = run_scenario(s, *backend, comm, false, true);
    off[static_cast<size_t>(rank)] = run_scenario(s, *backend, comm, false, false);
  });
  int64_t p = 0;
  bool saw_partial = false;  // a step where M_k is a strict subset of M (the count is not |M|)
  for (size_t step = 0; step < s.chunks.size(); ++step) {
    const int64_t l_C = s.chunks[step];
    const Segments seg = compute_segments(p, l_C, s.config.l_I, s.config.l_L);
    for (int layer = 0; layer < s.layers; ++layer) {
      SCOPED_TRACE("step " + std::to_string(step) + " layer " + std::to_string(layer));
      const auto at = [&](const auto& records, int r) -> const StepRecord& {
        return records[static_cast<size_t>(r)][step][static_cast<size_t>(layer)];
      };
      const int64_t count = static_cast<int64_t>(at(on, 0).selected.size());
      const int64_t k_entries = seg.m_size() > 0 ? s.config.top_k : 0;
      int64_t rows_on = 0, rows_off = 0;
      for (int r = 0; r < ranks; ++r) {
        EXPECT_EQ(at(off, r).o, at(on, r).o) << "rank " << r;
        EXPECT_TRUE(at(off, r).selected.empty());
        EXPECT_EQ(at(on, r).selected_count, count);
        EXPECT_EQ(at(off, r).selected_count, count) << "rank " << r;
        EXPECT_EQ(at(off, r).evicted, at(on, r).evicted);
        rows_on += at(on, r).attended_local_rows;
        rows_off += at(off, r).attended_local_rows;
      }
      EXPECT_EQ(rows_on, seg.i_end + count + (seg.c_end - seg.s0()));
      EXPECT_EQ(rows_off, seg.i_end + ranks * k_entries + (seg.c_end - seg.s0()));
      saw_partial = saw_partial || (count > 0 && count < seg.m_size());
    }
    p += l_C;
  }
  EXPECT_TRUE(saw_partial);
}

// esa, esa + lagkv, exact-topk, exact-topk + lagkv (scenario order: mode-major, lagkv off/on).
INSTANTIATE_TEST_SUITE_P(SelectionOnTheBackend, RecordSelection,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4), ::testing::Values(2, 3, 4, 5)), scenario_name);

// Where the attention went (the metric of the selection statistics): the softmax mass on I,
// M_k and L ∪ C measured by the distributed step equals SPEC's attention recomputed in
// float64 (support/naive_spec.h), on every rank alike; measuring leaves o as the oracle's.
class AttentionShareTest : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(AttentionShareTest, EqualsFloat64AttentionOnEveryRank) {
  const auto [ranks, scenario_index] = GetParam();
  const Scenario s = all_scenarios().at(static_cast<size_t>(scenario_index));
  SCOPED_TRACE(s.name() + " P=" + std::to_string(ranks));
  const auto per_rank = run_on_local_ranks(s, ranks, /*measure_share=*/true);
  int64_t p = 0;
  double most_selected = 0;
  for (size_t step = 0; step < s.chunks.size(); ++step) {
    const int64_t l_C = s.chunks[step];
    for (int layer = 0; layer < s.layers; ++layer) {
      SCOPED_TRACE("step " + std::to_string(step) + " layer " + std::to_string(layer));
      const StepRecord& got = per_rank[0][step][static_cast<size_t>(layer)];
      const naive::StepOut want = naive::step(step_case(s, p, l_C, layer));
      ASSERT_TRUE(got.share.measured);
      EXPECT_NEAR(got.share.initial, want.share_initial, 1e-5);
      EXPECT_NEAR(got.share.selected, want.share_selected, 1e-5);
      EXPECT_NEAR(got.share.local, want.share_local, 1e-5);
      EXPECT_NEAR(got.share.initial + got.share.selected + got.share.local, 1.0, 1e-5);
      EXPECT_LT(relative_error(got.o, oracle_step(s, p, l_C, layer).o), tolerance::kDistributed);
      for (int r = 1; r < ranks; ++r) {
        const StepRecord& other = per_rank[static_cast<size_t>(r)][step][static_cast<size_t>(layer)];
        EXPECT_EQ(other.share.initial, got.share.initial) << "rank " << r;
        EXPECT_EQ(other.share.selected, got.share.selected) << "rank " << r;
        EXPECT_EQ(other.share.local, got.share.local) << "rank " << r;
        EXPECT_EQ(other.o, got.o) << "rank " << r;
      }
      most_selected = std::max(most_selected, got.share.selected);
    }
    p += l_C;
  }
  // Cannot pass with the mass all in one place: selection modes put some on M_k.
  if (s.config.selects()) {
    EXPECT_GT(most_selected, 0.05);
  } else {
    EXPECT_EQ(most_selected, 0.0);
  }
}

// esa, exact-topk + lagkv, streaming, block (scenario order: mode-major, lagkv off/on).
INSTANTIATE_TEST_SUITE_P(SelectionModes, AttentionShareTest,
                         ::testing::Combine(::testing::Values(1, 2, 3), ::testing::Values(2, 5, 6, 8)), scenario_name);

TEST(AttentionShareTest, FullModeIsNotMeasured) {
  Scenario s = all_scenarios().at(0);
  ASSERT_EQ(s.config.mode, AttentionMode::kFull);
  s.chunks = {20, 1};
  run_local_ranks(1, [&](int, Communicator& comm) {
    auto backend = make_cpu_backend();
    for (const auto& step : run_scenario(s, *backend, comm, true))
      for (const StepRecord& layer : step) EXPECT_FALSE(layer.share.measured);
  });
}

}  // namespace
}  // namespace unshackle::testing

namespace unshackle::testing {
namespace {

// A rank that dies mid-step (stops taking part) must not hang the others: their forward()
// fails within the communicator's timeout with an error naming the missing rank.
TEST(DistributedStep, DeadRankFailsOthersWithinTimeout) {
  Scenario s = all_scenarios().at(2);  // esa, no eviction
  s.layers = 1;
  const int ranks = 3, dead = 2;
  const auto timeout = std::chrono::milliseconds(1500);
  std::vector<std::string> errors(ranks);
  std::vector<double> seconds(ranks, 0);
  run_local_ranks(ranks, [&](int rank, Communicator& comm) {
    comm.set_timeout(timeout);
    auto backend = make_cpu_backend();
    const CompressionWeights cw = s.compression();
    ContextAttention attention(*backend, comm,
                               ContextAttentionOptions{.attention = s.config, .layers = 1, .H = s.H, .G = s.G, .d = s.d,
                                                       .kv_block = s.kv_block, .inv_freq = rope_inv_freq(s.d, 1e4),
                                                       .compression = &cw});
    const int64_t n = 100;
    const auto q = s.rows(0, 0, 0, n), k = s.rows(0, 1, 0, n), v = s.rows(0, 2, 0, n);
    std::vector<float> o(q.size());
    attention.forward(0, q.data(), k.data(), v.data(), n, o.data());  // one good step
    attention.commit_chunk(n);
    if (rank == dead) return;  // dies before the next step
    const auto start = std::chrono::steady_clock::now();
    try {
      attention.forward(0, q.data(), k.data(), v.data(), 1, o.data());
    } catch (const unshackle::Error& e) {
      errors[static_cast<size_t>(rank)] = e.what();
    }
    seconds[static_cast<size_t>(rank)] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  });
  for (int r = 0; r < ranks; ++r) {
    if (r == dead) continue;
    EXPECT_NE(errors[static_cast<size_t>(r)].find("rank " + std::to_string(dead)), std::string::npos)
        << "rank " << r << " error: '" << errors[static_cast<size_t>(r)] << "'";
    EXPECT_LT(seconds[static_cast<size_t>(r)], 3 * static_cast<double>(timeout.count()) / 1000.0);
  }
}

}  // namespace
}  // namespace unshackle::testing
