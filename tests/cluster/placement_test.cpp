// SPEC §7 placement against brute force: owned ranges partition [0, n) with block b on rank
// b mod P, and the halo is exactly the other ranks' tokens within eps of an owned token.
#include <gtest/gtest.h>

#include <cstdlib>
#include <vector>

#include "unshackle/cluster/placement.h"
#include "unshackle/common/check.h"

namespace unshackle {
namespace {

// Expands ranges into a per-token mask, checking they are ascending, non-empty, inside
// [0, n) and never touching (canonical form).
std::vector<bool> mask_of(const std::vector<TokenRange>& ranges, int64_t n) {
  std::vector<bool> mask(static_cast<size_t>(n), false);
  for (size_t i = 0; i < ranges.size(); ++i) {
    EXPECT_LT(ranges[i].begin, ranges[i].end);
    EXPECT_GE(ranges[i].begin, 0);
    EXPECT_LE(ranges[i].end, n);
    if (i > 0) {
      EXPECT_LT(ranges[i - 1].end, ranges[i].begin) << "ranges " << i - 1 << ", " << i << " touch";
    }
    for (int64_t t = ranges[i].begin; t < ranges[i].end; ++t) mask[static_cast<size_t>(t)] = true;
  }
  return mask;
}

TEST(Placement, OwnershipPartitionsEveryContextInRoundRobinBlocks) {
  for (int ranks = 1; ranks <= 5; ++ranks)
    for (int64_t block : {1, 3, 7, 16})
      for (int64_t n : {0, 1, 2, 5, 16, 17, 48, 97, 130}) {
        const Placement placement{ranks, block, 0};
        std::vector<int> owners(static_cast<size_t>(n), 0);  // how many ranks claim each token
        for (int rank = 0; rank < ranks; ++rank) {
          const std::vector<bool> mask = mask_of(placement.owned_ranges(rank, n), n);
          int64_t count = 0;
          for (int64_t t = 0; t < n; ++t) {
            const bool expected = (t / block) % ranks == rank;
            ASSERT_EQ(mask[static_cast<size_t>(t)], expected) << "P " << ranks << " block " << block << " token " << t;
            ASSERT_EQ(placement.owns(rank, t), expected);
            owners[static_cast<size_t>(t)] += mask[static_cast<size_t>(t)];
            count += expected;
          }
          EXPECT_EQ(placement.owned_count(rank, n), count);
        }
        for (int64_t t = 0; t < n; ++t) {
          ASSERT_EQ(owners[static_cast<size_t>(t)], 1) << "token " << t << " of n " << n;
          ASSERT_EQ(placement.owner_rank(t), static_cast<int>((t / block) % ranks));
        }
      }
}

TEST(Placement, OneRankOwnsOneRangeAndNoHalo) {
  const Placement placement{1, 64, 9};
  EXPECT_EQ(placement.owned_ranges(0, 1000), (std::vector<TokenRange>{{0, 1000}}));
  EXPECT_TRUE(placement.halo_ranges(0, 1000).empty());
}

TEST(Placement, HaloIsExactlyOtherRanksTokensWithinEps) {
  for (int ranks = 1; ranks <= 4; ++ranks)
    for (int64_t block : {1, 2, 5, 8})
      for (int64_t eps : {0, 1, 2, 4, 5, 9, 40})
        for (int64_t n : {0, 1, 3, 8, 23, 64, 101}) {
          const Placement placement{ranks, block, eps};
          for (int rank = 0; rank < ranks; ++rank) {
            const std::vector<bool> halo = mask_of(placement.halo_ranges(rank, n), n);
            for (int64_t t = 0; t < n; ++t) {
              bool expected = false;  // brute force over every owned token of [0, n)
              if ((t / block) % ranks != rank)
                for (int64_t s = 0; s < n && !expected; ++s)
                  expected = (s / block) % ranks == rank && std::llabs(s - t) <= eps;
              ASSERT_EQ(halo[static_cast<size_t>(t)], expected)
                  << "P " << ranks << " block " << block << " eps " << eps << " n " << n << " rank " << rank << " token " << t;
              ASSERT_EQ(placement.in_halo(rank, t, n), expected) << "token " << t;
            }
          }
        }
}

TEST(Placement, LongContextCountsMatchTheFormula) {
  // 1M tokens, 256-token blocks over 3 ranks: 4096 blocks, last one full.
  const Placement placement{3, 256, 16};
  const int64_t n = 1 << 20, blocks = n / 256;
  int64_t total = 0;
  for (int rank = 0; rank < 3; ++rank) {
    const int64_t mine = (blocks - rank + 2) / 3;  // blocks b < 4096 with b % 3 == rank
    EXPECT_EQ(placement.owned_count(rank, n), mine * 256);
    EXPECT_EQ(placement.owned_ranges(rank, n).size(), static_cast<size_t>(mine));
    total += placement.owned_count(rank, n);
    // eps < block: each owned block has eps tokens on each side that exist and are not owned.
    int64_t halo = 0;
    for (const TokenRange& range : placement.halo_ranges(rank, n)) halo += range.size();
    const int64_t edges = 2 * mine - (rank == 0 ? 1 : 0) - ((blocks - 1) % 3 == rank ? 1 : 0);
    EXPECT_EQ(halo, edges * 16) << "rank " << rank;
  }
  EXPECT_EQ(total, n);
}

TEST(Placement, RejectsBadSettings) {
  EXPECT_THROW((Placement{0, 16, 0}.owned_ranges(0, 10)), Error);
  EXPECT_THROW((Placement{2, 0, 0}.owned_ranges(0, 10)), Error);
  EXPECT_THROW((Placement{2, 16, -1}.halo_ranges(0, 10)), Error);
  EXPECT_THROW((Placement{2, 16, 0}.owned_ranges(2, 10)), Error);
}

}  // namespace
}  // namespace unshackle
