#include "client_commands.h"

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "unshackle/common/check.h"

namespace unshackle {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using nlohmann::json;

ServiceClient::ServiceClient(const std::string& url, std::string api_key) : api_key_(std::move(api_key)) {
  std::string rest = url;
  UNS_CHECK(rest.rfind("http://", 0) == 0, "--url: expected http://HOST:PORT (got '{}'; https is not supported)", url);
  rest = rest.substr(7);
  rest = rest.substr(0, rest.find('/'));
  const size_t colon = rest.rfind(':');
  if (colon == std::string::npos || rest.back() == ']') {
    host_ = rest;
    port_ = "80";
  } else {
    host_ = rest.substr(0, colon);
    port_ = rest.substr(colon + 1);
  }
  if (host_.size() >= 2 && host_.front() == '[') host_ = host_.substr(1, host_.size() - 2);
  UNS_CHECK(!host_.empty() && !port_.empty() && port_.find_first_not_of("0123456789") == std::string::npos,
            "--url: expected http://HOST:PORT (got '{}')", url);
}

ClientResponse ServiceClient::send(const std::string& method, const std::string& target, const std::string& body,
                                   const std::function<void(std::string_view)>* on_data) const {
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  net::ip::tcp::resolver resolver(ioc);
  beast::error_code ec;
  const auto endpoints = resolver.resolve(host_, port_, ec);
  UNS_CHECK_KIND(kIo, !ec, "cannot resolve {}: {}", host_, ec.message());
  stream.expires_after(std::chrono::seconds(10));
  stream.connect(endpoints, ec);
  UNS_CHECK_KIND(kIo, !ec, "cannot connect to the coordinator at {}:{}: {}", host_, port_, ec.message());
  http::request<http::string_body> req{http::string_to_verb(method), target, 11};
  req.set(http::field::host, host_);
  req.set(http::field::user_agent, "unshackle-cli");
  if (!api_key_.empty()) req.set(http::field::authorization, "Bearer " + api_key_);
  if (method == "POST") {
    req.set(http::field::content_type, "application/json");
    req.body() = body;
    req.prepare_payload();
  }
  http::write(stream, req, ec);
  UNS_CHECK_KIND(kIo, !ec, "sending {} {}: {}", method, target, ec.message());
  // A long prefill or generation may take a while; the service bounds its own steps.
  stream.expires_never();
  beast::flat_buffer buffer;
  http::response_parser<http::buffer_body> parser;
  parser.body_limit(boost::none);
  http::read_header(stream, buffer, parser, ec);
  UNS_CHECK_KIND(kIo, !ec, "reading the answer to {} {}: {}", method, target, ec.message());
  ClientResponse out;
  out.status = static_cast<int>(parser.get().result_int());
  char data[8192];
  while (!parser.is_done()) {
    parser.get().body().data = data;
    parser.get().body().size = sizeof data;
    http::read(stream, buffer, parser, ec);
    if (ec == http::error::need_buffer) ec = {};
    UNS_CHECK_KIND(kIo, !ec, "reading the answer to {} {}: {}", method, target, ec.message());
    const size_t n = sizeof data - parser.get().body().size;
    const std::string_view chunk(data, n);
    if (on_data && out.status == 200) (*on_data)(chunk);
    else out.body.append(chunk);
  }
  stream.socket().shutdown(net::ip::tcp::socket::shutdown_both, ec);
  return out;
}

ClientResponse ServiceClient::get(const std::string& target) const { return send("GET", target, "", nullptr); }
ClientResponse ServiceClient::post(const std::string& target, const std::string& body) const {
  return send("POST", target, body, nullptr);
}
ClientResponse ServiceClient::del(const std::string& target) const { return send("DELETE", target, "", nullptr); }
ClientResponse ServiceClient::post_stream(const std::string& target, const std::string& body,
                                          const std::function<void(std::string_view)>& on_data) const {
  return send("POST", target, body, &on_data);
}

namespace {

struct ClientOptions {
  std::string url, api_key;
};

void add_connection_options(CLI::App* cmd, ClientOptions& o) {
  const char* url = std::getenv("UNSHACKLE_URL");
  const char* key = std::getenv("UNSHACKLE_API_KEY");
  o.url = url ? url : "http://127.0.0.1:8000";
  o.api_key = key ? key : "";
  cmd->add_option("--url", o.url, "coordinator URL (default: $UNSHACKLE_URL or http://127.0.0.1:8000)");
  cmd->add_option("--api-key", o.api_key, "Bearer key (default: $UNSHACKLE_API_KEY)");
}

// The service's error envelope as an Error: 4xx is bad input (exit 2), the rest exit 1.
json checked(const ClientResponse& r, const std::string& what) {
  const json j = json::parse(r.body, nullptr, false);
  if (r.status >= 200 && r.status < 300) {
    UNS_CHECK_KIND(kIo, !j.is_discarded(), "{}: the service answered {} with a body that is not JSON", what, r.status);
    return j;
  }
  std::string message = r.body;
  if (j.is_object() && j.contains("error") && j["error"].is_object())
    message = fmt::format("{} ({})", j["error"].value("message", ""), j["error"].value("code", ""));
  const ErrorKind kind = r.status == 404 ? ErrorKind::kNotFound
                         : r.status >= 400 && r.status < 500 ? ErrorKind::kInvalidArgument
                                                             : ErrorKind::kIo;
  throw Error(kind, fmt::format("{}: HTTP {}: {}", what, r.status, message));
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  UNS_CHECK_KIND(kNotFound, in.good(), "--file: cannot open '{}'", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string fmt_value(const json& v) { return v.is_null() ? "-" : (v.is_string() ? v.get<std::string>() : v.dump()); }

// "prefill [##########          ]  1536/4096 tokens" on stderr, redrawn in place on a terminal.
void draw_progress(int64_t done, int64_t total, bool final) {
  const int width = 30;
  const int filled = total > 0 ? static_cast<int>(width * std::min<int64_t>(done, total) / total) : 0;
  const bool tty = ::isatty(STDERR_FILENO);
  std::fprintf(stderr, "%sprefill [%s%s] %lld/%lld tokens%s", tty ? "\r" : "", std::string(filled, '#').c_str(),
               std::string(width - filled, ' ').c_str(), static_cast<long long>(done), static_cast<long long>(total),
               tty && !final ? "" : "\n");
  std::fflush(stderr);
}

struct SubmitOptions {
  ClientOptions connection;
  std::string file, question, model, attention;
  int64_t max_tokens = 256;
  double temperature = 0;
  int64_t seed = 0;
  bool detach = false, keep_context = false;
};

void run_submit(const SubmitOptions& o) {
  const ServiceClient client(o.connection.url, o.connection.api_key);
  const std::string document = read_file(o.file);
  json common{{"max_tokens", o.max_tokens}, {"temperature", o.temperature}, {"seed", o.seed}};
  if (!o.model.empty()) common["model"] = o.model;
  json attention;
  if (!o.attention.empty()) {
    attention = json::parse(o.attention, nullptr, false);
    UNS_CHECK(attention.is_object(), "--attention: not a JSON object: {}", o.attention);
  }
  if (o.detach) {
    json body = common;
    body["prompt"] = document + o.question;
    if (!attention.is_null()) body["attention"] = attention;
    const json job = checked(client.post("/v1/jobs", body.dump()), "submitting the job");
    std::printf("%s\n", job["id"].get<std::string>().c_str());
    return;
  }
  // 1. The file becomes a stored context; its prefill is followed with a progress bar.
  json context_body{{"prompt", document}};
  if (!o.model.empty()) context_body["model"] = o.model;
  if (!attention.is_null()) context_body["attention"] = attention;
  json context = checked(client.post("/v1/contexts", context_body.dump()), "storing --file as a context");
  const std::string id = context["id"];
  for (;;) {
    const std::string status = context.value("status", "");
    const int64_t total = context["tokens"].is_number() ? context["tokens"].get<int64_t>() : 0;
    const int64_t done = context["prefilled_tokens"].is_number() ? context["prefilled_tokens"].get<int64_t>() : 0;
    if (status == "ready") {
      draw_progress(total, total, true);
      break;
    }
    if (status != "prefilling") {
      if (total > 0) draw_progress(done, total, true);
      const std::string error = context["error"].is_object() ? context["error"].value("message", "") : "";
      fail(ErrorKind::kIo, fmt::format("context {} is {}{}", id, status, error.empty() ? "" : ": " + error));
    }
    if (total > 0) draw_progress(done, total, false);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    context = checked(client.get("/v1/contexts/" + id), "following the context's prefill");
  }
  // 2. The question continues the context; tokens are printed as they stream in.
  json body = common;
  body["context"] = id;
  body["prompt"] = o.question;
  body["stream"] = true;
  body["stream_options"] = {{"include_usage", true}};
  std::string pending, finish, failure;
  json usage;
  const auto on_data = [&](std::string_view data) {
    pending.append(data);
    size_t end;
    while ((end = pending.find("\n\n")) != std::string::npos) {
      const std::string event = pending.substr(0, end);
      pending.erase(0, end + 2);
      if (event.rfind("data: ", 0) != 0) continue;
      const std::string payload = event.substr(6);
      if (payload == "[DONE]") continue;
      const json chunk = json::parse(payload, nullptr, false);
      if (!chunk.is_object()) continue;
      if (chunk.contains("error")) {
        failure = chunk["error"].value("message", payload);
        continue;
      }
      if (chunk.contains("usage") && !chunk["usage"].is_null()) usage = chunk["usage"];
      if (chunk["choices"].is_array() && !chunk["choices"].empty()) {
        const json& c = chunk["choices"][0];
        std::fputs(c.value("text", "").c_str(), stdout);
        std::fflush(stdout);
        if (!c["finish_reason"].is_null()) finish = c["finish_reason"];
      }
    }
  };
  ClientResponse r;
  try {
    r = client.post_stream("/v1/completions", body.dump(), on_data);
  } catch (...) {
    if (!o.keep_context) client.del("/v1/contexts/" + id);
    throw;
  }
  std::printf("\n");
  if (!o.keep_context) client.del("/v1/contexts/" + id);
  if (r.status != 200) checked(r, "asking the question");
  UNS_CHECK_KIND(kIo, failure.empty(), "the completion failed: {}", failure);
  std::fprintf(stderr, "finish_reason: %s; prompt %s tokens, completion %s tokens%s\n", finish.c_str(),
               fmt_value(usage.value("prompt_tokens", json())).c_str(),
               fmt_value(usage.value("completion_tokens", json())).c_str(),
               o.keep_context ? fmt::format("; context {} kept", id).c_str() : "");
}

void print_job_line(const json& j) {
  const json& p = j["progress"];
  std::printf("%-28s %-10s %-10s prefill %s/%s  generated %s\n", fmt_value(j["id"]).c_str(), fmt_value(j["status"]).c_str(),
              fmt_value(j["kind"]).c_str(), fmt_value(p["prefilled_tokens"]).c_str(), fmt_value(p["prompt_tokens"]).c_str(),
              fmt_value(p["generated_tokens"]).c_str());
}

}  // namespace

void add_client_commands(CLI::App& app) {
  auto s = std::make_shared<SubmitOptions>();
  CLI::App* submit = app.add_subcommand("submit", "Ask a question about a file through the service (progress, streamed tokens)");
  add_connection_options(submit, s->connection);
  submit->add_option("--file", s->file, "the document: stored as a context and prefilled once")->required();
  submit->add_option("--question", s->question, "the prompt that follows the document")->required();
  submit->add_option("--model", s->model, "model id (default: any the service has)");
  submit->add_option("--max-tokens", s->max_tokens, "tokens to generate at most")->capture_default_str();
  submit->add_option("--temperature", s->temperature, "0: greedy")->capture_default_str();
  submit->add_option("--seed", s->seed, "sampling seed")->capture_default_str();
  submit->add_option("--attention", s->attention, "attention settings as JSON, e.g. '{\"mode\":\"exact-topk\"}'");
  submit->add_flag("--detach", s->detach, "submit document + question as a job, print its id and return");
  submit->add_flag("--keep-context", s->keep_context, "keep the stored context (its id is printed) for more questions");
  submit->callback([s] { run_submit(*s); });

  auto jobs_options = std::make_shared<ClientOptions>();
  auto limit = std::make_shared<int>(20);
  auto as_json = std::make_shared<bool>(false);
  CLI::App* jobs = app.add_subcommand("jobs", "List the newest jobs of the service");
  add_connection_options(jobs, *jobs_options);
  jobs->add_option("--limit", *limit, "jobs to list (1..1000)")->capture_default_str();
  jobs->add_flag("--json", *as_json, "print the service's JSON");
  jobs->callback([jobs_options, limit, as_json] {
    const ServiceClient client(jobs_options->url, jobs_options->api_key);
    const json list = checked(client.get(fmt::format("/v1/jobs?limit={}", *limit)), "listing jobs");
    if (*as_json) {
      std::printf("%s\n", list.dump(2).c_str());
      return;
    }
    for (const json& j : list["data"]) print_job_line(j);
  });

  auto status_options = std::make_shared<ClientOptions>();
  auto status_id = std::make_shared<std::string>();
  CLI::App* status = app.add_subcommand("status", "Show one job (progress, timings, error) as JSON");
  add_connection_options(status, *status_options);
  status->add_option("job", *status_id, "job id")->required();
  status->callback([status_options, status_id] {
    const ServiceClient client(status_options->url, status_options->api_key);
    const json job = checked(client.get("/v1/jobs/" + *status_id), "job " + *status_id);
    std::printf("%s\n", job.dump(2).c_str());
  });

  auto cancel_options = std::make_shared<ClientOptions>();
  auto cancel_id = std::make_shared<std::string>();
  CLI::App* cancel = app.add_subcommand("cancel", "Cancel a job (its work on the workers stops at the next step)");
  add_connection_options(cancel, *cancel_options);
  cancel->add_option("job", *cancel_id, "job id")->required();
  cancel->callback([cancel_options, cancel_id] {
    const ServiceClient client(cancel_options->url, cancel_options->api_key);
    const json job = checked(client.post("/v1/jobs/" + *cancel_id + "/cancel", "{}"), "cancelling job " + *cancel_id);
    print_job_line(job);
  });
}

}  // namespace unshackle
