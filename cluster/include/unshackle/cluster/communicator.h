// Communication only (SPEC §7): the collectives one layer step needs, behind one interface
// with three implementations: in-process ranks as threads (tests anywhere), MPI over host
// buffers (CPU workers, multi-rank CI), NCCL over device buffers (one rank per GPU).
//
// Every call is collective unless it says otherwise, blocks until its result is in place,
// and never waits forever: past the communicator's timeout it throws Error(kTimeout or
// kComm) whose message names the rank(s) that did not answer, and the communicator is
// then broken (every later call throws at once).
#pragma once

#include <chrono>
#include <cstddef>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "unshackle/common/dtype.h"
#include "unshackle/kernels/backend.h"

namespace unshackle {

enum class ReduceOp : uint8_t { kSum, kMax, kMin };

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "local", "mpi", "nccl"
  // Where send/recv buffers must live (host for local and MPI, device for NCCL).
  virtual MemorySpace memory_space() const = 0;

  // recv holds size() blocks of bytes_per_rank, block r from rank r. send may alias block rank().
  virtual void all_gather(const void* send, void* recv, size_t bytes_per_rank) = 0;
  // Element-wise over `count` elements of dtype (F32, F64, I32, I64). In place when send == recv.
  virtual void all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) = 0;
  virtual void broadcast(void* buffer, size_t bytes, int root) = 0;
  // Point to point (not collective): pairs with the peer's matching call. A send may block
  // until the peer receives (MPI rendezvous, NCCL), so order pairs without a cycle of
  // waiting sends (in a ring: even ranks send first, odd ranks receive first).
  virtual void send(const void* buffer, size_t bytes, int peer) = 0;
  virtual void recv(void* buffer, size_t bytes, int peer) = 0;
  virtual void barrier() = 0;

  void set_timeout(std::chrono::milliseconds timeout) { timeout_ = timeout; }
  std::chrono::milliseconds timeout() const { return timeout_; }

 protected:
  std::chrono::milliseconds timeout_{std::chrono::seconds(120)};
};

// P ranks in this process; rank r is driven by one thread. The returned objects share state.
std::vector<std::unique_ptr<Communicator>> make_local_communicators(int ranks);

// Runs fn(rank, communicator) on `ranks` threads and rethrows the first failure (by rank).
template <typename Fn>
void run_local_ranks(int ranks, Fn&& fn) {
  auto comms = make_local_communicators(ranks);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(ranks));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(r, *comms[static_cast<size_t>(r)]);
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (auto& error : errors)
    if (error) std::rethrow_exception(error);
}

}  // namespace unshackle
