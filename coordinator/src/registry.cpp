#include "unshackle/coordinator/registry.h"

#include <fmt/format.h>

#include <cstdio>

#include "unshackle/service/engine_ops.h"

namespace unshackle::coord {

namespace net = boost::asio;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {
void log_line(const std::string& line) { std::fprintf(stderr, "unshackle-coordinator: %s\n", line.c_str()); }
double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }
}  // namespace

// ---- WorkerGroup ----

WorkerGroup::WorkerGroup(std::string id, int ranks, ModelInfo model, std::shared_ptr<wire::Link> link, Metrics& metrics)
    : id_(std::move(id)), ranks_(ranks), model_(std::move(model)), link_(std::move(link)), metrics_(metrics),
      last_heard_(Clock::now()) {}

std::string WorkerGroup::down_reason() const {
  std::lock_guard lock(mutex_);
  return down_reason_;
}

json WorkerGroup::call(const std::string& op, const json& args, std::chrono::milliseconds timeout) {
  std::future<json> future;
  uint64_t id = 0;
  {
    std::lock_guard lock(mutex_);
    if (!up_) throw Error(ErrorKind::kComm, fmt::format("worker group '{}' lost: {}", id_, down_reason_));
    id = next_call_++;
    future = pending_[id].get_future();
  }
  link_->send(json{{"type", "call"}, {"id", id}, {"op", op}, {"args", args}});
  if (future.wait_for(timeout) != std::future_status::ready) {
    const std::string reason = fmt::format("'{}' did not return within {:.1f} s", op, seconds(timeout));
    mark_down(reason, "step_timeout");
    throw Error(ErrorKind::kTimeout, fmt::format("worker group '{}' lost: {}", id_, reason));
  }
  json message = future.get();  // throws the kComm error of mark_down
  if (!message.value("ok", false)) {
    try {
      wire::throw_remote_error(message.value("error", json()));
    } catch (const Error& e) {
      // A collective failed or timed out in this call: the group is broken (its "fatal" follows
      // on the link). Down now, so that every job of the group fails as worker_group_lost,
      // this one too, instead of racing the fatal message.
      if (e.kind() == ErrorKind::kComm || e.kind() == ErrorKind::kTimeout)
        mark_down("the group reported: " + wire::plain_message(e), "collective_failed");
      throw;
    }
  }
  return message.value("result", json::object());
}

void WorkerGroup::on_message(const json& message) {
  last_heard_ = Clock::now();
  const std::string type = message["type"].get<std::string>();
  if (type == "result") {
    if (!message.contains("id") || !message["id"].is_number_unsigned()) {
      mark_down("result without an id");
      return;
    }
    std::lock_guard lock(mutex_);
    auto it = pending_.find(message["id"].get<uint64_t>());
    if (it == pending_.end()) return;  // a call that already timed out
    it->second.set_value(message);
    pending_.erase(it);
  } else if (type == "heartbeat") {
    if (message.contains("ranks") && message["ranks"].is_array()) {
      for (const json& r : message["ranks"]) {
        if (!r.is_object()) continue;
        metrics_.set_rank_kv(id_, r.value("rank", 0), r.value("kv_bytes", 0.0), r.value("kv_tokens", 0.0));
      }
    }
  } else if (type == "fatal") {
    mark_down("the group reported: " + message.value("message", std::string("fatal error")), "collective_failed");
  } else {
    mark_down(fmt::format("unexpected message type '{}'", type));
  }
}

void WorkerGroup::mark_down(const std::string& reason, const char* cause) {
  std::map<uint64_t, std::promise<json>> pending;
  {
    std::lock_guard lock(mutex_);
    if (!up_) return;
    up_ = false;
    down_reason_ = reason;
    pending.swap(pending_);
  }
  log_line(fmt::format("worker group '{}' ({}) is down: {}", id_, link_->peer(), reason));
  metrics_.set_group_up(id_, false);
  metrics_.group_down(cause);
  for (auto& [id, promise] : pending)
    promise.set_exception(std::make_exception_ptr(Error(ErrorKind::kComm, fmt::format("worker group '{}' lost: {}", id_, reason))));
  link_->close(reason);
}

// ---- Registry ----

Registry::Registry(net::io_context& ioc, RegistryOptions options, Metrics& metrics)
    : ioc_(ioc), options_(options), metrics_(metrics), acceptor_(ioc), watchdog_(ioc) {}

Registry::~Registry() = default;

uint16_t Registry::listen(const std::string& address, uint16_t port) {
  const net::ip::tcp::endpoint endpoint(net::ip::make_address(address), port);
  acceptor_.open(endpoint.protocol());
  acceptor_.set_option(net::socket_base::reuse_address(true));
  acceptor_.bind(endpoint);
  acceptor_.listen(net::socket_base::max_listen_connections);
  do_accept();
  start_watchdog();
  return acceptor_.local_endpoint().port();
}

void Registry::stop() {
  net::post(ioc_, [this] {
    stopped_ = true;
    boost::system::error_code ec;
    acceptor_.close(ec);
    watchdog_.cancel();
    for (auto& group : all_groups()) group->mark_down("coordinator shutting down", "shutdown");
  });
}

