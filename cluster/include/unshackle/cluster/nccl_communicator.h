// NCCL over device buffers, one communicator per GPU rank (one process or thread each).
// Communicators are non-blocking (ncclConfig_t::blocking = 0): every call enqueues on the
// communicator's stream, then polls ncclCommGetAsyncError and the stream until done or the
// timeout, and aborts the communicator (ncclCommAbort) on error or timeout, so no thread is
// stuck inside NCCL when a peer dies.
#pragma once

#include <cuda_runtime_api.h>

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

// The NCCL communicator adds its device and stream. Every call enqueues on stream() and
// returns once the stream is idle, so work the caller queued there before is ordered before
// the collective. Buffers written by a copy on another stream (or the legacy default
// stream, which a non-blocking stream does not wait for) must be complete before the call.
// Calls poll the stream, so they must not be made while stream() is being captured.
class NcclCommunicator : public Communicator {
 public:
  virtual cudaStream_t stream() const = 0;
  virtual int device() const = 0;
};

// A communicator for `rank` of `ranks` on CUDA device `device` (made current in the calling
// thread). Sets NCCL_NVLS_ENABLE=0 when unset: NVLink multicast stays off on shared machines.
// Creation itself is bounded by `timeout` (a rank that never joins is a kTimeout).
std::unique_ptr<NcclCommunicator> make_nccl_communicator(int rank, int ranks, const NcclId& id, int device,
                                                     std::chrono::milliseconds timeout = std::chrono::seconds(120));

}  // namespace unshackle
