#include "unshackle/service/worker_service.h"

#include <fmt/format.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <thread>

#include "unshackle/service/engine_ops.h"
#include "unshackle/service/wire.h"

namespace unshackle {

namespace net = boost::asio;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

void log_line(const std::string& line) { std::fprintf(stderr, "unshackle-worker: %s\n", line.c_str()); }

// Rank 0's message to every rank, or a rank's wait for rank 0's. Throws on a broken group.
json broadcast_json(Communicator& comm, const json* message) {
  std::string text = message ? message->dump() : std::string();
  uint64_t size = text.size();
  comm.broadcast(&size, sizeof size, 0);
  text.resize(size);
  if (size) comm.broadcast(text.data(), size, 0);
  return json::parse(text);
}

// Every rank's usage, gathered on every rank.
json gather_usage(Engine& engine, Communicator* comm) {
  const EngineUsage u = engine.usage();
  const int64_t mine[3] = {u.kv_bytes, u.kv_tokens, u.contexts};
  const int ranks = comm ? comm->size() : 1;
  std::vector<int64_t> all(3 * static_cast<size_t>(ranks));
  if (comm && ranks > 1) comm->all_gather(mine, all.data(), sizeof mine);
  else std::copy(mine, mine + 3, all.begin());
  json out = json::array();
  for (int r = 0; r < ranks; ++r) {
    const size_t o = 3 * static_cast<size_t>(r);
    out.push_back({{"rank", r}, {"kv_bytes", all[o]}, {"kv_tokens", all[o + 1]}, {"contexts", all[o + 2]}});
  }
  return out;
}

bool breaks_group(const Error& e) { return e.kind() == ErrorKind::kComm || e.kind() == ErrorKind::kTimeout; }

int follow(Engine& engine, Communicator& comm) {
  wire::EngineOps ops(engine);
  for (;;) {
    json message;
    try {
      message = broadcast_json(comm, nullptr);
    } catch (const std::exception& e) {
      log_line(fmt::format("rank {}: lost rank 0: {}", comm.rank(), wire::plain_message(e)));
      return kWorkerExitGroupBroken;
    }
    const std::string op = message.value("op", "");
    if (op == "stop") return message.value("code", kWorkerExitClosed);
    try {
      if (op == "usage") gather_usage(engine, &comm);
      else ops.execute(op, message.value("args", json::object()));
    } catch (const Error& e) {
      // Rank 0 hits the same error in lockstep and reports it; only a broken group ends us.
      if (breaks_group(e)) {
        log_line(fmt::format("rank {}: group broken: {}", comm.rank(), wire::plain_message(e)));
        return kWorkerExitGroupBroken;
      }
    } catch (const std::exception&) {
    }
  }
}

class Leader {
 public:
  Leader(Engine& engine, Communicator* comm, const WorkerOptions& options)
      : engine_(engine), comm_(comm), options_(options), ops_(engine), heartbeat_timer_(ioc_) {}

  int run() {
    auto guard = net::make_work_guard(ioc_);
    std::thread io([this] { ioc_.run(); });
    int code = kWorkerExitCoordinator;
    try {
      code = serve();
    } catch (const std::exception& e) {
      log_line(fmt::format("error: {}", wire::plain_message(e)));
    }
    stop_ranks(code);
    if (link_) link_->close_after_flush("worker exiting");
    // Give the last frame (a result, "fatal") a moment to leave, then stop the I/O thread.
    {
      std::unique_lock lock(mutex_);
      cv_.wait_for(lock, std::chrono::seconds(2), [this] { return closed_; });
    }
    guard.reset();
    ioc_.stop();
    io.join();
    return code;
  }

 private:
  int serve() {
    if (!connect()) return kWorkerExitCoordinator;
    const ModelInfo info = engine_.info();
    link_->send(json{{"type", "hello"},
                     {"protocol", wire::kProtocolVersion},
                     {"group", options_.group},
                     {"ranks", comm_ ? comm_->size() : 1},
                     {"model", wire::model_info_to_json(info)}});
    last_heard_ = Clock::now();
    net::post(ioc_, [this] { schedule_heartbeat(); });
    for (;;) {
      json call;
      bool have_call = false;
      {
        std::unique_lock lock(mutex_);
        cv_.wait_for(lock, options_.heartbeat, [this] { return closed_ || !calls_.empty() || stop_requested(); });
        if (stop_requested()) {
          log_line("stop requested (signal): leaving the coordinator");
          return kWorkerExitClosed;
        }
        if (closed_) {
          log_line("coordinator link closed: " + close_reason_);
          return rejected_ ? kWorkerExitCoordinator : (lost_ ? kWorkerExitCoordinator : kWorkerExitClosed);
        }
        if (!calls_.empty()) {
          call = std::move(calls_.front());
          calls_.pop_front();
          have_call = true;
        }
      }
      // Usage is polled when idle and, while calls keep coming, at least once a heartbeat,
      // so the per-rank KV gauges follow a long job.
      if (!have_call || Clock::now() - last_usage_ >= options_.heartbeat) {
        last_usage_ = Clock::now();
        try {
          if (comm_ && comm_->size() > 1) broadcast_json(*comm_, &kUsagePoll);
          json usage = gather_usage(engine_, comm_);
          std::lock_guard lock(mutex_);
          usage_ = std::move(usage);
        } catch (const std::exception& e) {
          return group_broken(wire::plain_message(e));
        }
        if (!have_call) continue;
      }
      const json id = call.value("id", json());
      const std::string op = call.value("op", "");
      const json args = call.value("args", json::object());
      try {
        if (comm_ && comm_->size() > 1) broadcast_json(*comm_, &call);
      } catch (const std::exception& e) {
        return group_broken(wire::plain_message(e));
      }
      try {
        json result = ops_.execute(op, args);
        link_->send(json{{"type", "result"}, {"id", id}, {"ok", true}, {"result", std::move(result)}});
      } catch (const Error& e) {
        link_->send(json{{"type", "result"}, {"id", id}, {"ok", false}, {"error", wire::error_to_json(e.kind(), wire::plain_message(e))}});
        if (breaks_group(e)) return group_broken(wire::plain_message(e));
      } catch (const std::exception& e) {
        link_->send(json{{"type", "result"}, {"id", id}, {"ok", false}, {"error", wire::error_to_json(ErrorKind::kInternal, e.what())}});
      }
    }
  }

