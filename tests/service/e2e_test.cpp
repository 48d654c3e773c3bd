// End to end on loopback with real processes (issue 6): unshackle-coordinator, a worker group
// of 2 CPU ranks under mpirun (unshackle-worker) serving a model written by make_model, and a
// real HTTP client. The oracle for generated tokens is `unshackle generate` on the same model,
// prompt, attention settings, ranks and seed.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cstdio>
#include <memory>

#include "live_service.h"
#include "unshackle/model/tokenizer.h"

namespace unshackle::live {
namespace {

const char* kPrompt = "The quick brown fox jumps";  // 25 bytes + BOS: one prefill chunk

// One service for the suite: starting mpirun and loading the model is the slow part.
class E2E : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { service_ = std::make_unique<LiveService>(); }
  static void TearDownTestSuite() { service_.reset(); }
  void SetUp() override {
    if (!service_ || service_->http_port == 0) GTEST_FAIL() << "the service did not start";
  }
  static LiveService& svc() { return *service_; }
  static inline std::unique_ptr<LiveService> service_;
};

// Jobs that must still run when the test cancels or kills them: a wider model and short
// prefill chunks make a 1900-token prefill take seconds instead of a fraction of one.
LiveOptions slow_options() {
  LiveOptions o;
  o.model.layers = 4;
  o.model.hidden = 256;
  o.model.heads = 8;
  o.model.kv_heads = 4;
  o.prefill_chunk = 16;
  return o;
}

class E2ESlow : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { service_ = std::make_unique<LiveService>(slow_options()); }
  static void TearDownTestSuite() { service_.reset(); }
  void SetUp() override {
    if (!service_ || service_->http_port == 0) GTEST_FAIL() << "the service did not start";
  }
  static LiveService& svc() { return *service_; }
  static inline std::unique_ptr<LiveService> service_;
};

TEST_F(E2E, ModelsListsTheGroupsModel) {
  const HttpResult r = svc().get("/v1/models");
  ASSERT_EQ(r.status, 200) << r.body;
  const json j = r.json_body();
  ASSERT_EQ(j["data"].size(), 1u) << r.body;
  EXPECT_EQ(j["data"][0]["id"], "model");
  EXPECT_EQ(j["data"][0]["max_model_len"], svc().options().max_context_tokens);
}

