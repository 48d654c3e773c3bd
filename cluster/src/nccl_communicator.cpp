#include "unshackle/cluster/nccl_communicator.h"

#include <arpa/inet.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include "unshackle/common/check.h"

namespace unshackle {
namespace {

void cuda_check(cudaError_t code, const char* expression) {
  if (code != cudaSuccess) fail(ErrorKind::kComm, fmt::format("{} failed: {}", expression, cudaGetErrorString(code)));
}

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::kF32: return ncclFloat32;
    case DType::kF64: return ncclFloat64;
    case DType::kI32: return ncclInt32;
    case DType::kI64: return ncclInt64;
    default: fail(ErrorKind::kUnsupported, fmt::format("nccl: dtype {} unsupported", dtype_name(dtype)));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  return ncclSum;
}

// NVLink multicast (NVLS) can take a shared host's GPUs out of service: keep it off unless
// the operator chose otherwise. Before NCCL reads its environment, once per process
// (setenv is not safe against concurrent getenv).
void keep_multicast_off() {
  static std::once_flag once;
  std::call_once(once, [] { setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0); });
}

class NcclCommunicatorImpl final : public NcclCommunicator {
 public:
  NcclCommunicatorImpl(int rank, int ranks, const NcclId& id, int device, std::chrono::milliseconds timeout)
      : rank_(rank), size_(ranks), device_(device) {
    timeout_ = timeout;
    keep_multicast_off();
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    try {
      cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
      cuda_check(cudaMalloc(&scratch_, sizeof(int64_t)), "cudaMalloc");
      cuda_check(cudaMemset(scratch_, 0, sizeof(int64_t)), "cudaMemset");
      ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
      config.blocking = 0;
      ncclUniqueId unique;
      std::memcpy(&unique, id.bytes.data(), sizeof unique);
      const ncclResult_t started = ncclCommInitRankConfig(&comm_, ranks, unique, rank, &config);
      if (started != ncclSuccess && started != ncclInProgress) abort_with("ncclCommInitRankConfig", started);
      wait_for_nccl("ncclCommInitRank");
    } catch (...) {  // the destructor will not run: release what was made (comm_ is aborted)
      cudaFree(scratch_);
      if (stream_) cudaStreamDestroy(stream_);
      throw;
    }
  }

  ~NcclCommunicatorImpl() override {
    cudaSetDevice(device_);
    if (comm_) {
      // Non-blocking teardown: finalize, poll until done (bounded), then destroy; a peer
      // that is gone would make it wait forever, so fall back to abort at the deadline.
      const ncclResult_t finalize = ncclCommFinalize(comm_);
      const auto deadline = std::chrono::steady_clock::now() + std::min(timeout_, std::chrono::milliseconds(10000));
      ncclResult_t state = finalize == ncclSuccess ? ncclInProgress : finalize;
      while (state == ncclInProgress && std::chrono::steady_clock::now() < deadline) {
        ncclCommGetAsyncError(comm_, &state);
        std::this_thread::yield();
      }
      if (state == ncclSuccess) ncclCommDestroy(comm_);
      else ncclCommAbort(comm_);
    }
    cudaFree(scratch_);
    cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }
  cudaStream_t stream() const override { return stream_; }
  int device() const override { return device_; }

  void all_gather(const void* send, void* recv, size_t bytes_per_rank) override {
    run("all_gather", [&] { return ncclAllGather(send, recv, bytes_per_rank, ncclUint8, comm_, stream_); });
  }
  void all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) override {
    run("all_reduce", [&] { return ncclAllReduce(send, recv, count, nccl_type(dtype), nccl_op(op), comm_, stream_); });
  }
  void broadcast(void* buffer, size_t bytes, int root) override {
    UNS_CHECK(root >= 0 && root < size_, "broadcast: root {} of {}", root, size_);
    run("broadcast", [&] { return ncclBroadcast(buffer, buffer, bytes, ncclUint8, root, comm_, stream_); });
  }
  void send(const void* buffer, size_t bytes, int peer) override {
    UNS_CHECK(peer >= 0 && peer < size_ && peer != rank_, "send: bad peer {}", peer);
    run("send", [&] { return ncclSend(buffer, bytes, ncclUint8, peer, comm_, stream_); });
  }
  void recv(void* buffer, size_t bytes, int peer) override {
    UNS_CHECK(peer >= 0 && peer < size_ && peer != rank_, "recv: bad peer {}", peer);
    run("recv", [&] { return ncclRecv(buffer, bytes, ncclUint8, peer, comm_, stream_); });
  }
  void barrier() override {
    run("barrier", [&] { return ncclAllReduce(scratch_, scratch_, 1, ncclInt64, ncclSum, comm_, stream_); });
  }

 private:
  [[noreturn]] void abort_with(const char* op, ncclResult_t result) {
    broken_ = true;
    reason_ = fmt::format("nccl {} on rank {} failed: {} ({})", op, rank_, ncclGetErrorString(result),
                          comm_ ? ncclGetLastError(comm_) : "");
    if (comm_) ncclCommAbort(comm_);
    comm_ = nullptr;
    fail(ErrorKind::kComm, reason_);
  }

  [[noreturn]] void time_out(const char* op) {
    broken_ = true;
    reason_ = fmt::format("nccl {} on rank {} timed out after {} ms: a peer rank died or hangs; communicator aborted",
                          op, rank_, timeout_.count());
    if (comm_) ncclCommAbort(comm_);
    comm_ = nullptr;
    fail(ErrorKind::kTimeout, reason_);
  }

  // Non-blocking NCCL: an enqueue may return ncclInProgress; poll the async error until set.
  void wait_for_nccl(const char* op) {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (;;) {
      ncclResult_t state = ncclSuccess;
      ncclCommGetAsyncError(comm_, &state);
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) abort_with(op, state);
      if (std::chrono::steady_clock::now() > deadline) time_out(op);
      std::this_thread::yield();
    }
  }

  template <typename Enqueue>
  void run(const char* op, Enqueue enqueue) {
    if (broken_) fail(ErrorKind::kComm, "communicator is broken: " + reason_);
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    const ncclResult_t result = enqueue();
    if (result != ncclSuccess && result != ncclInProgress) abort_with(op, result);
    wait_for_nccl(op);
    // Wait for the collective itself, watching for asynchronous errors and the deadline.
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (;;) {
      const cudaError_t done = cudaStreamQuery(stream_);
      if (done == cudaSuccess) return;
      if (done != cudaErrorNotReady) cuda_check(done, "cudaStreamQuery");
      ncclResult_t state = ncclSuccess;
      ncclCommGetAsyncError(comm_, &state);
      if (state != ncclSuccess && state != ncclInProgress) abort_with(op, state);
      if (std::chrono::steady_clock::now() > deadline) time_out(op);
      std::this_thread::yield();
    }
  }

  int rank_, size_, device_;
  cudaStream_t stream_ = nullptr;
  ncclComm_t comm_ = nullptr;
  void* scratch_ = nullptr;
  bool broken_ = false;
  std::string reason_;
};

