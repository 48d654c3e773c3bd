// Under mpirun -np P: the shared exact collective checks (collective_checks.h) on the MPI
// communicator, three rounds so that per-call tags advance and never cross. Each rank prints
// its failures; rank 0 prints "N passed, N failed" summed over ranks. Exit 1 on any failure.
#include <cstdio>

#include "collective_checks.h"
#include "unshackle/cluster/mpi_communicator.h"
#include "unshackle/common/check.h"

using namespace unshackle;

int main(int argc, char** argv) {
  MpiSession session(&argc, &argv);
  auto comm = make_mpi_communicator();
  comm->set_timeout(std::chrono::seconds(30));
  cluster_checks::HostMemory memory;
  cluster_checks::CheckLog log;
  try {
    log.expect(comm->name() == "mpi" && comm->memory_space() == MemorySpace::kHost, "mpi communicator identity");
    for (int round = 0; round < 3; ++round) cluster_checks::check_collectives(*comm, memory, log);
  } catch (const std::exception& e) {
    log.expect(false, std::string("threw: ") + e.what());
    std::printf("rank %d: %s\n", comm->rank(), e.what());
    std::fflush(stdout);
    return 1;  // the group may be broken: no summary
  }
  for (const std::string& failure : log.failures) std::printf("rank %d: FAIL %s\n", comm->rank(), failure.c_str());
  std::vector<int64_t> counts{log.passed, log.failed};
  comm->all_reduce(counts.data(), counts.data(), counts.size(), DType::kI64, ReduceOp::kSum);
  if (comm->rank() == 0) std::printf("%lld passed, %lld failed\n", static_cast<long long>(counts[0]), static_cast<long long>(counts[1]));
  std::fflush(stdout);
  return counts[1] == 0 && counts[0] > 0 ? 0 : 1;
}
