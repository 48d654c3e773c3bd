// The whole service on loopback with real processes, for end-to-end tests (and for checking
// dashboards' PromQL): a generated model, unshackle-coordinator, one worker group of N CPU
// ranks under mpirun, and optionally a real Prometheus scraping the coordinator.
//
//   LiveService svc({.ranks = 2});        // model + coordinator + `mpirun -np 2 unshackle-worker`
//   svc.post("/v1/completions", body);    // a real HTTP client (Beast)
//   LivePrometheus prom(svc);             // `prometheus` scraping svc's /metrics every second
//   prom.query("sum(unshackle_prompt_tokens_total)");   // PromQL over its HTTP API
//
// Every child gets PR_SET_PDEATHSIG, runs in its own process group (mpirun's ranks die with
// it) and logs to a file in the fixture's directory; logs are printed when a test failed.
// Binaries come from compile definitions: UNS_COORDINATOR_BIN, UNS_WORKER_BIN, UNS_CLI_BIN.
#pragma once

#include <gtest/gtest.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "http_client.h"  // also: the net/beast/http aliases, json, chrono literals
#include "unshackle/model/make_model.h"
#include "unshackle/model/tokenizer.h"

namespace unshackle::live {

inline std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds timeout = 20s, std::chrono::milliseconds every = 25ms) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(every);
  }
  return pred();
}

// A child process in its own process group, stderr+stdout to `log`.
class Child {
 public:
  Child() = default;
  Child(std::vector<std::string> args, const std::filesystem::path& log, std::map<std::string, std::string> env = {})
      : log_(log) {
    pid_ = ::fork();
    if (pid_ == 0) {
      ::setpgid(0, 0);
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // no orphans when the test dies
      for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
      if (!std::freopen(log.c_str(), "w", stderr)) std::_Exit(126);
      ::dup2(::fileno(stderr), STDOUT_FILENO);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execvp(argv[0], argv.data());
      std::_Exit(127);
    }
    ::setpgid(pid_, pid_);  // also from the parent: no race with kill(-pid) below
  }
  Child(Child&& o) noexcept { *this = std::move(o); }
  Child& operator=(Child&& o) noexcept {
    std::swap(pid_, o.pid_);
    std::swap(log_, o.log_);
    std::swap(status_, o.status_);
    return *this;
  }
  ~Child() { stop(); }

  pid_t pid() const { return pid_; }
  // Exit status once it ended (-1 while running).
  std::optional<int> poll() {
    if (pid_ <= 0) return status_;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      pid_ = -1;
    }
    return pid_ > 0 ? std::nullopt : status_;
  }
  // Waits up to `timeout` for the exit; the status or nullopt.
  std::optional<int> wait(std::chrono::milliseconds timeout) {
    std::optional<int> s;
    eventually([&] { return (s = poll()).has_value(); }, timeout, 20ms);
    return s;
  }
  // SIGTERM to the whole group, SIGKILL after `grace`.
  std::optional<int> stop(std::chrono::milliseconds grace = 10s) {
    if (pid_ <= 0) return status_;
    ::kill(-pid_, SIGTERM);
    if (auto s = wait(grace)) return s;
    ::kill(-pid_, SIGKILL);
    return wait(5s);
  }
  void signal_group(int sig) const {
    if (pid_ > 0) ::kill(-pid_, sig);
  }
  std::string log_text() const { return read_text(log_); }

 private:
  pid_t pid_ = -1;
  std::filesystem::path log_;
  std::optional<int> status_;
};

// ---- HTTP: http_client.h ----

// ---- the service ----