// --- TCP bootstrap ------------------------------------------------------------------------

struct Fd {
  int fd = -1;
  ~Fd() { if (fd >= 0) ::close(fd); }
};

void set_timeouts(int fd, std::chrono::milliseconds timeout) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

}  // namespace

NcclId nccl_new_id() {
  keep_multicast_off();
  ncclUniqueId unique;
  const ncclResult_t result = ncclGetUniqueId(&unique);
  UNS_CHECK_KIND(kComm, result == ncclSuccess, "ncclGetUniqueId failed: {}", ncclGetErrorString(result));
  NcclId id;
  std::memcpy(id.bytes.data(), &unique, sizeof unique);
  return id;
}

NcclId nccl_id_over(Communicator& host_comm) {
  UNS_CHECK(host_comm.memory_space() == MemorySpace::kHost, "nccl_id_over needs a host communicator");
  NcclId id;
  if (host_comm.rank() == 0) id = nccl_new_id();
  host_comm.broadcast(id.bytes.data(), id.bytes.size(), 0);
  return id;
}

NcclId nccl_id_over_tcp(const std::string& host, int port, int rank, int ranks, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  if (rank == 0) {
    NcclId id = nccl_new_id();
    Fd listener{::socket(AF_INET, SOCK_STREAM, 0)};
    UNS_CHECK_KIND(kIo, listener.fd >= 0, "nccl bootstrap: socket() failed");
    const int yes = 1;
    setsockopt(listener.fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_ANY);
    UNS_CHECK_KIND(kIo, ::bind(listener.fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0,
                   "nccl bootstrap: cannot listen on port {}: {}", port, std::strerror(errno));
    ::listen(listener.fd, ranks);
    for (int served = 1; served < ranks; ++served) {
      // Each accept waits only for what is left of the one deadline.
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      set_timeouts(listener.fd, std::max(left, std::chrono::milliseconds(1)));
      Fd peer{::accept(listener.fd, nullptr, nullptr)};
      UNS_CHECK_KIND(kTimeout, peer.fd >= 0 && std::chrono::steady_clock::now() < deadline,
                     "nccl bootstrap: only {} of {} ranks connected to port {} within {} ms", served, ranks, port,
                     timeout.count());
      set_timeouts(peer.fd, timeout);
      UNS_CHECK_KIND(kIo, ::send(peer.fd, id.bytes.data(), id.bytes.size(), MSG_NOSIGNAL) ==
                              static_cast<ssize_t>(id.bytes.size()),
                     "nccl bootstrap: sending the id failed");
    }
    return id;
  }
  for (;;) {  // peers retry until rank 0 listens
    addrinfo hints{}, *found = nullptr;
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    // A name that does not resolve yet (a Kubernetes pod not ready) is retried like a refusal.
    const bool resolved = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) == 0;
    Fd fd{::socket(AF_INET, SOCK_STREAM, 0)};
    set_timeouts(fd.fd, timeout);
    const bool connected = resolved && ::connect(fd.fd, found->ai_addr, found->ai_addrlen) == 0;
    if (resolved) freeaddrinfo(found);
    if (connected) {
      NcclId id;
      size_t got = 0;
      while (got < id.bytes.size()) {
        const ssize_t n = ::recv(fd.fd, id.bytes.data() + got, id.bytes.size() - got, 0);
        UNS_CHECK_KIND(kTimeout, n > 0, "nccl bootstrap: rank 0 at {}:{} closed or timed out", host, port);
        got += static_cast<size_t>(n);
      }
      return id;
    }
    UNS_CHECK_KIND(kTimeout, std::chrono::steady_clock::now() < deadline,
                   "nccl bootstrap: rank 0 at {}:{} did not answer within {} ms", host, port, timeout.count());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

std::unique_ptr<NcclCommunicator> make_nccl_communicator(int rank, int ranks, const NcclId& id, int device,
                                                         std::chrono::milliseconds timeout) {
  UNS_CHECK(ranks > 0 && rank >= 0 && rank < ranks, "make_nccl_communicator: rank {} of {}", rank, ranks);
  return std::make_unique<NcclCommunicatorImpl>(rank, ranks, id, device, timeout);
}

}  // namespace unshackle
