// The distributed layer step under mpirun: every rank runs every scenario of scenario.h over
// MPI and checks its own results against the oracle (selected/evicted sets exactly, output
// within 1e-5 relative). Prints "N passed, N failed" on rank 0; exit code 1 on any failure.
#include <cstdio>
#include <string>

#include "scenario.h"
#include "unshackle/cluster/mpi_communicator.h"

using namespace unshackle;
using namespace unshackle::testing;

int main(int argc, char** argv) {
  MpiSession session(&argc, &argv);
  auto comm = make_mpi_communicator();
  auto backend = make_cpu_backend();
  int passed = 0, failed = 0;
  for (const Scenario& s : all_scenarios()) {
    std::string problem;
    try {
      const auto records = run_scenario(s, *backend, *comm);
      std::vector<std::vector<int64_t>> evicted(static_cast<size_t>(s.layers));
      int64_t p = 0;
      for (size_t step = 0; step < s.chunks.size() && problem.empty(); ++step) {
        for (int layer = 0; layer < s.layers && problem.empty(); ++layer) {
          const StepResult want = oracle_step(s, p, s.chunks[step], layer);
          const StepRecord& got = records[step][static_cast<size_t>(layer)];
          auto& ev = evicted[static_cast<size_t>(layer)];
          ev.insert(ev.end(), got.evicted.begin(), got.evicted.end());
          std::sort(ev.begin(), ev.end());
          const double err = relative_error(got.o, want.o);
          if (got.selected != want.selected) problem = "selected differs";
          else if (ev != want.evicted) problem = "evicted differs";
          else if (!(err < tolerance::kDistributed)) problem = "relative error " + std::to_string(err);
          if (!problem.empty()) problem += " at step " + std::to_string(step) + " layer " + std::to_string(layer);
        }
        p += s.chunks[step];
      }
    } catch (const std::exception& e) {
      problem = std::string("exception: ") + e.what();
    }
    // A scenario passes only if it passed on every rank.
    int64_t bad = problem.empty() ? 0 : 1;
    comm->all_reduce(&bad, &bad, 1, DType::kI64, ReduceOp::kSum);
    if (!problem.empty()) std::fprintf(stderr, "rank %d: %s: %s\n", comm->rank(), s.name().c_str(), problem.c_str());
    (bad == 0 ? passed : failed) += 1;
    if (comm->rank() == 0) std::printf("%s P=%d: %s\n", s.name().c_str(), comm->size(), bad == 0 ? "ok" : "FAILED");
  }
  if (comm->rank() == 0) std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