TEST_F(E2E, SyncCompletionEqualsUnshackleGenerate) {
  for (const double temperature : {0.0, 0.9}) {
    const HttpResult r = svc().post(
        "/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 12}, {"temperature", temperature}, {"seed", 11}});
    ASSERT_EQ(r.status, 200) << r.body;
    const json j = r.json_body();
    const json g = run_generate(svc(), kPrompt, 12, temperature, 11);
    ASSERT_TRUE(g.is_object());
    EXPECT_EQ(j["choices"][0]["text"], g["text"]) << "temperature " << temperature;
    EXPECT_EQ(j["usage"]["prompt_tokens"], g["prompt_tokens"].size());
    // generate counts a final stop token, the service does not (it ends the completion).
    const bool stopped = g["finish_reason"] == "stop_token";
    EXPECT_EQ(j["usage"]["completion_tokens"].get<size_t>(), g["tokens"].size() - (stopped ? 1 : 0));
    EXPECT_EQ(j["choices"][0]["finish_reason"], stopped ? "stop" : "length");
  }
}

TEST_F(E2E, StreamingDeliversTheSameTextAsSSE) {
  const json body{{"prompt", kPrompt}, {"max_tokens", 12}, {"temperature", 0.9}, {"seed", 5}};
  const HttpResult sync = svc().post("/v1/completions", body);
  ASSERT_EQ(sync.status, 200) << sync.body;
  json stream_body = body;
  stream_body["stream"] = true;
  stream_body["stream_options"] = {{"include_usage", true}};
  const HttpResult r = svc().post("/v1/completions", stream_body);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_NE(r.header("Content-Type").find("text/event-stream"), std::string::npos);
  const std::vector<std::string> events = parse_sse(r.body);
  ASSERT_GE(events.size(), 3u) << r.body;
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  std::string finish;
  json usage;
  int text_events = 0;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json e = json::parse(events[i], nullptr, false);
    ASSERT_TRUE(e.is_object()) << events[i];
    ASSERT_FALSE(e.contains("error")) << events[i];
    EXPECT_EQ(e["object"], "text_completion");
    if (e["choices"].empty()) {
      EXPECT_EQ(i + 2, events.size()) << "the usage chunk comes last, right before [DONE]";
      usage = e["usage"];
      continue;
    }
    text += e["choices"][0]["text"].get<std::string>();
    if (!e["choices"][0]["text"].get<std::string>().empty()) ++text_events;
    if (!e["choices"][0]["finish_reason"].is_null()) finish = e["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(text, sync.json_body()["choices"][0]["text"]);
  EXPECT_EQ(finish, sync.json_body()["choices"][0]["finish_reason"]);
  EXPECT_GT(text_events, 1) << "text arrives in several deltas";
  EXPECT_EQ(usage, sync.json_body()["usage"]);
}

// Token ids of `text` with the model's tokenizer (BOS first).
std::vector<int32_t> encode(const LiveService& s, const std::string& text, bool bos) {
  auto tokenizer = load_tokenizer(s.model_dir());
  return tokenizer->encode(text, bos);
}

TEST_F(E2E, StoredContextGivesTheTokensOfAFreshPrefill) {
  // 63 bytes + BOS = 64 tokens: two whole prefill chunks, so the fresh prefill of context +
  // question is cut at the same token boundaries as context, then question (selection is per chunk).
  const std::string context_text = "Once upon a time, in a land of long documents, a model read it.";
  const std::vector<int32_t> context_ids = encode(svc(), context_text, true);
  ASSERT_EQ(context_ids.size() % static_cast<size_t>(svc().options().prefill_chunk), 0u);
  const HttpResult c = svc().post("/v1/contexts", json{{"prompt", context_ids}});
  ASSERT_EQ(c.status, 200) << c.body;
  const std::string id = c.json_body()["id"];
  ASSERT_TRUE(eventually([&] { return svc().get("/v1/contexts/" + id).json_body().value("status", "") == "ready"; }))
      << svc().get("/v1/contexts/" + id).body;

  const std::string question_text = " Who read it?";
  const std::vector<int32_t> question = encode(svc(), question_text, false);
  std::vector<int32_t> whole = context_ids;
  whole.insert(whole.end(), question.begin(), question.end());
  for (const double temperature : {0.0, 1.0}) {
    const json sampling{{"max_tokens", 10}, {"temperature", temperature}, {"seed", 3}};
    json fresh_body = sampling, reuse_body = sampling;
    fresh_body["prompt"] = whole;
    reuse_body["prompt"] = question_text;  // text continuing a context is tokenized without BOS
    reuse_body["context"] = id;
    const HttpResult fresh = svc().post("/v1/completions", fresh_body);
    const HttpResult first = svc().post("/v1/completions", reuse_body);
    const HttpResult second = svc().post("/v1/completions", reuse_body);
    ASSERT_EQ(fresh.status, 200) << fresh.body;
    ASSERT_EQ(first.status, 200) << first.body;
    ASSERT_EQ(second.status, 200) << second.body;
    EXPECT_EQ(first.json_body()["choices"], fresh.json_body()["choices"]) << "temperature " << temperature;
    EXPECT_EQ(second.json_body()["choices"], fresh.json_body()["choices"]) << "the context is unchanged by a completion";
    EXPECT_EQ(first.json_body()["usage"]["prompt_tokens"], whole.size());
  }
  EXPECT_EQ(svc().del("/v1/contexts/" + id).status, 200);
  EXPECT_TRUE(eventually([&] { return svc().get("/v1/contexts/" + id).status == 404; }));
  // Deleted contexts release their KV on every rank (the heartbeat reports it).
  EXPECT_TRUE(eventually([&] {
    return svc().metric("unshackle_worker_kv_tokens{group=\"g0\",rank=\"0\"}") == 0.0 &&
           svc().metric("unshackle_worker_kv_tokens{group=\"g0\",rank=\"1\"}") == 0.0;
  })) << svc().get("/metrics").body;
}

// A prompt long enough that its prefill takes many steps.
std::string long_prompt(size_t bytes) {
  std::string text;
  while (text.size() < bytes) text += "All work and no play makes a long context. ";
  text.resize(bytes);
  return text;
}

TEST_F(E2E, JobReportsProgressAndCompletes) {
  const HttpResult r = svc().post("/v1/jobs", json{{"prompt", long_prompt(300)}, {"max_tokens", 4}, {"temperature", 0}});
  ASSERT_EQ(r.status, 200) << r.body;
  const std::string id = r.json_body()["id"];
  double last_fraction = 0;
  json job;
  ASSERT_TRUE(eventually([&] {
    job = svc().get("/v1/jobs/" + id).json_body();
    const json& p = job["progress"];
    if (p["prefill_fraction"].is_number()) {
      EXPECT_GE(p["prefill_fraction"].get<double>(), last_fraction) << "progress never goes back";
      last_fraction = p["prefill_fraction"].get<double>();
    }
    return job["status"] == "completed";
  })) << job.dump();
  EXPECT_EQ(job["progress"]["prompt_tokens"], 301);
  EXPECT_EQ(job["progress"]["prefilled_tokens"], 301);
  EXPECT_EQ(last_fraction, 1.0);
  EXPECT_TRUE(job["timings"]["prefill_seconds"].is_number());
  const HttpResult result = svc().get("/v1/jobs/" + id + "/result");
  ASSERT_EQ(result.status, 200) << result.body;
  EXPECT_EQ(result.json_body()["usage"]["prompt_tokens"], 301);
}

// JSONL lines of a batch input file: {"custom_id","method","url","body"} each.
std::string batch_jsonl(const std::vector<std::pair<std::string, json>>& requests) {
  std::string out;
  for (const auto& [custom_id, body] : requests)
    out += json{{"custom_id", custom_id}, {"method", "POST"}, {"url", "/v1/completions"}, {"body", body}}.dump() + "\n";
  return out;
}

// The lines of a JSONL file by custom_id.
std::map<std::string, json> jsonl_by_custom_id(const std::string& text) {
  std::map<std::string, json> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.empty()) continue;
    const json j = json::parse(line, nullptr, false);
    EXPECT_TRUE(j.is_object()) << line;
    if (!j.is_object()) continue;
    EXPECT_EQ(out.count(j.value("custom_id", "")), 0u) << "custom_id twice: " << line;
    out[j.value("custom_id", "")] = j;
  }
  return out;
}

