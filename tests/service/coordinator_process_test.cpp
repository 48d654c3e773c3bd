// The real unshackle-coordinator process on loopback, driven by a real HTTP client (Beast)
// and by a worker peer that speaks the wire protocol over TCP (registration, heartbeats,
// results). No model runs here: the peer answers the health step and holds every other call,
// which is what registration, readiness, admission, 429 and heartbeat loss need.
#include <gtest/gtest.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "http_client.h"
#include "unshackle/service/wire.h"

namespace unshackle {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using nlohmann::json;
using namespace std::chrono_literals;

const std::string kKey = "sk-process-test";

// ---- the coordinator process ----

class Coordinator {
 public:
  explicit Coordinator(std::vector<std::string> extra) {
    dir_ = std::filesystem::temp_directory_path() / ("uns_coord_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    std::filesystem::create_directories(dir_);
    const std::string port_file = (dir_ / "ports.json").string();
    std::vector<std::string> args = {UNS_COORDINATOR_BIN, "--port", "0", "--worker-port", "0", "--port-file", port_file,
                                     "--api-key", kKey, "--heartbeat-ms", "100", "--heartbeat-timeout-ms", "800"};
    args.insert(args.end(), extra.begin(), extra.end());
    const std::string log = (dir_ / "coordinator.log").string();
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // no orphan when the test dies
      FILE* f = std::freopen(log.c_str(), "w", stderr);
      (void)f;
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      std::_Exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + 20s;
    while (std::chrono::steady_clock::now() < deadline) {
      std::ifstream in(port_file);
      json ports = json::parse(in, nullptr, false);
      if (!ports.is_discarded() && ports.contains("http")) {
        http_port = ports["http"].get<uint16_t>();
        worker_port = ports["worker"].get<uint16_t>();
        return;
      }
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(20ms);
    }
    ADD_FAILURE() << "coordinator did not start; log:\n" << log_text();
  }
  ~Coordinator() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int status = 0;
      for (int i = 0; i < 100 && ::waitpid(pid_, &status, WNOHANG) == 0; ++i) std::this_thread::sleep_for(50ms);
      if (::waitpid(pid_, &status, WNOHANG) == 0) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
      }
    }
    if (!::testing::Test::HasFailure()) std::filesystem::remove_all(dir_);
    else std::fprintf(stderr, "coordinator log (%s):\n%s\n", dir_.c_str(), log_text().c_str());
  }
  std::string log_text() const {
    std::ifstream in(dir_ / "coordinator.log");
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  uint16_t http_port = 0, worker_port = 0;

 private:
  static inline int counter_ = 0;
  std::filesystem::path dir_;
  pid_t pid_ = -1;
};

// ---- a real HTTP client (http_client.h) ----

using live::HttpResult;

HttpResult request(uint16_t port, http::verb verb, const std::string& target, const std::string& body = "",
                   const std::string& key = kKey, const std::string& content_type = "application/json") {
  return live::http_request(port, verb, target, body, key, content_type, 30s);
}

HttpResult get(uint16_t port, const std::string& target, const std::string& key = kKey) {
  return request(port, http::verb::get, target, "", key);
}
HttpResult post(uint16_t port, const std::string& target, const json& body) {
  return request(port, http::verb::post, target, body.dump());
}

template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds timeout = 10s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(25ms);
  }
  return pred();
}

// ---- a worker group's rank 0, speaking the wire protocol ----

