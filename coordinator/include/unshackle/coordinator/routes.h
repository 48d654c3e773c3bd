// The HTTP API as a pure function of the request: handle(request) -> reply, no sockets.
// A reply is either a response, or a job the session follows until it finishes (a
// non-streaming completion) or streams as server-sent events.
#pragma once

#include <memory>
#include <string>

#include "unshackle/coordinator/api.h"
#include "unshackle/coordinator/batches.h"
#include "unshackle/coordinator/metrics.h"
#include "unshackle/coordinator/registry.h"
#include "unshackle/coordinator/scheduler.h"

namespace unshackle::coord {

struct RouterOptions {
  std::string api_key;                            // empty: no authentication
  size_t max_body_bytes = size_t{64} << 20;
  AttentionConfig default_attention;
};

struct Reply {
  enum class Mode { kResponse, kWait, kStream };
  Mode mode = Mode::kResponse;
  HttpResponse response;        // kResponse
  std::shared_ptr<Job> job;     // kWait, kStream
  bool include_usage = false;   // kStream
};

class Router {
 public:
  Router(Scheduler& scheduler, Registry& registry, Metrics& metrics, BatchStore& batches, RouterOptions options);
  // Never throws: every failure is a response with the OpenAI error envelope.
  Reply handle(const HttpRequest& request);
  const RouterOptions& options() const { return options_; }

 private:
  Reply route(const HttpRequest& request, const std::string& path);
  Reply completions(const HttpRequest& request);
  HttpResponse models() const;
  HttpResponse files_upload(const HttpRequest& request);

  Scheduler& scheduler_;
  Registry& registry_;
  Metrics& metrics_;
  BatchStore& batches_;
  RouterOptions options_;
};

// The response of a finished completion (its error when it failed).
HttpResponse completion_response(const Job& job);
// One SSE event: "data: <json>\n\n".
std::string sse_event(const nlohmann::json& data);
// A streamed text_completion chunk.
nlohmann::json stream_chunk(const Job& job, const std::string& model, const std::string& text, const nlohmann::json& finish_reason);

// multipart/form-data: name -> (filename, content). Throws ApiError(400) when malformed.
struct FormPart {
  std::string filename;
  std::string content;
};
std::map<std::string, FormPart> parse_multipart(const std::string& content_type, const std::string& body);

}  // namespace unshackle::coord