// OpenAI Batch API on the real workers: an uploaded JSONL of completions runs as jobs; each
// output line carries its custom_id and the completion that `unshackle generate` gives for the
// same request; a bad line lands in the error file and the rest still complete.
TEST_F(E2E, BatchOfCompletionsMatchesGenerateAndMapsCustomIds) {
  struct Good {
    std::string custom_id, prompt;
    int max_tokens;
    double temperature;
    uint64_t seed;
    bool as_ids;  // the prompt as token ids (BOS first) instead of text
  };
  const std::vector<Good> good = {{"alpha", kPrompt, 8, 0.0, 1, false},
                                  {"bravo", "Pack my box with five dozen liquor jugs", 10, 0.9, 21, false},
                                  {"charlie", "Sphinx of black quartz, judge my vow", 9, 0.7, 5, true}};
  std::vector<std::pair<std::string, json>> requests;
  std::map<std::string, json> bodies;
  for (const Good& g : good) {
    json body{{"max_tokens", g.max_tokens}, {"temperature", g.temperature}, {"seed", g.seed}};
    body["prompt"] = g.as_ids ? json(encode(svc(), g.prompt, true)) : json(g.prompt);
    bodies[g.custom_id] = body;
    requests.emplace_back(g.custom_id, body);
    if (g.custom_id == "alpha") requests.emplace_back("delta-bad", json{{"prompt", "a"}, {"max_tokens", -1}});
  }
  const std::string jsonl = batch_jsonl(requests);

  const HttpResult up = svc().upload(jsonl);
  ASSERT_EQ(up.status, 200) << up.body;
  const std::string input_id = up.json_body()["id"];
  EXPECT_EQ(up.json_body()["purpose"], "batch");
  EXPECT_EQ(up.json_body()["bytes"], jsonl.size());
  EXPECT_EQ(svc().get("/v1/files/" + input_id + "/content").body, jsonl);

  const HttpResult created = svc().post("/v1/batches", json{{"input_file_id", input_id},
                                                            {"endpoint", "/v1/completions"},
                                                            {"completion_window", "24h"},
                                                            {"metadata", {{"suite", "e2e"}}}});
  ASSERT_EQ(created.status, 200) << created.body;
  const std::string batch_id = created.json_body()["id"];
  json batch;
  ASSERT_TRUE(eventually(
      [&] {
        batch = svc().get("/v1/batches/" + batch_id).json_body();
        const std::string status = batch.value("status", "");
        return status != "validating" && status != "in_progress" && status != "finalizing";
      },
      120s, 100ms))
      << batch.dump();
  ASSERT_EQ(batch["status"], "completed") << batch.dump();
  EXPECT_EQ(batch["request_counts"], (json{{"total", 4}, {"completed", 3}, {"failed", 1}})) << batch.dump();
  EXPECT_EQ(batch["metadata"], (json{{"suite", "e2e"}}));
  ASSERT_TRUE(batch["output_file_id"].is_string()) << batch.dump();
  ASSERT_TRUE(batch["error_file_id"].is_string()) << batch.dump();

  const HttpResult output = svc().get("/v1/files/" + batch["output_file_id"].get<std::string>() + "/content");
  ASSERT_EQ(output.status, 200) << output.body;
  const std::map<std::string, json> lines = jsonl_by_custom_id(output.body);
  EXPECT_EQ(lines.size(), good.size()) << output.body;
  for (const Good& g : good) {
    SCOPED_TRACE(g.custom_id);
    ASSERT_EQ(lines.count(g.custom_id), 1u) << output.body;
    const json& line = lines.at(g.custom_id);
    EXPECT_TRUE(line["error"].is_null()) << line.dump();
    EXPECT_EQ(line["response"]["status_code"], 200) << line.dump();
    const json& body = line["response"]["body"];
    EXPECT_EQ(body["object"], "text_completion");
    const json oracle = run_generate(svc(), g.prompt, g.max_tokens, g.temperature, g.seed);
    ASSERT_TRUE(oracle.is_object());
    EXPECT_EQ(body["choices"][0]["text"], service_text(svc(), oracle)) << line.dump();
    EXPECT_EQ(body["usage"]["prompt_tokens"], oracle["prompt_tokens"].size());
    EXPECT_EQ(body["usage"]["completion_tokens"], service_completion_tokens(oracle));
    // The same request as a sync completion answers the same.
    const HttpResult sync = svc().post("/v1/completions", bodies.at(g.custom_id));
    ASSERT_EQ(sync.status, 200) << sync.body;
    EXPECT_EQ(body["choices"], sync.json_body()["choices"]);
    // request_id is the job that ran it.
    const std::string job_id = line["response"]["request_id"];
    const json job = svc().get("/v1/jobs/" + job_id).json_body();
    EXPECT_EQ(job["kind"], "batch_request") << job.dump();
    EXPECT_EQ(job["status"], "completed") << job.dump();
  }

  const HttpResult errors = svc().get("/v1/files/" + batch["error_file_id"].get<std::string>() + "/content");
  ASSERT_EQ(errors.status, 200) << errors.body;
  const std::map<std::string, json> error_lines = jsonl_by_custom_id(errors.body);
  ASSERT_EQ(error_lines.size(), 1u) << errors.body;
  ASSERT_EQ(error_lines.count("delta-bad"), 1u) << errors.body;
  const json& bad = error_lines.at("delta-bad");
  EXPECT_EQ(bad["response"]["status_code"], 400) << bad.dump();
  EXPECT_EQ(bad["response"]["body"]["error"]["code"], "invalid_value") << bad.dump();
  EXPECT_EQ(bad["response"]["body"]["error"]["param"], "max_tokens") << bad.dump();

  // The output files are listed with purpose batch_output.
  const json output_file = svc().get("/v1/files/" + batch["output_file_id"].get<std::string>()).json_body();
  EXPECT_EQ(output_file["purpose"], "batch_output") << output_file.dump();
  EXPECT_EQ(output_file["bytes"], output.body.size());
}

