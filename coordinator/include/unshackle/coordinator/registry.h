// The registry of worker groups: rank 0 of each group connects (wire protocol, see
// worker/service/.../wire.h), says hello, heartbeats, and answers calls. A group that is
// silent past the heartbeat timeout, closes its link or reports "fatal" is marked down: its
// pending calls fail with Error(kComm) naming the group and the reason.
#pragma once

#include <boost/asio.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "unshackle/coordinator/metrics.h"
#include "unshackle/service/wire.h"
#include "unshackle/worker/engine.h"

namespace unshackle::coord {

struct RegistryOptions {
  std::chrono::milliseconds heartbeat{1000};          // our heartbeat to the workers (and theirs, asked in welcome)
  std::chrono::milliseconds heartbeat_timeout{5000};  // silence that marks a group down
};

class WorkerGroup {
 public:
  WorkerGroup(std::string id, int ranks, ModelInfo model, std::shared_ptr<wire::Link> link, Metrics& metrics);

  const std::string& id() const { return id_; }
  int ranks() const { return ranks_; }
  const ModelInfo& model() const { return model_; }
  std::string peer() const { return link_->peer(); }

  bool up() const { return up_.load(); }
  bool ready() const { return up_.load() && ready_.load(); }  // up and a health step passed
  void set_ready(bool ready) { ready_ = ready; }
  std::string down_reason() const;

  // One call on the group; blocks until its result. Throws Error(kComm) when the group is or
  // goes down, Error(kTimeout) past `timeout` (the group is then marked down: a step that does
  // not return means a hung group), or the worker's error (its kind and message).
  nlohmann::json call(const std::string& op, const nlohmann::json& args, std::chrono::milliseconds timeout);

  // From the registry (link strand).
  void on_message(const nlohmann::json& message);
  void mark_down(const std::string& reason, const char* cause = "protocol");  // cause: see Metrics::group_down
  std::chrono::steady_clock::time_point last_heard() const { return last_heard_.load(); }
  void send_heartbeat() { link_->send(nlohmann::json{{"type", "heartbeat"}}); }

 private:
  const std::string id_;
  const int ranks_;
  const ModelInfo model_;
  std::shared_ptr<wire::Link> link_;
  Metrics& metrics_;
  std::atomic<bool> up_{true}, ready_{false};
  std::atomic<std::chrono::steady_clock::time_point> last_heard_;
  mutable std::mutex mutex_;
  std::string down_reason_;
  uint64_t next_call_ = 1;
  std::map<uint64_t, std::promise<nlohmann::json>> pending_;
};

class Registry {
 public:
  using GroupCallback = std::function<void(std::shared_ptr<WorkerGroup>)>;

  Registry(boost::asio::io_context& ioc, RegistryOptions options, Metrics& metrics);
  ~Registry();
  // Listens for workers on `port` (0: any free port); returns the bound port.
  uint16_t listen(const std::string& address, uint16_t port);
  void stop();
  // Called (on the I/O thread) when a group has registered. (That a group went down is seen
  // by whoever uses it: up() turns false and its calls throw.)
  void on_group_up(GroupCallback callback) { on_up_ = std::move(callback); }

  std::vector<std::shared_ptr<WorkerGroup>> groups() const;  // every group that is up
  std::vector<std::shared_ptr<WorkerGroup>> all_groups() const;  // also the ones down (for status)
  bool any_ready() const;

 private:
  void do_accept();
  void start_watchdog();
  void greet(std::shared_ptr<wire::Link> link);
  void register_group(std::shared_ptr<wire::Link> link, const nlohmann::json& hello,
                      std::shared_ptr<std::shared_ptr<WorkerGroup>> slot);

  boost::asio::io_context& ioc_;
  RegistryOptions options_;
  Metrics& metrics_;
  boost::asio::ip::tcp::acceptor acceptor_;
  boost::asio::steady_timer watchdog_;
  GroupCallback on_up_;
  mutable std::mutex mutex_;
  std::map<std::string, std::shared_ptr<WorkerGroup>> groups_;
  bool stopped_ = false;
  std::chrono::milliseconds heartbeat_tick_{0};
};

}  // namespace unshackle::coord
