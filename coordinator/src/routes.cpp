#include "unshackle/coordinator/routes.h"

#include <fmt/format.h>

#include <algorithm>
#include <set>

namespace unshackle::coord {

using nlohmann::json;

namespace {

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> parts;
  size_t i = 0;
  while (i < path.size()) {
    while (i < path.size() && path[i] == '/') ++i;
    const size_t j = path.find('/', i);
    if (i < path.size()) parts.push_back(path.substr(i, j == std::string::npos ? std::string::npos : j - i));
    if (j == std::string::npos) break;
    i = j;
  }
  return parts;
}

bool equal_constant_time(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i % std::max<size_t>(b.size(), 1)]);
  return diff == 0 && !b.empty();
}

Reply respond(HttpResponse response) {
  Reply r;
  r.response = std::move(response);
  return r;
}
Reply respond(const ApiError& e) { return respond(error_response(e)); }
Reply respond_json(const json& body, int status = 200) { return respond(json_response(status, body)); }

// `lost_on_restart`: what a coordinator restart loses, so an id from before one is explained.
ApiError not_found(const std::string& what, const std::string& id, const char* code, const char* lost_on_restart = nullptr) {
  return ApiError(404,
                  lost_on_restart ? fmt::format("No {} with id '{}' ({} live in the coordinator's memory: a restart loses them)",
                                                what, id, lost_on_restart)
                                  : fmt::format("No {} with id '{}'", what, id),
                  "", code);
}

ApiError method_not_allowed(const HttpRequest& r, const std::string& path) {
  ApiError e(405, fmt::format("Method {} is not allowed on {}", r.method, path), "", "method_not_allowed");
  return e;
}

}  // namespace

Router::Router(Scheduler& scheduler, Registry& registry, Metrics& metrics, BatchStore& batches, RouterOptions options)
    : scheduler_(scheduler), registry_(registry), metrics_(metrics), batches_(batches), options_(std::move(options)) {}

