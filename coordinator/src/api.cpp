#include "unshackle/coordinator/api.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>

#include "unshackle/service/wire.h"

namespace unshackle::coord {

using nlohmann::json;

namespace {
std::string default_type(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    case 503: return "service_unavailable_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}
}  // namespace

json error_json(const ApiError& e) {
  return json{{"error",
               {{"message", e.message},
                {"type", e.type.empty() ? default_type(e.status) : e.type},
                {"param", e.param.empty() ? json() : json(e.param)},
                {"code", e.code.empty() ? json() : json(e.code)}}}};
}

HttpResponse error_response(const ApiError& e) {
  HttpResponse r = json_response(e.status, error_json(e));
  if (e.should_retry) r.headers.emplace_back("x-should-retry", *e.should_retry ? "true" : "false");
  if (e.retry_after_s > 0) r.headers.emplace_back("Retry-After", std::to_string(e.retry_after_s));
  return r;
}

HttpResponse json_response(int status, const json& body) {
  HttpResponse r;
  r.status = status;
  r.body = body.dump(-1, ' ', false, json::error_handler_t::replace);
  return r;
}

ApiError invalid_field(const std::string& param, const std::string& message) {
  return ApiError(400, message, param, "invalid_value");
}

std::optional<json> parse_json_bounded(const std::string& text, std::string* error) {
  // json's copy, comparison and dump recurse once per level: a body of 64 MiB of '[' would
  // overflow the stack wherever a request value is copied. The parser itself is iterative.
  struct TooDeep {};
  try {
    return json::parse(text, [](int depth, json::parse_event_t event, json&) {
      if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) && depth >= kMaxJsonDepth)
        throw TooDeep{};
      return true;
    });
  } catch (const TooDeep&) {
    if (error) *error = fmt::format("nested deeper than {} levels", kMaxJsonDepth);
  } catch (const json::exception& e) {
    if (error) *error = e.what();
  }
  return std::nullopt;
}

json parse_body(const std::string& body) {
  std::string detail;
  std::optional<json> parsed = parse_json_bounded(body, &detail);
  if (!parsed) throw ApiError(400, fmt::format("The request body is not valid JSON: {}", detail), "", "invalid_json");
  if (!parsed->is_object()) throw ApiError(400, "The request body must be a JSON object", "", "invalid_json");
  return std::move(*parsed);
}

namespace {

std::string type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer() || v.is_number_unsigned()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  return "an object";
}

ApiError wrong_type(const std::string& param, const char* expected, const json& got) {
  return invalid_field(param, fmt::format("{}: expected {}, got {}", param, expected, type_name(got)));
}

int64_t get_integer(const json& v, const std::string& param) {
  // JSON integers above INT64_MAX parse as unsigned: out of range, not wrapped to negative.
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    throw invalid_field(param, fmt::format("{}: {} is out of range (at most {})", param, v.get<uint64_t>(),
                                           std::numeric_limits<int64_t>::max()));
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && std::floor(d) == d && std::fabs(d) < 9e15) return static_cast<int64_t>(d);
  }
  throw wrong_type(param, "an integer", v);
}

double get_number(const json& v, const std::string& param) {
  if (!v.is_number()) throw wrong_type(param, "a number", v);
  return v.get<double>();
}

std::vector<int32_t> token_array(const json& v, const std::string& param) {
  std::vector<int32_t> out;
  out.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const json& t = v[i];
    if (!t.is_number_integer()) throw wrong_type(fmt::format("{}[{}]", param, i), "a token id (integer)", t);
    const int64_t id = t.get<int64_t>();
    if (id < 0 || id > std::numeric_limits<int32_t>::max())
      throw invalid_field(param, fmt::format("{}[{}]: token id {} is out of range", param, i, id));
    out.push_back(static_cast<int32_t>(id));
  }
  return out;
}

// prompt: a string, an array of token ids, or a one-element array of either.
void parse_prompt(const json& body, JobSpec& spec, bool required) {
  if (!body.contains("prompt") || body["prompt"].is_null()) {
    if (required) throw ApiError(400, "prompt: this field is required", "prompt", "missing_required_parameter");
    return;
  }
  json prompt = body["prompt"];
  if (prompt.is_array() && prompt.size() == 1 && (prompt[0].is_string() || prompt[0].is_array())) prompt = prompt[0];
  else if (prompt.is_array() && !prompt.empty() && (prompt[0].is_string() || prompt[0].is_array()))
    throw invalid_field("prompt", "prompt: only one prompt per request is supported");
  if (prompt.is_string()) {
    spec.prompt_is_text = true;
    spec.prompt_text = prompt.get<std::string>();
    if (spec.prompt_text.empty() && required) throw invalid_field("prompt", "prompt: must not be empty");
  } else if (prompt.is_array()) {
    spec.prompt_tokens = token_array(prompt, "prompt");
    if (spec.prompt_tokens.empty() && required) throw invalid_field("prompt", "prompt: must not be empty");
  } else {
    throw wrong_type("prompt", "a string or an array of token ids", prompt);
  }
}

