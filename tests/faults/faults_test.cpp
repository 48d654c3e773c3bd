// Faults with real processes (issue 15): a worker rank killed (SIGKILL) during prefill and
// during decode, a rank hung (SIGSTOP), the coordinator killed while jobs run and started
// again on its state directory, and a full disk under /v1/files. Each ends with a clear error
// to the client within the configured timeout, and the coordinator serves the next job.
// Every wait is bounded; the timings printed as "FAULT|..." lines are docs/reliability.md's table.
#include <gtest/gtest.h>

#include <fmt/format.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <future>
#include <set>
#include <string>

#include "fault_service.h"

namespace unshackle::live {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

const char* kPrompt = "The quick brown fox jumps";

std::string long_prompt(size_t bytes, const std::string& seed = "All work and no play makes a long context. ") {
  std::string text;
  while (text.size() < bytes) text += seed;
  text.resize(bytes);
  return text;
}

// A model and chunking slow enough that a 1900-token prefill takes seconds on a CPU (as the
// e2e suite's slow service), so a fault lands inside the phase the test names.
LiveOptions slow_options() {
  LiveOptions o;
  o.model.layers = 4;
  o.model.hidden = 256;
  o.model.heads = 8;
  o.model.kv_heads = 4;
  o.prefill_chunk = 16;
  return o;
}

void report(const std::string& fault, const std::string& client_saw, double seconds, const std::string& coordinator) {
  std::printf("FAULT|%s|%s|%.2f s|%s\n", fault.c_str(), client_saw.c_str(), seconds, coordinator.c_str());
  std::fflush(stdout);
}

// The newest completion job (kind "completion", not a batch's) once it is in `phase` with
// progress in it (prefilled or generated tokens).
json wait_for_phase(const FaultService& svc, const std::string& phase, int64_t min_progress) {
  json job;
  const bool ok = eventually(
      [&] {
        const json list = svc.get("/v1/jobs?limit=20").json_body();
        for (const json& j : list.value("data", json::array())) {
          if (j["kind"] != "completion" || j["status"] != phase) continue;
          const json& p = j["progress"];
          const json& n = phase == "decode" ? p["generated_tokens"] : p["prefilled_tokens"];
          if (n.is_number() && n.get<int64_t>() >= min_progress) {
            job = j;
            return true;
          }
        }
        return false;
      },
      60s, 5ms);
  EXPECT_TRUE(ok) << "no completion reached " << phase << ": " << svc.get("/v1/jobs?limit=20").body;
  return ok ? job : json();
}

// The in-band error event of an SSE body (the event before [DONE]), or null.
json stream_error(const std::string& body) {
  const auto events = parse_sse(body);
  if (events.size() < 2 || events.back() != "[DONE]") return nullptr;
  const json e = json::parse(events[events.size() - 2], nullptr, false);
  return e.is_object() && e.contains("error") ? e["error"] : json();
}

// The text a stream delivered before it ended.
std::string stream_text(const std::string& body) {
  std::string text;
  for (const auto& event : parse_sse(body)) {
    const json e = json::parse(event, nullptr, false);
    if (e.is_object() && e.contains("choices") && !e["choices"].empty()) text += e["choices"][0].value("text", "");
  }
  return text;
}

std::string down_causes(const FaultService& svc) {
  std::string out;
  for (const char* cause : {"step_timeout", "collective_failed", "heartbeat_lost", "link_closed"}) {
    const auto v = svc.metric(fmt::format("unshackle_worker_group_down_total{{cause=\"{}\"}}", cause));
    if (v && *v > 0) out += (out.empty() ? "" : ",") + std::string(cause);
  }
  return out.empty() ? "none" : out;
}

// A short greedy completion equals `unshackle generate`: the service serves again, correctly.
void expect_serves(const FaultService& svc, const std::string& prompt, const std::string& want_group = "") {
  const auto t0 = Clock::now();
  const HttpResult r = svc.post("/v1/completions", json{{"prompt", prompt}, {"max_tokens", 6}, {"temperature", 0}});
  ASSERT_EQ(r.status, 200) << r.body;
  const json oracle = svc.generate(prompt, 6);
  ASSERT_TRUE(oracle.is_object());
  EXPECT_EQ(r.json_body()["choices"][0]["text"], oracle["service_text"]) << r.body;
  if (!want_group.empty()) {
    const std::string id = r.json_body()["id"].get<std::string>().substr(5);  // "cmpl-" + job id
    EXPECT_EQ(svc.get("/v1/jobs/" + id).json_body()["group"], want_group);
  }
  std::printf("next completion served in %.2f s\n", since(t0));
}

// ---- a rank killed (SIGKILL) ----

struct RankFault {
  int rank;
  const char* phase;  // "prefill" (a sync completion) or "decode" (a stream)
};

void PrintTo(const RankFault& f, std::ostream* os) { *os << "rank " << f.rank << " during " << f.phase; }

class RankKilled : public ::testing::TestWithParam<RankFault> {};

TEST_P(RankKilled, ClientGetsWorkerGroupLostAndARestartedGroupServes) {
  const RankFault fault = GetParam();
  const bool decode = std::string(fault.phase) == "decode";
  FaultOptions o;
  o.live = slow_options();
  FaultService svc(o);
  ASSERT_TRUE(svc.start_coordinator());
  ASSERT_TRUE(svc.start_group("g0"));
  const json body = decode ? json{{"prompt", kPrompt}, {"max_tokens", 1500}, {"temperature", 0}, {"stream", true}}
                           : json{{"prompt", long_prompt(1900)}, {"max_tokens", 20}, {"temperature", 0}};
  auto client = std::async(std::launch::async, [&] { return svc.post_exchange("/v1/completions", body); });
  const json job = wait_for_phase(svc, fault.phase, decode ? 2 : 16);
  ASSERT_TRUE(job.is_object());
  const pid_t victim = svc.rank_pid("g0", fault.rank);
  ASSERT_GT(victim, 0) << "rank " << fault.rank << " of g0 not found among mpirun's children";
  const auto t0 = Clock::now();
  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  ASSERT_EQ(client.wait_for(60s), std::future_status::ready) << "the client got no answer within 60 s";
  const Exchange e = client.get();
  const double seconds = since(t0);
  ASSERT_TRUE(e.transport_error.empty()) << e.transport_error;
  std::string saw;
  if (decode) {
    // Headers went out with the first token: the failure comes in band, then [DONE].
    EXPECT_EQ(e.result.status, 200);
    const json error = stream_error(e.result.body);
    ASSERT_TRUE(error.is_object()) << e.result.body.substr(0, 2000);
    EXPECT_EQ(error["code"], "worker_group_lost") << error.dump();
    EXPECT_FALSE(stream_text(e.result.body).empty()) << "tokens before the fault were delivered";
    saw = fmt::format("SSE error event `{}` (\"{}\") after {} chars, then [DONE]", error["code"].get<std::string>(),
                      error["message"].get<std::string>(), stream_text(e.result.body).size());
  } else {
    EXPECT_EQ(e.result.status, 500) << e.result.body;
    EXPECT_EQ(e.result.error_code(), "worker_group_lost") << e.result.body;
    EXPECT_EQ(e.result.header("x-should-retry"), "false");
    saw = fmt::format("{} `{}` (\"{}\")", e.result.status, e.result.error_code(),
                      e.result.json_body()["error"].value("message", ""));
  }
  // Detected by the kernel (the dead rank's sockets close) or at worst by the collective
  // timeout of the rank left waiting; both well inside it plus the heartbeat timeout.
  EXPECT_LT(seconds, o.collective_timeout_s + static_cast<double>(o.heartbeat_timeout_ms) / 1000.0 + 2) << saw;
  EXPECT_EQ(svc.get("/health").status, 200);
  EXPECT_EQ(svc.metric("unshackle_worker_group_up{group=\"g0\"}"), 0.0);
  // The whole group exits, so its launcher (systemd, Slurm, LWS) restarts it whole.
  const auto code = svc.group("g0").wait(30s);
  ASSERT_TRUE(code.has_value()) << "the group did not exit within 30 s of losing rank " << fault.rank << "\n"
                                << svc.group("g0").log_text();
  const std::string causes = down_causes(svc);
  report(fmt::format("SIGKILL rank {} during {}", fault.rank, fault.phase), saw, seconds,
         fmt::format("group down ({}); mpirun exited {}; restarted group serves", causes, *code));
  // Restarted under the same name (as a launcher does), it serves the next job correctly.
  ASSERT_TRUE(svc.start_group("g0"));
  expect_serves(svc, "Pack my box with five dozen liquor jugs");
}

INSTANTIATE_TEST_SUITE_P(Faults, RankKilled,
                         ::testing::Values(RankFault{1, "prefill"}, RankFault{0, "prefill"}, RankFault{1, "decode"},
                                           RankFault{0, "decode"}),
                         [](const auto& p) { return fmt::format("Rank{}During_{}", p.param.rank, p.param.phase); });

// ---- a rank hung (SIGSTOP) ----

class RankHung : public ::testing::TestWithParam<int> {};

// Two groups: the job's group hangs, the other serves the next job at once.
TEST_P(RankHung, ClientGetsAnErrorWithinTheTimeoutAndTheOtherGroupServes) {
  const int rank = GetParam();
  FaultOptions o;
  o.live = slow_options();
  FaultService svc(o);
  ASSERT_TRUE(svc.start_coordinator());
  ASSERT_TRUE(svc.start_group("g0"));
  ASSERT_TRUE(svc.start_group("g1"));
  const json body{{"prompt", kPrompt}, {"max_tokens", 1500}, {"temperature", 0}, {"stream", true}};
  auto client = std::async(std::launch::async, [&] { return svc.post_exchange("/v1/completions", body); });
  const json job = wait_for_phase(svc, "decode", 2);
  ASSERT_TRUE(job.is_object());
  const std::string hung = job["group"], other = hung == "g0" ? "g1" : "g0";
  const pid_t victim = svc.rank_pid(hung, rank);
  ASSERT_GT(victim, 0);
  const auto t0 = Clock::now();
  ASSERT_EQ(::kill(victim, SIGSTOP), 0);
  ASSERT_EQ(client.wait_for(60s), std::future_status::ready) << "the client got no answer within 60 s";
  const Exchange e = client.get();
  const double seconds = since(t0);
  ASSERT_TRUE(e.transport_error.empty()) << e.transport_error;
  const json error = stream_error(e.result.body);
  ASSERT_TRUE(error.is_object()) << e.result.body.substr(0, 2000);
  EXPECT_EQ(error["code"], "worker_group_lost") << error.dump();
  // Rank 0 stopped: its heartbeats stop (--heartbeat-timeout-ms). Another rank stopped: rank 0's
  // collective waits for it (--collective-timeout-s) and reports the group broken.
  const double limit = rank == 0 ? static_cast<double>(o.heartbeat_timeout_ms) / 1000.0 : o.collective_timeout_s;
  EXPECT_GE(seconds, limit * 0.9) << "detected before the timeout: by what?";
  EXPECT_LT(seconds, limit + 2.5) << error.dump();
  const std::string causes = down_causes(svc);
  EXPECT_EQ(svc.metric(fmt::format("unshackle_worker_group_up{{group=\"{}\"}}", hung)), 0.0);
  // The other group serves at once.
  expect_serves(svc, "Sphinx of black quartz, judge my vow", other);
  // The hung group: the ranks still running leave after their collective timeout, and mpirun
  // then ends the stopped one, so the launcher sees the group exit.
  const auto code = svc.group(hung).wait(30s);
  report(fmt::format("SIGSTOP rank {} during decode", rank),
         fmt::format("SSE error event `{}` (\"{}\"), then [DONE]", error["code"].get<std::string>(),
                     error["message"].get<std::string>()),
         seconds,
         fmt::format("group down ({}); other group served the next job; mpirun {}", causes,
                     code ? fmt::format("exited {}", *code) : std::string("still running after 30 s")));
  EXPECT_TRUE(code.has_value()) << "the hung group's mpirun did not exit within 30 s\n" << svc.group(hung).log_text();
}

INSTANTIATE_TEST_SUITE_P(Faults, RankHung, ::testing::Values(1, 0),
                         [](const auto& p) { return fmt::format("Rank{}", p.param); });

// ---- the coordinator killed (SIGKILL) and started again ----

std::string batch_line(const std::string& custom_id, const std::string& prompt, int max_tokens) {
  return json{{"custom_id", custom_id},
              {"method", "POST"},
              {"url", "/v1/completions"},
              {"body", {{"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0}}}}
             .dump() +
         "\n";
}

json create_batch(const FaultService& svc, const std::string& file_id) {
  const HttpResult r = svc.post("/v1/batches", json{{"input_file_id", file_id}, {"endpoint", "/v1/completions"},
                                                    {"completion_window", "24h"}});
  EXPECT_EQ(r.status, 200) << r.body;
  return r.json_body();
}

json wait_batch_done(const FaultService& svc, const std::string& id, std::chrono::seconds timeout = 120s) {
  json b;
  eventually(
      [&] {
        b = svc.get("/v1/batches/" + id).json_body();
        const std::string s = b.value("status", "");
        return s != "validating" && s != "in_progress" && s != "finalizing" && s != "cancelling";
      },
      timeout, 100ms);
  return b;
}

// Each output line's text equals generate's for its prompt.
void expect_batch_output(const FaultService& svc, const json& batch, const std::map<std::string, std::string>& prompts,
                         int max_tokens) {
  ASSERT_EQ(batch["status"], "completed") << batch.dump();
  ASSERT_TRUE(batch["output_file_id"].is_string()) << batch.dump();
  const std::string output = svc.get("/v1/files/" + batch["output_file_id"].get<std::string>() + "/content").body;
  std::set<std::string> seen;
  std::istringstream in(output);
  std::string text;
  while (std::getline(in, text)) {
    if (text.empty()) continue;
    const json line = json::parse(text, nullptr, false);
    ASSERT_TRUE(line.is_object()) << text;
    const std::string id = line["custom_id"];
    ASSERT_EQ(prompts.count(id), 1u) << text;
    EXPECT_TRUE(seen.insert(id).second) << "custom_id twice: " << id;
    const json oracle = svc.generate(prompts.at(id), max_tokens);
    EXPECT_EQ(line["response"]["body"]["choices"][0]["text"], oracle["service_text"]) << text;
  }
  EXPECT_EQ(seen.size(), prompts.size()) << output;
}

TEST(CoordinatorKilled, ClientsSeeTheConnectionCloseAndTheRestartedCoordinatorHasFilesAndBatches) {
  FaultOptions o;
  o.live = slow_options();
  o.state_dir = true;
  FaultService svc(o);
  ASSERT_TRUE(svc.start_coordinator());
  ASSERT_TRUE(svc.start_group("g0"));
  // A batch that finished before the crash.
  const std::map<std::string, std::string> done_prompts{{"early", "Pack my box with five dozen liquor jugs"}};
  const HttpResult done_file = svc.upload(batch_line("early", done_prompts.at("early"), 4), "early.jsonl");
  ASSERT_EQ(done_file.status, 200) << done_file.body;
  const json done = wait_batch_done(svc, create_batch(svc, done_file.json_body()["id"])["id"]);
  ASSERT_EQ(done["status"], "completed") << done.dump();
  const std::string done_output = svc.get("/v1/files/" + done["output_file_id"].get<std::string>() + "/content").body;
  // A batch running at the crash: prompts long enough that it runs for seconds.
  std::map<std::string, std::string> prompts;
  std::string jsonl;
  for (int i = 0; i < 3; ++i) {
    const std::string id = fmt::format("req-{}", i);
    prompts[id] = long_prompt(400, fmt::format("Line {} of a batch that outlives a crash. ", i));
    jsonl += batch_line(id, prompts[id], 5);
  }
  const HttpResult file = svc.upload(jsonl);
  ASSERT_EQ(file.status, 200) << file.body;
  const std::string file_id = file.json_body()["id"];
  const std::string batch_id = create_batch(svc, file_id)["id"];
  // A stored context and a running completion.
  const HttpResult context = svc.post("/v1/contexts", json{{"prompt", kPrompt}});
  ASSERT_EQ(context.status, 200) << context.body;
  const std::string context_id = context.json_body()["id"];
  ASSERT_TRUE(eventually([&] { return svc.get("/v1/contexts/" + context_id).json_body().value("status", "") == "ready"; }));
  // A stream in decode and a sync completion in prefill.
  const json stream_body{{"prompt", kPrompt}, {"max_tokens", 1500}, {"temperature", 0}, {"stream", true}};
  auto streamer = std::async(std::launch::async, [&] { return svc.post_exchange("/v1/completions", stream_body); });
  ASSERT_TRUE(wait_for_phase(svc, "decode", 2).is_object());
  const json running_body{{"prompt", long_prompt(1900)}, {"max_tokens", 20}, {"temperature", 0}};
  auto client = std::async(std::launch::async, [&] { return svc.post_exchange("/v1/completions", running_body); });
  const json job = wait_for_phase(svc, "prefill", 16);
  ASSERT_TRUE(job.is_object());
  ASSERT_EQ(svc.get("/v1/batches/" + batch_id).json_body()["status"], "in_progress");

  const auto t0 = Clock::now();
  ASSERT_EQ(::kill(svc.coordinator().pid(), SIGKILL), 0);
  ASSERT_EQ(client.wait_for(30s), std::future_status::ready);
  const Exchange e = client.get();
  const double seconds = since(t0);
  EXPECT_FALSE(e.transport_error.empty()) << "a response from a killed coordinator? " << e.result.body;
  EXPECT_LT(seconds, 2.0) << "the client learns at once: its connection closes";
  ASSERT_EQ(streamer.wait_for(30s), std::future_status::ready);
  const Exchange stream = streamer.get();
  EXPECT_FALSE(stream.transport_error.empty()) << "the stream ends without its last chunk, so without [DONE]";
  // The group sees its link close and exits 0 (its launcher restarts it).
  const auto group_code = svc.group("g0").wait(20s);
  ASSERT_TRUE(group_code.has_value()) << svc.group("g0").log_text();
  EXPECT_EQ(*group_code, 0) << svc.group("g0").log_text();

  // Started again on the same state directory.
  const auto restart = Clock::now();
  ASSERT_TRUE(svc.start_coordinator());
  const double restart_seconds = since(restart);
  EXPECT_NE(svc.coordinator_log().find("its 3 requests run again"), std::string::npos) << svc.coordinator_log();
  const json files = svc.get("/v1/files").json_body();
  EXPECT_EQ(files["data"].size(), 3u) << files.dump();  // two inputs and the finished batch's output
  EXPECT_EQ(svc.get("/v1/files/" + file_id + "/content").body, jsonl);
  EXPECT_EQ(svc.get("/v1/files/" + done["output_file_id"].get<std::string>() + "/content").body, done_output);
  const json done_again = svc.get("/v1/batches/" + done["id"].get<std::string>()).json_body();
  EXPECT_EQ(done_again["status"], "completed");
  EXPECT_EQ(done_again["request_counts"], done["request_counts"]);
  const json resumed = svc.get("/v1/batches/" + batch_id).json_body();
  EXPECT_EQ(resumed["status"], "in_progress") << resumed.dump();
  EXPECT_EQ(resumed["request_counts"], (json{{"total", 3}, {"completed", 0}, {"failed", 0}})) << resumed.dump();
  // Jobs and stored contexts lived in memory: their ids are unknown, and the message says why.
  const HttpResult old_job = svc.get("/v1/jobs/" + job["id"].get<std::string>());
  EXPECT_EQ(old_job.status, 404);
  EXPECT_EQ(old_job.error_code(), "job_not_found");
  EXPECT_NE(old_job.body.find("a restart loses them"), std::string::npos) << old_job.body;
  const HttpResult old_context = svc.get("/v1/contexts/" + context_id);
  EXPECT_EQ(old_context.status, 404);
  EXPECT_NE(old_context.body.find("a restart loses them"), std::string::npos) << old_context.body;
  // The group comes back and the batch runs to the end, every answer equal to generate's.
  ASSERT_TRUE(svc.start_group("g0"));
  const json finished = wait_batch_done(svc, batch_id);
  expect_batch_output(svc, finished, prompts, 5);
  report("SIGKILL the coordinator (jobs, a batch, a stored context running)",
         fmt::format("sync: connection closed without a response (`{}`); stream: body cut short, no [DONE] (`{}`)",
                     e.transport_error.substr(0, e.transport_error.find(" [")),
                     stream.transport_error.substr(0, stream.transport_error.find(" ["))),
         seconds,
         fmt::format("group exited {}; restarted in {:.2f} s on --state-dir: 3 files and 2 batches read back, the running "
                     "batch ran again and completed; old job/context ids 404 `... a restart loses them`",
                     *group_code, restart_seconds));
}

TEST(CoordinatorKilled, WithoutAStateDirTheLostFileIsExplained) {
  FaultOptions o;
  FaultService svc(o);
  ASSERT_TRUE(svc.start_coordinator());
  const HttpResult up = svc.upload(batch_line("a", "hello", 2));
  ASSERT_EQ(up.status, 200) << up.body;
  ASSERT_EQ(::kill(svc.coordinator().pid(), SIGKILL), 0);
  ASSERT_TRUE(svc.coordinator().wait(10s).has_value());
  ASSERT_TRUE(svc.start_coordinator());
  const HttpResult r = svc.get("/v1/files/" + up.json_body()["id"].get<std::string>());
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(r.error_code(), "file_not_found");
  EXPECT_NE(r.body.find("without --state-dir"), std::string::npos) << r.body;
}

// ---- a full disk under /v1/files ----

std::vector<std::string> temp_files(const std::filesystem::path& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& sub : {"files", "batches"})
    for (const auto& entry : std::filesystem::directory_iterator(dir / sub, ec))
      if (entry.path().extension() == ".tmp") out.push_back(entry.path().string());
  return out;
}

// The state directory on a 256 KiB tmpfs of the coordinator's own (a mount namespace): real
// ENOSPC from the kernel. Uploads that do not fit are 507 and leave no trace; what was stored
// stays byte for byte, also across a restart on the full disk; a batch whose output cannot be
// written fails with the reason and runs again once there is room.
TEST(DiskFull, UploadsGet507AndStoredFilesSurviveIntact) {
  const auto prefix = private_mount_prefix();
  if (!prefix) GTEST_SKIP() << "no mount namespace for a private tmpfs here (neither `unshare --mount` as root nor "
                               "`unshare --user --map-root-user --mount`)";
  FaultOptions o;
  o.state_dir = true;
  o.tmpfs_kib = 256;
  FaultService svc(o);
  ASSERT_TRUE(svc.start_coordinator(*prefix));
  std::map<std::string, std::string> stored;  // id -> content
  // A batch input (its prompts short: the batch below runs fast).
  std::map<std::string, std::string> prompts{{"x", "Sphinx of black quartz"}, {"y", "Pack my box"}};
  const std::string input = batch_line("x", prompts["x"], 4) + batch_line("y", prompts["y"], 4);
  const HttpResult a = svc.upload(input);
  ASSERT_EQ(a.status, 200) << a.body;
  stored[a.json_body()["id"]] = input;

  const auto t0 = Clock::now();
  const HttpResult big = svc.upload(std::string(300 * 1024, 'z'));
  const double seconds = since(t0);
  EXPECT_EQ(big.status, 507) << big.body;
  EXPECT_EQ(big.error_code(), "insufficient_storage") << big.body;
  EXPECT_EQ(big.json_body()["error"]["type"], "server_error");
  EXPECT_NE(big.body.find("No space left on device"), std::string::npos) << big.body;
  EXPECT_TRUE(temp_files(svc.state_view()).empty()) << "a failed write left its temp file";
  // Fill the disk to the last page with small files; each 507 changes nothing.
  int fillers = 0, refused = 0;
  for (int i = 0; i < 200 && refused < 2; ++i) {
    const std::string content = fmt::format("filler {} ", i) + std::string(2000, 'f');
    const HttpResult r = svc.upload(content, fmt::format("filler{}.jsonl", i));
    if (r.status == 200) {
      stored[r.json_body()["id"]] = content;
      ++fillers;
    } else {
      EXPECT_EQ(r.status, 507) << r.body;
      ++refused;
    }
  }
  EXPECT_GT(fillers, 10);
  EXPECT_EQ(refused, 2);
  // A batch's record cannot be written either: 507, and no batch.
  const HttpResult no_batch = svc.post("/v1/batches", json{{"input_file_id", a.json_body()["id"]},
                                                           {"endpoint", "/v1/completions"}, {"completion_window", "24h"}});
  EXPECT_EQ(no_batch.status, 507) << no_batch.body;
  EXPECT_EQ(svc.get("/v1/batches").json_body()["data"].size(), 0u);
  const auto check_stored = [&](const char* when) {
    SCOPED_TRACE(when);
    const json list = svc.get("/v1/files").json_body();
    EXPECT_EQ(list["data"].size(), stored.size()) << list.dump();
    for (const auto& [id, content] : stored) EXPECT_EQ(svc.get("/v1/files/" + id + "/content").body, content) << id;
    EXPECT_TRUE(temp_files(svc.state_view()).empty());
  };
  check_stored("on the full disk");
  // Room for the batch's record, none for its output: the batch fails and says why.
  const std::string freed = stored.rbegin()->first;
  ASSERT_EQ(svc.del("/v1/files/" + freed).status, 200);
  stored.erase(freed);
  const json batch = create_batch(svc, a.json_body()["id"]);
  ASSERT_EQ(batch["status"], "in_progress") << batch.dump();
  for (int i = 0; i < 4; ++i) {
    const std::string content = fmt::format("last {}", i);
    const HttpResult r = svc.upload(content, "last.jsonl");
    if (r.status == 200) stored[r.json_body()["id"]] = content;
  }
  ASSERT_TRUE(svc.start_group("g0"));
  const json failed = wait_batch_done(svc, batch["id"]);
  EXPECT_EQ(failed["status"], "failed") << failed.dump();
  EXPECT_EQ(failed["errors"]["data"][0]["code"], "insufficient_storage") << failed.dump();
  check_stored("after the batch's output was refused");
  // Restarted on the same full tmpfs: the files are read back intact; the batch record on disk
  // is the one written last (in_progress), so with room made it runs again and completes.
  std::vector<std::string> fillers_to_free;
  for (const auto& [id, content] : stored)
    if (id != a.json_body()["id"] && fillers_to_free.size() < 3) fillers_to_free.push_back(id);
  for (const auto& id : fillers_to_free) {
    ASSERT_EQ(svc.del("/v1/files/" + id).status, 200);
    stored.erase(id);
  }
  ASSERT_TRUE(svc.restart_in_namespace());
  check_stored("after a restart");
  ASSERT_TRUE(svc.start_group("g1"));
  const json again = wait_batch_done(svc, batch["id"]);
  expect_batch_output(svc, again, prompts, 4);
  report("/v1/files upload on a full disk (256 KiB tmpfs)", "507 `insufficient_storage`", seconds,
         fmt::format("nothing stored, no temp file; {} stored files intact, also after a restart; a batch whose output "
                     "did not fit failed (`insufficient_storage`), then ran again after the restart",
                     stored.size()));
}

}  // namespace
}  // namespace unshackle::live