TEST_F(E2ESlow, CancelStopsTheJobOnTheWorkers) {
  const int64_t total = 1901;  // 1900 bytes + BOS, in 119 prefill chunks
  const HttpResult r = svc().post("/v1/jobs", json{{"prompt", long_prompt(1900)}, {"max_tokens", 100}});
  ASSERT_EQ(r.status, 200) << r.body;
  const std::string id = r.json_body()["id"];
  json job;
  ASSERT_TRUE(eventually([&] {
    job = svc().get("/v1/jobs/" + id).json_body();
    return job["progress"]["prefilled_tokens"].is_number() && job["progress"]["prefilled_tokens"].get<int64_t>() > 0;
  }, 30s, 5ms)) << job.dump();
  // The workers hold the job's KV while it runs.
  EXPECT_TRUE(eventually([&] { return svc().metric("unshackle_worker_kv_tokens{group=\"g0\",rank=\"1\"}") > 0.0; }, 10s, 5ms));
  const HttpResult cancel = svc().post("/v1/jobs/" + id + "/cancel", json::object());
  ASSERT_EQ(cancel.status, 200) << cancel.body;
  ASSERT_TRUE(eventually([&] {
    job = svc().get("/v1/jobs/" + id).json_body();
    return job["status"] == "cancelled";
  })) << job.dump();
  const int64_t prefilled = job["progress"]["prefilled_tokens"];
  EXPECT_LT(prefilled, total) << "cancelled before the prefill ended";
  EXPECT_EQ(job["progress"]["generated_tokens"], 0);
  // Work stopped: progress stays, the context is released on every rank, nothing runs.
  std::this_thread::sleep_for(500ms);
  EXPECT_EQ(svc().get("/v1/jobs/" + id).json_body()["progress"]["prefilled_tokens"], prefilled);
  EXPECT_TRUE(eventually([&] {
    return svc().metric("unshackle_worker_kv_tokens{group=\"g0\",rank=\"0\"}") == 0.0 &&
           svc().metric("unshackle_worker_kv_tokens{group=\"g0\",rank=\"1\"}") == 0.0 &&
           svc().metric("unshackle_num_requests_running") == 0.0;
  })) << svc().get("/metrics").body;
  const HttpResult result = svc().get("/v1/jobs/" + id + "/result");
  EXPECT_EQ(result.status, 409);
  EXPECT_EQ(result.error_code(), "job_cancelled");
}