class Peer {
 public:
  Peer(uint16_t port, std::string group) : socket_(ioc_), group_(std::move(group)) {
    socket_.connect(net::ip::tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
  }
  ~Peer() { close(); }

  // Sends hello and returns the coordinator's first answer ("welcome" or "reject").
  json hello(int64_t max_context = 1000, int64_t capacity = 4000) {
    send(json{{"type", "hello"},
              {"protocol", wire::kProtocolVersion},
              {"group", group_},
              {"ranks", 2},
              {"model",
               {{"name", "test-model"}, {"max_context_tokens", max_context}, {"kv_capacity_tokens", capacity},
                {"num_heads", 4}, {"num_kv_heads", 2}, {"layers", 2}, {"vocab_size", 100}}}});
    json first = read_one();
    if (first.value("type", "") == "welcome") {
      reader_ = std::thread([this] { read_loop(); });
      heartbeat_ = std::thread([this] { heartbeat_loop(); });
    }
    return first;
  }
  void stop_heartbeats() { heartbeats_ = false; }
  void close() {
    stop_heartbeats();
    done_ = true;
    beast::error_code ec;
    socket_.shutdown(net::ip::tcp::socket::shutdown_both, ec);
    socket_.close(ec);
    if (reader_.joinable()) reader_.join();
    if (heartbeat_.joinable()) heartbeat_.join();
  }
  bool wait_for_call(const std::string& op, std::chrono::milliseconds timeout = 10s) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, timeout, [&] { return std::count(calls_.begin(), calls_.end(), op) > 0; });
  }
  int count(const std::string& op) {
    std::lock_guard lock(mutex_);
    return static_cast<int>(std::count(calls_.begin(), calls_.end(), op));
  }
  // Answers "health" with ok; every other call is held (never answered).
  std::function<std::optional<json>(const std::string&, const json&)> handler = [](const std::string& op, const json&) {
    return op == "health" ? std::optional<json>(json::object()) : std::nullopt;
  };

 private:
  void send(const json& message) {
    std::lock_guard lock(write_mutex_);
    beast::error_code ec;
    net::write(socket_, net::buffer(wire::encode_frame(message)), ec);
  }
  json read_one() {
    char buffer[4096];
    for (;;) {
      if (auto m = decoder_.next()) return *m;
      beast::error_code ec;
      const size_t n = socket_.read_some(net::buffer(buffer), ec);
      if (ec) return json{{"type", "closed"}};
      decoder_.feed(buffer, n);
    }
  }
  void read_loop() {
    while (!done_) {
      json m = read_one();
      const std::string type = m.value("type", "");
      if (type == "closed") return;
      if (type != "call") continue;
      const std::string op = m.value("op", "");
      {
        std::lock_guard lock(mutex_);
        calls_.push_back(op);
        cv_.notify_all();
      }
      if (auto result = handler(op, m["args"]))
        send(json{{"type", "result"}, {"id", m["id"]}, {"ok", true}, {"result", *result}});
    }
  }
  void heartbeat_loop() {
    while (!done_) {
      if (heartbeats_)
        send(json{{"type", "heartbeat"}, {"ranks", {{{"rank", 0}, {"kv_bytes", 4096}, {"kv_tokens", 16}, {"contexts", 1}},
                                                    {{"rank", 1}, {"kv_bytes", 2048}, {"kv_tokens", 8}, {"contexts", 1}}}}});
      std::this_thread::sleep_for(50ms);
    }
  }

  net::io_context ioc_;
  net::ip::tcp::socket socket_;
  std::string group_;
  wire::FrameDecoder decoder_;
  std::mutex mutex_, write_mutex_;
  std::condition_variable cv_;
  std::vector<std::string> calls_;
  std::atomic<bool> heartbeats_{true}, done_{false};
  std::thread reader_, heartbeat_;
};

bool metric_has(uint16_t port, const std::string& line) {
  return get(port, "/metrics").body.find(line) != std::string::npos;
}

// ---- tests ----

TEST(CoordinatorProcess, HealthAuthNotFoundAndNoGroup) {
  Coordinator c({});
  ASSERT_GT(c.http_port, 0);
  EXPECT_EQ(get(c.http_port, "/health", "").status, 200);
  HttpResult r = get(c.http_port, "/v1/models", "");
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(r.error_code(), "missing_api_key");
  r = get(c.http_port, "/v1/models", "sk-wrong");
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(r.error_code(), "invalid_api_key");
  EXPECT_EQ(get(c.http_port, "/v1/models").status, 200);
  r = get(c.http_port, "/v1/jobs/job-0000");
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(r.error_code(), "job_not_found");
  r = get(c.http_port, "/v1/contexts/ctx-0000");
  EXPECT_EQ(r.status, 404);
  r = post(c.http_port, "/v1/completions", json{{"prompt", "hello"}});
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(r.error_code(), "no_ready_group");
  EXPECT_EQ(r.headers["Retry-After"], "5");
  r = post(c.http_port, "/v1/completions", json{{"prompt", "hello"}, {"stream", true}});
  EXPECT_EQ(r.status, 503);  // refused before any event is sent
  r = get(c.http_port, "/ready");
  EXPECT_EQ(r.status, 503);
  r = request(c.http_port, http::verb::post, "/v1/completions", "{\"prompt\": [1,");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.error_code(), "invalid_json");
  EXPECT_TRUE(metric_has(c.http_port, "unshackle_requests_rejected_total{reason=\"no_ready_group\"} 2"));
}

