// The soak's load client (tests/soak/run_soak.sh starts the service and runs it): N client
// threads for a bounded time against a running coordinator, a mix of sync completions, SSE
// streams, jobs (submit, then poll the result) and completions on stored contexts (long-lived
// ones, and ones created, used and deleted), plus an overload window in which more clients
// than the queue bound send at once, to provoke 429s.
//
// Every answer is checked against `unshackle generate` for the same prompt and settings
// (greedy, so deterministic): text, token counts and finish reason. A response that is
// missing (transport error, 5xx) is "lost"; one with another prompt's answer is "mixed up".
// At the end the service must be idle with every rank's KV released, and the coordinator's
// and ranks' RSS (VmRSS from /proc) may not grow beyond --rss-growth-mib after warm-up.
//
// Exit 0 when all of that holds; 1 with the reasons on stderr. The report is JSON (--report).
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "http_client.h"
#include "unshackle/model/tokenizer.h"

namespace unshackle::soak {

using live::HttpResult;
using live::http_request;
using nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace http = live::http;

struct Options {
  uint16_t port = 0;
  std::string key, model, cli, generate_args, report;
  double seconds = 60;
  int clients = 4, overload_clients = 24;
  double overload_begin = 0.4, overload_end = 0.6;  // fractions of the run
  double warmup_seconds = 10;
  pid_t coordinator_pid = 0, mpirun_pid = 0;
  double rss_growth_mib = 32;
  double rss_second_half_mib = 4;  // checked on runs of 300 s or more
};

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// ---- what the answers must be ----

struct Expected {
  std::string prompt;      // the request's prompt (a question, for a context)
  std::string full;        // context + question: what generate ran on
  int context = -1;        // index into the contexts, or -1
  int max_tokens = 0;
  std::string text, finish_reason;
  size_t prompt_tokens = 0, completion_tokens = 0;
};

class Oracle {
 public:
  explicit Oracle(const Options& o) : o_(o), tokenizer_(load_tokenizer(o.model)) {}

  // `unshackle generate --json` on the service's model and settings, as the service answers it:
  // special tokens skipped in the text, a final stop token not counted.
  void fill(Expected& e) {
    const auto out = std::filesystem::temp_directory_path() / fmt::format("uns_soak_generate_{}.json", ::getpid());
    const std::string cmd = fmt::format("'{}' generate --model '{}' --prompt '{}' --max-tokens {} --temperature 0 {} --json > '{}' 2>&1",
                                        o_.cli, o_.model, e.full, e.max_tokens, o_.generate_args, out.string());
    const int rc = std::system(cmd.c_str());
    const json g = json::parse(read_text(out), nullptr, false);
    std::filesystem::remove(out);
    if (rc != 0 || !g.is_object()) throw std::runtime_error("generate failed: " + cmd);
    const auto tokens = g.at("tokens").get<std::vector<int32_t>>();
    const std::string bytes = tokenizer_->decode(tokens, /*skip_special=*/true);
    e.text = json::parse(json(bytes).dump(-1, ' ', false, json::error_handler_t::replace)).get<std::string>();
    const bool stopped = g.value("finish_reason", "") == "stop_token";
    e.finish_reason = stopped ? "stop" : "length";
    e.completion_tokens = tokens.size() - (stopped ? 1 : 0);
    e.prompt_tokens = g.at("prompt_tokens").size();
  }

 private:
  const Options& o_;
  std::unique_ptr<Tokenizer> tokenizer_;
};

// ---- measurements ----

enum Kind { kSync, kStream, kJob, kContext, kContextChurn, kKinds };
const char* kKindNames[kKinds] = {"sync", "stream", "job", "context", "context_churn"};

struct Stats {
  std::mutex mutex;
  std::vector<double> latency[kKinds];
  std::vector<double> steady, overload;  // all kinds, by when the request began
  int64_t served[kKinds] = {};
  int64_t rejected_429 = 0, rejected_429_in_overload = 0, retry_after_missing = 0;
  int64_t lost = 0, mixed_up = 0, wrong = 0, unexpected_status = 0;
  std::vector<std::string> failures;  // the first few, for the log

