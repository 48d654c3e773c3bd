// End to end with real processes, beyond one group of two ranks: several worker groups on one
// coordinator (work shared between them; KV admission sends a job to the group with room), and
// a group of three ranks. The oracle is `unshackle generate` with the group's rank count.
#include <gtest/gtest.h>

#include <memory>
#include <set>

#include "live_service.h"
#include "unshackle/model/tokenizer.h"

namespace unshackle::live {
namespace {

const char* kPrompt = "The quick brown fox jumps";  // 25 bytes + BOS

// Two groups of one CPU rank each (no mpirun: on a 2-core box two busy-waiting MPI groups
// would starve each other). Each group may reserve 512 KV tokens, one context 512.
LiveOptions two_groups_options() {
  LiveOptions o;
  o.ranks = 1;
  o.max_context_tokens = 512;
  o.kv_capacity_tokens = 512;
  return o;
}

class E2EGroups : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    service_ = std::make_unique<LiveService>(two_groups_options());  // starts g0
    if (service_->http_port != 0) service_->start_group("g1");
  }
  static void TearDownTestSuite() { service_.reset(); }
  void SetUp() override {
    if (!service_ || service_->http_port == 0) GTEST_FAIL() << "the service did not start";
  }
  static LiveService& svc() { return *service_; }
  static inline std::unique_ptr<LiveService> service_;
};

// Waits until the job has finished; its object.
json wait_job(const LiveService& s, const std::string& id, std::chrono::milliseconds timeout = 60s) {
  json job;
  const bool finished = eventually(
      [&] {
        job = s.get("/v1/jobs/" + id).json_body();
        const std::string status = job.value("status", "");
        return status == "completed" || status == "failed" || status == "cancelled";
      },
      timeout, 50ms);
  EXPECT_TRUE(finished) << "job " << id << " did not finish: " << job.dump();
  return job;
}

struct Request {
  std::string prompt;
  int max_tokens;
  double temperature;
  uint64_t seed;
  json body() const { return json{{"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", temperature}, {"seed", seed}}; }
};

TEST_F(E2EGroups, BothGroupsAreReady) {
  const json ready = svc().get("/ready").json_body();
  std::set<std::string> names;
  for (const json& g : ready.value("groups", json::array())) {
    if (g.value("ready", false)) names.insert(g.value("id", g.value("group", "")));
    EXPECT_EQ(g["ranks"], 1) << g.dump();
  }
  EXPECT_EQ(names, (std::set<std::string>{"g0", "g1"})) << ready.dump();
}

// Jobs submitted together are shared by both groups, and every answer equals the oracle
// whichever group ran it. Submitted in rounds until both groups served one (the scheduler
// does not promise a split, only that an idle group with room takes queued work).
TEST_F(E2EGroups, ConcurrentJobsAreSharedByBothGroupsAndEqualGenerate) {
  const std::vector<Request> requests = {{kPrompt, 10, 0.0, 1},
                                         {"Pack my box with five dozen liquor jugs", 10, 0.9, 2},
                                         {"Sphinx of black quartz, judge my vow", 8, 0.7, 3},
                                         {"How vexingly quick daft zebras jump", 12, 1.0, 4}};
  std::vector<json> oracle;
  for (const Request& r : requests) {
    oracle.push_back(run_generate(svc(), r.prompt, r.max_tokens, r.temperature, r.seed));
    ASSERT_TRUE(oracle.back().is_object());
  }
  std::map<std::string, int> served;  // group -> jobs
  int rounds = 0;
  for (; rounds < 5 && served.size() < 2; ++rounds) {
    std::vector<std::string> ids;
    for (const Request& r : requests) {
      const HttpResult posted = svc().post("/v1/jobs", r.body());
      ASSERT_EQ(posted.status, 200) << posted.body;
      ids.push_back(posted.json_body()["id"]);
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      SCOPED_TRACE(requests[i].prompt);
      const json job = wait_job(svc(), ids[i]);
      ASSERT_EQ(job["status"], "completed") << job.dump();
      ASSERT_TRUE(job["group"].is_string()) << job.dump();
      ++served[job["group"].get<std::string>()];
      const HttpResult result = svc().get("/v1/jobs/" + ids[i] + "/result");
      ASSERT_EQ(result.status, 200) << result.body;
      EXPECT_EQ(result.json_body()["choices"][0]["text"], service_text(svc(), oracle[i])) << "on group " << job["group"];
      EXPECT_EQ(result.json_body()["usage"]["prompt_tokens"], oracle[i]["prompt_tokens"].size());
      EXPECT_EQ(result.json_body()["usage"]["completion_tokens"], service_completion_tokens(oracle[i]));
    }
  }
  EXPECT_EQ(served.size(), 2u) << "after " << rounds << " rounds of " << requests.size()
                               << " jobs, only one group served: " << json(served).dump();
  std::fprintf(stderr, "served per group after %d round(s): %s\n", rounds, json(served).dump().c_str());
  EXPECT_EQ(svc().metric("unshackle_worker_group_up{group=\"g0\"}"), 1.0);
  EXPECT_EQ(svc().metric("unshackle_worker_group_up{group=\"g1\"}"), 1.0);
}

