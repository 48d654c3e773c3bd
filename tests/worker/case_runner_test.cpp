// A SPEC §9 case run through the distributed step on P in-process ranks equals the
// single-process reference: same selected and evicted sets, output within 1e-5, for every
// mode and for short contexts (empty M, M smaller than k).
#include <gtest/gtest.h>

#include "test_data.h"
#include "tolerance.h"
#include "unshackle/cluster/communicator.h"
#include "unshackle/worker/case_runner.h"

namespace unshackle::testing {
namespace {

StepCase random_case(AttentionMode mode, int64_t p, int64_t l_C, double lag_ratio, uint64_t seed) {
  StepCase c;
  c.p = p;
  c.l_C = l_C;
  c.H = 6;
  c.G = 3;
  c.d = 8;
  c.d_c = 5;
  c.q = normal_vector(static_cast<size_t>(l_C * c.H * c.d), seed);
  c.k = normal_vector(static_cast<size_t>((p + l_C) * c.G * c.d), seed + 1);
  c.v = normal_vector(static_cast<size_t>((p + l_C) * c.G * c.d), seed + 2);
  c.wq = normal_vector(static_cast<size_t>(c.d_c * c.H * c.d), seed + 3, 0.2f);
  c.wk = normal_vector(static_cast<size_t>(c.d_c * c.G * c.d), seed + 4, 0.3f);
  c.config.mode = mode;
  c.config.l_I = 4;
  c.config.l_L = 24;
  c.config.top_k = 12;
  c.config.eps = 1;
  c.config.block = 4;
  c.config.lag = 8;
  c.config.lag_ratio = lag_ratio;
  return c;
}

TEST(CaseRunner, DistributedEqualsReference) {
  int cases = 0;
  for (AttentionMode mode : {AttentionMode::kFull, AttentionMode::kEsa, AttentionMode::kExactTopk,
                             AttentionMode::kStreaming, AttentionMode::kBlock}) {
    for (int64_t p : {0, 3, 20, 28, 29, 150}) {
      for (int64_t l_C : {1, 9}) {
        for (double ratio : {0.0, 0.5}) {
          const StepCase c = random_case(mode, p, l_C, ratio, 100 + static_cast<uint64_t>(cases));
          const StepResult want = reference_step(c);
          for (int ranks : {1, 2, 3, 4}) {
            std::vector<StepResult> got(static_cast<size_t>(ranks));
            run_local_ranks(ranks, [&](int rank, Communicator& comm) {
              auto backend = make_cpu_backend();
              got[static_cast<size_t>(rank)] = run_case_distributed(c, *backend, comm, /*kv_block=*/5);
            });
            SCOPED_TRACE(std::string(mode_name(mode)) + " p=" + std::to_string(p) + " l_C=" + std::to_string(l_C) +
                         " ratio=" + std::to_string(ratio) + " P=" + std::to_string(ranks));
            EXPECT_EQ(got[0].selected, want.selected);
            EXPECT_EQ(got[0].evicted, want.evicted);
            EXPECT_LT(relative_error(got[0].o, want.o), tolerance::kDistributed);
            for (int r = 1; r < ranks; ++r) EXPECT_EQ(got[static_cast<size_t>(r)].o, got[0].o);
          }
          ++cases;
        }
      }
    }
  }
  EXPECT_EQ(cases, 120);
}

}  // namespace
}  // namespace unshackle::testing
