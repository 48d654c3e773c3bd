#include "unshackle/cluster/mpi_communicator.h"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "rank_order_reduce.h"
#include "unshackle/common/check.h"

namespace unshackle {
namespace {

constexpr int kPointToPointTag = 7;
constexpr int kFirstCollectiveTag = 100;
constexpr int kCollectiveTags = 30000;  // MPI guarantees tags up to 32767


class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() {
    MPI_Comm_dup(MPI_COMM_WORLD, &comm_);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    if (!broken_) MPI_Comm_free(&comm_);  // a broken communicator may have dead peers: leave it
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }
  MemorySpace memory_space() const override { return MemorySpace::kHost; }

  void all_gather(const void* send, void* recv, size_t bytes_per_rank) override {
    const int tag = next_tag();
    auto* out = static_cast<unsigned char*>(recv);
    if (out + static_cast<size_t>(rank_) * bytes_per_rank != send && bytes_per_rank)
      std::memcpy(out + static_cast<size_t>(rank_) * bytes_per_rank, send, bytes_per_rank);
    std::vector<Pending> pending;
    for (int peer = 0; peer < size_; ++peer) {
      if (peer == rank_) continue;
      pending.push_back(irecv(out + static_cast<size_t>(peer) * bytes_per_rank, bytes_per_rank, peer, tag));
      pending.push_back(isend(out + static_cast<size_t>(rank_) * bytes_per_rank, bytes_per_rank, peer, tag));
    }
    complete("all_gather", pending);
  }

  void all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) override {
    const size_t bytes = count * dtype_size(dtype);
    std::vector<unsigned char> all(bytes * static_cast<size_t>(size_));
    if (bytes) std::memcpy(all.data() + static_cast<size_t>(rank_) * bytes, send, bytes);
    all_gather(all.data() + static_cast<size_t>(rank_) * bytes, all.data(), bytes);
    detail::reduce_gathered(recv, all.data(), count, size_, dtype, op);
  }

  void broadcast(void* buffer, size_t bytes, int root) override {
    UNS_CHECK(root >= 0 && root < size_, "broadcast: root {} of {}", root, size_);
    const int tag = next_tag();
    std::vector<Pending> pending;
    if (rank_ == root) {
      for (int peer = 0; peer < size_; ++peer)
        if (peer != root) pending.push_back(isend(buffer, bytes, peer, tag));
    } else {
      pending.push_back(irecv(buffer, bytes, root, tag));
    }
    complete("broadcast", pending);
  }

  void barrier() override {
    std::vector<unsigned char> token(static_cast<size_t>(size_));
    all_gather(token.data() + rank_, token.data(), 1);
  }

  void send(const void* buffer, size_t bytes, int peer) override {
    UNS_CHECK(peer >= 0 && peer < size_ && peer != rank_, "send: bad peer {}", peer);
    std::vector<Pending> pending{isend(buffer, bytes, peer, kPointToPointTag)};
    complete("send", pending);
  }

  void recv(void* buffer, size_t bytes, int peer) override {
    UNS_CHECK(peer >= 0 && peer < size_ && peer != rank_, "recv: bad peer {}", peer);
    std::vector<Pending> pending{irecv(buffer, bytes, peer, kPointToPointTag)};
    complete("recv", pending);
  }

 private:
  struct Pending {
    MPI_Request request;
    int peer;
  };

  int next_tag() {
    throw_if_broken();
    return kFirstCollectiveTag + static_cast<int>(sequence_++ % kCollectiveTags);
  }

  void throw_if_broken() const {
    if (broken_) fail(ErrorKind::kComm, "communicator is broken: " + broken_reason_);
  }

  Pending isend(const void* data, size_t bytes, int peer, int tag) {
    UNS_CHECK(bytes <= static_cast<size_t>(INT_MAX), "mpi: {} bytes in one message (MPI counts are int)", bytes);
    Pending p{MPI_REQUEST_NULL, peer};
    check(MPI_Isend(data, static_cast<int>(bytes), MPI_BYTE, peer, tag, comm_, &p.request), "MPI_Isend", peer);
    return p;
  }

  Pending irecv(void* data, size_t bytes, int peer, int tag) {
    UNS_CHECK(bytes <= static_cast<size_t>(INT_MAX), "mpi: {} bytes in one message (MPI counts are int)", bytes);
    Pending p{MPI_REQUEST_NULL, peer};
    check(MPI_Irecv(data, static_cast<int>(bytes), MPI_BYTE, peer, tag, comm_, &p.request), "MPI_Irecv", peer);
    return p;
  }

  void check(int code, const char* what, int peer) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    broken_ = true;
    broken_reason_ = fmt::format("{} with rank {} failed: {}", what, peer, std::string(text, static_cast<size_t>(length)));
    fail(ErrorKind::kComm, broken_reason_);
  }

  // Polls every request until all complete or the timeout passes; then names the peers
  // whose messages never completed.
  void complete(const char* op, std::vector<Pending>& pending) {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    auto nap = std::chrono::microseconds(1);
    for (;;) {
      bool all_done = true;
      for (Pending& p : pending) {
        if (p.request == MPI_REQUEST_NULL) continue;
        int done = 0;
        check(MPI_Test(&p.request, &done, MPI_STATUS_IGNORE), op, p.peer);
        all_done = all_done && done;
      }
      if (all_done) return;
      if (std::chrono::steady_clock::now() > deadline) break;
      std::this_thread::sleep_for(nap);  // back off: ranks may share few cores
      nap = std::min(nap * 2, std::chrono::microseconds(500));
    }
    std::vector<int> missing;
    for (Pending& p : pending) {
      if (p.request == MPI_REQUEST_NULL) continue;
      missing.push_back(p.peer);
      MPI_Cancel(&p.request);
    }
    std::sort(missing.begin(), missing.end());
    missing.erase(std::unique(missing.begin(), missing.end()), missing.end());
    std::string ranks;
    for (int peer : missing) ranks += (ranks.empty() ? "" : ", ") + std::to_string(peer);
    broken_ = true;
    broken_reason_ = fmt::format("{} timed out after {} ms waiting for rank {}", op, timeout_.count(), ranks);
    fail(ErrorKind::kTimeout, broken_reason_);
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  uint64_t sequence_ = 0;
  bool broken_ = false;
  std::string broken_reason_;
};

}  // namespace

MpiSession::MpiSession(int* argc, char*** argv) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised) {
    MPI_Init(argc, argv);
    owns_ = true;
  }
}

MpiSession::~MpiSession() {
  int finalised = 0;
  MPI_Finalized(&finalised);
  if (owns_ && !finalised) MPI_Finalize();
}

bool MpiSession::launched_by_mpirun() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr ||
         std::getenv("PMIX_RANK") != nullptr;
}

std::unique_ptr<Communicator> make_mpi_communicator() { return std::make_unique<MpiCommunicator>(); }

}  // namespace unshackle
