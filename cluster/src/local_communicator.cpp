// P ranks in one process, one thread each. Collectives meet at a rendezvous: every rank posts
// its send pointer under a per-rank sequence number, waits until all P have posted, copies
// what it needs, then waits until all P have copied (so no sender's buffer is reused early).
// Reductions gather all inputs and reduce in rank order, so every rank gets the same bits.
#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>

#include "unshackle/cluster/communicator.h"
#include "rank_order_reduce.h"
#include "unshackle/common/check.h"

namespace unshackle {
namespace {

struct LocalGroup {
  explicit LocalGroup(int ranks)
      : size(ranks), posted(static_cast<size_t>(ranks), 0), copied(static_cast<size_t>(ranks), 0),
        send(static_cast<size_t>(ranks), nullptr) {}

  const int size;
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<uint64_t> posted;  // last collective sequence number each rank posted
  std::vector<uint64_t> copied;  // last collective sequence number each rank finished copying
  std::vector<const void*> send;
  bool broken = false;
  std::string broken_reason;
  std::map<std::pair<int, int>, std::deque<std::vector<unsigned char>>> mailboxes;  // (from, to)
};


class LocalCommunicator final : public Communicator {
 public:
  LocalCommunicator(std::shared_ptr<LocalGroup> group, int rank) : group_(std::move(group)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size; }
  std::string name() const override { return "local"; }
  MemorySpace memory_space() const override { return MemorySpace::kHost; }

  void all_gather(const void* send, void* recv, size_t bytes_per_rank) override {
    rendezvous("all_gather", send, [&](const std::vector<const void*>& sends) {
      for (int r = 0; r < size(); ++r)
        if (bytes_per_rank && static_cast<unsigned char*>(recv) + r * bytes_per_rank != sends[static_cast<size_t>(r)])
          std::memcpy(static_cast<unsigned char*>(recv) + r * bytes_per_rank, sends[static_cast<size_t>(r)], bytes_per_rank);
    });
  }

  void all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) override {
    const size_t bytes = count * dtype_size(dtype);
    std::vector<unsigned char> all(bytes * static_cast<size_t>(size()));
    const std::vector<unsigned char> mine(static_cast<const unsigned char*>(send), static_cast<const unsigned char*>(send) + bytes);
    all_gather(mine.data(), all.data(), bytes);
    detail::reduce_gathered(recv, all.data(), count, size(), dtype, op);
  }

  void broadcast(void* buffer, size_t bytes, int root) override {
    UNS_CHECK(root >= 0 && root < size(), "broadcast: root {} of {}", root, size());
    rendezvous("broadcast", buffer, [&](const std::vector<const void*>& sends) {
      if (rank_ != root && bytes) std::memcpy(buffer, sends[static_cast<size_t>(root)], bytes);
    });
  }

  void barrier() override {
    rendezvous("barrier", nullptr, [](const std::vector<const void*>&) {});
  }

  void send(const void* buffer, size_t bytes, int peer) override {
    UNS_CHECK(peer >= 0 && peer < size() && peer != rank_, "send: bad peer {}", peer);
    std::lock_guard lock(group_->mutex);
    throw_if_broken();
    const auto* begin = static_cast<const unsigned char*>(buffer);
    group_->mailboxes[{rank_, peer}].emplace_back(begin, begin + bytes);
    group_->changed.notify_all();
  }

  void recv(void* buffer, size_t bytes, int peer) override {
    UNS_CHECK(peer >= 0 && peer < size() && peer != rank_, "recv: bad peer {}", peer);
    std::unique_lock lock(group_->mutex);
    auto& box = group_->mailboxes[{peer, rank_}];
    wait(lock, [&] { return !box.empty(); }, [&] { return fmt::format("recv on rank {} timed out after {} ms waiting for rank {}", rank_, timeout_.count(), peer); });
    UNS_CHECK_KIND(kComm, box.front().size() == bytes, "recv: rank {} sent {} bytes, expected {}", peer,
                   box.front().size(), bytes);
    if (bytes) std::memcpy(buffer, box.front().data(), bytes);
    box.pop_front();
  }

 private:
  void throw_if_broken() const {
    if (group_->broken) fail(ErrorKind::kComm, "communicator is broken: " + group_->broken_reason);
  }

  // Waits for `ready` under the group lock; on timeout marks the group broken and throws.
  // A rank already waiting when another rank's wait expires throws the same timeout (it
  // waited as long, for the same missing rank); later calls find the group broken (kComm).
  template <typename Ready, typename Describe>
  void wait(std::unique_lock<std::mutex>& lock, Ready ready, Describe describe) {
    throw_if_broken();
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    while (!ready()) {
      const bool expired = group_->changed.wait_until(lock, deadline) == std::cv_status::timeout;
      if (group_->broken) fail(ErrorKind::kTimeout, group_->broken_reason);
      if (expired && !ready()) {
        group_->broken = true;
        group_->broken_reason = describe();
        group_->changed.notify_all();
        fail(ErrorKind::kTimeout, group_->broken_reason);
      }
    }
  }

  std::string missing(const std::vector<uint64_t>& marks, uint64_t sequence) const {
    std::string ranks;
    for (int r = 0; r < size(); ++r)
      if (marks[static_cast<size_t>(r)] < sequence) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
    return ranks;
  }

  std::string timed_out(const char* op, const char* what, const std::string& ranks) const {
    return fmt::format("{} timed out after {} ms waiting for rank {}{}", op, timeout_.count(), ranks, what);
  }

  void rendezvous(const char* op, const void* send, const std::function<void(const std::vector<const void*>&)>& copy) {
    const uint64_t sequence = ++sequence_;
    std::unique_lock lock(group_->mutex);
    throw_if_broken();
    group_->send[static_cast<size_t>(rank_)] = send;
    group_->posted[static_cast<size_t>(rank_)] = sequence;
    group_->changed.notify_all();
    const auto all_at_least = [&](const std::vector<uint64_t>& marks) {
      return std::all_of(marks.begin(), marks.end(), [&](uint64_t m) { return m >= sequence; });
    };
    wait(lock, [&] { return all_at_least(group_->posted); },
         [&] { return timed_out(op, "", missing(group_->posted, sequence)); });
    const std::vector<const void*> sends = group_->send;
    lock.unlock();
    copy(sends);  // senders stay parked below until every rank has copied
    lock.lock();
    group_->copied[static_cast<size_t>(rank_)] = sequence;
    group_->changed.notify_all();
    wait(lock, [&] { return all_at_least(group_->copied); },
         [&] { return timed_out(op, " to finish", missing(group_->copied, sequence)); });
  }

  std::shared_ptr<LocalGroup> group_;
  int rank_;
  uint64_t sequence_ = 0;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_local_communicators(int ranks) {
  UNS_CHECK(ranks > 0, "make_local_communicators: ranks = {}", ranks);
  auto group = std::make_shared<LocalGroup>(ranks);
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < ranks; ++r) out.push_back(std::make_unique<LocalCommunicator>(group, r));
  return out;
}

}  // namespace unshackle