TEST(CoordinatorProcess, OversizedBodyIs413) {
  Coordinator c({"--max-body-bytes", "4096"});
  ASSERT_GT(c.http_port, 0);
  const HttpResult r = request(c.http_port, http::verb::post, "/v1/completions", std::string(10000, 'x'));
  EXPECT_EQ(r.status, 413);
  EXPECT_EQ(r.error_code(), "request_too_large");
  EXPECT_EQ(get(c.http_port, "/health", "").status, 200);  // the server is fine
}

TEST(CoordinatorProcess, GroupRegistersQueueFillsHeartbeatLossFailsJobs) {
  Coordinator c({"--max-queued", "1"});
  ASSERT_GT(c.http_port, 0);
  Peer peer(c.worker_port, "g0");
  const json welcome = peer.hello();
  ASSERT_EQ(welcome.value("type", ""), "welcome") << welcome.dump();
  EXPECT_EQ(welcome["heartbeat_ms"], 100);
  ASSERT_TRUE(peer.wait_for_call("health"));
  ASSERT_TRUE(eventually([&] { return get(c.http_port, "/ready").status == 200; }));
  json models = get(c.http_port, "/v1/models").json_body();
  ASSERT_EQ(models["data"].size(), 1u);
  EXPECT_EQ(models["data"][0]["id"], "test-model");
  EXPECT_EQ(models["data"][0]["max_model_len"], 1000);
  EXPECT_TRUE(metric_has(c.http_port, "unshackle_worker_group_up{group=\"g0\"} 1"));
  EXPECT_TRUE(eventually([&] { return metric_has(c.http_port, "unshackle_worker_kv_bytes{group=\"g0\",rank=\"1\"} 2048"); }));

  // A second registration under the same id is refused.
  {
    Peer twin(c.worker_port, "g0");
    const json answer = twin.hello();
    EXPECT_EQ(answer.value("type", ""), "reject");
    EXPECT_NE(answer.value("message", "").find("already registered"), std::string::npos);
  }

  // Over the model's context: refused before any work, with the limit and the counts.
  HttpResult r = post(c.http_port, "/v1/completions", json{{"prompt", {1, 2, 3}}, {"max_tokens", 998}});
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.error_code(), "context_length_exceeded");
  const std::string message = r.json_body()["error"]["message"];
  EXPECT_NE(message.find("maximum context length is 1000 tokens"), std::string::npos) << message;
  EXPECT_NE(message.find("you requested 1001 tokens (3 in the prompt, 998 in the completion)"), std::string::npos) << message;
  EXPECT_EQ(peer.count("create_context"), 0);
  // Unknown model.
  r = post(c.http_port, "/v1/completions", json{{"prompt", {1}}, {"model", "other"}});
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(r.error_code(), "model_not_found");

  // Job A is admitted (the peer holds its create_context), B waits, C finds the queue full.
  r = post(c.http_port, "/v1/jobs", json{{"prompt", {1, 2, 3, 4}}, {"max_tokens", 8}, {"attention", {{"mode", "streaming"}}}});
  ASSERT_EQ(r.status, 200) << r.body;
  const std::string a = r.json_body()["id"];
  ASSERT_TRUE(peer.wait_for_call("create_context"));
  ASSERT_TRUE(eventually([&] { return get(c.http_port, "/v1/jobs/" + a).json_body()["status"] == "prefill"; }));
  json job_a = get(c.http_port, "/v1/jobs/" + a).json_body();
  EXPECT_EQ(job_a["group"], "g0");
  EXPECT_EQ(job_a["progress"]["prompt_tokens"], 4);
  EXPECT_EQ(job_a["progress"]["prefilled_tokens"], 0);
  r = post(c.http_port, "/v1/jobs", json{{"prompt", {5, 6}}, {"max_tokens", 8}});
  ASSERT_EQ(r.status, 200) << r.body;
  const std::string b = r.json_body()["id"];
  EXPECT_EQ(r.json_body()["status"], "queued");
  r = post(c.http_port, "/v1/jobs", json{{"prompt", {7}}, {"max_tokens", 8}});
  EXPECT_EQ(r.status, 429);
  EXPECT_EQ(r.error_code(), "queue_full");
  EXPECT_EQ(r.headers["Retry-After"], "1");
  EXPECT_TRUE(metric_has(c.http_port, "unshackle_num_requests_waiting 1"));
  EXPECT_TRUE(metric_has(c.http_port, "unshackle_num_requests_running 1"));
  EXPECT_TRUE(metric_has(c.http_port, "unshackle_kv_cache_usage_ratio 0.003"));  // 12 of 4000 tokens reserved
  r = get(c.http_port, "/v1/jobs/" + a + "/result");
  EXPECT_EQ(r.status, 409);
  EXPECT_EQ(r.error_code(), "job_not_finished");

  // Heartbeats stop (the socket stays open): the group goes down, its job fails, and with no
  // group left the queued job fails with 503.
  peer.stop_heartbeats();
  ASSERT_TRUE(eventually([&] { return get(c.http_port, "/v1/jobs/" + a).json_body()["status"] == "failed"; }));
  job_a = get(c.http_port, "/v1/jobs/" + a).json_body();
  EXPECT_EQ(job_a["error"]["code"], "worker_group_lost");
  EXPECT_NE(job_a["error"]["message"].get<std::string>().find("worker group 'g0' lost: no heartbeat for"), std::string::npos)
      << job_a.dump();
  r = get(c.http_port, "/v1/jobs/" + a + "/result");
  EXPECT_EQ(r.status, 500);
  EXPECT_EQ(r.headers["x-should-retry"], "false");
  ASSERT_TRUE(eventually([&] { return get(c.http_port, "/v1/jobs/" + b).json_body()["status"] == "failed"; }));
  EXPECT_EQ(get(c.http_port, "/v1/jobs/" + b).json_body()["error"]["code"], "no_ready_group");
  EXPECT_EQ(get(c.http_port, "/ready").status, 503);
  EXPECT_TRUE(metric_has(c.http_port, "unshackle_worker_group_up{group=\"g0\"} 0"));
  EXPECT_TRUE(metric_has(c.http_port, "unshackle_request_finished_total{reason=\"error\"} 2"));
  EXPECT_TRUE(metric_has(c.http_port, "unshackle_num_requests_running 0"));
  EXPECT_TRUE(metric_has(c.http_port, "unshackle_num_requests_waiting 0"));
  peer.close();

  // The group id can register again; a completion in flight when its link drops gets 500
  // with x-should-retry: false.
  Peer again(c.worker_port, "g0");
  ASSERT_EQ(again.hello().value("type", ""), "welcome");
  ASSERT_TRUE(eventually([&] { return get(c.http_port, "/ready").status == 200; }));
  std::optional<HttpResult> sync;
  std::thread client([&] {
    try {
      sync = post(c.http_port, "/v1/completions", json{{"prompt", {1, 2}}, {"max_tokens", 2}});
    } catch (const std::exception& e) {
      ADD_FAILURE() << "completion request failed: " << e.what();
    }
  });
  ASSERT_TRUE(again.wait_for_call("create_context"));
  again.close();
  client.join();
  ASSERT_TRUE(sync);
  EXPECT_EQ(sync->status, 500) << sync->body;
  EXPECT_EQ(sync->headers["x-should-retry"], "false");
  EXPECT_EQ(sync->error_code(), "worker_group_lost");
  EXPECT_NE(sync->body.find("worker group 'g0' lost"), std::string::npos) << sync->body;
}