TEST_F(E2ESlow, StreamClientThatDisconnectsDuringPrefillCancelsItsJob) {
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  stream.connect(net::ip::tcp::endpoint(net::ip::make_address("127.0.0.1"), svc().http_port));
  http::request<http::string_body> req{http::verb::post, "/v1/completions", 11};
  req.set(http::field::host, "127.0.0.1");
  req.set(http::field::authorization, "Bearer " + svc().options().api_key);
  req.set(http::field::content_type, "application/json");
  req.body() = json{{"prompt", long_prompt(1900)}, {"max_tokens", 20}, {"stream", true}}.dump();
  req.prepare_payload();
  http::write(stream, req);
  // The stream's job is the newest; wait until it is prefilling (nothing has been written yet).
  std::string id;
  ASSERT_TRUE(eventually(
      [&] {
        const json list = svc().get("/v1/jobs?limit=1").json_body();
        if (!list.contains("data") || list["data"].empty()) return false;
        const json& j = list["data"][0];
        if (j["status"] != "prefill" || !j["progress"]["prefilled_tokens"].is_number() ||
            j["progress"]["prefilled_tokens"].get<int64_t>() == 0)
          return false;
        id = j["id"];
        return true;
      },
      30s, 5ms));
  stream.socket().close();
  json job;
  ASSERT_TRUE(eventually([&] {
    job = svc().get("/v1/jobs/" + id).json_body();
    return job["status"] == "cancelled";
  })) << job.dump();
  EXPECT_LT(job["progress"]["prefilled_tokens"].get<int64_t>(), 1901);
  EXPECT_TRUE(eventually([&] {
    return svc().metric("unshackle_worker_kv_tokens{group=\"g0\",rank=\"0\"}") == 0.0 &&
           svc().metric("unshackle_worker_kv_tokens{group=\"g0\",rank=\"1\"}") == 0.0;
  })) << svc().get("/metrics").body;
}

struct BadRequest {
  const char* name;
  std::string target;
  std::string body;
  int status;
  const char* code;
  const char* param;  // nullptr: not checked
};