void Registry::do_accept() {
  acceptor_.async_accept(net::make_strand(ioc_), [this](boost::system::error_code ec, net::ip::tcp::socket socket) {
    if (stopped_ || !acceptor_.is_open()) return;
    if (!ec) greet(std::make_shared<wire::Link>(std::move(socket)));
    do_accept();
  });
}

void Registry::greet(std::shared_ptr<wire::Link> link) {
  // The first message must be a hello; the slot then holds the group for the link's callbacks.
  auto slot = std::make_shared<std::shared_ptr<WorkerGroup>>();
  auto hello_timer = std::make_shared<net::steady_timer>(ioc_, options_.heartbeat_timeout);
  std::weak_ptr<wire::Link> weak = link;
  hello_timer->async_wait([weak, slot](boost::system::error_code ec) {
    if (ec || *slot) return;
    if (auto l = weak.lock()) l->close("no hello in time");
  });
  link->start(
      [this, weak, slot, hello_timer](json message) {
        auto l = weak.lock();
        if (!l) return;
        if (*slot) {
          (*slot)->on_message(message);
          return;
        }
        hello_timer->cancel();
        register_group(l, message, slot);
      },
      [slot](const std::string& why) {
        if (*slot) (*slot)->mark_down(why, "link_closed");
      });
}

void Registry::register_group(std::shared_ptr<wire::Link> link, const json& hello,
                              std::shared_ptr<std::shared_ptr<WorkerGroup>> slot) {
  auto reject = [&](const std::string& why) {
    log_line(fmt::format("rejected worker from {}: {}", link->peer(), why));
    link->send(json{{"type", "reject"}, {"message", why}});
    link->close_after_flush("rejected: " + why);
  };
  if (hello["type"] != "hello") return reject("the first message must be a hello");
  if (hello.value("protocol", 0) != wire::kProtocolVersion)
    return reject(fmt::format("protocol {} is not supported (this coordinator speaks {})", hello.value("protocol", json()).dump(),
                              wire::kProtocolVersion));
  const json group_json = hello.value("group", json());
  const json ranks_json = hello.value("ranks", json());
  if (!group_json.is_string() || group_json.get<std::string>().empty() || group_json.get<std::string>().size() > 64)
    return reject("hello needs a group id (1 to 64 characters)");
  if (!ranks_json.is_number_integer() || ranks_json.get<int>() < 1) return reject("hello needs ranks >= 1");
  ModelInfo model;
  try {
    model = wire::model_info_from_json(hello.value("model", json()));
  } catch (const std::exception& e) {
    return reject(wire::plain_message(e));
  }
  const std::string id = group_json.get<std::string>();
  std::shared_ptr<WorkerGroup> group;
  {
    std::lock_guard lock(mutex_);
    auto it = groups_.find(id);
    if (it != groups_.end() && it->second->up()) {
      reject(fmt::format("group '{}' is already registered (from {})", id, it->second->peer()));
      return;
    }
    group = std::make_shared<WorkerGroup>(id, ranks_json.get<int>(), model, link, metrics_);
    groups_[id] = group;
  }
  *slot = group;
  link->send(json{{"type", "welcome"}, {"heartbeat_ms", options_.heartbeat.count()}});
  metrics_.set_group_up(id, true);
  log_line(fmt::format("worker group '{}' registered from {}: {} rank(s), model '{}', {} tokens per context, {} KV tokens",
                       id, link->peer(), group->ranks(), model.name, model.max_context_tokens, model.kv_capacity_tokens));
  if (on_up_) on_up_(group);
}

void Registry::start_watchdog() {
  const auto period = std::max(std::chrono::milliseconds(20), std::min(options_.heartbeat, options_.heartbeat_timeout / 4));
  watchdog_.expires_after(period);
  watchdog_.async_wait([this, period](boost::system::error_code ec) {
    if (ec || stopped_) return;
    const auto now = Clock::now();
    for (auto& group : groups()) {
      const auto silent = now - group->last_heard();
      if (silent > options_.heartbeat_timeout) {
        group->mark_down(fmt::format("no heartbeat for {:.1f} s", seconds(silent)), "heartbeat_lost");
      }
    }
    // Our heartbeat to every group (the worker's coordinator timeout watches it).
    heartbeat_tick_ += period;
    if (heartbeat_tick_ >= options_.heartbeat) {
      heartbeat_tick_ = {};
      for (auto& group : groups()) group->send_heartbeat();
    }
    start_watchdog();
  });
}

std::vector<std::shared_ptr<WorkerGroup>> Registry::groups() const {
  std::lock_guard lock(mutex_);
  std::vector<std::shared_ptr<WorkerGroup>> out;
  for (auto& [id, group] : groups_)
    if (group->up()) out.push_back(group);
  return out;
}

std::vector<std::shared_ptr<WorkerGroup>> Registry::all_groups() const {
  std::lock_guard lock(mutex_);
  std::vector<std::shared_ptr<WorkerGroup>> out;
  for (auto& [id, group] : groups_) out.push_back(group);
  return out;
}

bool Registry::any_ready() const {
  for (auto& group : groups())
    if (group->ready()) return true;
  return false;
}

}  // namespace unshackle::coord
