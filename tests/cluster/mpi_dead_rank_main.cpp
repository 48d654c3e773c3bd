// Under mpirun: the last rank dies (SIGKILL to itself, or --hang: stops calling) after a few
// good collectives. Every survivor must get an Error naming that rank within the timeout,
// not hang. Each survivor prints "rank R: saw error: ..."; rank 0 prints a summary line.
// Exit code 0 only when the survivor saw the right error in time.
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
  comm->set_timeout(std::chrono::milliseconds(2000));
  const int dead = comm->size() - 1;
  std::vector<int64_t> values(static_cast<size_t>(comm->size()));
  for (int round = 0; round < 3; ++round) {  // good collectives first
    int64_t mine = comm->rank() * 10 + round;
    comm->all_gather(&mine, values.data(), sizeof mine);
    for (int r = 0; r < comm->size(); ++r)
      if (values[static_cast<size_t>(r)] != r * 10 + round) return 3;
  }
  if (comm->rank() == dead) {
    if (hang) {
      std::this_thread::sleep_for(std::chrono::seconds(8));  // alive but silent
      return 0;
    }
    raise(SIGKILL);
  }
  const auto start = std::chrono::steady_clock::now();
  std::string error;
  try {
    int64_t mine = 1;
    comm->all_gather(&mine, values.data(), sizeof mine);
  } catch (const Error& e) {
    error = e.what();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const bool named = error.find("rank " + std::to_string(dead)) != std::string::npos;
  std::printf("rank %d: saw error after %.2f s: %s\n", comm->rank(), seconds, error.c_str());
  std::fflush(stdout);
  const bool ok = named && seconds < 6.0;
  // A later call fails at once: the communicator is broken.
  try {
    comm->barrier();
    return 4;
  } catch (const Error&) {
  }
  if (comm->rank() == 0) std::printf("%d passed, %d failed\n", ok ? 1 : 0, ok ? 0 : 1);
  std::fflush(stdout);
  if (!hang) _exit(ok ? 0 : 1);  // a killed peer never reaches MPI_Finalize: do not wait for it
  return ok ? 0 : 1;              // a hung peer does, once it wakes up
}