TEST_F(E2E, BadRequestsGetTheirStatusCodeAndField) {
  const std::vector<BadRequest> table = {
      {"not json", "/v1/completions", "{\"prompt\": ", 400, "invalid_json", nullptr},
      {"no prompt", "/v1/completions", R"({"max_tokens":4})", 400, "missing_required_parameter", "prompt"},
      {"negative max_tokens", "/v1/completions", R"({"prompt":"a","max_tokens":-1})", 400, "invalid_value", "max_tokens"},
      {"temperature as text", "/v1/completions", R"({"prompt":"a","temperature":"hot"})", 400, "invalid_value", "temperature"},
      {"top_p zero", "/v1/completions", R"({"prompt":"a","top_p":0})", 400, "invalid_value", "top_p"},
      {"attention.top_k zero", "/v1/completions", R"({"prompt":"a","attention":{"top_k":0}})", 400, "invalid_value",
       "attention.top_k"},
      {"attention unknown mode", "/v1/completions", R"({"prompt":"a","attention":{"mode":"fast"}})", 400, "invalid_value",
       "attention.mode"},
      {"esa without compression weights", "/v1/completions", R"({"prompt":"a","max_tokens":2,"attention":{"mode":"esa"}})",
       400, "invalid_value", "attention.mode"},
      {"token id outside the vocabulary", "/v1/completions", R"({"prompt":[1,2,99999],"max_tokens":2})", 400,
       "invalid_value", "prompt"},
      {"beyond the context length", "/v1/completions", R"({"prompt":"abc","max_tokens":5000})", 400,
       "context_length_exceeded", nullptr},
      {"n of 2", "/v1/completions", R"({"prompt":"a","n":2})", 400, "invalid_value", "n"},
      {"unknown model", "/v1/completions", R"({"prompt":"a","model":"gpt-5"})", 404, "model_not_found", "model"},
      {"unknown context", "/v1/completions", R"({"prompt":"a","context":"ctx-nope"})", 404, "context_not_found", "context"},
      {"unknown job", "/v1/jobs/job-nope", "", 404, "job_not_found", nullptr},
      {"unknown route", "/v2/everything", "", 404, "unknown_route", nullptr},
  };
  for (const BadRequest& c : table) {
    SCOPED_TRACE(c.name);
    const HttpResult r = c.body.empty() ? svc().get(c.target)
                                        : svc().raw(http::verb::post, c.target, c.body, svc().options().api_key);
    EXPECT_EQ(r.status, c.status) << r.body;
    EXPECT_EQ(r.error_code(), c.code) << r.body;
    if (c.param) {
      EXPECT_EQ(r.error_param(), c.param) << r.body;
    }
    const json j = r.json_body();
    ASSERT_TRUE(j.is_object() && j.contains("error")) << r.body;
    EXPECT_FALSE(j["error"]["message"].get<std::string>().empty());
  }
  // The service still serves after all of them.
  EXPECT_EQ(svc().post("/v1/completions", json{{"prompt", "ok"}, {"max_tokens", 2}}).status, 200);
}

TEST_F(E2E, BearerAuthOnEveryRouteButHealth) {
  const std::string key = svc().options().api_key;
  EXPECT_EQ(svc().raw(http::verb::get, "/health", "", "").status, 200);
  for (const std::string target : {"/v1/models", "/metrics", "/ready", "/v1/jobs/x"}) {
    SCOPED_TRACE(target);
    const HttpResult none = svc().raw(http::verb::get, target, "", "");
    EXPECT_EQ(none.status, 401);
    EXPECT_EQ(none.error_code(), "missing_api_key");
    const HttpResult wrong = svc().raw(http::verb::get, target, "", key + "x");
    EXPECT_EQ(wrong.status, 401);
    EXPECT_EQ(wrong.error_code(), "invalid_api_key");
  }
  const HttpResult post = svc().raw(http::verb::post, "/v1/completions", R"({"prompt":"a"})", "wrong");
  EXPECT_EQ(post.status, 401);
}

