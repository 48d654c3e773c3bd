// NCCL communicators, one thread per GPU in this process (id from ncclGetUniqueId, no MPI):
// the shared exact collective checks for P = 1, 2 and every GPU; a silent rank makes the
// others time out, abort and name the operation, and later calls fail at once. Skips with
// the reason where there is no CUDA device (CI); nccl_comm_check is the multi-process twin.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <set>
#include <thread>

#include "collective_checks.h"
#include "device_memory.h"
#include "unshackle/cluster/nccl_communicator.h"

namespace unshackle {
namespace {

int gpu_count(std::string& why) {
  int devices = 0;
  const cudaError_t code = cudaGetDeviceCount(&devices);
  if (code != cudaSuccess) why = cudaGetErrorString(code);
  else if (devices == 0) why = "0 devices";
  return code == cudaSuccess ? devices : 0;
}

// Runs fn(rank, communicator) on one thread per GPU 0..ranks-1; failures become test failures.
template <typename Fn>
void on_gpus(int ranks, std::chrono::milliseconds timeout, Fn fn) {
  const NcclId id = nccl_new_id();
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        auto comm = make_nccl_communicator(r, ranks, id, r, timeout);
        fn(r, *comm);
      } catch (const std::exception& e) {
        ADD_FAILURE() << "rank " << r << ": " << e.what();
      }
    });
  for (auto& thread : threads) thread.join();
}

TEST(NcclComm, ExactCollectivesOneThreadPerGpu) {
  std::string why;
  const int devices = gpu_count(why);
  if (devices == 0) GTEST_SKIP() << "no CUDA device: " << why;
  for (int ranks : std::set<int>{1, std::min(devices, 2), devices}) {
    std::vector<cluster_checks::CheckLog> logs(static_cast<size_t>(ranks));
    on_gpus(ranks, std::chrono::seconds(60), [&](int rank, Communicator& base) {
      auto& comm = dynamic_cast<NcclCommunicator&>(base);
      auto& log = logs[static_cast<size_t>(rank)];
      log.expect(comm.name() == "nccl" && comm.memory_space() == MemorySpace::kDevice && comm.device() == rank &&
                     comm.stream() != nullptr,
                 "nccl communicator identity");
      cluster_checks::DeviceMemory memory{rank};
      for (int round = 0; round < 2; ++round) cluster_checks::check_collectives(comm, memory, log);
    });
    for (const auto& log : logs) {
      EXPECT_EQ(log.failed, 0) << "P = " << ranks;
      EXPECT_GT(log.passed, 30) << "P = " << ranks;
      for (const std::string& failure : log.failures) ADD_FAILURE() << "P = " << ranks << ": " << failure;
    }
  }
}

TEST(NcclComm, SilentRankTimesOutAbortsAndBreaks) {
  std::string why;
  const int devices = gpu_count(why);
  if (devices == 0) GTEST_SKIP() << "no CUDA device: " << why;
  if (devices < 2) GTEST_SKIP() << "needs 2 GPUs, found " << devices;
  const int ranks = std::min(devices, 4), silent = ranks - 1;
  std::vector<std::string> errors(static_cast<size_t>(ranks)), later(static_cast<size_t>(ranks));
  std::vector<ErrorKind> kinds(static_cast<size_t>(ranks), ErrorKind::kInternal);
  std::vector<double> seconds(static_cast<size_t>(ranks)), later_seconds(static_cast<size_t>(ranks));
  std::atomic<int> done{0};
  on_gpus(ranks, std::chrono::milliseconds(2000), [&](int rank, Communicator& comm) {
    const auto r = static_cast<size_t>(rank);
    cluster_checks::DeviceMemory memory{rank};
    cluster_checks::Buffer<cluster_checks::DeviceMemory, int64_t> value(memory, 1);
    value.put({rank});
    comm.all_reduce(value.data(), value.data(), 1, DType::kI64, ReduceOp::kSum);  // a good one first
    if (rank == silent) {
      while (done.load() < ranks - 1) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    } else {
      const auto start = std::chrono::steady_clock::now();
      try {
        comm.all_reduce(value.data(), value.data(), 1, DType::kI64, ReduceOp::kSum);
      } catch (const Error& e) {
        errors[r] = e.what();
        kinds[r] = e.kind();
      }
      seconds[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const auto again = std::chrono::steady_clock::now();
      try {
        comm.barrier();
      } catch (const Error& e) {
        later[r] = e.what();
      }
      later_seconds[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - again).count();
      ++done;
      return;
    }
    // The silent rank's peers have aborted: its own late call must end within its timeout,
    // not hang. It may even complete, on what the aborted peers had already sent (seen with
    // P = 2 on H200s), which is why a timeout anywhere breaks the whole group.
    const auto start = std::chrono::steady_clock::now();
    try {
      comm.all_reduce(value.data(), value.data(), 1, DType::kI64, ReduceOp::kSum);
    } catch (const Error& e) {
      errors[r] = e.what();
    }
    seconds[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  });
  for (int rank = 0; rank < ranks; ++rank) {
    const auto r = static_cast<size_t>(rank);
    if (rank == silent) {
      EXPECT_LT(seconds[r], 6.0) << "the silent rank's late call hung: " << errors[r];
      continue;
    }
    EXPECT_EQ(kinds[r], ErrorKind::kTimeout) << errors[r];
    EXPECT_NE(errors[r].find("nccl all_reduce on rank " + std::to_string(rank) + " timed out after 2000 ms"),
              std::string::npos)
        << errors[r];
    EXPECT_GE(seconds[r], 1.9);
    EXPECT_LT(seconds[r], 6.0);
    EXPECT_NE(later[r].find("communicator is broken"), std::string::npos) << later[r];
    EXPECT_LT(later_seconds[r], 0.1);
  }
}

}  // namespace
}  // namespace unshackle