// A stored context fills one group's KV capacity (480 of its 512 tokens stay reserved); jobs
// that need more than the 32 left there run on the other group at once instead of waiting
// for room or failing. Text prompts (room known only once tokenized) and token ids alike.
TEST_F(E2EGroups, AJobGoesToTheGroupWithRoomWhenAStoredContextFillsTheOther) {
  std::string document;
  while (document.size() < 479) document += "A long stored document fills one group's KV. ";
  document.resize(479);  // + BOS = 480 tokens
  const HttpResult c = svc().post("/v1/contexts", json{{"prompt", document}});
  ASSERT_EQ(c.status, 200) << c.body;
  const std::string ctx = c.json_body()["id"];
  json context;
  ASSERT_TRUE(eventually([&] {
    context = svc().get("/v1/contexts/" + ctx).json_body();
    return context.value("status", "") == "ready";
  }, 60s, 50ms)) << context.dump();
  ASSERT_EQ(context["tokens"], 480) << context.dump();
  const std::string full = context["group"];
  const std::string other = full == "g0" ? "g1" : "g0";
  EXPECT_TRUE(eventually([&] { return svc().metric("unshackle_worker_kv_tokens{group=\"" + full + "\",rank=\"0\"}") == 480.0; }))
      << svc().get("/metrics").body;

  const std::vector<int32_t> ids = load_tokenizer(svc().model_dir())->encode(kPrompt, true);
  const std::vector<Request> requests = {{kPrompt, 10, 0.8, 7}, {kPrompt, 10, 0.8, 8}};
  for (const Request& r : requests) {
    const json oracle = run_generate(svc(), r.prompt, r.max_tokens, r.temperature, r.seed);
    ASSERT_TRUE(oracle.is_object());
    // 26 prompt tokens + 10: 36 > 32 left on `full`.
    for (const bool as_ids : {false, true}) {
      SCOPED_TRACE(as_ids ? "token ids" : "text");
      json body = r.body();
      if (as_ids) body["prompt"] = ids;
      const HttpResult posted = svc().post("/v1/jobs", body);
      ASSERT_EQ(posted.status, 200) << posted.body;
      const std::string id = posted.json_body()["id"];
      const json job = wait_job(svc(), id, 30s);
      ASSERT_EQ(job["status"], "completed") << job.dump();
      EXPECT_EQ(job["group"], other) << "the group holding the context has no room: " << job.dump();
      const HttpResult result = svc().get("/v1/jobs/" + id + "/result");
      ASSERT_EQ(result.status, 200) << result.body;
      EXPECT_EQ(result.json_body()["choices"][0]["text"], service_text(svc(), oracle));
      EXPECT_EQ(result.json_body()["usage"]["completion_tokens"], service_completion_tokens(oracle));
    }
  }
  // A request on the context itself works on a copy of it (480 + 4 + 10 tokens): it fits the
  // group's capacity but never what the stored context leaves free, so it fails at once
  // instead of waiting forever.
  const HttpResult on_context =
      svc().post("/v1/completions", json{{"context", ctx}, {"prompt", " one"}, {"max_tokens", 10}, {"temperature", 0}});
  EXPECT_EQ(on_context.status, 400) << on_context.body;
  EXPECT_EQ(on_context.error_code(), "context_length_exceeded") << on_context.body;
  EXPECT_NE(on_context.body.find("stored contexts hold 480"), std::string::npos) << on_context.body;
  // The context stayed where it was, untouched.
  context = svc().get("/v1/contexts/" + ctx).json_body();
  EXPECT_EQ(context["status"], "ready") << context.dump();
  EXPECT_EQ(context["group"], full);
  // Deleted, its group has room again and its KV is released.
  ASSERT_EQ(svc().del("/v1/contexts/" + ctx).status, 200);
  EXPECT_TRUE(eventually([&] { return svc().metric("unshackle_worker_kv_tokens{group=\"" + full + "\",rank=\"0\"}") == 0.0; }))
      << svc().get("/metrics").body;
}

// One group of three ranks (KV blocks of 8 tokens over ranks 0, 1, 2, 0, ...): the same tokens
// as `unshackle generate --ranks 3`.
TEST(E2EThreeRanks, SyncCompletionEqualsGenerateWithThreeRanks) {
  LiveOptions o;
  o.ranks = 3;
  LiveService svc(o);
  ASSERT_NE(svc.http_port, 0);
  const json ready = svc.get("/ready").json_body();
  ASSERT_EQ(ready["groups"].size(), 1u) << ready.dump();
  EXPECT_EQ(ready["groups"][0]["ranks"], 3) << ready.dump();
  // 40 bytes + BOS: KV blocks on every rank.
  const std::string prompt = "Three ranks hold the blocks of this text";
  for (const double temperature : {0.0, 0.9}) {
    SCOPED_TRACE(temperature);
    const HttpResult r =
        svc.post("/v1/completions", json{{"prompt", prompt}, {"max_tokens", 12}, {"temperature", temperature}, {"seed", 13}});
    ASSERT_EQ(r.status, 200) << r.body;
    const json g = run_generate(svc, prompt, 12, temperature, 13);
    ASSERT_TRUE(g.is_object());
    EXPECT_EQ(r.json_body()["choices"][0]["text"], service_text(svc, g));
    EXPECT_EQ(r.json_body()["usage"]["prompt_tokens"], g["prompt_tokens"].size());
    EXPECT_EQ(r.json_body()["usage"]["completion_tokens"], service_completion_tokens(g));
  }
  // Every rank reports its KV (rank 2 exists in the group's heartbeat).
  EXPECT_TRUE(eventually([&] { return svc.metric("unshackle_worker_kv_tokens{group=\"g0\",rank=\"2\"}").has_value(); }))
      << svc.get("/metrics").body;
}

}  // namespace
}  // namespace unshackle::live
