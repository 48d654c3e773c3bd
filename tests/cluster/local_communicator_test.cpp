// In-process communicators, P = 1..4: every operation with rank-coded data and exact
// expected values (nccl-tests style), in place and out of place; timeouts name the missing
// rank and break the group.
#include <gtest/gtest.h>

#include <chrono>
#include <numeric>

#include "unshackle/cluster/communicator.h"
#include "unshackle/common/check.h"

namespace unshackle {
namespace {

// Element i of rank r: exactly representable in every dtype used here.
double coded(int rank, size_t i) { return static_cast<double>(rank * 1000 + static_cast<int>(i % 997)) - 300.5; }

template <typename T>
void check_all_reduce(int ranks, DType dtype) {
  const size_t n = 1031;
  run_local_ranks(ranks, [&](int rank, Communicator& comm) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
      std::vector<T> data(n), out(n);
      for (size_t i = 0; i < n; ++i) data[i] = static_cast<T>(coded(rank, i));
      comm.all_reduce(data.data(), out.data(), n, dtype, op);
      comm.all_reduce(data.data(), data.data(), n, dtype, op);  // in place
      for (size_t i = 0; i < n; ++i) {
        T want = static_cast<T>(coded(0, i));
        for (int r = 1; r < ranks; ++r) {
          const T x = static_cast<T>(coded(r, i));
          want = op == ReduceOp::kSum ? static_cast<T>(want + x) : op == ReduceOp::kMax ? std::max(want, x) : std::min(want, x);
        }
        ASSERT_EQ(out[i], want) << "rank " << rank << " element " << i;
        ASSERT_EQ(data[i], want);
      }
    }
  });
}

class LocalComm : public ::testing::TestWithParam<int> {};

TEST_P(LocalComm, AllGatherBroadcastBarrierSendRecv) {
  const int ranks = GetParam();
  run_local_ranks(ranks, [&](int rank, Communicator& comm) {
    EXPECT_EQ(comm.rank(), rank);
    EXPECT_EQ(comm.size(), ranks);
    const size_t n = 257;
    std::vector<int32_t> mine(n), all(n * static_cast<size_t>(ranks));
    for (size_t i = 0; i < n; ++i) mine[i] = rank * 100000 + static_cast<int32_t>(i);
    comm.all_gather(mine.data(), all.data(), n * sizeof(int32_t));
    for (int r = 0; r < ranks; ++r)
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(all[static_cast<size_t>(r) * n + i], r * 100000 + static_cast<int32_t>(i));
    // in place: send aliases this rank's block
    std::vector<int32_t> in_place(n * static_cast<size_t>(ranks), -1);
    std::copy(mine.begin(), mine.end(), in_place.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(rank) * n));
    comm.all_gather(in_place.data() + static_cast<size_t>(rank) * n, in_place.data(), n * sizeof(int32_t));
    EXPECT_EQ(in_place, all);
    for (int root = 0; root < ranks; ++root) {
      std::vector<int64_t> value(5, rank == root ? 77 + root : -1);
      comm.broadcast(value.data(), value.size() * sizeof(int64_t), root);
      for (int64_t v : value) ASSERT_EQ(v, 77 + root);
    }
    comm.barrier();
    if (ranks > 1) {  // ring
      const int next = (rank + 1) % ranks, prev = (rank + ranks - 1) % ranks;
      const int64_t sent = 5000 + rank;
      int64_t got = 0;
      comm.send(&sent, sizeof sent, next);
      comm.recv(&got, sizeof got, prev);
      EXPECT_EQ(got, 5000 + prev);
    }
  });
}

TEST_P(LocalComm, AllReduceEveryDtypeAndOp) {
  check_all_reduce<float>(GetParam(), DType::kF32);
  check_all_reduce<double>(GetParam(), DType::kF64);
  check_all_reduce<int32_t>(GetParam(), DType::kI32);
  check_all_reduce<int64_t>(GetParam(), DType::kI64);
}

INSTANTIATE_TEST_SUITE_P(Ranks, LocalComm, ::testing::Values(1, 2, 3, 4));

TEST(LocalComm, TimeoutNamesMissingRankAndBreaksGroup) {
  const int ranks = 4, missing = 2;
  std::vector<std::string> errors(ranks), later(ranks);
  std::vector<double> seconds(ranks);
  run_local_ranks(ranks, [&](int rank, Communicator& comm) {
    comm.set_timeout(std::chrono::milliseconds(300));
    if (rank == missing) return;  // never calls
    std::vector<int32_t> all(ranks);
    const int32_t mine = rank;
    const auto start = std::chrono::steady_clock::now();
    try {
      comm.all_gather(&mine, all.data(), sizeof mine);
    } catch (const Error& e) {
      errors[static_cast<size_t>(rank)] = e.what();
      EXPECT_TRUE(e.kind() == ErrorKind::kTimeout || e.kind() == ErrorKind::kComm);
    }
    seconds[static_cast<size_t>(rank)] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    try {
      comm.barrier();
    } catch (const Error& e) {
      later[static_cast<size_t>(rank)] = e.what();
      EXPECT_EQ(e.kind(), ErrorKind::kComm);
    }
  });
  for (int r = 0; r < ranks; ++r) {
    if (r == missing) continue;
    EXPECT_NE(errors[static_cast<size_t>(r)].find("rank 2"), std::string::npos) << errors[static_cast<size_t>(r)];
    EXPECT_LT(seconds[static_cast<size_t>(r)], 2.0);
    EXPECT_NE(later[static_cast<size_t>(r)].find("broken"), std::string::npos) << later[static_cast<size_t>(r)];
  }
}

}  // namespace
}  // namespace unshackle