void parse_common(const json& body, JobSpec& spec, const AttentionConfig& defaults) {
  if (body.contains("model") && !body["model"].is_null()) {
    if (!body["model"].is_string()) throw wrong_type("model", "a string", body["model"]);
    spec.model = body["model"].get<std::string>();
  }
  spec.attention = defaults;
  if (body.contains("attention") && !body["attention"].is_null()) {
    try {
      spec.attention = wire::attention_from_json(body["attention"], defaults, "attention.");
    } catch (const Error& e) {
      const std::string message = wire::plain_message(e);
      const size_t colon = message.find(':');
      throw invalid_field(colon == std::string::npos ? "attention" : message.substr(0, colon), message);
    }
  }
}

}  // namespace

CompletionRequest parse_completion(const json& body, const AttentionConfig& defaults) {
  CompletionRequest r;
  JobSpec& spec = r.spec;
  parse_common(body, spec, defaults);
  parse_prompt(body, spec, !body.contains("context") || body["context"].is_null());
  if (body.contains("context") && !body["context"].is_null()) {
    if (!body["context"].is_string()) throw wrong_type("context", "a context id (string)", body["context"]);
    spec.context_id = body["context"].get<std::string>();
  }
  if (body.contains("max_tokens") && !body["max_tokens"].is_null()) {
    spec.max_tokens = get_integer(body["max_tokens"], "max_tokens");
    if (spec.max_tokens < 1) throw invalid_field("max_tokens", fmt::format("max_tokens: must be >= 1 (got {})", spec.max_tokens));
  }
  if (body.contains("temperature") && !body["temperature"].is_null()) {
    spec.sampling.temperature = get_number(body["temperature"], "temperature");
    if (!(spec.sampling.temperature >= 0 && spec.sampling.temperature <= 2))
      throw invalid_field("temperature", fmt::format("temperature: must be in [0, 2] (got {})", spec.sampling.temperature));
  }
  if (body.contains("top_p") && !body["top_p"].is_null()) {
    spec.sampling.top_p = get_number(body["top_p"], "top_p");
    if (!(spec.sampling.top_p > 0 && spec.sampling.top_p <= 1))
      throw invalid_field("top_p", fmt::format("top_p: must be in (0, 1] (got {})", spec.sampling.top_p));
  }
  if (body.contains("top_k") && !body["top_k"].is_null()) {
    spec.sampling.top_k = get_integer(body["top_k"], "top_k");
    if (spec.sampling.top_k < 0) throw invalid_field("top_k", fmt::format("top_k: must be >= 0 (got {})", spec.sampling.top_k));
  }
  if (body.contains("seed") && !body["seed"].is_null()) {
    const json& seed = body["seed"];
    // Any 64-bit value: unsigned as given, negative ones as their two's complement.
    spec.sampling.seed = seed.is_number_unsigned() ? seed.get<uint64_t>() : static_cast<uint64_t>(get_integer(seed, "seed"));
  }
  if (body.contains("n") && !body["n"].is_null() && get_integer(body["n"], "n") != 1)
    throw invalid_field("n", "n: only n = 1 is supported");
  if (body.contains("stop") && !body["stop"].is_null()) {
    const json& stop = body["stop"];
    if (stop.is_string()) {
      spec.stop.push_back(stop.get<std::string>());
    } else if (stop.is_array()) {
      if (stop.size() > 4) throw invalid_field("stop", "stop: at most 4 sequences");
      for (size_t i = 0; i < stop.size(); ++i) {
        if (!stop[i].is_string()) throw wrong_type(fmt::format("stop[{}]", i), "a string", stop[i]);
        spec.stop.push_back(stop[i].get<std::string>());
      }
    } else {
      throw wrong_type("stop", "a string or an array of strings", stop);
    }
    for (const auto& s : spec.stop)
      if (s.empty()) throw invalid_field("stop", "stop: sequences must not be empty");
  }
  if (body.contains("stream") && !body["stream"].is_null()) {
    if (!body["stream"].is_boolean()) throw wrong_type("stream", "a boolean", body["stream"]);
    r.stream = body["stream"].get<bool>();
  }
  if (body.contains("stream_options") && !body["stream_options"].is_null()) {
    const json& so = body["stream_options"];
    if (!so.is_object()) throw wrong_type("stream_options", "an object", so);
    if (!r.stream) throw invalid_field("stream_options", "stream_options: only allowed when stream is true");
    if (so.contains("include_usage") && !so["include_usage"].is_null()) {
      if (!so["include_usage"].is_boolean())
        throw wrong_type("stream_options.include_usage", "a boolean", so["include_usage"]);
      r.include_usage = so["include_usage"].get<bool>();
    }
  }
  for (const char* unsupported : {"logprobs", "echo", "suffix", "best_of", "logit_bias"}) {
    if (body.contains(unsupported) && !body[unsupported].is_null() && body[unsupported] != false &&
        !(std::string(unsupported) == "best_of" && body[unsupported] == 1))
      throw invalid_field(unsupported, fmt::format("{}: not supported", unsupported));
  }
  return r;
}

JobSpec parse_context_request(const json& body, const AttentionConfig& defaults) {
  JobSpec spec;
  parse_common(body, spec, defaults);
  parse_prompt(body, spec, true);
  spec.store_context = true;
  spec.max_tokens = 0;
  return spec;
}

}  // namespace unshackle::coord