  bool stop_requested() const { return options_.stop != nullptr && options_.stop->load(); }

  int group_broken(const std::string& why) {
    log_line("group broken: " + why);
    link_->send(json{{"type", "fatal"}, {"message", why}});
    return kWorkerExitGroupBroken;
  }

  void stop_ranks(int code) {
    if (!comm_ || comm_->size() <= 1 || code == kWorkerExitGroupBroken) return;
    try {
      const json stop{{"op", "stop"}, {"code", code}};
      broadcast_json(*comm_, &stop);
    } catch (const std::exception& e) {
      log_line(fmt::format("could not stop the other ranks: {}", wire::plain_message(e)));
    }
  }

  bool connect() {
    const auto deadline = Clock::now() + options_.connect_timeout;
    std::string last_error;
    for (;;) {
      try {
        net::ip::tcp::resolver resolver(ioc_);
        net::ip::tcp::socket socket(net::make_strand(ioc_));
        net::connect(socket, resolver.resolve(options_.coordinator_host, std::to_string(options_.coordinator_port)));
        link_ = std::make_shared<wire::Link>(std::move(socket));
        break;
      } catch (const std::exception& e) {
        last_error = e.what();
      }
      if (stop_requested()) return false;
      if (Clock::now() >= deadline) {
        log_line(fmt::format("cannot reach the coordinator at {}:{}: {}", options_.coordinator_host,
                             options_.coordinator_port, last_error));
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    link_->start([this](json message) { on_message(std::move(message)); },
                 [this](const std::string& why) {
                   std::lock_guard lock(mutex_);
                   closed_ = true;
                   close_reason_ = why;
                   cv_.notify_all();
                 });
    log_line(fmt::format("connected to the coordinator at {} as group '{}' ({} rank(s))", link_->peer(), options_.group,
                         comm_ ? comm_->size() : 1));
    return true;
  }

  // On the link's strand.
  void on_message(json message) {
    last_heard_ = Clock::now();
    const std::string type = message["type"].get<std::string>();
    if (type == "call") {
      std::lock_guard lock(mutex_);
      calls_.push_back(std::move(message));
      cv_.notify_all();
    } else if (type == "reject") {
      rejected_ = true;
      log_line("rejected by the coordinator: " + message.value("message", std::string()));
      link_->close("rejected");
    } else if (type == "welcome" || type == "heartbeat") {
      // nothing beyond last_heard_
    } else {
      link_->close("unexpected message type '" + type + "'");
    }
  }

  void schedule_heartbeat() {
    heartbeat_timer_.expires_after(options_.heartbeat);
    heartbeat_timer_.async_wait([this](boost::system::error_code ec) {
      if (ec) return;
      {
        std::lock_guard lock(mutex_);
        if (closed_) return;
      }
      const auto silent = Clock::now() - last_heard_.load();
      if (silent > options_.coordinator_timeout) {
        lost_ = true;
        link_->close(fmt::format("coordinator silent for {} ms",
                                 std::chrono::duration_cast<std::chrono::milliseconds>(silent).count()));
        return;
      }
      json ranks;
      {
        std::lock_guard lock(mutex_);
        ranks = usage_;
      }
      link_->send(json{{"type", "heartbeat"}, {"ranks", ranks}});
      schedule_heartbeat();
    });
  }

  inline static const json kUsagePoll{{"op", "usage"}};

  Engine& engine_;
  Communicator* comm_;
  WorkerOptions options_;
  wire::EngineOps ops_;
  net::io_context ioc_;
  net::steady_timer heartbeat_timer_;
  std::shared_ptr<wire::Link> link_;
  std::atomic<Clock::time_point> last_heard_{Clock::now()};
  std::atomic<bool> rejected_{false}, lost_{false};
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<json> calls_;
  json usage_ = json::array();
  Clock::time_point last_usage_ = Clock::now();
  bool closed_ = false;
  std::string close_reason_;
};

}  // namespace

int run_worker_rank(Engine& engine, Communicator* comm, const WorkerOptions& options) {
  if (comm && comm->rank() != 0) return follow(engine, *comm);
  Leader leader(engine, comm, options);
  return leader.run();
}

}  // namespace unshackle