struct LiveOptions {
  int ranks = 2;
  std::string api_key = "sk-live-test";
  MakeModelOptions model = [] {
    MakeModelOptions m;
    m.arch = "llama";
    m.layers = 2;
    m.hidden = 64;
    m.heads = 4;
    m.kv_heads = 2;
    m.vocab = 320;  // bytes tokenizer: 256 bytes + specials
    m.seed = 7;
    return m;
  }();
  std::string attention = R"({"mode":"exact-topk","top_k":8,"l_I":4,"l_L":16})";
  int64_t max_context_tokens = 2048;
  int64_t kv_capacity_tokens = 8192;
  int64_t kv_block = 8;          // small, so short prompts are spread over every rank
  int64_t prefill_chunk = 32;
  std::vector<std::string> coordinator_args;  // extra
  std::vector<std::string> worker_args;       // extra
  bool start_workers = true;
};

class LiveService {
 public:
  explicit LiveService(LiveOptions options = {}) : options_(std::move(options)) {
    static int counter = 0;
    dir_ = std::filesystem::temp_directory_path() /
           ("uns_live_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    model_dir_ = (dir_ / "model").string();
    make_model(options_.model, model_dir_);

    const std::string port_file = (dir_ / "ports.json").string();
    std::vector<std::string> args = {UNS_COORDINATOR_BIN, "--port", "0", "--worker-port", "0", "--port-file", port_file,
                                     "--heartbeat-ms", "200", "--heartbeat-timeout-ms", "3000", "--prefill-chunk",
                                     std::to_string(options_.prefill_chunk), "--attention", options_.attention};
    if (!options_.api_key.empty()) {
      args.push_back("--api-key");
      args.push_back(options_.api_key);
    }
    args.insert(args.end(), options_.coordinator_args.begin(), options_.coordinator_args.end());
    coordinator_ = Child(args, dir_ / "coordinator.log", {{"UNSHACKLE_API_KEY", ""}});
    const bool listening = eventually(
        [&] {
          const json ports = json::parse(read_text(port_file), nullptr, false);
          if (ports.is_object() && ports.contains("http")) {
            http_port = ports["http"].get<uint16_t>();
            worker_port = ports["worker"].get<uint16_t>();
            return true;
          }
          return coordinator_.poll().has_value();
        },
        20s);
    if (!listening || http_port == 0) {
      ADD_FAILURE() << "coordinator did not start; log:\n" << coordinator_.log_text();
      return;
    }
    if (options_.start_workers) start_group("g0");
  }

  ~LiveService() {
    for (auto& [name, group] : groups_) group.stop();
    coordinator_.stop();
    if (!::testing::Test::HasFailure() && std::getenv("UNS_KEEP_LIVE") == nullptr) {
      std::filesystem::remove_all(dir_);
    } else {
      std::fprintf(stderr, "---- coordinator log (%s) ----\n%s\n", dir_.c_str(), coordinator_.log_text().c_str());
      for (auto& [name, group] : groups_)
        std::fprintf(stderr, "---- worker group %s log ----\n%s\n", name.c_str(), group.log_text().c_str());
    }
  }

  // `mpirun -np ranks unshackle-worker ...` (one rank: the worker alone); waits for /ready.
  void start_group(const std::string& name, bool wait_ready = true) {
    std::vector<std::string> args;
    if (options_.ranks > 1) {
      args = {"mpirun", "-np", std::to_string(options_.ranks), "--oversubscribe", "--bind-to", "none",
              "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo"};
    }
    const std::vector<std::string> worker = {UNS_WORKER_BIN, "--model", model_dir_, "--coordinator",
                                             "127.0.0.1:" + std::to_string(worker_port), "--group", name,
                                             "--max-context-tokens", std::to_string(options_.max_context_tokens),
                                             "--kv-capacity-tokens", std::to_string(options_.kv_capacity_tokens),
                                             "--kv-block", std::to_string(options_.kv_block), "--heartbeat-ms", "200",
                                             "--collective-timeout-s", "10"};
    args.insert(args.end(), worker.begin(), worker.end());
    args.insert(args.end(), options_.worker_args.begin(), options_.worker_args.end());
    groups_[name] = Child(args, dir_ / ("worker_" + name + ".log"),
                          {{"OMPI_ALLOW_RUN_AS_ROOT", "1"}, {"OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"},
                           {"OMPI_MCA_rmaps_base_oversubscribe", "1"}});
    if (!wait_ready) return;
    const bool ready = eventually(
        [&] {
          const HttpResult r = get("/ready");
          if (r.status == 200) {
            for (const auto& g : r.json_body().value("groups", json::array()))
              if (g.value("id", g.value("group", "")) == name && g.value("ready", false)) return true;
          }
          return groups_[name].poll().has_value();
        },
        60s, 100ms);
    if (!ready) ADD_FAILURE() << "worker group " << name << " did not become ready; /ready: " << get("/ready").body
                              << "\nworker log:\n" << groups_[name].log_text();
  }
  Child& group(const std::string& name) { return groups_.at(name); }

  HttpResult get(const std::string& target) const {
    return http_request(http_port, http::verb::get, target, "", options_.api_key);
  }
  HttpResult post(const std::string& target, const json& body) const {
    return http_request(http_port, http::verb::post, target, body.dump(), options_.api_key);
  }
  HttpResult del(const std::string& target) const {
    return http_request(http_port, http::verb::delete_, target, "", options_.api_key);
  }
  HttpResult raw(http::verb verb, const std::string& target, const std::string& body, const std::string& key,
                 const std::string& content_type = "application/json") const {
    return http_request(http_port, verb, target, body, key, content_type);
  }

  // POST /v1/files as multipart/form-data: a `purpose` field and a `file` part holding `content`.
  HttpResult upload(const std::string& content, const std::string& purpose = "batch",
                    const std::string& filename = "requests.jsonl") const {
    const std::string boundary = "uns-live-boundary-4f1c9a";
    const std::string body = "--" + boundary + "\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n" + purpose +
                             "\r\n--" + boundary + "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + filename +
                             "\"\r\nContent-Type: application/jsonl\r\n\r\n" + content + "\r\n--" + boundary + "--\r\n";
    return raw(http::verb::post, "/v1/files", body, options_.api_key, "multipart/form-data; boundary=" + boundary);
  }

  // The value of a metric line of /metrics (exact name with labels as printed), or nullopt.
  std::optional<double> metric(const std::string& name_with_labels) const {
    const std::string text = get("/metrics").body;
    size_t pos = 0;
    while ((pos = text.find(name_with_labels + " ", pos)) != std::string::npos) {
      if (pos == 0 || text[pos - 1] == '\n') return std::stod(text.substr(pos + name_with_labels.size() + 1));
      pos += name_with_labels.size();
    }
    return std::nullopt;
  }

  const std::string& model_dir() const { return model_dir_; }
  const std::filesystem::path& dir() const { return dir_; }
  const LiveOptions& options() const { return options_; }
  Child& coordinator() { return coordinator_; }
  uint16_t http_port = 0, worker_port = 0;

 private:
  LiveOptions options_;
  std::filesystem::path dir_;
  std::string model_dir_;
  Child coordinator_;
  std::map<std::string, Child> groups_;
};

// The oracle: `unshackle generate --json` on the service's model with its attention settings,
// ranks, KV block and prefill chunk (the same tokens a group of that many ranks must produce).
inline json run_generate(const LiveService& s, const std::string& prompt, int max_tokens, double temperature,
                         uint64_t seed) {
  static int n = 0;
  const auto out = s.dir() / fmt::format("generate{}.json", n++);
  const std::string cmd = fmt::format(
      "'{}' generate --model '{}' --prompt '{}' --max-tokens {} --temperature {} --seed {} --mode exact-topk --top-k 8 "
      "--l-i 4 --l-l 16 --ranks {} --kv-block {} --chunk {} --json > '{}' 2>&1",
      UNS_CLI_BIN, s.model_dir(), prompt, max_tokens, temperature, seed, s.options().ranks, s.options().kv_block,
      s.options().prefill_chunk, out.string());
  const int rc = std::system(cmd.c_str());
  const std::string text = read_text(out);
  EXPECT_EQ(rc, 0) << cmd << "\n" << text;
  return json::parse(text, nullptr, false);
}

// The text the service answers for the tokens `generate` produced: the worker detokenizes with
// special tokens skipped (as OpenAI-style servers do), `generate` prints them ("<s>" when the
// random model samples BOS). Bytes that are not UTF-8 become U+FFFD in the JSON of both, as
// here. Equal to generate's "text" whenever no special token was sampled.
inline std::string service_text(const LiveService& s, const json& generated) {
  const auto tokens = generated.at("tokens").get<std::vector<int32_t>>();
  const std::string bytes = load_tokenizer(s.model_dir())->decode(tokens, /*skip_special=*/true);
  return json::parse(json(bytes).dump(-1, ' ', false, json::error_handler_t::replace)).get<std::string>();
}

// usage.completion_tokens the service reports for generate's tokens (generate counts a final
// stop token, the service ends the completion on it).
inline size_t service_completion_tokens(const json& generated) {
  return generated.at("tokens").size() - (generated.value("finish_reason", "") == "stop_token" ? 1 : 0);
}

// A real Prometheus (Debian package `prometheus`) scraping the service's /metrics every second.
class LivePrometheus {
 public:
  static bool available() { return std::system("command -v prometheus >/dev/null 2>&1") == 0; }

