// Under mpirun: the last rank dies (SIGKILL to itself, or --hang: stays alive but stops
// calling) after a few good collectives. Every survivor must get an Error naming that rank
// within the timeout (2 s) instead of hanging, and find the communicator broken afterwards.
// Each survivor prints "rank R: PASS ..." or "rank R: FAIL ..."; mpi_dead_rank.cmake
// requires a PASS line from every survivor (mpirun's exit status says little here).
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include "unshackle/cluster/mpi_communicator.h"
#include "unshackle/common/check.h"

using namespace unshackle;

int main(int argc, char** argv) {
  const bool hang = argc > 1 && std::strcmp(argv[1], "--hang") == 0;
  MpiSession session(&argc, &argv);
  auto comm = make_mpi_communicator();
  const auto timeout = std::chrono::milliseconds(2000);
  comm->set_timeout(timeout);
  const int dead = comm->size() - 1, rank = comm->rank();
  std::vector<int64_t> values(static_cast<size_t>(comm->size()));
  for (int round = 0; round < 3; ++round) {  // good collectives first: the peer was reachable
    const int64_t mine = rank * 10 + round;
    comm->all_gather(&mine, values.data(), sizeof mine);
    for (int r = 0; r < comm->size(); ++r)
      if (values[static_cast<size_t>(r)] != r * 10 + round) {
        std::printf("rank %d: FAIL round %d: got %lld from rank %d\n", rank, round,
                    static_cast<long long>(values[static_cast<size_t>(r)]), r);
        return 1;
      }
  }
  if (rank == dead) {
    if (hang) {
      std::this_thread::sleep_for(timeout + std::chrono::seconds(3));  // alive but silent
      return 0;
    }
    raise(SIGKILL);
  }
  const auto start = std::chrono::steady_clock::now();
  std::string error = "no error";
  ErrorKind kind = ErrorKind::kInternal;
  try {
    const int64_t mine = 1;
    comm->all_gather(&mine, values.data(), sizeof mine);
  } catch (const Error& e) {
    error = e.what();
    kind = e.kind();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::string expected = "all_gather timed out after 2000 ms waiting for rank " + std::to_string(dead);
  bool ok = kind == ErrorKind::kTimeout && error == expected && seconds >= 1.9 && seconds < 5.0;
  // A later call fails at once: the communicator is broken. "At once" is under half the 2 s
  // timeout, so it cannot pass by waiting, with room for a loaded 2-core CI machine.
  const auto later_start = std::chrono::steady_clock::now();
  std::string later = "no error";
  try {
    comm->barrier();
  } catch (const Error& e) {
    later = e.what();
    ok = ok && e.kind() == ErrorKind::kComm;
  }
  const double later_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - later_start).count();
  ok = ok && later.find("communicator is broken") != std::string::npos && later_seconds < 1.0;
  std::printf("rank %d: %s saw error after %.2f s: %s; later call after %.3f s: %s\n", rank, ok ? "PASS" : "FAIL",
              seconds, error.c_str(), later_seconds, later.c_str());
  std::fflush(stdout);
  if (!hang) _exit(ok ? 0 : 1);  // a killed peer never reaches MPI_Finalize: do not wait for it
  return ok ? 0 : 1;              // a hung peer does, once it wakes up
}
