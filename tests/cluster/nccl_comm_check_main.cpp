// The NCCL communicator on real GPUs, one MPI process per GPU: mpirun -np P nccl_comm_check.
//  1. id over MPI (nccl_id_over): the shared exact collective checks, three rounds;
//  2. id over TCP from rank 0 (nccl_id_over_tcp, the launcher-without-MPI path): the checks again;
//  3. a silent rank: the last rank skips one all-reduce; every other rank must get
//     Error(kTimeout) naming the operation and itself within the timeout (2 s), its
//     communicator aborted, and a later call must fail at once (kComm).
// Rank 0 prints "N passed, N failed" over all ranks; exit 1 on any failure.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "collective_checks.h"
#include "device_memory.h"
#include "unshackle/cluster/mpi_communicator.h"
#include "unshackle/cluster/nccl_communicator.h"

using namespace unshackle;
using cluster_checks::CheckLog;

namespace {

void check_silent_rank(Communicator& host, int device, CheckLog& log) {
  const int rank = host.rank(), silent = host.size() - 1;
  auto comm = make_nccl_communicator(rank, host.size(), nccl_id_over(host), device, std::chrono::milliseconds(2000));
  cluster_checks::DeviceMemory memory{device};
  cluster_checks::Buffer<cluster_checks::DeviceMemory, int64_t> value(memory, 1);
  value.put({rank});
  comm->all_reduce(value.data(), value.data(), 1, DType::kI64, ReduceOp::kSum);  // a good one first
  if (rank != silent) {
    const auto start = std::chrono::steady_clock::now();
    std::string error = "no error";
    ErrorKind kind = ErrorKind::kInternal;
    try {
      comm->all_reduce(value.data(), value.data(), 1, DType::kI64, ReduceOp::kSum);
    } catch (const Error& e) {
      error = e.what();
      kind = e.kind();
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const std::string want = "nccl all_reduce on rank " + std::to_string(rank) + " timed out after 2000 ms";
    log.expect(kind == ErrorKind::kTimeout && error.find(want) != std::string::npos && seconds >= 1.9 && seconds < 6,
               fmt::format("silent rank: rank {} got after {:.2f} s: {}", rank, seconds, error));
    const auto again = std::chrono::steady_clock::now();
    std::string later = "no error";
    try {
      comm->barrier();
    } catch (const Error& e) {
      later = e.what();
    }
    const double later_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - again).count();
    log.expect(later.find("communicator is broken") != std::string::npos && later_seconds < 0.1,
               fmt::format("silent rank: later call on rank {} after {:.3f} s: {}", rank, later_seconds, later));
    std::printf("rank %d: silent peer: %s after %.2f s\n", rank, error.c_str(), seconds);
  }
  host.barrier();  // the silent rank waits here until the others have timed out and aborted
  if (rank == silent) {
    // Its peers have aborted: the late call must end within its timeout, not hang. It may
    // even complete, on what the aborted peers had already sent (seen with P = 2), which is
    // why a timeout anywhere breaks the whole group.
    std::string error = "completed";
    const auto start = std::chrono::steady_clock::now();
    try {
      comm->all_reduce(value.data(), value.data(), 1, DType::kI64, ReduceOp::kSum);
    } catch (const Error& e) {
      error = e.what();
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    log.expect(seconds < 6, fmt::format("silent rank: its late call hung for {:.2f} s: {}", seconds, error));
    std::printf("rank %d: silent rank's late call after %.2f s: %s\n", rank, seconds, error.c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession session(&argc, &argv);
  auto host = make_mpi_communicator();
  host->set_timeout(std::chrono::seconds(60));
  const int rank = host->rank(), ranks = host->size();
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    if (rank == 0) std::printf("SKIPPED: no CUDA device\n0 passed, 0 failed\n");
    return 0;
  }
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  const int device = (local ? std::atoi(local) : rank) % devices;
  CheckLog log;
  try {
    auto comm = make_nccl_communicator(rank, ranks, nccl_id_over(*host), device);
    log.expect(comm->device() == device && comm->stream() != nullptr && comm->name() == "nccl", "identity");
    cluster_checks::DeviceMemory memory{device};
    for (int round = 0; round < 3; ++round) cluster_checks::check_collectives(*comm, memory, log);
  } catch (const std::exception& e) {
    log.expect(false, std::string("MPI-bootstrapped checks threw: ") + e.what());
  }
  try {
    int port = 20000 + static_cast<int>(getpid() % 20000);
    host->broadcast(&port, sizeof port, 0);
    const NcclId id = nccl_id_over_tcp("127.0.0.1", port, rank, ranks, std::chrono::seconds(30));
    auto comm = make_nccl_communicator(rank, ranks, id, device);
    cluster_checks::DeviceMemory memory{device};
    cluster_checks::check_collectives(*comm, memory, log);
  } catch (const std::exception& e) {
    log.expect(false, std::string("TCP-bootstrapped checks threw: ") + e.what());
  }
  if (ranks > 1) {
    try {
      check_silent_rank(*host, device, log);
    } catch (const std::exception& e) {
      log.expect(false, std::string("silent-rank check threw: ") + e.what());
    }
  }
  for (const std::string& failure : log.failures) std::printf("rank %d: FAIL %s\n", rank, failure.c_str());
  std::fflush(stdout);
  std::vector<int64_t> counts{log.passed, log.failed};
  host->all_reduce(counts.data(), counts.data(), 2, DType::kI64, ReduceOp::kSum);
  if (rank == 0) std::printf("%lld passed, %lld failed\n", static_cast<long long>(counts[0]), static_cast<long long>(counts[1]));
  return counts[1] == 0 && counts[0] > 0 ? 0 : 1;
}
