// NCCL over device buffers, one communicator per GPU rank (one process or thread each).
// Communicators are non-blocking (ncclConfig_t::blocking = 0): every call enqueues on the
// communicator's stream, then polls ncclCommGetAsyncError and the stream until done or the
// timeout, and aborts the communicator (ncclCommAbort) on error or timeout, so no thread is
// stuck inside NCCL when a peer dies.
#pragma once

#include <array>
#include <memory>
#include <string>

#include "unshackle/cluster/communicator.h"

namespace unshackle {

// The 128-byte ncclUniqueId, opaque.
struct NcclId {
  std::array<char, 128> bytes{};
};

// Rank 0's fresh id (call on one rank only).
NcclId nccl_new_id();
// Bootstraps: rank 0 makes the id and shares it over an existing host communicator (MPI) ...
NcclId nccl_id_over(Communicator& host_comm);
// ... or over TCP from a known address, for launchers without MPI (Kubernetes): rank 0
// listens on `port` and hands the id to ranks - 1 connecting peers; others connect to
// host:port, retrying until `timeout`. Throws Error(kTimeout) naming what was missing.
NcclId nccl_id_over_tcp(const std::string& host, int port, int rank, int ranks, std::chrono::milliseconds timeout);

// A communicator for `rank` of `ranks` on CUDA device `device`. Sets NCCL_NVLS_ENABLE=0
// when unset: NVLink multicast stays off on shared machines.
std::unique_ptr<Communicator> make_nccl_communicator(int rank, int ranks, const NcclId& id, int device,
                                                     std::chrono::milliseconds timeout = std::chrono::seconds(120));

}  // namespace unshackle