// A real Prometheus scrapes the coordinator during a workload; PromQL over its HTTP API shows
// the counters, histograms and per-rank gauges moved.
TEST_F(E2E, PrometheusScrapesTheWorkload) {
  if (!LivePrometheus::available()) GTEST_SKIP() << "prometheus is not installed (Debian package prometheus)";
  LivePrometheus prom(svc());
  ASSERT_TRUE(eventually([&] { return prom.target_up(); }, 30s, 200ms)) << "Prometheus never scraped /metrics";
  const auto now = [&](const std::string& q) { return prom.value(q).value_or(0.0); };
  // Baselines from Prometheus itself (earlier tests of the suite already ran work).
  const double prompt0 = now("sum(unshackle_prompt_tokens_total)");
  const double generated0 = now("sum(unshackle_generation_tokens_total)");
  const double finished0 = now("sum(unshackle_request_finished_total)");
  const double ttft0 = now("sum(unshackle_time_to_first_token_seconds_count)");
  const double collective0 = now("sum(unshackle_collective_seconds_count)");
  const double selected0 = now("sum(unshackle_selected_tokens_total)");

  // The workload: a stored context (its KV stays on the ranks while scraped) and completions on it.
  const HttpResult c = svc().post("/v1/contexts", json{{"prompt", long_prompt(200)}});
  ASSERT_EQ(c.status, 200) << c.body;
  const std::string id = c.json_body()["id"];
  ASSERT_TRUE(eventually([&] { return svc().get("/v1/contexts/" + id).json_body().value("status", "") == "ready"; }));
  for (int i = 0; i < 3; ++i) {
    const HttpResult r = svc().post("/v1/completions", json{{"context", id}, {"prompt", " more"}, {"max_tokens", 8},
                                                             {"temperature", 0.7}, {"seed", i}});
    ASSERT_EQ(r.status, 200) << r.body;
  }
  const double prompt_sent = 201 + 3 * 5;  // the context once, then 5 question tokens each
  const bool moved = eventually(
      [&] {
        return now("sum(unshackle_prompt_tokens_total)") >= prompt0 + prompt_sent &&
               now("sum(unshackle_request_finished_total)") >= finished0 + 4 &&
               now("min(unshackle_worker_kv_tokens{group=\"g0\"})") > 0;
      },
      30s, 250ms);
  EXPECT_TRUE(moved) << "prompt " << now("sum(unshackle_prompt_tokens_total)") - prompt0 << " finished "
                     << now("sum(unshackle_request_finished_total)") - finished0;
  EXPECT_GT(now("sum(unshackle_generation_tokens_total)"), generated0);
  EXPECT_GE(now("sum(unshackle_time_to_first_token_seconds_count)"), ttft0 + 3);
  EXPECT_GT(now("sum(unshackle_collective_seconds_count)"), collective0);
  // One query, so both counts come from the same scrape.
  EXPECT_EQ(prom.value("sum(unshackle_layer_collective_seconds_count) - sum(unshackle_collective_seconds_count)"), 0.0)
      << "one per-layer observation per step";
  EXPECT_GT(now("sum(unshackle_selected_tokens_total)"), selected0) << "exact-topk selects once the middle is long";
  EXPECT_EQ(now("unshackle_worker_group_up{group=\"g0\"}"), 1.0);
  // Both ranks hold part of the stored context (blocks of 8 tokens alternate between them).
  EXPECT_EQ(now("count(unshackle_worker_kv_bytes{group=\"g0\"} > 0)"), 2.0);
  // A histogram quantile over the scraped buckets is a finite latency.
  const auto p90 = prom.value("histogram_quantile(0.9, sum by (le) (unshackle_e2e_request_latency_seconds_bucket))");
  ASSERT_TRUE(p90.has_value());
  EXPECT_GT(*p90, 0.0);
  EXPECT_EQ(svc().del("/v1/contexts/" + id).status, 200);
}

// The `unshackle` client subcommands against the running service.
struct CliRun {
  int code = -1;
  std::string out, err;
};
CliRun run_cli(const LiveService& s, const std::string& args) {
  static int n = 0;
  const auto out = s.dir() / fmt::format("cli{}.out", n), err = s.dir() / fmt::format("cli{}.err", n);
  ++n;
  const std::string cmd = fmt::format("'{}' {} --url http://127.0.0.1:{} --api-key '{}' > '{}' 2> '{}'", UNS_CLI_BIN, args,
                                      s.http_port, s.options().api_key, out.string(), err.string());
  const int rc = std::system(cmd.c_str());
  return CliRun{WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, read_text(out), read_text(err)};
}

TEST_F(E2E, CliSubmitStreamsTheAnswerAfterAPrefillProgressBar) {
  // 63 bytes + BOS: two whole prefill chunks, so the fresh prompt below is chunked alike.
  const std::string document = "Once upon a time, in a land of long documents, a model read it.";
  const auto file = svc().dir() / "document.txt";
  std::ofstream(file) << document;
  const CliRun r = run_cli(svc(), fmt::format("submit --file '{}' --question ' Who read it?' --max-tokens 8 --temperature 0.8 "
                                              "--seed 4",
                                              file.string()));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("prefill ["), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("64/64 tokens"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("finish_reason: "), std::string::npos) << r.err;
  std::vector<int32_t> whole = encode(svc(), document, true);
  const std::vector<int32_t> question = encode(svc(), " Who read it?", false);
  whole.insert(whole.end(), question.begin(), question.end());
  const HttpResult fresh =
      svc().post("/v1/completions", json{{"prompt", whole}, {"max_tokens", 8}, {"temperature", 0.8}, {"seed", 4}});
  ASSERT_EQ(fresh.status, 200) << fresh.body;
  EXPECT_EQ(r.out, fresh.json_body()["choices"][0]["text"].get<std::string>() + "\n");
}

