// MPI over host buffers, for CPU workers and the multi-rank tests in CI. Every collective is
// built from non-blocking point-to-point messages polled against the timeout, so a rank that
// died or hangs is named in the error instead of hanging the others forever.
#pragma once

#include <memory>

#include "unshackle/cluster/communicator.h"

namespace unshackle {

// Initialises MPI for the process unless it already is; finalises what it initialised.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  static bool launched_by_mpirun();  // OMPI_COMM_WORLD_SIZE / PMI_SIZE in the environment

 private:
  bool owns_ = false;
};

// A communicator over a duplicate of MPI_COMM_WORLD (needs an MpiSession).
std::unique_ptr<Communicator> make_mpi_communicator();

}  // namespace unshackle
