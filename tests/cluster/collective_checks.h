// One suite of exact collective checks for every communicator (threads, MPI, NCCL), in the
// manner of nccl-tests: every element encodes its source rank and index, inputs are chosen
// so that sums are exact in every dtype and any reduction order (so NCCL's order gives the
// same bits as rank order), and results are compared for equality, never within a tolerance.
//
// Memory decides where buffers live: HostMemory here; the NCCL checks pass a device one.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "unshackle/cluster/communicator.h"

namespace unshackle::cluster_checks {

struct CheckLog {
  int passed = 0, failed = 0;
  std::vector<std::string> failures;

  void expect(bool ok, const std::string& what) {
    if (ok) {
      ++passed;
    } else {
      ++failed;
      failures.push_back(what);
    }
  }
};

// Host buffers: what local and MPI communicators take.
struct HostMemory {
  void* allocate(size_t bytes) { return new unsigned char[std::max<size_t>(bytes, 1)]; }
  void release(void* p) { delete[] static_cast<unsigned char*>(p); }
  void put(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
  void get(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
};

// A typed buffer in Memory, filled from and read back into host vectors.
template <typename Memory, typename T>
class Buffer {
 public:
  Buffer(Memory& memory, size_t count) : memory_(memory), count_(count), data_(memory.allocate(count * sizeof(T))) {}
  ~Buffer() { memory_.release(data_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  T* data() { return static_cast<T*>(data_); }
  void put(const std::vector<T>& host, size_t offset = 0) { memory_.put(data() + offset, host.data(), host.size() * sizeof(T)); }
  std::vector<T> get() {
    std::vector<T> host(count_);
    memory_.get(host.data(), data_, count_ * sizeof(T));
    return host;
  }

 private:
  Memory& memory_;
  size_t count_;
  void* data_;
};

// Element i from rank r: distinct per (rank, index), exact in float, and such that any sum
// over up to 64 ranks stays exact (|x| < 2^17, half-integer steps: 2^24 covers the sum).
inline double coded(int rank, size_t i) {
  return static_cast<double>(rank * 1009 + static_cast<int>(i % 1013)) * (rank % 2 ? -1.0 : 1.0) - 0.5;
}

// First mismatch of got against want, or "" (names the check, rank and element).
template <typename T>
std::string first_mismatch(const std::vector<T>& got, const std::vector<T>& want, const std::string& what, int rank) {
  for (size_t i = 0; i < want.size(); ++i)
    if (!(got[i] == want[i]))
      return fmt::format("{} on rank {}: element {} is {}, want {}", what, rank, i, got[i], want[i]);
  return "";
}

template <typename Memory, typename T>
void check_all_reduce(Communicator& comm, Memory& memory, DType dtype, CheckLog& log) {
  const int rank = comm.rank(), ranks = comm.size();
  const size_t n = 1031;  // odd, not a multiple of any vector width
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
    const char* op_name = op == ReduceOp::kSum ? "sum" : op == ReduceOp::kMax ? "max" : "min";
    std::vector<T> mine(n), want(n);
    for (size_t i = 0; i < n; ++i) {
      mine[i] = static_cast<T>(coded(rank, i));
      T acc = static_cast<T>(coded(0, i));
      for (int r = 1; r < ranks; ++r) {
        const T x = static_cast<T>(coded(r, i));
        acc = op == ReduceOp::kSum ? static_cast<T>(acc + x) : op == ReduceOp::kMax ? std::max(acc, x) : std::min(acc, x);
      }
      want[i] = acc;
    }
    Buffer<Memory, T> send(memory, n), recv(memory, n);
    send.put(mine);
    recv.put(std::vector<T>(n, T(-7)));
    comm.all_reduce(send.data(), recv.data(), n, dtype, op);
    const std::string what = fmt::format("all_reduce {} {}", dtype_name(dtype), op_name);
    std::string bad = first_mismatch(recv.get(), want, what, rank);
    bad += first_mismatch(send.get(), mine, what + " (send buffer changed)", rank);
    log.expect(bad.empty(), bad);
    comm.all_reduce(send.data(), send.data(), n, dtype, op);  // in place
    bad = first_mismatch(send.get(), want, what + " in place", rank);
    log.expect(bad.empty(), bad);
  }
}

template <typename Memory>
void check_all_gather(Communicator& comm, Memory& memory, CheckLog& log) {
  const int rank = comm.rank(), ranks = comm.size();
  const size_t n = 257;
  const auto element = [](int r, size_t i) { return static_cast<int32_t>(r * 100000 + static_cast<int>(i)); };
  std::vector<int32_t> mine(n), want(n * static_cast<size_t>(ranks));
  for (size_t i = 0; i < n; ++i) mine[i] = element(rank, i);
  for (int r = 0; r < ranks; ++r)
    for (size_t i = 0; i < n; ++i) want[static_cast<size_t>(r) * n + i] = element(r, i);
  Buffer<Memory, int32_t> send(memory, n), recv(memory, n * static_cast<size_t>(ranks));
  send.put(mine);
  recv.put(std::vector<int32_t>(want.size(), -1));
  comm.all_gather(send.data(), recv.data(), n * sizeof(int32_t));
  std::string bad = first_mismatch(recv.get(), want, "all_gather", rank);
  log.expect(bad.empty(), bad);
  // In place: the send block is this rank's block of the output.
  Buffer<Memory, int32_t> inplace(memory, want.size());
  inplace.put(std::vector<int32_t>(want.size(), -1));
  inplace.put(mine, static_cast<size_t>(rank) * n);
  comm.all_gather(inplace.data() + static_cast<size_t>(rank) * n, inplace.data(), n * sizeof(int32_t));
  bad = first_mismatch(inplace.get(), want, "all_gather in place", rank);
  log.expect(bad.empty(), bad);
}

template <typename Memory>
void check_broadcast(Communicator& comm, Memory& memory, CheckLog& log) {
  const int rank = comm.rank(), ranks = comm.size();
  const size_t n = 333;
  for (int root = 0; root < ranks; ++root) {
    std::vector<int64_t> want(n);
    for (size_t i = 0; i < n; ++i) want[i] = int64_t{root} * 1000003 + static_cast<int64_t>(i) * 7 + (int64_t{1} << 40);
    Buffer<Memory, int64_t> buffer(memory, n);
    buffer.put(rank == root ? want : std::vector<int64_t>(n, -1));
    comm.broadcast(buffer.data(), n * sizeof(int64_t), root);
    const std::string bad = first_mismatch(buffer.get(), want, fmt::format("broadcast from root {}", root), rank);
    log.expect(bad.empty(), bad);
  }
}

// Ring: each rank sends to rank + 1 and receives from rank - 1. Sends may block until the
// peer receives (MPI rendezvous, NCCL), so even ranks send first and odd ranks receive
// first: no cycle of waiting sends for any P.
template <typename Memory>
void check_send_recv(Communicator& comm, Memory& memory, CheckLog& log) {
  const int rank = comm.rank(), ranks = comm.size();
  if (ranks < 2) return;
  const int next = (rank + 1) % ranks, prev = (rank + ranks - 1) % ranks;
  const size_t n = 4099;
  const auto element = [](int from, int to, size_t i) { return static_cast<int64_t>(from) * 1000000 + to * 10000 + static_cast<int64_t>(i); };
  std::vector<int64_t> mine(n), want(n);
  for (size_t i = 0; i < n; ++i) {
    mine[i] = element(rank, next, i);
    want[i] = element(prev, rank, i);
  }
  Buffer<Memory, int64_t> out(memory, n), in(memory, n);
  out.put(mine);
  in.put(std::vector<int64_t>(n, -1));
  if (rank % 2 == 0) {
    comm.send(out.data(), n * sizeof(int64_t), next);
    comm.recv(in.data(), n * sizeof(int64_t), prev);
  } else {
    comm.recv(in.data(), n * sizeof(int64_t), prev);
    comm.send(out.data(), n * sizeof(int64_t), next);
  }
  const std::string bad = first_mismatch(in.get(), want, "send/recv ring", rank);
  log.expect(bad.empty(), bad);
}

// Every collective of the interface, then a barrier; one log entry per check.
template <typename Memory>
void check_collectives(Communicator& comm, Memory& memory, CheckLog& log) {
  log.expect(comm.rank() >= 0 && comm.rank() < comm.size(), fmt::format("rank {} of {}", comm.rank(), comm.size()));
  check_all_gather(comm, memory, log);
  check_all_reduce<Memory, float>(comm, memory, DType::kF32, log);
  check_all_reduce<Memory, double>(comm, memory, DType::kF64, log);
  check_all_reduce<Memory, int32_t>(comm, memory, DType::kI32, log);
  check_all_reduce<Memory, int64_t>(comm, memory, DType::kI64, log);
  check_broadcast(comm, memory, log);
  check_send_recv(comm, memory, log);
  comm.barrier();
  log.expect(true, "barrier");
}

}  // namespace unshackle::cluster_checks
