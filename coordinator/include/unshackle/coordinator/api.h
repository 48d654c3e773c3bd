// The coordinator's HTTP API types: requests and responses as plain values (no sockets), the
// OpenAI error envelope, and the parsing of a completion request into a job spec.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "unshackle/kernels/attention_config.h"
#include "unshackle/worker/engine.h"

namespace unshackle::coord {

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // path and query
  std::string authorization;
  std::string content_type;
  std::string body;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  // extra headers
};

// An error the API reports: {"error":{"message","type","param","code"}} with `status`.
struct ApiError : std::exception {
  int status = 400;
  std::string message;
  std::string type;   // empty: derived from status
  std::string param;  // empty: null
  std::string code;   // empty: null
  std::optional<bool> should_retry;  // x-should-retry header when set
  int retry_after_s = 0;             // Retry-After header when > 0

  ApiError() = default;
  ApiError(int status_, std::string message_, std::string param_ = {}, std::string code_ = {})
      : status(status_), message(std::move(message_)), param(std::move(param_)), code(std::move(code_)) {}
  const char* what() const noexcept override { return message.c_str(); }
};

nlohmann::json error_json(const ApiError& error);
HttpResponse error_response(const ApiError& error);
HttpResponse json_response(int status, const nlohmann::json& body);

// An ApiError(400) for a field, message "<param>: <what>" style is the caller's choice.
ApiError invalid_field(const std::string& param, const std::string& message);

// What a completion (or job, context, batch line) asks the scheduler to do.
struct JobSpec {
  std::string model;                   // requested model name; empty: the served one
  bool prompt_is_text = false;
  std::string prompt_text;             // when prompt_is_text
  std::vector<int32_t> prompt_tokens;  // when given as ids (else filled by tokenization)
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<std::string> stop;
  AttentionConfig attention;
  std::string context_id;      // a stored context the prompt continues ("" none)
  bool store_context = false;  // /v1/contexts: prefill and keep, generate nothing
};

struct CompletionRequest {
  JobSpec spec;
  bool stream = false;
  bool include_usage = false;
};

// Parses a /v1/completions body (also a job's and a batch line's body). Throws ApiError(400)
// naming the field. `defaults` supplies the attention settings the request starts from.
CompletionRequest parse_completion(const nlohmann::json& body, const AttentionConfig& defaults);
// Parses a /v1/contexts body: {"prompt", "model"?, "attention"?}.
JobSpec parse_context_request(const nlohmann::json& body, const AttentionConfig& defaults);
// JSON from outside (request bodies, batch input lines) nests at most this deep.
constexpr int kMaxJsonDepth = 64;
// Parses `text` as JSON nested at most kMaxJsonDepth deep; nullopt (and why in *error) otherwise.
std::optional<nlohmann::json> parse_json_bounded(const std::string& text, std::string* error = nullptr);
// Parses the request body as a JSON object; 400 invalid_json otherwise (also nested too deep).
nlohmann::json parse_body(const std::string& body);

}  // namespace unshackle::coord
