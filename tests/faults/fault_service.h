// The service on loopback for fault tests: a generated model, unshackle-coordinator and worker
// groups of N CPU ranks under mpirun, as tests/service/live_service.h starts them, except that
// every process can be killed, stopped and started again on its own: the coordinator (with its
// --state-dir kept across restarts, optionally run on a small tmpfs of its own), one rank of a
// group (its pid found among mpirun's children), a whole group.
#pragma once

#include <gtest/gtest.h>

#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "live_service.h"  // Child, eventually, read_text, LiveOptions; http_client.h

namespace unshackle::live {

// What one HTTP exchange gave the client, including a connection that broke (status 0).
struct Exchange {
  HttpResult result;
  std::string transport_error;  // non-empty: no complete response (the text of the error)
  double seconds = 0;
};

inline Exchange exchange(uint16_t port, http::verb verb, const std::string& target, const std::string& body,
                         const std::string& key, std::chrono::seconds timeout = 120s) {
  Exchange out;
  const auto start = std::chrono::steady_clock::now();
  try {
    out.result = http_request(port, verb, target, body, key, "application/json", timeout);
  } catch (const std::exception& e) {
    out.transport_error = e.what();
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return out;
}

// The pids of a process's children (Linux /proc).
inline std::vector<pid_t> children_of(pid_t pid) {
  std::vector<pid_t> out;
  std::error_code ec;
  for (const auto& task : std::filesystem::directory_iterator(fmt::format("/proc/{}/task", pid), ec)) {
    std::istringstream in(read_text(task.path() / "children"));
    pid_t child = 0;
    while (in >> child) out.push_back(child);
  }
  return out;
}

// The value of an environment variable of a running process, or "".
inline std::string environ_of(pid_t pid, const std::string& name) {
  const std::string text = read_text(fmt::format("/proc/{}/environ", pid));
  const std::string key = name + "=";
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t end = text.find('\0', pos);
    const std::string entry = text.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
    if (entry.rfind(key, 0) == 0) return entry.substr(key.size());
    if (end == std::string::npos) break;
    pos = end + 1;
  }
  return "";
}

// Resident memory of a process in KiB (VmRSS), or -1 once it is gone.
inline long rss_kib(pid_t pid) {
  std::istringstream in(read_text(fmt::format("/proc/{}/status", pid)));
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

// How a command can get a mount namespace with a tmpfs of its own: "unshare --mount" as root
// with CAP_SYS_ADMIN, "unshare --user --map-root-user --mount" where unprivileged user
// namespaces are allowed; nullopt where neither works (the test then says so and skips).
inline std::optional<std::vector<std::string>> private_mount_prefix() {
  for (const std::vector<std::string>& prefix :
       {std::vector<std::string>{"unshare", "--mount", "--propagation", "private"},
        std::vector<std::string>{"unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"}}) {
    std::string cmd;
    for (const auto& p : prefix) cmd += p + " ";
    cmd += "sh -c 'd=$(mktemp -d) && mount -t tmpfs -o size=64k uns-probe \"$d\" && umount \"$d\"; r=$?; rmdir \"$d\"; exit $r' "
           ">/dev/null 2>&1";
    if (std::system(cmd.c_str()) == 0) return prefix;
  }
  return std::nullopt;
}

struct FaultOptions {
  LiveOptions live;                   // model, ranks, attention, KV and chunk settings, api key
  bool state_dir = false;             // --state-dir <dir>/state, kept across restarts
  int64_t tmpfs_kib = 0;              // > 0: the state dir is a tmpfs of this size (a mount namespace of its own)
  double collective_timeout_s = 4;    // the workers' --collective-timeout-s
  int64_t heartbeat_timeout_ms = 3000;
};

class FaultService {
 public:
  explicit FaultService(FaultOptions options) : options_(std::move(options)) {
    static int counter = 0;
    dir_ = std::filesystem::temp_directory_path() /
           ("uns_faults_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_ / "state");
    model_dir_ = (dir_ / "model").string();
    make_model(options_.live.model, model_dir_);
  }
  ~FaultService() {
    for (auto& [name, group] : groups_) {
      group.signal_group(SIGCONT);  // a stopped rank would ignore SIGTERM
      group.stop();
    }
    coordinator_.signal_group(SIGCONT);
    coordinator_.stop();
    if (!::testing::Test::HasFailure() && std::getenv("UNS_KEEP_LIVE") == nullptr) {
      std::filesystem::remove_all(dir_);
    } else {
      for (int i = 0; i < coordinator_starts_; ++i)
        std::fprintf(stderr, "---- coordinator log %d (%s) ----\n%s\n", i, dir_.c_str(),
                     read_text(dir_ / fmt::format("coordinator_{}.log", i)).c_str());
      for (auto& [name, group] : groups_)
        std::fprintf(stderr, "---- worker group %s log ----\n%s\n", name.c_str(), group.log_text().c_str());
    }
  }

  // The coordinator's arguments (ports 0: fresh ones each start, written to the port file).
  std::vector<std::string> coordinator_args() const {
    std::vector<std::string> args = {UNS_COORDINATOR_BIN, "--port", "0", "--worker-port", "0", "--port-file",
                                     (dir_ / "ports.json").string(), "--heartbeat-ms", "200", "--heartbeat-timeout-ms",
                                     std::to_string(options_.heartbeat_timeout_ms), "--prefill-chunk",
                                     std::to_string(options_.live.prefill_chunk), "--attention", options_.live.attention,
                                     "--api-key", options_.live.api_key};
    if (options_.state_dir) {
      args.push_back("--state-dir");
      args.push_back(state_dir().string());
    }
    args.insert(args.end(), options_.live.coordinator_args.begin(), options_.live.coordinator_args.end());
    return args;
  }

  // Starts the coordinator (again) and waits until it listens. With tmpfs_kib the command is
  //   unshare --mount sh -c 'mount -t tmpfs -o size=Nk ... STATE && "$@"; exec "$@"' sh ARGS
  // so the coordinator can be killed once and starts again on the same (full) tmpfs, which
  // lives as long as the namespace does: restart_in_namespace() does that.
  bool start_coordinator(const std::vector<std::string>& mount_prefix = {}) {
    std::filesystem::remove(dir_ / "ports.json");
    std::vector<std::string> args;
    if (options_.tmpfs_kib > 0) {
      args = mount_prefix;
      args.insert(args.end(), {"sh", "-c",
                               fmt::format("mount -t tmpfs -o size={}k uns-faults '{}' && \"$@\"; exec \"$@\"",
                                           options_.tmpfs_kib, state_dir().string()),
                               "sh"});
    }
    const auto own = coordinator_args();
    args.insert(args.end(), own.begin(), own.end());
    coordinator_log_ = dir_ / fmt::format("coordinator_{}.log", coordinator_starts_++);
    coordinator_ = Child(args, coordinator_log_, {{"UNSHACKLE_API_KEY", ""}});
    return wait_listening();
  }

  // tmpfs mode: SIGKILL to the coordinator inside the namespace; its shell starts it again.
  bool restart_in_namespace() {
    const pid_t pid = coordinator_pid();
    if (pid <= 0) return false;
    std::filesystem::remove(dir_ / "ports.json");
    ::kill(pid, SIGKILL);
    return wait_listening();
  }

  // The coordinator process itself (the child of the namespace's shell in tmpfs mode).
  pid_t coordinator_pid() const {
    if (options_.tmpfs_kib <= 0) return coordinator_.pid();
    const auto kids = children_of(coordinator_.pid());
    return kids.empty() ? coordinator_.pid() : kids.front();
  }

  // The state directory as the coordinator sees it (through /proc for its own tmpfs).
  std::filesystem::path state_view() const {
    if (options_.tmpfs_kib <= 0) return state_dir();
    return std::filesystem::path(fmt::format("/proc/{}/root", coordinator_pid())) / state_dir().relative_path();
  }

  // `mpirun -np ranks unshackle-worker ...`; waits until /ready lists the group as ready.
  bool start_group(const std::string& name, bool wait_ready = true) {
    const int ranks = options_.live.ranks;
    std::vector<std::string> args = {"mpirun", "-np", std::to_string(ranks), "--oversubscribe", "--bind-to", "none",
                                     "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo", "--mca",
                                     "oob_tcp_if_include", "lo"};
    const std::vector<std::string> worker = {
        UNS_WORKER_BIN, "--model", model_dir_, "--coordinator", "127.0.0.1:" + std::to_string(worker_port), "--group",
        name, "--max-context-tokens", std::to_string(options_.live.max_context_tokens), "--kv-capacity-tokens",
        std::to_string(options_.live.kv_capacity_tokens), "--kv-block", std::to_string(options_.live.kv_block),
        "--heartbeat-ms", "200", "--collective-timeout-s", fmt::format("{}", options_.collective_timeout_s)};
    args.insert(args.end(), worker.begin(), worker.end());
    args.insert(args.end(), options_.live.worker_args.begin(), options_.live.worker_args.end());
    const auto log = dir_ / fmt::format("worker_{}_{}.log", name, group_starts_++);
    groups_.erase(name);
    groups_.emplace(name, Child(args, log, {{"OMPI_ALLOW_RUN_AS_ROOT", "1"}, {"OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"},
                                            {"OMPI_MCA_rmaps_base_oversubscribe", "1"}}));
    if (!wait_ready) return true;
    const bool ready = eventually([&] { return group_ready(name) || groups_.at(name).poll().has_value(); }, 60s, 100ms);
    if (!ready || !group_ready(name)) {
      ADD_FAILURE() << "worker group " << name << " did not become ready; /ready: " << get("/ready").body << "\nlog:\n"
                    << groups_.at(name).log_text();
      return false;
    }
    return true;
  }

  bool group_ready(const std::string& name) const {
    try {
      const HttpResult r = get("/ready");
      for (const auto& g : r.json_body().value("groups", json::array()))
        if (g.value("group", "") == name && g.value("ready", false)) return true;
    } catch (const std::exception&) {
    }
    return false;
  }

  // The pid of rank `rank` of a group: mpirun's child whose OMPI_COMM_WORLD_RANK is `rank`.
  pid_t rank_pid(const std::string& group, int rank) const {
    for (const pid_t child : children_of(groups_.at(group).pid()))
      if (environ_of(child, "OMPI_COMM_WORLD_RANK") == std::to_string(rank)) return child;
    return -1;
  }

  Child& group(const std::string& name) { return groups_.at(name); }
  Child& coordinator() { return coordinator_; }

  HttpResult get(const std::string& target) const {
    return http_request(http_port, http::verb::get, target, "", options_.live.api_key);
  }
  HttpResult post(const std::string& target, const json& body) const {
    return http_request(http_port, http::verb::post, target, body.dump(), options_.live.api_key);
  }
  HttpResult del(const std::string& target) const {
    return http_request(http_port, http::verb::delete_, target, "", options_.live.api_key);
  }
  Exchange post_exchange(const std::string& target, const json& body) const {
    return exchange(http_port, http::verb::post, target, body.dump(), options_.live.api_key);
  }
  // POST /v1/files (multipart): a `purpose` field and a `file` part holding `content`.
  HttpResult upload(const std::string& content, const std::string& filename = "requests.jsonl") const {
    const std::string boundary = "uns-faults-boundary-7d2e";
    const std::string body = "--" + boundary + "\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--" +
                             boundary + "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + filename +
                             "\"\r\nContent-Type: application/jsonl\r\n\r\n" + content + "\r\n--" + boundary + "--\r\n";
    return http_request(http_port, http::verb::post, "/v1/files", body, options_.live.api_key,
                        "multipart/form-data; boundary=" + boundary);
  }
  std::optional<double> metric(const std::string& name_with_labels) const {
    const std::string text = get("/metrics").body;
    size_t pos = 0;
    while ((pos = text.find(name_with_labels + " ", pos)) != std::string::npos) {
      if (pos == 0 || text[pos - 1] == '\n') return std::stod(text.substr(pos + name_with_labels.size() + 1));
      pos += name_with_labels.size();
    }
    return std::nullopt;
  }
  // The log of the coordinator started last (in tmpfs mode: of every start in the namespace).
  std::string coordinator_log() const { return read_text(coordinator_log_); }

  // The oracle: `unshackle generate --json` with the service's settings; the text the service
  // must answer (special tokens skipped, as the worker detokenizes).
  json generate(const std::string& prompt, int max_tokens) const {
    static int n = 0;
    const auto out = dir_ / fmt::format("generate{}.json", n++);
    const std::string cmd = fmt::format(
        "'{}' generate --model '{}' --prompt '{}' --max-tokens {} --temperature 0 --mode exact-topk --top-k 8 "
        "--l-i 4 --l-l 16 --ranks {} --kv-block {} --chunk {} --json > '{}' 2>&1",
        UNS_CLI_BIN, model_dir_, prompt, max_tokens, options_.live.ranks, options_.live.kv_block,
        options_.live.prefill_chunk, out.string());
    const int rc = std::system(cmd.c_str());
    const std::string text = read_text(out);
    EXPECT_EQ(rc, 0) << cmd << "\n" << text;
    json g = json::parse(text, nullptr, false);
    if (!g.is_object()) return g;
    const auto tokens = g.at("tokens").get<std::vector<int32_t>>();
    const std::string bytes = load_tokenizer(model_dir_)->decode(tokens, /*skip_special=*/true);
    g["service_text"] = json::parse(json(bytes).dump(-1, ' ', false, json::error_handler_t::replace));
    return g;
  }

  std::filesystem::path state_dir() const { return dir_ / "state"; }
  const std::filesystem::path& dir() const { return dir_; }
  const FaultOptions& options() const { return options_; }
  uint16_t http_port = 0, worker_port = 0;

 private:
  bool wait_listening() {
    const std::string port_file = (dir_ / "ports.json").string();
    http_port = worker_port = 0;
    const bool up = eventually(
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
    if (!up || http_port == 0) ADD_FAILURE() << "coordinator did not start; log:\n" << coordinator_log();
    return up && http_port != 0;
  }

  FaultOptions options_;
  std::filesystem::path dir_;
  std::string model_dir_;
  Child coordinator_;
  std::filesystem::path coordinator_log_;
  int coordinator_starts_ = 0;
  std::map<std::string, Child> groups_;
  int group_starts_ = 0;
};

}  // namespace unshackle::live