  void fail(const std::string& what) {
    std::lock_guard lock(mutex);
    if (failures.size() < 20) failures.push_back(what);
  }
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(i), v.end());
  return v[i];
}

long rss_kib(pid_t pid) {
  std::istringstream in(read_text(fmt::format("/proc/{}/status", pid)));
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

std::vector<pid_t> children_of(pid_t pid) {
  std::vector<pid_t> out;
  std::error_code ec;
  for (const auto& task : std::filesystem::directory_iterator(fmt::format("/proc/{}/task", pid), ec)) {
    std::istringstream in(read_text(task.path() / "children"));
    pid_t child = 0;
    while (in >> child) out.push_back(child);
  }
  return out;
}

// ---- the load ----

class Soak {
 public:
  explicit Soak(Options o) : o_(std::move(o)), oracle_(o_) {}

  int run() {
    if (!wait_ready()) return fail_now("the service did not become ready within 120 s");
    find_processes();
    build_workload();
    create_contexts();
    sample("start");
    start_ = Clock::now();
    std::vector<std::thread> threads;
    for (int i = 0; i < o_.clients; ++i) threads.emplace_back([this, i] { client(i, false); });
    for (int i = 0; i < o_.overload_clients; ++i) threads.emplace_back([this, i] { client(1000 + i, true); });
    // RSS after warm-up, then every 10 s (the series shows growth, or its absence, over time).
    std::this_thread::sleep_for(std::chrono::duration<double>(std::min(o_.warmup_seconds, o_.seconds / 4)));
    sample("after_warmup");
    while (elapsed() < o_.seconds) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      if (elapsed() >= next_sample_) {
        sample(fmt::format("t{:.0f}", elapsed()));
        next_sample_ += 10;
      }
    }
    stop_ = true;
    for (auto& t : threads) t.join();
    const double load_seconds = elapsed();
    delete_contexts();
    const bool idle = wait_idle();
    std::this_thread::sleep_for(std::chrono::seconds(2));
    sample("end");
    return finish(load_seconds, idle);
  }

 private:
  double elapsed() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  bool overload_now() const {
    const double f = elapsed() / o_.seconds;
    return f >= o_.overload_begin && f < o_.overload_end;
  }

  int fail_now(const std::string& why) {
    std::fprintf(stderr, "soak: FAIL %s\n", why.c_str());
    return 1;
  }

  HttpResult request(http::verb verb, const std::string& target, const json& body) const {
    return http_request(o_.port, verb, target, body.is_null() ? "" : body.dump(), o_.key, "application/json",
                        std::chrono::seconds(300));
  }

  bool wait_ready() {
    const auto deadline = Clock::now() + std::chrono::seconds(120);
    while (Clock::now() < deadline) {
      try {
        if (request(http::verb::get, "/ready", nullptr).status == 200) return true;
      } catch (const std::exception&) {
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return false;
  }

  void find_processes() {
    if (o_.coordinator_pid > 0) pids_.emplace_back("coordinator", o_.coordinator_pid);
    if (o_.mpirun_pid > 0) {
      std::vector<std::pair<int, pid_t>> ranks;
      for (const pid_t child : children_of(o_.mpirun_pid)) {
        const std::string env = read_text(fmt::format("/proc/{}/environ", child));
        const size_t at = env.find("OMPI_COMM_WORLD_RANK=");
        if (at != std::string::npos) ranks.emplace_back(std::atoi(env.c_str() + at + 21), child);
      }
      std::sort(ranks.begin(), ranks.end());
      for (const auto& [rank, pid] : ranks) pids_.emplace_back(fmt::format("rank{}", rank), pid);
    }
  }

  // RSS of every process, with the requests served and refused so far (the load went on).
  void sample(const std::string& when) {
    json s = json::object();
    for (const auto& [name, pid] : pids_) s[name] = rss_kib(pid);
    int64_t served = 0, refused = 0;
    {
      std::lock_guard lock(stats_.mutex);
      for (int k = 0; k < kKinds; ++k) served += stats_.served[k];
      refused = stats_.rejected_429;
    }
    rss_.push_back(json{{"when", when}, {"t", start_ == Clock::time_point{} ? 0.0 : elapsed()}, {"rss_kib", s},
                        {"served", served}, {"rejected_429", refused}});
  }

  // Distinct prompts (of different lengths) with a few max_tokens each; contexts of exactly two
  // prefill chunks (63 bytes + BOS = 64 tokens) so context + question is chunked as a fresh
  // prefill of the whole is (selection is per chunk), with two questions each.
  void build_workload() {
    const std::vector<std::string> sentences = {
        "The quick brown fox jumps", "Pack my box with five dozen liquor jugs", "Sphinx of black quartz, judge my vow",
        "How vexingly quick daft zebras jump", "A long context needs a short answer",
        "Bright vixens jump; dozy fowl quack", "Waltz, bad nymph, for quick jigs vex",
        "Five quacking zephyrs jolt my wax bed", "Jackdaws love my big sphinx of quartz",
        "The five boxing wizards jump quickly", "Mr Jock, TV quiz PhD, bags few lynx",
        "Crazy Fredrick bought many very exquisite opal jewels"};
    const int max_tokens[] = {4, 8, 12, 16};
    for (size_t i = 0; i < sentences.size(); ++i) {
      Expected e;
      e.prompt = e.full = sentences[i];
      e.max_tokens = max_tokens[i % 4];
      oracle_.fill(e);
      plain_.push_back(e);
    }
    context_texts_ = {"Once upon a time, in a land of long documents, a model read it.",
                      "Selective attention keeps the tokens that matter and skips rest",
                      "A coordinator queues jobs; the worker groups hold their KV data"};
    for (const auto& c : context_texts_)
      if (c.size() != 63) throw std::runtime_error(fmt::format("context '{}' is {} bytes, not 63", c, c.size()));
    const std::vector<std::string> questions = {" Who read it?", " What is next?"};
    for (size_t c = 0; c < context_texts_.size(); ++c)
      for (size_t q = 0; q < questions.size(); ++q) {
        Expected e;
        e.prompt = questions[q];
        e.full = context_texts_[c] + questions[q];
        e.context = static_cast<int>(c);
        e.max_tokens = 6 + 4 * static_cast<int>(q);
        oracle_.fill(e);
        with_context_.push_back(e);
      }
    // A mix-up is seen only when the answers differ: say how many are distinct.
    std::map<std::string, int> texts;
    for (const auto& e : plain_) ++texts[e.text];
    for (const auto& e : with_context_) ++texts[e.text];
    distinct_answers_ = texts.size();
    std::printf("soak: %zu prompts with their expected answers (%zu distinct) from unshackle generate\n",
                plain_.size() + with_context_.size(), distinct_answers_);
  }

  // POST /v1/contexts and wait until it is ready: the context's id, "" when it failed, or the
  // HTTP answer that refused it (a 429 when the queue is full).
  std::string create_context(int c, HttpResult* refused = nullptr) {
    const HttpResult r = request(http::verb::post, "/v1/contexts", json{{"prompt", context_texts_[static_cast<size_t>(c)]}});
    if (r.status != 200) {
      if (refused) *refused = r;
      return "";
    }
    const std::string id = r.json_body().value("id", "");
    const auto deadline = Clock::now() + std::chrono::seconds(120);
    while (Clock::now() < deadline) {
      const std::string status = request(http::verb::get, "/v1/contexts/" + id, nullptr).json_body().value("status", "");
      if (status == "ready") return id;
      if (status != "prefilling") return "";
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return "";
  }

  void create_contexts() {
    for (size_t c = 0; c < context_texts_.size(); ++c) {
      const std::string id = create_context(static_cast<int>(c));
      if (id.empty()) throw std::runtime_error("could not create the long-lived contexts");
      context_ids_.push_back(id);
    }
  }

  void delete_contexts() {
    for (const auto& id : context_ids_) request(http::verb::delete_, "/v1/contexts/" + id, nullptr);
  }

  // Idle: nothing running or waiting, no KV held on any rank (so nothing leaked on the workers).
  bool wait_idle() {
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    while (Clock::now() < deadline) {
      const std::string m = request(http::verb::get, "/metrics", nullptr).body;
      bool idle = true;
      std::istringstream in(m);
      std::string line;
      while (std::getline(in, line)) {
        if (line.empty() || line[0] == '#') continue;
        const bool gauge = line.rfind("unshackle_num_requests_running", 0) == 0 ||
                           line.rfind("unshackle_num_requests_waiting", 0) == 0 ||
                           line.rfind("unshackle_worker_kv_tokens{", 0) == 0;
        if (gauge && std::stod(line.substr(line.rfind(' ') + 1)) != 0) idle = false;
      }
      if (idle) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return false;
  }

  // Checks one answer's choices/usage (sync and job) against the oracle.
  // True when the answer is right (and counted as served).
  bool check_completion(Kind kind, const Expected& e, const json& j, Stats& s) {
    const json& choice = j["choices"][0];
    const std::string text = choice.value("text", "");
    if (text != e.text) {
      bool other = false;
      for (const auto* set : {&plain_, &with_context_})
        for (const auto& x : *set) other = other || (&x != &e && x.text == text);
      std::lock_guard lock(s.mutex);
      ++(other ? s.mixed_up : s.wrong);
      if (s.failures.size() < 20)
        s.failures.push_back(fmt::format("{} '{}': got {} want {}", kKindNames[kind], e.full, json(text).dump(), json(e.text).dump()));
      return false;
    }
    const json& u = j["usage"];
    if (u.value("prompt_tokens", size_t{0}) != e.prompt_tokens || u.value("completion_tokens", size_t{0}) != e.completion_tokens ||
        choice.value("finish_reason", "") != e.finish_reason) {
      s.fail(fmt::format("{} '{}': usage {} finish {} (want {}+{}, {})", kKindNames[kind], e.full, u.dump(),
                         choice.value("finish_reason", ""), e.prompt_tokens, e.completion_tokens, e.finish_reason));
      std::lock_guard lock(s.mutex);
      ++s.wrong;
      return false;
    }
    std::lock_guard lock(s.mutex);
    ++s.served[kind];
    return true;
  }

  bool check_stream(Kind kind, const Expected& e, const HttpResult& r, Stats& s) {
    const auto events = live::parse_sse(r.body);
    std::string text, finish;
    bool error = false;
    for (size_t i = 0; i + 1 < events.size(); ++i) {
      const json ev = json::parse(events[i], nullptr, false);
      if (!ev.is_object() || ev.contains("error")) {
        error = true;
        break;
      }
      if (ev["choices"].empty()) continue;
      text += ev["choices"][0].value("text", "");
      if (!ev["choices"][0]["finish_reason"].is_null()) finish = ev["choices"][0]["finish_reason"];
    }
    if (events.empty() || events.back() != "[DONE]" || error) {
      s.fail(fmt::format("{} '{}': stream without [DONE] or with an error: {}", kKindNames[kind], e.full, r.body.substr(0, 300)));
      std::lock_guard lock(s.mutex);
      ++s.lost;
      return false;
    }
    json j{{"choices", json::array({json{{"text", text}, {"finish_reason", finish}}})},
           {"usage", {{"prompt_tokens", e.prompt_tokens}, {"completion_tokens", e.completion_tokens}}}};
    return check_completion(kind, e, j, s);
  }

  // A status other than 200: 429 is the queue bound speaking (counted, with its Retry-After
  // checked); anything else is a failure.
  bool rejected(Kind kind, const HttpResult& r, bool overload_client, Stats& s) {
    if (r.status == 200) return false;
    // A client honours Retry-After; overload clients come back after 50 ms (they are the overload).
    if (r.status == 429) {
      const int after = std::atoi(r.header("Retry-After").c_str());
      std::this_thread::sleep_for(overload_client ? std::chrono::milliseconds(50) : std::chrono::seconds(std::max(after, 1)));
    }
    std::lock_guard lock(s.mutex);
    if (r.status == 429 && r.error_code() == "queue_full") {
      ++s.rejected_429;
      if (overload_client) ++s.rejected_429_in_overload;
      if (r.header("Retry-After").empty()) ++s.retry_after_missing;
    } else {
      ++(r.status >= 500 ? s.lost : s.unexpected_status);
      if (s.failures.size() < 20) s.failures.push_back(fmt::format("{}: HTTP {} {}", kKindNames[kind], r.status, r.body.substr(0, 300)));
    }
    return true;
  }

  void client(int index, bool overload_client) {
    std::mt19937_64 rng(0x50a4 + static_cast<uint64_t>(index));
    std::uniform_real_distribution<double> u(0, 1);
    while (!stop_) {
      if (overload_client && !overload_now()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        continue;
      }
      // The mix: sync 35 %, stream 25 %, job 15 %, stored context 20 %, context churn 5 %.
      const double x = u(rng);
      const Kind kind = overload_client ? kSync
                        : x < 0.35      ? kSync
                        : x < 0.60      ? kStream
                        : x < 0.75      ? kJob
                        : x < 0.95      ? kContext
                                        : kContextChurn;
      const bool on_context = kind == kContext || kind == kContextChurn;
      const auto& set = on_context ? with_context_ : plain_;
      const Expected& e = set[static_cast<size_t>(rng() % set.size())];
      const auto t0 = Clock::now();
      try {
        one(kind, e, rng, overload_client, t0);
      } catch (const std::exception& ex) {
        stats_.fail(fmt::format("{} '{}': {}", kKindNames[kind], e.full, ex.what()));
        std::lock_guard lock(stats_.mutex);
        ++stats_.lost;
      }
    }
  }

  void one(Kind kind, const Expected& e, std::mt19937_64& rng, bool overload_client, Clock::time_point t0) {
    json body{{"prompt", e.prompt}, {"max_tokens", e.max_tokens}, {"temperature", 0}};
    std::string churn_id;
    if (kind == kContext) {
      body["context"] = context_ids_[static_cast<size_t>(e.context)];
      if (rng() % 2) body["stream"] = true;
    } else if (kind == kContextChurn) {
      HttpResult refused;
      churn_id = create_context(e.context, &refused);
      if (churn_id.empty() && refused.status != 0 && rejected(kind, refused, overload_client, stats_)) return;
      if (churn_id.empty()) {
        stats_.fail("context_churn: the context was not created or did not become ready");
        std::lock_guard lock(stats_.mutex);
        ++stats_.lost;
        return;
      }
      body["context"] = churn_id;
    } else if (kind == kStream) {
      body["stream"] = true;
    }
    bool served = false;  // this request's answer was right: its latency counts
    const bool began_in_overload = overload_now();
    if (kind == kJob) {
      const HttpResult r = request(http::verb::post, "/v1/jobs", body);
      if (rejected(kind, r, overload_client, stats_)) return;
      const std::string id = r.json_body().value("id", "");
      for (;;) {
        const HttpResult res = request(http::verb::get, "/v1/jobs/" + id + "/result", nullptr);
        if (res.status == 200) {
          served = check_completion(kind, e, res.json_body(), stats_);
          break;
        }
        if (res.status != 409 || res.error_code() != "job_not_finished") {
          rejected(kind, res, overload_client, stats_);
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    } else {
      const HttpResult r = request(http::verb::post, "/v1/completions", body);
      if (!rejected(kind, r, overload_client, stats_)) {
        served = body.value("stream", false) ? check_stream(kind, e, r, stats_)
                                             : check_completion(kind, e, r.json_body(), stats_);
      }
    }
    if (!churn_id.empty()) {
      const HttpResult d = request(http::verb::delete_, "/v1/contexts/" + churn_id, nullptr);
      if (d.status != 200) stats_.fail(fmt::format("context_churn: DELETE gave {}", d.status));
    }
    if (served) {
      const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      std::lock_guard lock(stats_.mutex);
      stats_.latency[kind].push_back(seconds);
      (began_in_overload ? stats_.overload : stats_.steady).push_back(seconds);
    }
  }

  int finish(double load_seconds, bool idle) {
    std::vector<std::string> problems;
    Stats& s = stats_;
    std::vector<double> all;
    int64_t served = 0;
    json kinds = json::object();
    for (int k = 0; k < kKinds; ++k) {
      served += s.served[k];
      all.insert(all.end(), s.latency[k].begin(), s.latency[k].end());
      kinds[kKindNames[k]] = {{"served", s.served[k]},
                              {"p50_s", percentile(s.latency[k], 0.50)},
                              {"p99_s", percentile(s.latency[k], 0.99)}};
    }
    if (static_cast<int64_t>(s.steady.size() + s.overload.size()) != served)
      problems.push_back(fmt::format("{} latencies for {} requests served", s.steady.size() + s.overload.size(), served));
    if (s.lost) problems.push_back(fmt::format("{} responses lost", s.lost));
    if (s.mixed_up) problems.push_back(fmt::format("{} responses carried another prompt's answer", s.mixed_up));
    if (s.wrong) problems.push_back(fmt::format("{} responses differ from unshackle generate", s.wrong));
    if (s.unexpected_status) problems.push_back(fmt::format("{} unexpected 4xx statuses", s.unexpected_status));
    if (s.rejected_429_in_overload == 0) problems.push_back("the overload window provoked no 429");
    if (s.retry_after_missing) problems.push_back(fmt::format("{} 429s without Retry-After", s.retry_after_missing));
    for (int k = 0; k < kKinds; ++k)
      if (s.served[k] == 0) problems.push_back(fmt::format("no {} request was served", kKindNames[k]));
    if (!idle) problems.push_back("the service was not idle with all KV released 60 s after the load");
    // RSS: the end against after warm-up, per process.
    json growth = json::object();
    const json& warm = rss_.at(1)["rss_kib"];
    const json& end = rss_.back()["rss_kib"];
    for (const auto& [name, pid] : pids_) {
      const long a = warm.value(name, -1L), b = end.value(name, -1L);
      if (a < 0 || b < 0) {
        problems.push_back(fmt::format("{} (pid {}) is gone", name, pid));
        continue;
      }
      const double mib = static_cast<double>(b - a) / 1024.0;
      growth[name] = mib;
      if (mib > o_.rss_growth_mib) problems.push_back(fmt::format("{} RSS grew {:.1f} MiB (bound {} MiB)", name, mib, o_.rss_growth_mib));
    }
    // Over the second half of a long run, once the coordinator's window of finished jobs
    // (keep_finished, 10000) is full, memory must stay flat.
    json second_half = json::object();
    const json* half = nullptr;
    for (const auto& r : rss_)
      if (!half && r["t"].get<double>() >= load_seconds / 2) half = &r;
    if (half)
      for (const auto& [name, pid] : pids_) {
        const long a = (*half)["rss_kib"].value(name, -1L), b = end.value(name, -1L);
        if (a < 0 || b < 0) continue;
        const double mib = static_cast<double>(b - a) / 1024.0;
        second_half[name] = mib;
        if (load_seconds >= 300 && mib > o_.rss_second_half_mib)
          problems.push_back(fmt::format("{} RSS grew {:.1f} MiB over the second half (bound {} MiB)", name, mib,
                                         o_.rss_second_half_mib));
      }
    json report{{"seconds", load_seconds},
                {"clients", o_.clients},
                {"overload_clients", o_.overload_clients},
                {"overload_window_s", {o_.overload_begin * o_.seconds, o_.overload_end * o_.seconds}},
                {"prompts", plain_.size() + with_context_.size()},
                {"distinct_answers", distinct_answers_},
                {"served", served},
                {"requests_per_second", static_cast<double>(served) / load_seconds},
                {"p50_s", percentile(all, 0.50)},
                {"p99_s", percentile(all, 0.99)},
                {"by_kind", kinds},
                {"rejected_429", s.rejected_429},
                {"rejected_429_by_overload_clients", s.rejected_429_in_overload},
                {"lost", s.lost},
                {"mixed_up", s.mixed_up},
                {"wrong", s.wrong},
                {"unexpected_status", s.unexpected_status},
                {"idle_and_kv_released", idle},
                {"rss", rss_},
                {"rss_growth_mib", growth},
                {"rss_growth_bound_mib", o_.rss_growth_mib},
                {"rss_second_half_growth_mib", second_half},
                {"rss_second_half_bound_mib", o_.rss_second_half_mib},
                {"steady", {{"p50_s", percentile(s.steady, 0.50)}, {"p99_s", percentile(s.steady, 0.99)}, {"served", s.steady.size()}}},
                {"overload", {{"p50_s", percentile(s.overload, 0.50)}, {"p99_s", percentile(s.overload, 0.99)}, {"served", s.overload.size()}}},
                {"failures", s.failures},
                {"problems", problems},
                {"pass", problems.empty()}};
    if (!o_.report.empty()) std::ofstream(o_.report) << report.dump(2) << "\n";
    std::printf("soak: %.0f s, %lld requests served (%.1f/s), p50 %.3f s, p99 %.3f s, %lld x 429, lost %lld, mixed up %lld, wrong %lld\n",
                load_seconds, static_cast<long long>(served), static_cast<double>(served) / load_seconds,
                percentile(all, 0.5), percentile(all, 0.99), static_cast<long long>(s.rejected_429),
                static_cast<long long>(s.lost), static_cast<long long>(s.mixed_up), static_cast<long long>(s.wrong));
    for (const auto& [name, pid] : pids_)
      std::printf("soak: %s RSS %ld KiB after warm-up, %ld KiB at the end\n", name.c_str(), warm.value(name, -1L),
                  end.value(name, -1L));
    for (const auto& f : s.failures) std::fprintf(stderr, "soak: failure: %s\n", f.c_str());
    for (const auto& p : problems) std::fprintf(stderr, "soak: FAIL %s\n", p.c_str());
    if (problems.empty()) std::printf("soak: PASS\n");
    return problems.empty() ? 0 : 1;
  }

  Options o_;
  Oracle oracle_;
  std::vector<Expected> plain_, with_context_;
  std::vector<std::string> context_texts_, context_ids_;
  size_t distinct_answers_ = 0;
  std::vector<std::pair<std::string, pid_t>> pids_;
  json rss_ = json::array();
  Stats stats_;
  Clock::time_point start_{};
  double next_sample_ = 10;
  std::atomic<bool> stop_{false};
};

}  // namespace unshackle::soak

int main(int argc, char** argv) {
  using namespace unshackle::soak;
  CLI::App app{"soak_client: load against a running Unshackle service, every answer checked against unshackle generate"};
  Options o;
  app.add_option("--port", o.port, "the coordinator's HTTP port")->required();
  app.add_option("--key", o.key, "API key");
  app.add_option("--model", o.model, "the model directory the workers serve")->required();
  app.add_option("--cli", o.cli, "the unshackle binary (for generate)")->required();
  app.add_option("--generate-args", o.generate_args, "generate flags matching the service (attention, ranks, kv-block, chunk)");
  app.add_option("--seconds", o.seconds, "how long the load runs")->capture_default_str();
  app.add_option("--clients", o.clients, "client threads all along")->capture_default_str();
  app.add_option("--overload-clients", o.overload_clients, "extra threads in the overload window (sync, no pause)")
      ->capture_default_str();
  app.add_option("--overload-begin", o.overload_begin, "start of the overload window (fraction of --seconds)")->capture_default_str();
  app.add_option("--overload-end", o.overload_end, "its end")->capture_default_str();
  app.add_option("--warmup-seconds", o.warmup_seconds, "load before the first RSS sample that growth is measured from")
      ->capture_default_str();
  app.add_option("--coordinator-pid", o.coordinator_pid, "for RSS");
  app.add_option("--mpirun-pid", o.mpirun_pid, "for the ranks' RSS (mpirun's children)");
  app.add_option("--rss-growth-mib", o.rss_growth_mib, "largest RSS growth per process from warm-up to the end")
      ->capture_default_str();
  app.add_option("--rss-second-half-mib", o.rss_second_half_mib,
                 "largest RSS growth per process over the second half of a run of 300 s or more")
      ->capture_default_str();
  app.add_option("--report", o.report, "write the JSON report here");
  CLI11_PARSE(app, argc, argv);
  try {
    return Soak(o).run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "soak: FAIL %s\n", e.what());
    return 1;
  }
}