TEST_F(E2ESlow, CliJobsStatusCancel) {
  const auto file = svc().dir() / "long.txt";
  std::ofstream(file) << long_prompt(1900);
  const CliRun submitted = run_cli(svc(), fmt::format("submit --detach --file '{}' --question ' Q' --max-tokens 50", file.string()));
  ASSERT_EQ(submitted.code, 0) << submitted.err;
  const std::string id = submitted.out.substr(0, submitted.out.find('\n'));
  ASSERT_EQ(id.rfind("job-", 0), 0u) << submitted.out;
  const CliRun jobs = run_cli(svc(), "jobs --limit 5");
  ASSERT_EQ(jobs.code, 0) << jobs.err;
  EXPECT_EQ(jobs.out.rfind(id, 0), 0u) << "the newest job comes first:\n" << jobs.out;
  const CliRun status = run_cli(svc(), "status " + id);
  ASSERT_EQ(status.code, 0) << status.err;
  EXPECT_EQ(json::parse(status.out, nullptr, false).value("id", ""), id) << status.out;
  const CliRun cancel = run_cli(svc(), "cancel " + id);
  ASSERT_EQ(cancel.code, 0) << cancel.err;
  EXPECT_TRUE(eventually([&] { return svc().get("/v1/jobs/" + id).json_body().value("status", "") == "cancelled"; }));
  // Bad input: exit 2 with the service's message, or the option named.
  const CliRun unknown = run_cli(svc(), "status job-nope");
  EXPECT_EQ(unknown.code, 2);
  EXPECT_NE(unknown.err.find("job_not_found"), std::string::npos) << unknown.err;
  const CliRun missing = run_cli(svc(), "submit --file /nonexistent/doc.txt --question q");
  EXPECT_EQ(missing.code, 2);
  EXPECT_NE(missing.err.find("--file"), std::string::npos) << missing.err;
}

// Its own service: the group dies.
TEST(E2EGroupLoss, KilledGroupFailsItsJobAndTheCoordinatorKeepsServing) {
  LiveService svc(slow_options());
  ASSERT_NE(svc.http_port, 0);
  const HttpResult r = svc.post("/v1/jobs", json{{"prompt", long_prompt(1900)}, {"max_tokens", 50}});
  ASSERT_EQ(r.status, 200) << r.body;
  const std::string id = r.json_body()["id"];
  ASSERT_TRUE(eventually([&] {
    const json job = svc.get("/v1/jobs/" + id).json_body();
    return job["progress"]["prefilled_tokens"].is_number() && job["progress"]["prefilled_tokens"].get<int64_t>() > 0;
  }, 30s, 5ms));
  svc.group("g0").signal_group(SIGKILL);  // mpirun and every rank
  json job;
  ASSERT_TRUE(eventually([&] {
    job = svc.get("/v1/jobs/" + id).json_body();
    return job["status"] == "failed";
  })) << job.dump();
  const HttpResult result = svc.get("/v1/jobs/" + id + "/result");
  EXPECT_EQ(result.status, 500) << result.body;
  EXPECT_EQ(result.error_code(), "worker_group_lost");
  EXPECT_EQ(result.header("x-should-retry"), "false");
  EXPECT_EQ(svc.get("/health").status, 200);
  EXPECT_EQ(svc.metric("unshackle_worker_group_up{group=\"g0\"}"), 0.0);
  // A new group joins and the same coordinator serves again.
  svc.start_group("g1");
  const HttpResult again = svc.post("/v1/completions", json{{"prompt", kPrompt}, {"max_tokens", 4}});
  EXPECT_EQ(again.status, 200) << again.body;
}

TEST(E2EShutdown, WorkersLeaveOnSigtermAndWhenTheCoordinatorGoes) {
  LiveService svc;
  ASSERT_NE(svc.http_port, 0);
  // SIGTERM to the group (mpirun and every rank, as systemd does): rank 0 stops the other
  // ranks and every rank leaves cleanly. mpirun itself exits 1 after it was signalled.
  const auto code = svc.group("g0").stop(20s);
  ASSERT_TRUE(code.has_value()) << "the group did not exit within 20 s of SIGTERM";
  const std::string log = svc.group("g0").log_text();
  EXPECT_NE(log.find("stop requested (signal)"), std::string::npos) << log;
  EXPECT_NE(log.find("exiting with code 0"), std::string::npos) << log;
  EXPECT_EQ(log.find("abort"), std::string::npos) << log;
  EXPECT_TRUE(eventually([&] { return svc.metric("unshackle_worker_group_up{group=\"g0\"}") == 0.0; }));
  // The coordinator goes away: the group notices the closed link and exits on its own.
  svc.start_group("g1");
  svc.coordinator().stop();
  const auto gone = svc.group("g1").wait(30s);
  ASSERT_TRUE(gone.has_value()) << "the group did not exit after the coordinator stopped";
  EXPECT_EQ(*gone, 0) << svc.group("g1").log_text();
}

}  // namespace
}  // namespace unshackle::live
