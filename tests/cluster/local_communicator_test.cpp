// In-process communicators, P = 1..4: every operation with rank-coded data and exact
// expected values (nccl-tests style), in place and out of place; timeouts name the missing
// rank and break the group.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <numeric>
#include <thread>

#include "collective_checks.h"
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

// The suite every communicator runs (MPI and NCCL too), here on threads.
TEST_P(LocalComm, SharedCollectiveChecks) {
  const int ranks = GetParam();
  std::vector<cluster_checks::CheckLog> logs(static_cast<size_t>(ranks));
  run_local_ranks(ranks, [&](int rank, Communicator& comm) {
    comm.set_timeout(std::chrono::seconds(30));
    cluster_checks::HostMemory memory;
    for (int round = 0; round < 2; ++round) cluster_checks::check_collectives(comm, memory, logs[static_cast<size_t>(rank)]);
  });
  for (const auto& log : logs) {
    EXPECT_EQ(log.failed, 0);
    EXPECT_GT(log.passed, 30);
    for (const std::string& failure : log.failures) ADD_FAILURE() << failure;
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, LocalComm, ::testing::Values(1, 2, 3, 4));

// Ranks in `absent` never call all_gather; every other rank must throw kTimeout naming
// exactly them after the timeout, and any later call on any rank throws kComm at once.
// Bounds are loose on purpose: CI runs this beside other tests on 2 cores, where a thread
// can wait hundreds of ms for a core. The present ranks meet at a latch first so that none
// can arrive after another's deadline (it would then, correctly, see kComm, not kTimeout);
// "at once" is checked against a 30 s timeout, so it cannot pass by waiting.
void check_timeout(int ranks, const std::vector<int>& absent, const std::string& named) {
  const auto timeout = std::chrono::milliseconds(1000);
  std::vector<std::string> errors(static_cast<size_t>(ranks)), later(static_cast<size_t>(ranks));
  std::vector<ErrorKind> kinds(static_cast<size_t>(ranks), ErrorKind::kInternal);
  std::vector<double> seconds(static_cast<size_t>(ranks)), later_seconds(static_cast<size_t>(ranks));
  const auto seconds_since = [](std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  std::atomic<int> finished{0}, arrived{0};
  const int present = ranks - static_cast<int>(absent.size());
  run_local_ranks(ranks, [&](int rank, Communicator& comm) {
    comm.set_timeout(timeout);
    const bool gone = std::find(absent.begin(), absent.end(), rank) != absent.end();
    const auto r = static_cast<size_t>(rank);
    if (!gone) {
      std::vector<int32_t> all(static_cast<size_t>(ranks));
      const int32_t mine = rank;
      ++arrived;
      while (arrived.load() < present) std::this_thread::yield();
      const auto start = std::chrono::steady_clock::now();
      try {
        comm.all_gather(&mine, all.data(), sizeof mine);
      } catch (const Error& e) {
        errors[r] = e.what();
        kinds[r] = e.kind();
      }
      seconds[r] = seconds_since(start);
      ++finished;
    } else {
      while (finished.load() < present) std::this_thread::yield();
    }
    comm.set_timeout(std::chrono::seconds(30));
    const auto start = std::chrono::steady_clock::now();
    try {  // the absent ranks too: the group is broken for everyone
      comm.barrier();
    } catch (const Error& e) {
      later[r] = e.what();
      kinds[r] = gone ? e.kind() : kinds[r];
      EXPECT_EQ(e.kind(), ErrorKind::kComm) << "rank " << rank;
    }
    later_seconds[r] = seconds_since(start);
  });
  for (int rank = 0; rank < ranks; ++rank) {
    const auto r = static_cast<size_t>(rank);
    if (std::find(absent.begin(), absent.end(), rank) == absent.end()) {
      EXPECT_EQ(kinds[r], ErrorKind::kTimeout) << "rank " << rank << ": " << errors[r];
      EXPECT_EQ(errors[r], "all_gather timed out after 1000 ms waiting for rank " + named) << "rank " << rank;
      EXPECT_GE(seconds[r], 0.99) << "rank " << rank;
      EXPECT_LT(seconds[r], 10.0) << "rank " << rank;
    }
    EXPECT_NE(later[r].find("communicator is broken: all_gather timed out"), std::string::npos) << later[r];
    EXPECT_LT(later_seconds[r], 5.0) << "rank " << rank << ": later calls must fail at once, not after the 30 s timeout";
  }
}

TEST(LocalComm, TimeoutNamesMissingRankAndBreaksGroup) { check_timeout(4, {2}, "2"); }
TEST(LocalComm, TimeoutNamesEveryMissingRank) { check_timeout(4, {1, 3}, "1, 3"); }
TEST(LocalComm, TimeoutNamesTheLastRank) { check_timeout(2, {1}, "1"); }

TEST(LocalComm, RecvFromSilentPeerTimesOut) {
  std::string error;
  run_local_ranks(3, [&](int rank, Communicator& comm) {
    comm.set_timeout(std::chrono::milliseconds(200));
    if (rank != 0) return;
    int64_t value = 0;
    try {
      comm.recv(&value, sizeof value, 2);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kTimeout);
      error = e.what();
    }
  });
  EXPECT_EQ(error, "recv on rank 0 timed out after 200 ms waiting for rank 2");
}

TEST(LocalComm, RecvOfWrongSizeFails) {
  run_local_ranks(2, [&](int rank, Communicator& comm) {
    comm.set_timeout(std::chrono::seconds(5));
    int64_t value = 42;
    if (rank == 0) comm.send(&value, sizeof value, 1);
    if (rank == 1) {
      int32_t small = 0;
      EXPECT_THROW(comm.recv(&small, sizeof small, 0), Error);
    }
  });
}

}  // namespace
}  // namespace unshackle