TEST(CoordinatorProcess, CancelQueuedJob) {
  Coordinator c({});
  ASSERT_GT(c.http_port, 0);
  Peer peer(c.worker_port, "g1");
  ASSERT_EQ(peer.hello().value("type", ""), "welcome");
  ASSERT_TRUE(eventually([&] { return get(c.http_port, "/ready").status == 200; }));
  HttpResult r = post(c.http_port, "/v1/jobs", json{{"prompt", {1, 2, 3}}, {"max_tokens", 4}});
  const std::string a = r.json_body()["id"];
  ASSERT_TRUE(peer.wait_for_call("create_context"));
  r = post(c.http_port, "/v1/jobs", json{{"prompt", {4}}, {"max_tokens", 4}});
  const std::string b = r.json_body()["id"];
  // Cancel the queued one: at once.
  r = request(c.http_port, http::verb::post, "/v1/jobs/" + b + "/cancel");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.json_body()["status"], "cancelled");
  r = get(c.http_port, "/v1/jobs/" + b + "/result");
  EXPECT_EQ(r.status, 409);
  EXPECT_EQ(r.error_code(), "job_cancelled");
  EXPECT_TRUE(metric_has(c.http_port, "unshackle_request_finished_total{reason=\"cancelled\"} 1"));
}

}  // namespace
}  // namespace unshackle