  explicit LivePrometheus(const LiveService& service) {
    dir_ = service.dir() / "prometheus";
    std::filesystem::create_directories(dir_ / "data");
    port_ = free_port();
    std::ofstream(dir_ / "prometheus.yml") << "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                                           << "scrape_configs:\n  - job_name: unshackle\n    metrics_path: /metrics\n"
                                           << (service.options().api_key.empty()
                                                   ? std::string()
                                                   : "    authorization:\n      credentials: " + service.options().api_key + "\n")
                                           << "    static_configs:\n      - targets: ['127.0.0.1:" << service.http_port
                                           << "']\n";
    process_ = Child({"prometheus", "--config.file=" + (dir_ / "prometheus.yml").string(),
                      "--storage.tsdb.path=" + (dir_ / "data").string(),
                      "--web.listen-address=127.0.0.1:" + std::to_string(port_)},
                     dir_ / "prometheus.log");
  }
  ~LivePrometheus() {
    process_.stop();
    if (::testing::Test::HasFailure()) std::fprintf(stderr, "---- prometheus log ----\n%s\n", process_.log_text().c_str());
  }

  // GET /api/v1/query?query=... ; the "data" member on success, else null (Prometheus not up yet).
  json query(const std::string& promql) const {
    std::string encoded;
    for (unsigned char c : promql) {
      if (std::isalnum(c) || c == '_' || c == '-' || c == '.' || c == '~') encoded += static_cast<char>(c);
      else encoded += fmt_hex(c);
    }
    try {
      const HttpResult r = http_request(port_, http::verb::get, "/api/v1/query?query=" + encoded, "", "", "", 10s);
      const json j = r.json_body();
      if (r.status == 200 && j.value("status", "") == "success") return j["data"];
    } catch (const std::exception&) {
    }
    return nullptr;
  }
  // The single value of an instant-vector query (the first series), or nullopt.
  std::optional<double> value(const std::string& promql) const {
    const json data = query(promql);
    if (!data.is_object() || !data["result"].is_array() || data["result"].empty()) return std::nullopt;
    return std::stod(data["result"][0]["value"][1].get<std::string>());
  }
  // Whether the scrape target is up (Prometheus' own `up` series).
  bool target_up() const {
    const auto v = value("up{job=\"unshackle\"}");
    return v && *v == 1;
  }
  uint16_t port() const { return port_; }

 private:
  static std::string fmt_hex(unsigned char c) {
    static const char* digits = "0123456789ABCDEF";
    return std::string{'%', digits[c >> 4], digits[c & 15]};
  }
  std::filesystem::path dir_;
  uint16_t port_ = 0;
  Child process_;
};

}  // namespace unshackle::live