Reply Router::handle(const HttpRequest& request) {
  std::string path = request.target.substr(0, request.target.find('?'));
  try {
    if (path == "/health") {
      if (request.method != "GET" && request.method != "HEAD") return respond(method_not_allowed(request, path));
      return respond_json(json{{"status", "ok"}});
    }
    if (!options_.api_key.empty()) {
      const std::string& auth = request.authorization;
      if (auth.empty()) {
        ApiError e(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", "", "missing_api_key");
        return respond(e);
      }
      if (auth.rfind("Bearer ", 0) != 0 || !equal_constant_time(auth.substr(7), options_.api_key))
        return respond(ApiError(401, "Incorrect API key provided.", "", "invalid_api_key"));
    }
    if (request.body.size() > options_.max_body_bytes)
      return respond(ApiError(413, fmt::format("The request body has {} bytes; the limit is {} bytes", request.body.size(),
                                               options_.max_body_bytes), "", "request_too_large"));
    return route(request, path);
  } catch (const ApiError& e) {
    return respond(e);
  } catch (const std::exception& e) {
    ApiError error(500, fmt::format("Internal error: {}", e.what()), "", "internal_error");
    return respond(error);
  }
}

HttpResponse Router::models() const {
  json data = json::array();
  std::set<std::string> seen;
  for (const auto& g : registry_.groups()) {
    const ModelInfo& m = g->model();
    if (!seen.insert(m.name).second) continue;
    data.push_back(json{{"id", m.name},
                        {"object", "model"},
                        {"created", 0},
                        {"owned_by", "unshackle"},
                        {"max_model_len", m.max_context_tokens},
                        {"ready", g->ready()}});
  }
  return json_response(200, json{{"object", "list"}, {"data", data}});
}

Reply Router::route(const HttpRequest& r, const std::string& path) {
  const auto parts = split_path(path);
  const std::string& m = r.method;
  const size_t n = parts.size();
  auto is = [&](std::initializer_list<const char*> want) {
    if (want.size() != n) return false;
    size_t i = 0;
    for (const char* w : want) {
      if (std::string(w) != "*" && parts[i] != w) return false;
      ++i;
    }
    return true;
  };

  if (is({"ready"})) {
    if (m != "GET") return respond(method_not_allowed(r, path));
    json groups = json::array();
    for (const auto& g : registry_.all_groups())
      groups.push_back(json{{"group", g->id()}, {"up", g->up()}, {"ready", g->ready()}, {"ranks", g->ranks()},
                            {"model", g->model().name}, {"reason", g->up() ? json() : json(g->down_reason())}});
    if (!registry_.any_ready()) {
      HttpResponse resp = error_response(ApiError(503, "No worker group is ready", "", "no_ready_group"));
      json body = json::parse(resp.body);
      body["groups"] = groups;
      resp.body = body.dump();
      return respond(resp);
    }
    return respond_json(json{{"status", "ready"}, {"groups", groups}});
  }
  if (is({"metrics"})) {
    if (m != "GET") return respond(method_not_allowed(r, path));
    HttpResponse resp;
    resp.content_type = "text/plain; version=0.0.4; charset=utf-8";
    resp.body = metrics_.serialize();
    return respond(resp);
  }
  if (n == 0 || parts[0] != "v1") return respond(ApiError(404, fmt::format("Unknown route: {} {}", m, path), "", "unknown_route"));

  if (is({"v1", "models"})) {
    if (m != "GET") return respond(method_not_allowed(r, path));
    return respond(models());
  }
  if (is({"v1", "completions"})) {
    if (m != "POST") return respond(method_not_allowed(r, path));
    return completions(r);
  }
  // Jobs.
  if (is({"v1", "jobs"}) && m == "GET") {
    // The newest jobs first; ?limit=N (1..1000, default 100).
    size_t limit = 100;
    const size_t q = r.target.find("limit=");
    if (q != std::string::npos) {
      const std::string value = r.target.substr(q + 6, r.target.find('&', q) - q - 6);
      size_t used = 0;
      long long parsed = -1;
      try {
        parsed = std::stoll(value, &used);
      } catch (const std::exception&) {
      }
      if (used != value.size() || parsed < 1 || parsed > 1000)
        return respond(ApiError(400, fmt::format("limit: must be an integer in [1, 1000] (got '{}')", value), "limit",
                                "invalid_value"));
      limit = static_cast<size_t>(parsed);
    }
    json data = json::array();
    for (const auto& job : scheduler_.list_jobs(limit)) data.push_back(job->to_json());
    return respond_json(json{{"object", "list"}, {"data", std::move(data)}});
  }
  if (is({"v1", "jobs"})) {
    if (m != "POST") return respond(method_not_allowed(r, path));
    CompletionRequest req = parse_completion(parse_body(r.body), options_.default_attention);
    if (req.stream) throw invalid_field("stream", "stream: a job is not streamed; use /v1/completions");
    auto job = scheduler_.submit(JobKind::kJob, std::move(req.spec));
    return respond_json(job->to_json());
  }
  if (n >= 3 && parts[0] == "v1" && parts[1] == "jobs") {
    const std::string& id = parts[2];
    if (n == 3) {
      if (m != "GET") return respond(method_not_allowed(r, path));
      auto job = scheduler_.find_job(id);
      if (!job) return respond(not_found("job", id, "job_not_found", "jobs"));
      return respond_json(job->to_json());
    }
    if (is({"v1", "jobs", "*", "result"})) {
      if (m != "GET") return respond(method_not_allowed(r, path));
      auto job = scheduler_.find_job(id);
      if (!job) return respond(not_found("job", id, "job_not_found", "jobs"));
      const Job::State s = job->snapshot();
      if (s.phase == JobPhase::kCompleted) return respond_json(completion_json(*job, s));
      return respond(job_error(s));
    }
    if (is({"v1", "jobs", "*", "cancel"})) {
      if (m != "POST") return respond(method_not_allowed(r, path));
      auto job = scheduler_.cancel_job(id);
      if (!job) return respond(not_found("job", id, "job_not_found", "jobs"));
      return respond_json(job->to_json());
    }
  }
  // Contexts.
  if (is({"v1", "contexts"})) {
    if (m != "POST") return respond(method_not_allowed(r, path));
    JobSpec spec = parse_context_request(parse_body(r.body), options_.default_attention);
    auto job = scheduler_.submit(JobKind::kContext, std::move(spec));
    const std::string id = scheduler_.context_of_job(job->id);
    return respond_json(scheduler_.context_json(id).value_or(json()));
  }
  if (is({"v1", "contexts", "*"})) {
    const std::string& id = parts[2];
    if (m == "GET") {
      auto c = scheduler_.context_json(id);
      if (!c) return respond(not_found("context", id, "context_not_found", "stored contexts"));
      return respond_json(*c);
    }
    if (m == "DELETE") {
      if (!scheduler_.delete_context(id)) return respond(not_found("context", id, "context_not_found", "stored contexts"));
      return respond_json(json{{"id", id}, {"object", "context.deleted"}, {"deleted", true}});
    }
    return respond(method_not_allowed(r, path));
  }
  // Files.
  if (is({"v1", "files"})) {
    if (m == "POST") return respond(files_upload(r));
    if (m == "GET") return respond_json(batches_.list_files());
    return respond(method_not_allowed(r, path));
  }
  if (is({"v1", "files", "*"})) {
    const std::string& id = parts[2];
    if (m == "GET") {
      auto f = batches_.file(id);
      if (!f) return respond(not_found("file", id, "file_not_found", batches_.durable() ? nullptr : "files without --state-dir"));
      return respond_json(*f);
    }
    if (m == "DELETE") {
      if (!batches_.delete_file(id)) return respond(not_found("file", id, "file_not_found", batches_.durable() ? nullptr : "files without --state-dir"));
      return respond_json(json{{"id", id}, {"object", "file"}, {"deleted", true}});
    }
    return respond(method_not_allowed(r, path));
  }
  if (is({"v1", "files", "*", "content"})) {
    if (m != "GET") return respond(method_not_allowed(r, path));
    auto content = batches_.file_content(parts[2]);
    if (!content) return respond(not_found("file", parts[2], "file_not_found", batches_.durable() ? nullptr : "files without --state-dir"));
    HttpResponse resp;
    resp.content_type = "application/jsonl";
    resp.body = std::move(*content);
    return respond(resp);
  }
  // Batches.
  if (is({"v1", "batches"})) {
    if (m == "POST") return respond_json(batches_.create_batch(parse_body(r.body)));
    if (m == "GET") return respond_json(batches_.list_batches());
    return respond(method_not_allowed(r, path));
  }
  if (is({"v1", "batches", "*"})) {
    if (m != "GET") return respond(method_not_allowed(r, path));
    auto b = batches_.batch(parts[2]);
    if (!b) return respond(not_found("batch", parts[2], "batch_not_found", batches_.durable() ? nullptr : "batches without --state-dir"));
    return respond_json(*b);
  }
  if (is({"v1", "batches", "*", "cancel"})) {
    if (m != "POST") return respond(method_not_allowed(r, path));
    auto b = batches_.cancel_batch(parts[2]);
    if (!b) return respond(not_found("batch", parts[2], "batch_not_found", batches_.durable() ? nullptr : "batches without --state-dir"));
    return respond_json(*b);
  }
  return respond(ApiError(404, fmt::format("Unknown route: {} {}", m, path), "", "unknown_route"));
}

Reply Router::completions(const HttpRequest& r) {
  CompletionRequest req = parse_completion(parse_body(r.body), options_.default_attention);
  auto job = scheduler_.submit(JobKind::kCompletion, std::move(req.spec));
  Reply reply;
  reply.mode = req.stream ? Reply::Mode::kStream : Reply::Mode::kWait;
  reply.job = job;
  reply.include_usage = req.include_usage;
  return reply;
}

HttpResponse Router::files_upload(const HttpRequest& r) {
  auto parts = parse_multipart(r.content_type, r.body);
  auto purpose = parts.find("purpose");
  auto file = parts.find("file");
  if (purpose == parts.end()) throw ApiError(400, "purpose: this field is required", "purpose", "missing_required_parameter");
  if (file == parts.end()) throw ApiError(400, "file: this field is required", "file", "missing_required_parameter");
  return json_response(200, batches_.add_file(file->second.filename.empty() ? "upload.jsonl" : file->second.filename,
                                              purpose->second.content, std::move(file->second.content)));
}

HttpResponse completion_response(const Job& job) {
  const Job::State s = job.snapshot();
  if (s.phase == JobPhase::kCompleted) return json_response(200, completion_json(job, s));
  return error_response(job_error(s));
}

std::string sse_event(const json& data) {
  return "data: " + data.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
}

json stream_chunk(const Job& job, const std::string& model, const std::string& text, const json& finish_reason) {
  return json{{"id", "cmpl-" + job.id},
              {"object", "text_completion"},
              {"created", job.created_unix},
              {"model", model},
              {"choices", json::array({json{{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", finish_reason}}})}};
}

std::map<std::string, FormPart> parse_multipart(const std::string& content_type, const std::string& body) {
  auto bad = [](const std::string& why) { return ApiError(400, "Malformed multipart/form-data body: " + why, "file", "invalid_multipart"); };
  if (content_type.rfind("multipart/form-data", 0) != 0)
    throw ApiError(400, fmt::format("Content-Type must be multipart/form-data (got '{}')", content_type), "", "invalid_content_type");
  const size_t b = content_type.find("boundary=");
  if (b == std::string::npos) throw bad("no boundary");
  std::string boundary = content_type.substr(b + 9);
  boundary = boundary.substr(0, boundary.find(';'));
  if (boundary.size() >= 2 && boundary.front() == '"') boundary = boundary.substr(1, boundary.size() - 2);
  if (boundary.empty()) throw bad("empty boundary");
  const std::string delimiter = "--" + boundary;
  std::map<std::string, FormPart> parts;
  size_t pos = body.find(delimiter);
  if (pos == std::string::npos) throw bad("no boundary line");
  for (;;) {
    pos += delimiter.size();
    if (body.compare(pos, 2, "--") == 0) break;  // closing delimiter
    if (body.compare(pos, 2, "\r\n") != 0) throw bad("boundary not followed by CRLF");
    pos += 2;
    const size_t header_end = body.find("\r\n\r\n", pos);
    if (header_end == std::string::npos) throw bad("part without headers");
    const std::string headers = body.substr(pos, header_end - pos);
    const size_t content_begin = header_end + 4;
    const size_t next = body.find("\r\n" + delimiter, content_begin);
    if (next == std::string::npos) throw bad("part without a closing boundary");
    auto param = [&](const char* key) -> std::string {
      const std::string k = std::string(key) + "=\"";
      const size_t at = headers.find(k);
      if (at == std::string::npos) return {};
      const size_t end = headers.find('"', at + k.size());
      return end == std::string::npos ? std::string() : headers.substr(at + k.size(), end - at - k.size());
    };
    const std::string name = param("name");
    if (name.empty()) throw bad("part without a name");
    parts[name] = FormPart{param("filename"), body.substr(content_begin, next - content_begin)};
    pos = next + 2;
  }
  return parts;
}

}  // namespace unshackle::coord
