// KvShard: ownership by block round-robin, halo of eps tokens, exact byte accounting, and
// eviction that removes exactly the asked rows and keeps the others' contents in order.
#include <gtest/gtest.h>

#include <set>

#include "test_data.h"
#include "unshackle/worker/kv_shard.h"

namespace unshackle::testing {
namespace {

TEST(KvShard, OwnershipHaloAndBytes) {
  auto backend = make_cpu_backend();
  const int G = 2, d = 4, d_c = 3, ranks = 3;
  const int64_t n = 203, block = 16, eps = 2;
  std::vector<std::unique_ptr<KvShard>> shards;
  const auto k = normal_vector(static_cast<size_t>(n) * G * d, 1), v = normal_vector(static_cast<size_t>(n) * G * d, 2);
  const auto kc = normal_vector(static_cast<size_t>(n) * d_c, 3);
  for (int r = 0; r < ranks; ++r) {
    shards.push_back(std::make_unique<KvShard>(*backend, KvShardOptions{.layers = 1, .G = G, .d = d, .d_c = d_c,
                                                                        .kv_dtype = DType::kF32, .rank = r,
                                                                        .ranks = ranks, .kv_block = block, .eps = eps}));
    // Appended in uneven chunks that straddle blocks.
    for (int64_t t0 = 0; t0 < n;) {
      const int64_t len = std::min<int64_t>(n - t0, 1 + (t0 * 7) % 23);
      shards.back()->append(0, t0, len, k.data() + t0 * G * d, v.data() + t0 * G * d, kc.data() + t0 * d_c);
      t0 += len;
    }
  }
  std::set<int64_t> seen;
  for (int r = 0; r < ranks; ++r) {
    const KvShard& shard = *shards[static_cast<size_t>(r)];
    const auto& layer = shard.layer(0);
    for (size_t i = 0; i < layer.tokens.size(); ++i) {
      const int64_t t = layer.tokens[i];
      EXPECT_EQ((t / block) % ranks, r);
      EXPECT_TRUE(seen.insert(t).second) << "token " << t << " owned twice";
      const auto* stored = layer.k.as<float>() + i * G * d;
      for (int j = 0; j < G * d; ++j) ASSERT_EQ(stored[j], k[static_cast<size_t>(t * G * d + j)]);
    }
    // Halo: exactly the tokens owned elsewhere within eps of an owned token (brute force).
    std::vector<int64_t> expected_scoring;
    for (int64_t t = 0; t < n; ++t) {
      bool near = (t / block) % ranks == r;
      for (int64_t u = std::max<int64_t>(0, t - eps); u <= t + eps && !near; ++u) near = (u / block) % ranks == r;
      if (near) expected_scoring.push_back(t);
    }
    EXPECT_EQ(layer.score_tokens, expected_scoring);
    const size_t expected_bytes = layer.tokens.size() * (2 * G * d * sizeof(float) + sizeof(int64_t)) +
                                  layer.score_tokens.size() * (d_c * sizeof(float) + 2 * sizeof(int64_t));
    EXPECT_EQ(shard.bytes_held(), expected_bytes);
  }
  EXPECT_EQ(seen.size(), static_cast<size_t>(n));
}

TEST(KvShard, EvictionRemovesExactlyAndFreesBytes) {
  auto backend = make_cpu_backend();
  const int G = 1, d = 2, d_c = 2;
  const int64_t n = 100;
  KvShard shard(*backend, KvShardOptions{.layers = 1, .G = G, .d = d, .d_c = d_c, .kv_dtype = DType::kBF16,
                                         .rank = 0, .ranks = 2, .kv_block = 10, .eps = 1});
  const auto k = normal_vector(n * G * d, 4), v = normal_vector(n * G * d, 5);
  std::vector<uint16_t> kc(static_cast<size_t>(n * d_c));
  for (size_t i = 0; i < kc.size(); ++i) kc[i] = float_to_bf16(hashed_normal(6, i));
  shard.append(0, 0, n, k.data(), v.data(), kc.data());
  const size_t before = shard.bytes_held();
  // Rank 0 of 2 owns blocks 0, 2, 4, ... (kv_block 10): 3, 4, 9, 21, 22, 23, 45 are owned;
  // 10 and 99 are halo (next to 9 and to the future token 100); 57 is not held at all.
  const std::vector<int64_t> remove = {3, 4, 9, 10, 21, 22, 23, 45, 57, 99};
  shard.evict(0, remove);
  const auto& layer = shard.layer(0);
  for (int64_t t : layer.tokens) EXPECT_FALSE(std::binary_search(remove.begin(), remove.end(), t));
  // Contents still follow their tokens after compaction (bf16 storage).
  const auto* stored = layer.k.as<uint16_t>();
  for (size_t i = 0; i < layer.tokens.size(); ++i)
    for (int j = 0; j < G * d; ++j)
      EXPECT_EQ(stored[i * G * d + j], float_to_bf16(k[static_cast<size_t>(layer.tokens[i] * G * d + j)]));
  const size_t removed_owned = 7, removed_scoring = 9;
  EXPECT_EQ(before - shard.bytes_held(), removed_owned * (2 * G * d * 2 + 8) + removed_scoring * (d_c * 2 + 16));
}

}  // namespace
}  // namespace unshackle::testing
