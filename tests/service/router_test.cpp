// The pure router: a table of requests and the status, error code, param and message each
// must get. No sockets; the scheduler has no worker group, so a valid request ends in 503.
#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>

#include "unshackle/coordinator/routes.h"

namespace unshackle::coord {
namespace {

using nlohmann::json;

struct Fixture {
  boost::asio::io_context ioc;
  Metrics metrics;
  Registry registry{ioc, RegistryOptions{}, metrics};
  Scheduler scheduler{registry, metrics, SchedulerOptions{}};
  BatchStore batches{scheduler, BatchOptions{}};
  Router router{scheduler, registry, metrics, batches, RouterOptions{"sk-test", 2048, AttentionConfig{}}};
};

struct Case {
  const char* name;
  const char* method;
  const char* target;
  std::string body;
  const char* auth;         // full Authorization header
  int status;
  const char* code;         // error code ("" for none / success)
  const char* param;        // error param ("" for null)
  const char* message_has;  // substring of the message (or body for non-errors)
};

const char* kAuth = "Bearer sk-test";

std::vector<Case> cases() {
  return {
      {"health needs no auth", "GET", "/health", "", "", 200, "", "", "ok"},
      {"auth missing", "GET", "/v1/models", "", "", 401, "missing_api_key", "", "didn't provide an API key"},
      {"auth wrong", "GET", "/v1/models", "", "Bearer sk-nope", 401, "invalid_api_key", "", "Incorrect API key"},
      {"auth not bearer", "GET", "/v1/models", "", "sk-test", 401, "invalid_api_key", "", "Incorrect API key"},
      {"auth on metrics", "GET", "/metrics", "", "", 401, "missing_api_key", "", "API key"},
      {"auth on ready", "GET", "/ready", "", "", 401, "missing_api_key", "", "API key"},
      {"models empty", "GET", "/v1/models", "", kAuth, 200, "", "", "\"data\":[]"},
      {"bad json", "POST", "/v1/completions", "{\"prompt\": ", kAuth, 400, "invalid_json", "", "not valid JSON"},
      {"json not an object", "POST", "/v1/completions", "[1,2]", kAuth, 400, "invalid_json", "", "must be a JSON object"},
      {"missing prompt", "POST", "/v1/completions", R"({"max_tokens":4})", kAuth, 400, "missing_required_parameter", "prompt", "prompt: this field is required"},
      {"prompt wrong type", "POST", "/v1/completions", R"({"prompt":5})", kAuth, 400, "invalid_value", "prompt", "prompt: expected a string or an array of token ids, got an integer"},
      {"prompt empty", "POST", "/v1/completions", R"({"prompt":""})", kAuth, 400, "invalid_value", "prompt", "must not be empty"},
      {"two prompts", "POST", "/v1/completions", R"({"prompt":["a","b"]})", kAuth, 400, "invalid_value", "prompt", "only one prompt"},
      {"negative token", "POST", "/v1/completions", R"({"prompt":[1,-2]})", kAuth, 400, "invalid_value", "prompt", "prompt[1]: token id -2 is out of range"},
      {"token not integer", "POST", "/v1/completions", R"({"prompt":[1,"x"]})", kAuth, 400, "invalid_value", "prompt[1]", "expected a token id"},
      {"max_tokens string", "POST", "/v1/completions", R"({"prompt":"hi","max_tokens":"8"})", kAuth, 400, "invalid_value", "max_tokens", "max_tokens: expected an integer, got a string"},
      {"max_tokens zero", "POST", "/v1/completions", R"({"prompt":"hi","max_tokens":0})", kAuth, 400, "invalid_value", "max_tokens", "must be >= 1"},
      {"temperature high", "POST", "/v1/completions", R"({"prompt":"hi","temperature":3})", kAuth, 400, "invalid_value", "temperature", "[0, 2]"},
      {"top_p zero", "POST", "/v1/completions", R"({"prompt":"hi","top_p":0})", kAuth, 400, "invalid_value", "top_p", "(0, 1]"},
      {"stop wrong type", "POST", "/v1/completions", R"({"prompt":"hi","stop":5})", kAuth, 400, "invalid_value", "stop", "stop: expected a string or an array of strings"},
      {"stop too many", "POST", "/v1/completions", R"({"prompt":"hi","stop":["a","b","c","d","e"]})", kAuth, 400, "invalid_value", "stop", "at most 4"},
      {"stream wrong type", "POST", "/v1/completions", R"({"prompt":"hi","stream":"yes"})", kAuth, 400, "invalid_value", "stream", "expected a boolean"},
      {"stream_options without stream", "POST", "/v1/completions", R"({"prompt":"hi","stream_options":{"include_usage":true}})", kAuth, 400, "invalid_value", "stream_options", "only allowed when stream is true"},
      {"n two", "POST", "/v1/completions", R"({"prompt":"hi","n":2})", kAuth, 400, "invalid_value", "n", "only n = 1"},
      {"logprobs unsupported", "POST", "/v1/completions", R"({"prompt":"hi","logprobs":2})", kAuth, 400, "invalid_value", "logprobs", "not supported"},
      {"attention not object", "POST", "/v1/completions", R"({"prompt":"hi","attention":"esa"})", kAuth, 400, "invalid_value", "attention", "attention: must be an object"},
      {"attention bad mode", "POST", "/v1/completions", R"({"prompt":"hi","attention":{"mode":"magic"}})", kAuth, 400, "invalid_value", "attention.mode", "unknown attention mode 'magic'"},
      {"attention top_k zero", "POST", "/v1/completions", R"({"prompt":"hi","attention":{"top_k":0}})", kAuth, 400, "invalid_value", "attention.top_k", "attention.top_k: must be > 0 (got 0)"},
      {"attention top_k string", "POST", "/v1/completions", R"({"prompt":"hi","attention":{"top_k":"8"}})", kAuth, 400, "invalid_value", "attention.top_k", "must be an integer"},
      {"attention eps negative", "POST", "/v1/completions", R"({"prompt":"hi","attention":{"eps":-1}})", kAuth, 400, "invalid_value", "attention.eps", "must be >= 0"},
      {"attention lag_ratio", "POST", "/v1/completions", R"({"prompt":"hi","attention":{"lag_ratio":1.5}})", kAuth, 400, "invalid_value", "attention.lag_ratio", "[0, 1]"},
      {"attention l_L below lag", "POST", "/v1/completions", R"({"prompt":"hi","attention":{"lag_ratio":0.5,"l_L":64}})", kAuth, 400, "invalid_value", "attention.l_L", "must be >= lag"},
      {"attention unknown field", "POST", "/v1/completions", R"({"prompt":"hi","attention":{"topk":8}})", kAuth, 400, "invalid_value", "attention.topk", "unknown field"},
      {"valid but no group", "POST", "/v1/completions", R"({"prompt":"hi","attention":{"mode":"esa","top_k":64}})", kAuth, 503, "no_ready_group", "", "No worker group is ready"},
      {"valid stream but no group", "POST", "/v1/completions", R"({"prompt":[1,2],"stream":true})", kAuth, 503, "no_ready_group", "", "No worker group"},
      {"job no group", "POST", "/v1/jobs", R"({"prompt":"hi"})", kAuth, 503, "no_ready_group", "", "No worker group"},
      {"job streamed", "POST", "/v1/jobs", R"({"prompt":"hi","stream":true})", kAuth, 400, "invalid_value", "stream", "not streamed"},
      {"unknown job", "GET", "/v1/jobs/job-123", "", kAuth, 404, "job_not_found", "", "No job with id 'job-123'"},
      {"unknown job result", "GET", "/v1/jobs/job-123/result", "", kAuth, 404, "job_not_found", "", "job-123"},
      {"unknown job cancel", "POST", "/v1/jobs/job-123/cancel", "", kAuth, 404, "job_not_found", "", "job-123"},
      {"unknown context", "GET", "/v1/contexts/ctx-1", "", kAuth, 404, "context_not_found", "", "ctx-1"},
      {"delete unknown context", "DELETE", "/v1/contexts/ctx-1", "", kAuth, 404, "context_not_found", "", "ctx-1"},
      {"completion on unknown context", "POST", "/v1/completions", R"({"context":"ctx-9","prompt":"more"})", kAuth, 404, "context_not_found", "context", "ctx-9"},
      {"context missing prompt", "POST", "/v1/contexts", R"({})", kAuth, 400, "missing_required_parameter", "prompt", "required"},
      {"unknown file", "GET", "/v1/files/file-1", "", kAuth, 404, "file_not_found", "", "file-1"},
      {"unknown file content", "GET", "/v1/files/file-1/content", "", kAuth, 404, "file_not_found", "", "file-1"},
      {"unknown batch", "GET", "/v1/batches/batch-1", "", kAuth, 404, "batch_not_found", "", "batch-1"},
      {"unknown batch cancel", "POST", "/v1/batches/batch-1/cancel", "", kAuth, 404, "batch_not_found", "", "batch-1"},
      {"batch missing file", "POST", "/v1/batches", R"({"endpoint":"/v1/completions","completion_window":"24h"})", kAuth, 400, "missing_required_parameter", "input_file_id", "required"},
      {"batch bad endpoint", "POST", "/v1/batches", R"({"input_file_id":"f","endpoint":"/v1/embeddings","completion_window":"24h"})", kAuth, 400, "invalid_value", "endpoint", "only /v1/completions"},
      {"batch unknown file", "POST", "/v1/batches", R"({"input_file_id":"file-x","endpoint":"/v1/completions","completion_window":"24h"})", kAuth, 404, "file_not_found", "input_file_id", "file-x"},
      {"file not multipart", "POST", "/v1/files", "{}", kAuth, 400, "invalid_content_type", "", "multipart/form-data"},
      {"oversized body", "POST", "/v1/completions", std::string(4096, ' '), kAuth, 413, "request_too_large", "", "limit is 2048 bytes"},
      {"unknown route", "GET", "/v1/nothing", "", kAuth, 404, "unknown_route", "", "Unknown route: GET /v1/nothing"},
      {"unknown top route", "GET", "/admin", "", kAuth, 404, "unknown_route", "", "/admin"},
      {"wrong method", "GET", "/v1/completions", "", kAuth, 405, "method_not_allowed", "", "Method GET is not allowed"},
      {"ready without group", "GET", "/ready", "", kAuth, 503, "no_ready_group", "", "No worker group is ready"},
  };
}

TEST(Router, TableOfRequests) {
  Fixture f;
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    HttpRequest request{c.method, c.target, c.auth, "application/json", c.body};
    const Reply reply = f.router.handle(request);
    ASSERT_EQ(reply.mode, Reply::Mode::kResponse);
    EXPECT_EQ(reply.response.status, c.status) << reply.response.body;
    const json body = json::parse(reply.response.body, nullptr, false);
    ASSERT_FALSE(body.is_discarded()) << reply.response.body;
    if (c.status >= 400) {
      ASSERT_TRUE(body.contains("error")) << reply.response.body;
      const json& e = body["error"];
      EXPECT_TRUE(e["message"].is_string());
      EXPECT_TRUE(e["type"].is_string());
      EXPECT_EQ(e["code"], std::string(c.code)) << reply.response.body;
      if (std::string(c.param).empty()) EXPECT_TRUE(e["param"].is_null()) << reply.response.body;
      else EXPECT_EQ(e["param"], std::string(c.param)) << reply.response.body;
      EXPECT_NE(e["message"].get<std::string>().find(c.message_has), std::string::npos) << e["message"];
    } else {
      EXPECT_NE(reply.response.body.find(c.message_has), std::string::npos) << reply.response.body;
    }
  }
}

TEST(Router, RetryHeaders) {
  Fixture f;
  const Reply reply = f.router.handle({"POST", "/v1/completions", kAuth, "application/json", R"({"prompt":"hi"})"});
  ASSERT_EQ(reply.response.status, 503);
  bool retry_after = false;
  for (const auto& [name, value] : reply.response.headers) retry_after = retry_after || (name == "Retry-After" && value == "5");
  EXPECT_TRUE(retry_after);
}

TEST(Router, MetricsText) {
  Fixture f;
  f.router.handle({"POST", "/v1/completions", kAuth, "application/json", R"({"prompt":"hi"})"});
  const Reply reply = f.router.handle({"GET", "/metrics", kAuth, "", ""});
  ASSERT_EQ(reply.response.status, 200);
  EXPECT_EQ(reply.response.content_type.rfind("text/plain; version=0.0.4", 0), 0u);
  const std::string& text = reply.response.body;
  for (const char* name : {"unshackle_num_requests_waiting 0", "unshackle_num_requests_running 0",
                           "unshackle_kv_cache_usage_ratio 0", "# TYPE unshackle_time_to_first_token_seconds histogram",
                           "unshackle_time_to_first_token_seconds_bucket{le=\"2560\"} 0",
                           "unshackle_e2e_request_latency_seconds_bucket{le=\"7680\"} 0",
                           "unshackle_inter_token_latency_seconds_bucket{le=\"80\"} 0",
                           "unshackle_request_queue_time_seconds", "unshackle_request_prefill_time_seconds",
                           "unshackle_request_decode_time_seconds", "unshackle_prompt_tokens_total 0",
                           "unshackle_generation_tokens_total 0", "unshackle_request_finished_total{reason=\"stop\"} 0",
                           "unshackle_requests_rejected_total{reason=\"no_ready_group\"} 1", "unshackle_collective_seconds",
                           "unshackle_selection_ratio", "unshackle_attention_share_ratio_count{part=\"selected\"} 0"})
    EXPECT_NE(text.find(name), std::string::npos) << name;
}

TEST(Router, FileUploadAndBatchValidation) {
  Fixture f;
  const std::string boundary = "XyZ";
  const std::string lines =
      R"({"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":"hi"}})" "\n"
      R"({"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":"again"}})" "\n"
      "not json\n";
  const std::string body = "--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                           "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
                           "Content-Type: application/jsonl\r\n\r\n" + lines + "\r\n--XyZ--\r\n";
  RouterOptions options{"sk-test", 1 << 20, AttentionConfig{}};
  Router router(f.scheduler, f.registry, f.metrics, f.batches, options);
  const Reply up = router.handle({"POST", "/v1/files", kAuth, "multipart/form-data; boundary=" + boundary, body});
  ASSERT_EQ(up.response.status, 200) << up.response.body;
  const json file = json::parse(up.response.body);
  EXPECT_EQ(file["purpose"], "batch");
  EXPECT_EQ(file["filename"], "in.jsonl");
  EXPECT_EQ(file["bytes"], lines.size());
  const Reply content = router.handle({"GET", "/v1/files/" + file["id"].get<std::string>() + "/content", kAuth, "", ""});
  EXPECT_EQ(content.response.body, lines);
  const Reply batch = router.handle({"POST", "/v1/batches", kAuth, "application/json",
                                     json{{"input_file_id", file["id"]}, {"endpoint", "/v1/completions"}, {"completion_window", "24h"}}.dump()});
  ASSERT_EQ(batch.response.status, 200) << batch.response.body;
  const json b = json::parse(batch.response.body);
  EXPECT_EQ(b["status"], "failed");
  ASSERT_EQ(b["errors"]["data"].size(), 2u) << b.dump();
  EXPECT_EQ(b["errors"]["data"][0]["line"], 2);
  EXPECT_NE(b["errors"]["data"][0]["message"].get<std::string>().find("repeats line 1"), std::string::npos);
  EXPECT_EQ(b["errors"]["data"][1]["line"], 3);
  // Bad purpose.
  const std::string bad = "--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                          "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nx\r\n--XyZ--\r\n";
  const Reply rejected = router.handle({"POST", "/v1/files", kAuth, "multipart/form-data; boundary=XyZ", bad});
  EXPECT_EQ(rejected.response.status, 400);
  EXPECT_NE(rejected.response.body.find("only 'batch'"), std::string::npos);
}

}  // namespace
}  // namespace unshackle::coord
