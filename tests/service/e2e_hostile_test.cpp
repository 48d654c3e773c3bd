// Hostile clients against the real service (issue 15): a coordinator and a worker group of 2
// CPU ranks under mpirun, driven over raw sockets. Every route gets wrong JSON types, missing
// fields, huge and negative numbers, invalid UTF-8 (in prompts, JSON strings, headers, the
// target), bodies over the limit, malformed HTTP, slow clients (slowloris) and a client that
// disconnects mid-stream. Each must get its documented status and the error envelope, the
// service must stay up, and normal work running beside it must still get the answer
// `unshackle generate` gives. Auth: every route but /health refuses a missing or wrong key,
// and the key never reaches a log.
//
// The bad-request table is data (kCases, kSlowCases); docs/reliability.md ("Bad requests")
// holds the same table, and DocsHoldTheSameTable fails when the two differ. To print the
// table as markdown: UNS_PRINT_BAD_REQUEST_TABLE=1 service_e2e_hostile_test --gtest_filter=*Docs*
#include <gtest/gtest.h>

#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <cstdio>
#include <memory>
#include <mutex>
#include <regex>
#include <set>
#include <thread>

#include "live_service.h"
#include "unshackle/model/tokenizer.h"

namespace unshackle::live {
namespace {

using Ms = std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

const char* kKey = "sk-hostile-5c1e7d0a9b";  // distinctive, so a log line holding it is found
const char* kPrompt = "The quick brown fox jumps";
constexpr int kIoTimeoutS = 2;    // --io-timeout-s of the service under test
constexpr int kIdleTimeoutS = 4;  // --idle-timeout-s
constexpr int kMaxBody = 65536;   // --max-body-bytes
// Slack over a timeout for the answer to arrive (scheduling on 2 busy cores, sanitizers).
constexpr Ms kSlack{3000};

// ---- a raw HTTP client: any bytes out, the answer (if any) back ----

void set_socket_timeouts(int fd, Ms timeout) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

struct Conn {
  net::io_context ioc;
  net::ip::tcp::socket socket{ioc};
  beast::flat_buffer buffer;
  explicit Conn(uint16_t port, Ms timeout = 30s) {
    socket.connect(net::ip::tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
    set_socket_timeouts(socket.native_handle(), timeout);
  }
  // Writes what it can: the server may answer early and close.
  bool send(const std::string& bytes) {
    beast::error_code ec;
    net::write(socket, net::buffer(bytes), ec);
    return !ec;
  }
  bool readable(Ms wait = Ms(0)) {
    pollfd p{socket.native_handle(), POLLIN, 0};
    return ::poll(&p, 1, static_cast<int>(wait.count())) > 0;
  }
  // One response; status 0 when the connection ended (or the read timed out) without one.
  HttpResult read_reply() {
    http::response_parser<http::string_body> parser;
    parser.body_limit(64 << 20);
    beast::error_code ec;
    http::read(socket, buffer, parser, ec);
    HttpResult out;
    if (ec && !parser.is_header_done()) return out;
    out.status = static_cast<int>(parser.get().result_int());
    for (const auto& field : parser.get()) out.headers[std::string(field.name_string())] = std::string(field.value());
    out.body = parser.get().body();
    return out;
  }
  // Whether the server closed the connection (end of stream) within `wait`.
  bool closed_within(Ms wait) {
    set_socket_timeouts(socket.native_handle(), wait);
    char byte = 0;
    const ssize_t n = ::recv(socket.native_handle(), &byte, 1, 0);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
  }
};

HttpResult send_raw(uint16_t port, const std::string& bytes) {
  Conn c(port);
  c.send(bytes);
  return c.read_reply();
}

// ---- the table ----

enum class Auth { kWithKey, kNoKey };

struct Case {
  const char* name;   // unique; the row of docs/reliability.md
  const char* route;  // as docs/api.md names it
  std::string method;
  std::string target;  // {job}, {file}, {badfile}, {deepfile}, {batch}: ids the suite made
  std::string body;
  int status;
  const char* code;  // error code; "" for a success
  std::string content_type = "application/json";
  std::string headers = "";  // extra header lines, each ending in \r\n
  Auth auth = Auth::kWithKey;
  std::string raw = "";  // when set: the exact bytes sent (malformed HTTP)
};

std::string completion(const std::string& fields) { return "{\"prompt\":\"a\",\"max_tokens\":2" + fields + "}"; }
std::string attention(const std::string& fields) { return completion(",\"attention\":{\"mode\":\"exact-topk\"," + fields + "}"); }

const std::string kBoundary = "hostile-boundary-91";
std::string multipart(const std::string& purpose_part, const std::string& file_part) {
  std::string out;
  if (!purpose_part.empty())
    out += "--" + kBoundary + "\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n" + purpose_part + "\r\n";
  if (!file_part.empty()) out += file_part;
  return out + "--" + kBoundary + "--\r\n";
}
std::string file_part(const std::string& content, const std::string& filename = "in.jsonl") {
  return "--" + kBoundary + "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + filename +
         "\"\r\nContent-Type: application/jsonl\r\n\r\n" + content + "\r\n";
}
const std::string kMultipart = "multipart/form-data; boundary=" + kBoundary;
const std::string kGoodLine = R"({"custom_id":"x","method":"POST","url":"/v1/completions","body":{"prompt":"a","max_tokens":2}})";
std::string batch(const std::string& fields) {
  return R"({"input_file_id":"{file}","endpoint":"/v1/completions","completion_window":"24h")" + fields + "}";
}
std::string metadata_pairs(int n) {
  std::string out = "{";
  for (int i = 0; i < n; ++i) out += fmt::format("{}\"k{}\":\"v\"", i ? "," : "", i);
  return out + "}";
}
std::string raw_request(const std::string& head_lines, const std::string& body = "") {
  return head_lines + "Host: 127.0.0.1\r\nAuthorization: Bearer " + kKey + "\r\nConnection: close\r\n" +
         (body.empty() ? "" : fmt::format("Content-Length: {}\r\n", body.size())) + "\r\n" + body;
}

const std::vector<Case>& cases() {
  static const std::vector<Case> table = [] {
    const std::string C = "/v1/completions";
    std::vector<Case> t = {
        // ---- routes without a body ----
        {"health without a key", "GET /health", "GET", "/health", "", 200, "", "application/json", "", Auth::kNoKey},
        {"health POST", "GET /health", "POST", "/health", "{}", 405, "method_not_allowed"},
        {"ready POST", "GET /ready", "POST", "/ready", "{}", 405, "method_not_allowed"},
        {"metrics DELETE", "GET /metrics", "DELETE", "/metrics", "", 405, "method_not_allowed"},
        {"models POST", "GET /v1/models", "POST", "/v1/models", "{}", 405, "method_not_allowed"},
        {"unknown route", "(none)", "GET", "/v2/everything", "", 404, "unknown_route"},
        {"root", "(none)", "GET", "/", "", 404, "unknown_route"},
        {"/v1 alone", "(none)", "GET", "/v1", "", 404, "unknown_route"},
        {"target of 8 KiB", "(none)", "GET", "/v1/" + std::string(8192, 'a'), "", 404, "unknown_route"},
        // ---- POST /v1/completions: the body ----
        {"completions GET", "POST /v1/completions", "GET", C, "", 405, "method_not_allowed"},
        {"empty body", "POST /v1/completions", "POST", C, "", 400, "invalid_json"},
        {"truncated JSON", "POST /v1/completions", "POST", C, "{\"prompt\": ", 400, "invalid_json"},
        {"body is an array", "POST /v1/completions", "POST", C, R"([{"prompt":"a"}])", 400, "invalid_json"},
        {"body is a string", "POST /v1/completions", "POST", C, R"("a")", 400, "invalid_json"},
        {"body is null", "POST /v1/completions", "POST", C, "null", 400, "invalid_json"},
        {"JSON nested 10000 deep", "POST /v1/completions", "POST", C, std::string(10000, '[') + std::string(10000, ']'), 400,
         "invalid_json"},
        {"prompt nested 30000 deep", "POST /v1/completions", "POST", C,
         "{\"prompt\":" + std::string(30000, '[') + std::string(30000, ']') + "}", 400, "invalid_json"},
        {"object nested 65 deep", "POST /v1/completions", "POST", C,
         completion(",\"x\":" + [] { std::string o; for (int i = 0; i < 64; ++i) o += "{\"a\":"; return o + "1" + std::string(64, '}'); }()),
         400, "invalid_json"},
        {"unknown field nested 60 deep", "POST /v1/completions", "POST", C,
         completion(",\"x\":" + std::string(59, '[') + std::string(59, ']')), 200, ""},
        {"empty object", "POST /v1/completions", "POST", C, "{}", 400, "missing_required_parameter"},
        {"prompt null", "POST /v1/completions", "POST", C, R"({"prompt":null})", 400, "missing_required_parameter"},
        {"prompt number", "POST /v1/completions", "POST", C, R"({"prompt":42})", 400, "invalid_value"},
        {"prompt object", "POST /v1/completions", "POST", C, R"({"prompt":{"text":"a"}})", 400, "invalid_value"},
        {"prompt boolean", "POST /v1/completions", "POST", C, R"({"prompt":true})", 400, "invalid_value"},
        {"prompt empty string", "POST /v1/completions", "POST", C, R"({"prompt":""})", 400, "invalid_value"},
        {"prompt empty array", "POST /v1/completions", "POST", C, R"({"prompt":[]})", 400, "invalid_value"},
        {"prompt ids with a string", "POST /v1/completions", "POST", C, R"({"prompt":[1,"a"]})", 400, "invalid_value"},
        {"prompt ids with a float", "POST /v1/completions", "POST", C, R"({"prompt":[1,2.5]})", 400, "invalid_value"},
        {"two prompts", "POST /v1/completions", "POST", C, R"({"prompt":["a","b"]})", 400, "invalid_value"},
        {"prompt id negative", "POST /v1/completions", "POST", C, R"({"prompt":[1,-1]})", 400, "invalid_value"},
        {"prompt id above int32", "POST /v1/completions", "POST", C, R"({"prompt":[1,2147483648]})", 400, "invalid_value"},
        {"prompt id outside the vocabulary", "POST /v1/completions", "POST", C, R"({"prompt":[1,99999],"max_tokens":2})", 400,
         "invalid_value"},
        {"prompt of 60000 bytes", "POST /v1/completions", "POST", C,
         "{\"prompt\":\"" + std::string(60000, 'x') + "\",\"max_tokens\":2}", 400, "context_length_exceeded"},
        {"prompt ids over the context", "POST /v1/completions", "POST", C,
         "{\"prompt\":[" + [] { std::string s = "1"; for (int i = 0; i < 3000; ++i) s += ",65"; return s; }() + "]}", 400,
         "context_length_exceeded"},
        {"model number", "POST /v1/completions", "POST", C, completion(",\"model\":5"), 400, "invalid_value"},
        {"unknown model", "POST /v1/completions", "POST", C, completion(",\"model\":\"gpt-5\""), 404, "model_not_found"},
        {"max_tokens string", "POST /v1/completions", "POST", C, R"({"prompt":"a","max_tokens":"8"})", 400, "invalid_value"},
        {"max_tokens float", "POST /v1/completions", "POST", C, R"({"prompt":"a","max_tokens":1.5})", 400, "invalid_value"},
        {"max_tokens zero", "POST /v1/completions", "POST", C, R"({"prompt":"a","max_tokens":0})", 400, "invalid_value"},
        {"max_tokens negative", "POST /v1/completions", "POST", C, R"({"prompt":"a","max_tokens":-5})", 400, "invalid_value"},
        {"max_tokens 1e300", "POST /v1/completions", "POST", C, R"({"prompt":"a","max_tokens":1e300})", 400, "invalid_value"},
        {"max_tokens INT64_MAX, text prompt", "POST /v1/completions", "POST", C,
         R"({"prompt":"a","max_tokens":9223372036854775807})", 400, "context_length_exceeded"},
        {"max_tokens INT64_MAX, token ids", "POST /v1/completions", "POST", C,
         R"({"prompt":[1,65,66],"max_tokens":9223372036854775807})", 400, "context_length_exceeded"},
        {"max_tokens UINT64_MAX", "POST /v1/completions", "POST", C, R"({"prompt":"a","max_tokens":18446744073709551615})",
         400, "invalid_value"},
        {"max_tokens 2^64", "POST /v1/completions", "POST", C, R"({"prompt":"a","max_tokens":18446744073709551616})", 400,
         "invalid_value"},
        {"temperature string", "POST /v1/completions", "POST", C, completion(",\"temperature\":\"hot\""), 400, "invalid_value"},
        {"temperature negative", "POST /v1/completions", "POST", C, completion(",\"temperature\":-0.1"), 400, "invalid_value"},
        {"temperature 1e308", "POST /v1/completions", "POST", C, completion(",\"temperature\":1e308"), 400, "invalid_value"},
        {"temperature 1e999", "POST /v1/completions", "POST", C, completion(",\"temperature\":1e999"), 400, "invalid_json"},
        {"top_p zero", "POST /v1/completions", "POST", C, completion(",\"top_p\":0"), 400, "invalid_value"},
        {"top_p negative", "POST /v1/completions", "POST", C, completion(",\"top_p\":-1"), 400, "invalid_value"},
        {"top_p above 1", "POST /v1/completions", "POST", C, completion(",\"top_p\":1.5"), 400, "invalid_value"},
        {"top_p boolean", "POST /v1/completions", "POST", C, completion(",\"top_p\":true"), 400, "invalid_value"},
        {"top_k negative", "POST /v1/completions", "POST", C, completion(",\"top_k\":-1"), 400, "invalid_value"},
        {"top_k UINT64_MAX", "POST /v1/completions", "POST", C, completion(",\"top_k\":18446744073709551615"), 400,
         "invalid_value"},
        {"top_k INT64_MAX (no cut)", "POST /v1/completions", "POST", C, completion(",\"top_k\":9223372036854775807"), 200, ""},
        {"seed string", "POST /v1/completions", "POST", C, completion(",\"seed\":\"x\""), 400, "invalid_value"},
        {"seed negative", "POST /v1/completions", "POST", C, completion(",\"seed\":-1"), 200, ""},
        {"seed UINT64_MAX", "POST /v1/completions", "POST", C, completion(",\"seed\":18446744073709551615"), 200, ""},
        {"n two", "POST /v1/completions", "POST", C, completion(",\"n\":2"), 400, "invalid_value"},
        {"n string", "POST /v1/completions", "POST", C, completion(",\"n\":\"1\""), 400, "invalid_value"},
        {"stop number", "POST /v1/completions", "POST", C, completion(",\"stop\":5"), 400, "invalid_value"},
        {"stop array of numbers", "POST /v1/completions", "POST", C, completion(",\"stop\":[1,2]"), 400, "invalid_value"},
        {"stop five strings", "POST /v1/completions", "POST", C, completion(",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]"), 400,
         "invalid_value"},
        {"stop empty string", "POST /v1/completions", "POST", C, completion(",\"stop\":[\"\"]"), 400, "invalid_value"},
        {"stop of 30000 bytes", "POST /v1/completions", "POST", C, completion(",\"stop\":\"" + std::string(30000, 'z') + "\""),
         200, ""},
        {"stream string", "POST /v1/completions", "POST", C, completion(",\"stream\":\"yes\""), 400, "invalid_value"},
        {"stream_options without stream", "POST /v1/completions", "POST", C,
         completion(",\"stream_options\":{\"include_usage\":true}"), 400, "invalid_value"},
        {"stream_options number", "POST /v1/completions", "POST", C, completion(",\"stream\":true,\"stream_options\":1"), 400,
         "invalid_value"},
        {"include_usage string", "POST /v1/completions", "POST", C,
         completion(",\"stream\":true,\"stream_options\":{\"include_usage\":\"y\"}"), 400, "invalid_value"},
        {"context number", "POST /v1/completions", "POST", C, completion(",\"context\":5"), 400, "invalid_value"},
        {"unknown context", "POST /v1/completions", "POST", C, completion(",\"context\":\"ctx-nope\""), 404, "context_not_found"},
        {"logprobs", "POST /v1/completions", "POST", C, completion(",\"logprobs\":5"), 400, "invalid_value"},
        {"echo", "POST /v1/completions", "POST", C, completion(",\"echo\":true"), 400, "invalid_value"},
        {"best_of two", "POST /v1/completions", "POST", C, completion(",\"best_of\":2"), 400, "invalid_value"},
        {"unknown fields are ignored", "POST /v1/completions", "POST", C, completion(",\"frobnicate\":[1,{}]"), 200, ""},
        // attention
        {"attention string", "POST /v1/completions", "POST", C, completion(",\"attention\":\"esa\""), 400, "invalid_value"},
        {"attention mode number", "POST /v1/completions", "POST", C, completion(",\"attention\":{\"mode\":1}"), 400,
         "invalid_value"},
        {"attention mode unknown", "POST /v1/completions", "POST", C, completion(",\"attention\":{\"mode\":\"fast\"}"), 400,
         "invalid_value"},
        {"attention esa without weights", "POST /v1/completions", "POST", C, completion(",\"attention\":{\"mode\":\"esa\"}"),
         400, "invalid_value"},
        {"attention unknown key", "POST /v1/completions", "POST", C, attention("\"topk\":8"), 400, "invalid_value"},
        {"attention.top_k zero", "POST /v1/completions", "POST", C, attention("\"top_k\":0"), 400, "invalid_value"},
        {"attention.top_k negative", "POST /v1/completions", "POST", C, attention("\"top_k\":-8"), 400, "invalid_value"},
        {"attention.top_k string", "POST /v1/completions", "POST", C, attention("\"top_k\":\"8\""), 400, "invalid_value"},
        {"attention.top_k 2^31-1", "POST /v1/completions", "POST", C, attention("\"top_k\":2147483647"), 200, ""},
        {"attention.top_k INT64_MAX", "POST /v1/completions", "POST", C, attention("\"top_k\":9223372036854775807"), 400,
         "invalid_value"},
        {"attention.l_L negative", "POST /v1/completions", "POST", C, attention("\"l_L\":-1"), 400, "invalid_value"},
        {"attention.l_L INT64_MAX", "POST /v1/completions", "POST", C, attention("\"l_L\":9223372036854775807"), 400,
         "invalid_value"},
        {"attention.l_I INT64_MAX", "POST /v1/completions", "POST", C, attention("\"l_I\":9223372036854775807"), 400,
         "invalid_value"},
        {"attention.w -2", "POST /v1/completions", "POST", C, attention("\"w\":-2"), 400, "invalid_value"},
        {"attention.w INT64_MAX", "POST /v1/completions", "POST", C, attention("\"w\":9223372036854775807"), 400,
         "invalid_value"},
        {"attention.eps INT64_MAX", "POST /v1/completions", "POST", C, attention("\"eps\":9223372036854775807"), 400,
         "invalid_value"},
        {"attention.eps UINT64_MAX", "POST /v1/completions", "POST", C, attention("\"eps\":18446744073709551615"), 400,
         "invalid_value"},
        {"attention.lag INT64_MAX with eviction", "POST /v1/completions", "POST", C,
         attention("\"lag\":9223372036854775807,\"l_L\":9223372036854775807,\"lag_ratio\":0.5"), 400, "invalid_value"},
        {"attention.lag_ratio 2", "POST /v1/completions", "POST", C, attention("\"lag_ratio\":2"), 400, "invalid_value"},
        {"attention.lag_ratio string", "POST /v1/completions", "POST", C, attention("\"lag_ratio\":\"half\""), 400,
         "invalid_value"},
        // invalid UTF-8 and odd strings
        {"prompt with byte 0xFF", "POST /v1/completions", "POST", C, "{\"prompt\":\"a\xff" "b\",\"max_tokens\":2}", 400,
         "invalid_json"},
        {"prompt with a truncated sequence", "POST /v1/completions", "POST", C, "{\"prompt\":\"a\xe2\x82\",\"max_tokens\":2}",
         400, "invalid_json"},
        {"prompt with an overlong encoding", "POST /v1/completions", "POST", C, "{\"prompt\":\"\xc0\xaf\",\"max_tokens\":2}",
         400, "invalid_json"},
        {"prompt with a UTF-16 surrogate", "POST /v1/completions", "POST", C, "{\"prompt\":\"\xed\xa0\x80\",\"max_tokens\":2}",
         400, "invalid_json"},
        {"prompt with a lone \\ud800 escape", "POST /v1/completions", "POST", C, R"({"prompt":"a\ud800","max_tokens":2})", 400,
         "invalid_json"},
        {"model name with byte 0xFE", "POST /v1/completions", "POST", C, "{\"prompt\":\"a\",\"model\":\"m\xfe\"}", 400,
         "invalid_json"},
        {"prompt with an escaped NUL", "POST /v1/completions", "POST", C, R"({"prompt":"a\u0000b","max_tokens":2})", 200, ""},
        {"prompt ids of invalid UTF-8 bytes", "POST /v1/completions", "POST", C, R"({"prompt":[1,258,259,195],"max_tokens":4})",
         200, ""},
        {"stop with byte 0xFF", "POST /v1/completions", "POST", C, "{\"prompt\":\"a\",\"stop\":\"\xff\"}", 400, "invalid_json"},
        // ---- HTTP framing, size and headers (any route) ----
        {"body over the limit", "POST /v1/completions", "POST", C,
         "{\"prompt\":\"" + std::string(kMaxBody, 'x') + "\"}", 413, "request_too_large"},
        {"Content-Length over the limit, no body", "POST /v1/completions", "", "", "", 413, "request_too_large", "", "",
         Auth::kWithKey, raw_request("POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n")},
        {"chunked body over the limit", "POST /v1/completions", "", "", "", 413, "request_too_large", "", "", Auth::kWithKey,
         raw_request("POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n") +
             fmt::format("{:x}\r\n{}\r\n", kMaxBody + 10, std::string(kMaxBody + 10, ' ')) + "0\r\n\r\n"},
        {"Content-Length not a number", "POST /v1/completions", "", "", "", 400, "bad_http", "", "", Auth::kWithKey,
         raw_request("POST /v1/completions HTTP/1.1\r\nContent-Length: ten\r\n")},
        {"Content-Length negative", "POST /v1/completions", "", "", "", 400, "bad_http", "", "", Auth::kWithKey,
         raw_request("POST /v1/completions HTTP/1.1\r\nContent-Length: -1\r\n")},
        {"two different Content-Lengths", "POST /v1/completions", "", "", "", 400, "bad_http", "", "", Auth::kWithKey,
         raw_request("POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n") + "{}"},
        {"bad chunk size", "POST /v1/completions", "", "", "", 400, "bad_http", "", "", Auth::kWithKey,
         raw_request("POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n") + "zz\r\n{}\r\n0\r\n\r\n"},
        {"header line without a colon", "(any)", "", "", "", 400, "bad_http", "", "", Auth::kWithKey,
         raw_request("GET /v1/models HTTP/1.1\r\nNoColonHere\r\n")},
        {"header name with byte 0xFF", "(any)", "", "", "", 400, "bad_http", "", "", Auth::kWithKey,
         raw_request("GET /v1/models HTTP/1.1\r\nX-\xff: 1\r\n")},
        {"header value with a NUL", "(any)", "", "", "", 400, "bad_http", "", "", Auth::kWithKey,
         raw_request(std::string("GET /v1/models HTTP/1.1\r\nX-Odd: a") + '\0' + "b\r\n")},
        {"headers over 16 KiB", "(any)", "", "", "", 431, "headers_too_large", "", "", Auth::kWithKey,
         raw_request("GET /v1/models HTTP/1.1\r\nX-Big: " + std::string(17000, 'b') + "\r\n")},
        {"target over 16 KiB", "(any)", "", "", "", 431, "headers_too_large", "", "", Auth::kWithKey,
         raw_request("GET /" + std::string(17000, 't') + " HTTP/1.1\r\n")},
        {"garbage request line", "(any)", "", "", "", 400, "bad_http", "", "", Auth::kWithKey, "GARBAGE\r\n\r\n"},
        {"HTTP/2 preface", "(any)", "", "", "", 400, "bad_http", "", "", Auth::kWithKey, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"},
        {"target with byte 0xFF", "GET /v1/jobs/{id}", "", "", "", 404, "job_not_found", "", "", Auth::kWithKey,
         raw_request("GET /v1/jobs/job-\xff HTTP/1.1\r\n")},
        {"Authorization with bytes 0xFF 0xFE", "(any)", "GET", "/v1/models", "", 401, "invalid_api_key", "application/json",
         "Authorization: Bearer \xff\xfe\r\n", Auth::kNoKey},
        // ---- jobs ----
        {"jobs stream true", "POST /v1/jobs", "POST", "/v1/jobs", completion(",\"stream\":true"), 400, "invalid_value"},
        {"jobs truncated JSON", "POST /v1/jobs", "POST", "/v1/jobs", "{", 400, "invalid_json"},
        {"jobs max_tokens negative", "POST /v1/jobs", "POST", "/v1/jobs", R"({"prompt":"a","max_tokens":-1})", 400,
         "invalid_value"},
        {"jobs DELETE", "POST /v1/jobs", "DELETE", "/v1/jobs", "", 405, "method_not_allowed"},
        {"jobs limit zero", "GET /v1/jobs", "GET", "/v1/jobs?limit=0", "", 400, "invalid_value"},
        {"jobs limit negative", "GET /v1/jobs", "GET", "/v1/jobs?limit=-1", "", 400, "invalid_value"},
        {"jobs limit 1001", "GET /v1/jobs", "GET", "/v1/jobs?limit=1001", "", 400, "invalid_value"},
        {"jobs limit text", "GET /v1/jobs", "GET", "/v1/jobs?limit=ten", "", 400, "invalid_value"},
        {"jobs limit of 30 digits", "GET /v1/jobs", "GET", "/v1/jobs?limit=999999999999999999999999999999", "", 400,
         "invalid_value"},
        {"jobs limit empty", "GET /v1/jobs", "GET", "/v1/jobs?limit=", "", 400, "invalid_value"},
        {"unknown job", "GET /v1/jobs/{id}", "GET", "/v1/jobs/job-nope", "", 404, "job_not_found"},
        {"job id of 4 KiB", "GET /v1/jobs/{id}", "GET", "/v1/jobs/" + std::string(4096, 'j'), "", 404, "job_not_found"},
        {"job POST", "GET /v1/jobs/{id}", "POST", "/v1/jobs/{job}", "{}", 405, "method_not_allowed"},
        {"result of a cancelled job", "GET /v1/jobs/{id}/result", "GET", "/v1/jobs/{job}/result", "", 409, "job_cancelled"},
        {"result of an unknown job", "GET /v1/jobs/{id}/result", "GET", "/v1/jobs/job-nope/result", "", 404, "job_not_found"},
        {"result POST", "GET /v1/jobs/{id}/result", "POST", "/v1/jobs/{job}/result", "{}", 405, "method_not_allowed"},
        {"cancel an unknown job", "POST /v1/jobs/{id}/cancel", "POST", "/v1/jobs/job-nope/cancel", "{}", 404, "job_not_found"},
        {"cancel GET", "POST /v1/jobs/{id}/cancel", "GET", "/v1/jobs/{job}/cancel", "", 405, "method_not_allowed"},
        // ---- contexts ----
        {"contexts no prompt", "POST /v1/contexts", "POST", "/v1/contexts", "{}", 400, "missing_required_parameter"},
        {"contexts prompt number", "POST /v1/contexts", "POST", "/v1/contexts", R"({"prompt":7})", 400, "invalid_value"},
        {"contexts attention.top_k zero", "POST /v1/contexts", "POST", "/v1/contexts",
         R"({"prompt":"a","attention":{"top_k":0}})", 400, "invalid_value"},
        {"contexts truncated JSON", "POST /v1/contexts", "POST", "/v1/contexts", "{\"prompt\":", 400, "invalid_json"},
        {"contexts prompt with byte 0xFF", "POST /v1/contexts", "POST", "/v1/contexts", "{\"prompt\":\"\xff\"}", 400,
         "invalid_json"},
        {"contexts ids over the context", "POST /v1/contexts", "POST", "/v1/contexts",
         "{\"prompt\":[" + [] { std::string s = "1"; for (int i = 0; i < 3000; ++i) s += ",66"; return s; }() + "]}", 400,
         "context_length_exceeded"},
        {"contexts GET", "POST /v1/contexts", "GET", "/v1/contexts", "", 405, "method_not_allowed"},
        {"unknown context GET", "GET /v1/contexts/{id}", "GET", "/v1/contexts/ctx-nope", "", 404, "context_not_found"},
        {"unknown context DELETE", "DELETE /v1/contexts/{id}", "DELETE", "/v1/contexts/ctx-nope", "", 404, "context_not_found"},
        {"context PUT", "GET /v1/contexts/{id}", "PUT", "/v1/contexts/ctx-nope", "{}", 405, "method_not_allowed"},
        // ---- files ----
        {"files JSON body", "POST /v1/files", "POST", "/v1/files", "{}", 400, "invalid_content_type"},
        {"files no boundary", "POST /v1/files", "POST", "/v1/files", multipart("batch", file_part(kGoodLine)), 400,
         "invalid_multipart", "multipart/form-data"},
        {"files wrong boundary", "POST /v1/files", "POST", "/v1/files", multipart("batch", file_part(kGoodLine)), 400,
         "invalid_multipart", "multipart/form-data; boundary=other"},
        {"files no file part", "POST /v1/files", "POST", "/v1/files", multipart("batch", ""), 400, "missing_required_parameter",
         kMultipart},
        {"files no purpose", "POST /v1/files", "POST", "/v1/files", multipart("", file_part(kGoodLine)), 400,
         "missing_required_parameter", kMultipart},
        {"files purpose fine-tune", "POST /v1/files", "POST", "/v1/files", multipart("fine-tune", file_part(kGoodLine)), 400,
         "invalid_value", kMultipart},
        {"files empty file", "POST /v1/files", "POST", "/v1/files", multipart("batch", file_part("")), 400, "invalid_value",
         kMultipart},
        {"files part never closed", "POST /v1/files", "POST", "/v1/files",
         "--" + kBoundary + "\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch", 400, "invalid_multipart",
         kMultipart},
        {"files Content-Type with byte 0xFF", "POST /v1/files", "POST", "/v1/files", multipart("batch", file_part(kGoodLine)),
         400, "invalid_content_type", "\xff/form-data"},
        {"files filename with byte 0xFF", "POST /v1/files", "POST", "/v1/files",
         multipart("batch", file_part(kGoodLine, "in\xff.jsonl")), 200, "", kMultipart},
        {"files over the limit", "POST /v1/files", "POST", "/v1/files", multipart("batch", file_part(std::string(kMaxBody, 'l'))),
         413, "request_too_large", kMultipart},
        {"files PUT", "POST /v1/files", "PUT", "/v1/files", "{}", 405, "method_not_allowed"},
        {"unknown file", "GET /v1/files/{id}", "GET", "/v1/files/file-nope", "", 404, "file_not_found"},
        {"unknown file DELETE", "DELETE /v1/files/{id}", "DELETE", "/v1/files/file-nope", "", 404, "file_not_found"},
        {"file POST", "GET /v1/files/{id}", "POST", "/v1/files/{file}", "{}", 405, "method_not_allowed"},
        {"unknown file content", "GET /v1/files/{id}/content", "GET", "/v1/files/file-nope/content", "", 404, "file_not_found"},
        {"file content POST", "GET /v1/files/{id}/content", "POST", "/v1/files/{file}/content", "{}", 405, "method_not_allowed"},
        // ---- batches ----
        {"batches no input_file_id", "POST /v1/batches", "POST", "/v1/batches",
         R"({"endpoint":"/v1/completions","completion_window":"24h"})", 400, "missing_required_parameter"},
        {"batches no endpoint", "POST /v1/batches", "POST", "/v1/batches", R"({"input_file_id":"{file}","completion_window":"24h"})",
         400, "missing_required_parameter"},
        {"batches input_file_id number", "POST /v1/batches", "POST", "/v1/batches",
         R"({"input_file_id":5,"endpoint":"/v1/completions","completion_window":"24h"})", 400, "invalid_value"},
        {"batches unknown file", "POST /v1/batches", "POST", "/v1/batches",
         R"({"input_file_id":"file-nope","endpoint":"/v1/completions","completion_window":"24h"})", 404, "file_not_found"},
        {"batches endpoint chat", "POST /v1/batches", "POST", "/v1/batches",
         R"({"input_file_id":"{file}","endpoint":"/v1/chat/completions","completion_window":"24h"})", 400, "invalid_value"},
        {"batches window 1h", "POST /v1/batches", "POST", "/v1/batches",
         R"({"input_file_id":"{file}","endpoint":"/v1/completions","completion_window":"1h"})", 400, "invalid_value"},
        {"batches metadata string", "POST /v1/batches", "POST", "/v1/batches", batch(",\"metadata\":\"m\""), 400, "invalid_value"},
        {"batches metadata number values", "POST /v1/batches", "POST", "/v1/batches", batch(",\"metadata\":{\"a\":1}"), 400,
         "invalid_value"},
        {"batches metadata 17 pairs", "POST /v1/batches", "POST", "/v1/batches", batch(",\"metadata\":" + metadata_pairs(17)),
         400, "invalid_value"},
        {"batches metadata nested 30000 deep", "POST /v1/batches", "POST", "/v1/batches",
         batch(",\"metadata\":" + std::string(30000, '[') + std::string(30000, ']')), 400, "invalid_json"},
        {"batches of a file with a line nested 30000 deep", "POST /v1/batches", "POST", "/v1/batches",
         R"({"input_file_id":"{deepfile}","endpoint":"/v1/completions","completion_window":"24h"})", 200, ""},
        {"batches truncated JSON", "POST /v1/batches", "POST", "/v1/batches", "{\"input_file_id\"", 400, "invalid_json"},
        {"batches of a file of bad lines", "POST /v1/batches", "POST", "/v1/batches",
         R"({"input_file_id":"{badfile}","endpoint":"/v1/completions","completion_window":"24h"})", 200, ""},
        {"batches DELETE", "POST /v1/batches", "DELETE", "/v1/batches", "", 405, "method_not_allowed"},
        {"unknown batch", "GET /v1/batches/{id}", "GET", "/v1/batches/batch-nope", "", 404, "batch_not_found"},
        {"batch POST", "GET /v1/batches/{id}", "POST", "/v1/batches/{batch}", "{}", 405, "method_not_allowed"},
        {"cancel an unknown batch", "POST /v1/batches/{id}/cancel", "POST", "/v1/batches/batch-nope/cancel", "{}", 404,
         "batch_not_found"},
        {"cancel a failed batch", "POST /v1/batches/{id}/cancel", "POST", "/v1/batches/{batch}/cancel", "{}", 409,
         "batch_not_cancellable"},
        {"batch cancel GET", "POST /v1/batches/{id}/cancel", "GET", "/v1/batches/{batch}/cancel", "", 405, "method_not_allowed"},
    };
    return t;
  }();
  return table;
}

// Timing cases: each is a test below; the table is for docs/reliability.md.
struct SlowCase {
  const char* name;
  const char* outcome;  // what the client sees
  int status;           // 0: no answer, the connection is closed
  const char* code;
};
const std::vector<SlowCase>& slow_cases() {
  static const std::vector<SlowCase> table = {
      {"slowloris: headers one byte every 100 ms", "408 after --io-timeout-s from the first byte", 408, "request_timeout"},
      {"slowloris: body that never completes", "408 after --io-timeout-s from the first byte", 408, "request_timeout"},
      {"slowloris: keep-alive, next request dribbled", "408 after --io-timeout-s from its first byte", 408, "request_timeout"},
      {"64 slowloris connections at once", "each 408 after --io-timeout-s; other clients served meanwhile", 408,
       "request_timeout"},
      {"connection that sends nothing", "closed after --io-timeout-s, no answer", 0, ""},
      {"idle keep-alive connection", "closed after --idle-timeout-s, no answer", 0, ""},
      {"SSE client disconnects mid-stream", "its job is cancelled at the next step, its KV released", 0, ""},
  };
  return table;
}

// ---- the suite: one service, normal work running beside the hostile requests ----

LiveOptions hostile_options() {
  LiveOptions o;
  o.api_key = kKey;
  o.coordinator_args = {"--io-timeout-s", std::to_string(kIoTimeoutS), "--idle-timeout-s", std::to_string(kIdleTimeoutS),
                        "--max-body-bytes", std::to_string(kMaxBody)};
  return o;
}

// A client that keeps sending the same completion while it runs; every answer is kept.
class Bystander {
 public:
  static json body() { return json{{"prompt", kPrompt}, {"max_tokens", 12}, {"temperature", 0.9}, {"seed", 11}}; }
  explicit Bystander(const LiveService& s) : svc_(s), thread_([this] { run(); }) {}
  ~Bystander() { stop(); }
  void stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  std::vector<HttpResult> answers() {
    std::lock_guard lock(mutex_);
    return answers_;
  }
  // Holds the loop between requests (a test that needs the group idle), and lets it go on.
  void pause() {
    paused_ = true;
    while (busy_) std::this_thread::sleep_for(Ms(10));
  }
  void resume() { paused_ = false; }

 private:
  void run() {
    while (!stop_) {
      if (paused_) {
        std::this_thread::sleep_for(Ms(10));
        continue;
      }
      busy_ = true;
      if (paused_) {  // pause() saw busy_ false before this request began
        busy_ = false;
        continue;
      }
      HttpResult r;
      try {
        r = svc_.post("/v1/completions", body());
      } catch (const std::exception& e) {
        r.body = e.what();
      }
      {
        std::lock_guard lock(mutex_);
        answers_.push_back(r);
      }
      busy_ = false;
    }
  }
  const LiveService& svc_;
  std::atomic<bool> stop_{false}, paused_{false}, busy_{false};
  std::mutex mutex_;
  std::vector<HttpResult> answers_;
  std::thread thread_;
};

class Hostile : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    service_ = std::make_unique<LiveService>(hostile_options());
    if (service_->http_port == 0) return;
    bystander_ = std::make_unique<Bystander>(*service_);
  }
  static void TearDownTestSuite() {
    bystander_.reset();
    service_.reset();
  }
  void SetUp() override {
    if (!service_ || service_->http_port == 0) GTEST_FAIL() << "the service did not start";
  }
  void TearDown() override {
    // The service stays up after every hostile test.
    EXPECT_FALSE(svc().coordinator().poll().has_value()) << "the coordinator exited";
    EXPECT_FALSE(svc().group("g0").poll().has_value()) << "the worker group exited";
    EXPECT_EQ(svc().get("/health").status, 200);
  }
  static LiveService& svc() { return *service_; }
  static inline std::unique_ptr<LiveService> service_;
  static inline std::unique_ptr<Bystander> bystander_;
};

std::string request_bytes(const Case& c, const std::map<std::string, std::string>& ids) {
  auto fill = [&](std::string s) {
    for (const auto& [name, id] : ids)
      for (size_t at; (at = s.find("{" + name + "}")) != std::string::npos;) s.replace(at, name.size() + 2, id);
    return s;
  };
  if (!c.raw.empty()) return c.raw;
  const std::string body = fill(c.body);
  std::string out = c.method + " " + fill(c.target) + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n";
  if (c.auth == Auth::kWithKey) out += std::string("Authorization: Bearer ") + kKey + "\r\n";
  out += c.headers;
  if (!body.empty() || c.method == "POST") out += "Content-Type: " + c.content_type + fmt::format("\r\nContent-Length: {}\r\n", body.size());
  return out + "\r\n" + body;
}

// The error envelope: {"error":{"message","type","param","code"}} with a message and a type.
void expect_envelope(const HttpResult& r, const std::string& code) {
  const json j = r.json_body();
  ASSERT_TRUE(j.is_object() && j.contains("error") && j["error"].is_object()) << r.body.substr(0, 500);
  const json& e = j["error"];
  EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty()) << r.body.substr(0, 500);
  EXPECT_TRUE(e["type"].is_string()) << r.body.substr(0, 500);
  EXPECT_TRUE(e.contains("param")) << r.body.substr(0, 500);
  EXPECT_EQ(e["code"], code) << r.body.substr(0, 500);
}

TEST_F(Hostile, EveryCaseOfTheTableGetsItsStatusAndEnvelope) {
  // Ids the table refers to: a cancelled job, an uploaded file, a file of bad lines, a failed batch.
  std::map<std::string, std::string> ids;
  const HttpResult job = svc().post("/v1/jobs", json{{"prompt", std::string(1500, 'q')}, {"max_tokens", 400}});
  ASSERT_EQ(job.status, 200) << job.body;
  ids["job"] = job.json_body()["id"];
  ASSERT_EQ(svc().post("/v1/jobs/" + ids["job"] + "/cancel", json::object()).status, 200);
  ASSERT_TRUE(eventually([&] { return svc().get("/v1/jobs/" + ids["job"]).json_body().value("status", "") == "cancelled"; }));
  const HttpResult file = svc().upload(kGoodLine + "\n");
  ASSERT_EQ(file.status, 200) << file.body;
  ids["file"] = file.json_body()["id"];
  const HttpResult badfile = svc().upload("not json\n\xff\xfe\n" R"({"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":5}})" "\n");
  ASSERT_EQ(badfile.status, 200) << badfile.body;
  ids["badfile"] = badfile.json_body()["id"];
  const HttpResult deepfile = svc().upload(R"({"custom_id":"deep","method":"POST","url":"/v1/completions","body":{"prompt":)" +
                                           std::string(30000, '[') + std::string(30000, ']') + "}}\n" + kGoodLine + "\n");
  ASSERT_EQ(deepfile.status, 200) << deepfile.body;
  ids["deepfile"] = deepfile.json_body()["id"];
  const HttpResult failed = svc().post(
      "/v1/batches", json{{"input_file_id", ids["badfile"]}, {"endpoint", "/v1/completions"}, {"completion_window", "24h"}});
  ASSERT_EQ(failed.status, 200) << failed.body;
  ids["batch"] = failed.json_body()["id"];
  ASSERT_EQ(failed.json_body()["status"], "failed") << failed.body;

  std::set<std::string> names;
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    EXPECT_TRUE(names.insert(c.name).second) << "case names are unique";
    const auto start = Clock::now();
    const HttpResult r = send_raw(svc().http_port, request_bytes(c, ids));
    const auto took = std::chrono::duration_cast<Ms>(Clock::now() - start);
    EXPECT_EQ(r.status, c.status) << r.body.substr(0, 500);
    EXPECT_LT(took, Ms(kIoTimeoutS * 1000)) << "answered at once, not by a timeout";
    if (c.status >= 400) expect_envelope(r, c.code);
    else EXPECT_TRUE(r.json_body().is_object()) << r.body.substr(0, 500);
    ASSERT_EQ(svc().get("/health").status, 200) << "the service is down after this case";
  }
}

// The same table is in docs/reliability.md, "Bad requests".
TEST(HostileDocs, DocsHoldTheSameTable) {
  const auto md = [](const std::string& s) {
    std::string out;
    for (const unsigned char ch : s) {
      if (ch == '|') out += "\\|";
      else if (ch < 0x20 || ch >= 0x80) out += fmt::format("\\x{:02X}", ch);
      else out += static_cast<char>(ch);
    }
    return out;
  };
  const auto status = [](int s) { return s == 0 ? std::string("closed") : std::to_string(s); };
  std::vector<std::string> rows;
  for (const Case& c : cases())
    rows.push_back(fmt::format("| {} | `{}` | {} | {} |", md(c.name), c.route, c.status, *c.code ? fmt::format("`{}`", c.code) : "-"));
  for (const SlowCase& c : slow_cases())
    rows.push_back(fmt::format("| {} | {} | {} | {} |", md(c.name), c.outcome, status(c.status),
                               *c.code ? fmt::format("`{}`", c.code) : "-"));
  if (std::getenv("UNS_PRINT_BAD_REQUEST_TABLE")) {
    for (const auto& row : rows) std::printf("%s\n", row.c_str());
  }
  const std::string doc = read_text(std::filesystem::path(UNS_SOURCE_DIR) / "docs" / "reliability.md");
  const size_t section = doc.find("\n## Bad requests");
  ASSERT_NE(section, std::string::npos) << "docs/reliability.md has no '## Bad requests' section";
  const size_t end = doc.find("\n## ", section + 1);
  const std::string text = doc.substr(section, end == std::string::npos ? std::string::npos : end - section);
  // The rows of the two tables: from a "| case | route |" or "| case | outcome |" header to
  // the next line that is not a row.
  std::set<std::string> documented;
  bool in_table = false;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    const std::string line = text.substr(pos, eol - pos);
    pos = eol + 1;
    if (line.rfind("| case | route | status | code |", 0) == 0 || line.rfind("| case | outcome | status | code |", 0) == 0) {
      in_table = true;
      continue;
    }
    if (line.rfind("|", 0) != 0) in_table = false;
    if (in_table && line.rfind("|---", 0) != 0) documented.insert(line);
  }
  std::set<std::string> tested(rows.begin(), rows.end());
  for (const auto& row : tested) EXPECT_TRUE(documented.count(row)) << "not in docs/reliability.md: " << row;
  for (const auto& row : documented) EXPECT_TRUE(tested.count(row)) << "in docs/reliability.md but not tested: " << row;
}

// ---- slow clients ----

std::string partial_request() {
  return std::string("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ") + kKey +
         "\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n";
}

// Sends `bytes` one at a time, `every` apart, until the server answers or closes; the answer
// and the time from the first byte to it.
std::pair<HttpResult, Ms> dribble(Conn& c, const std::string& bytes, Ms every, Ms give_up) {
  const auto start = Clock::now();
  for (size_t i = 0; i < bytes.size() && Clock::now() - start < give_up; ++i) {
    if (c.readable(every)) break;  // answered (or closed): stop writing, read it
    if (!c.send(bytes.substr(i, 1))) break;
  }
  c.readable(std::max(Ms(0), std::chrono::duration_cast<Ms>(give_up - (Clock::now() - start))));
  HttpResult r = c.read_reply();
  return {r, std::chrono::duration_cast<Ms>(Clock::now() - start)};
}

TEST_F(Hostile, SlowlorisHeadersGet408WithinTheIoTimeout) {
  Conn c(svc().http_port);
  // Headers that never end: a long header value, one byte every 100 ms.
  const auto [r, took] = dribble(c, partial_request().substr(0, 60) + std::string(1000, 'h'), Ms(100), Ms(20000));
  EXPECT_EQ(r.status, 408) << r.body << " after " << took.count() << " ms";
  expect_envelope(r, "request_timeout");
  EXPECT_GE(took, Ms(kIoTimeoutS * 1000 - 200));
  EXPECT_LE(took, Ms(kIoTimeoutS * 1000) + kSlack);
  EXPECT_TRUE(c.closed_within(Ms(2000))) << "the connection is closed after the 408";
}

TEST_F(Hostile, BodyThatNeverCompletesGets408WithinTheIoTimeout) {
  Conn c(svc().http_port);
  const auto start = Clock::now();
  c.send(partial_request() + "{\"prompt\":");  // 10 of the 40 bytes announced
  ASSERT_TRUE(c.readable(Ms(kIoTimeoutS * 1000) + kSlack)) << "no answer";
  const HttpResult r = c.read_reply();
  const auto took = std::chrono::duration_cast<Ms>(Clock::now() - start);
  EXPECT_EQ(r.status, 408) << r.body;
  expect_envelope(r, "request_timeout");
  EXPECT_GE(took, Ms(kIoTimeoutS * 1000 - 200));
}

TEST_F(Hostile, KeepAliveRequestDribbledAfterAnIdlePauseGets408) {
  Conn c(svc().http_port);
  c.send("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
  ASSERT_EQ(c.read_reply().status, 200);
  std::this_thread::sleep_for(Ms(1000));  // idle, under --idle-timeout-s
  // The next request starts, then dribbles: --io-timeout-s counts from its first byte, not
  // --idle-timeout-s.
  const auto [r, took] = dribble(c, partial_request() + std::string(40, ' '), Ms(100), Ms(15000));
  EXPECT_EQ(r.status, 408) << r.body << " after " << took.count() << " ms";
  EXPECT_LE(took, Ms(kIoTimeoutS * 1000) + kSlack);
}

TEST_F(Hostile, ManySlowlorisConnectionsDoNotStopOtherClients) {
  std::vector<std::unique_ptr<Conn>> slow;
  for (int i = 0; i < 64; ++i) {
    slow.push_back(std::make_unique<Conn>(svc().http_port));
    slow.back()->send(partial_request().substr(0, 30));
  }
  // Meanwhile a normal request is served at once.
  const auto start = Clock::now();
  const HttpResult ok = svc().get("/v1/models");
  EXPECT_EQ(ok.status, 200);
  EXPECT_LT(Clock::now() - start, Ms(kIoTimeoutS * 1000)) << "served while 64 slow clients wait";
  for (auto& c : slow) {
    ASSERT_TRUE(c->readable(Ms(kIoTimeoutS * 1000) + kSlack));
    const HttpResult r = c->read_reply();
    EXPECT_EQ(r.status, 408);
  }
}

TEST_F(Hostile, SilentConnectionIsClosedAfterTheIoTimeout) {
  Conn c(svc().http_port);
  const auto start = Clock::now();
  EXPECT_TRUE(c.closed_within(Ms(kIoTimeoutS * 1000) + kSlack));
  const auto took = std::chrono::duration_cast<Ms>(Clock::now() - start);
  EXPECT_GE(took, Ms(kIoTimeoutS * 1000 - 200));
}

TEST_F(Hostile, IdleKeepAliveConnectionIsClosedAfterTheIdleTimeout) {
  Conn c(svc().http_port);
  c.send("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
  ASSERT_EQ(c.read_reply().status, 200);
  const auto start = Clock::now();
  EXPECT_TRUE(c.closed_within(Ms(kIdleTimeoutS * 1000) + kSlack));
  const auto took = std::chrono::duration_cast<Ms>(Clock::now() - start);
  EXPECT_GE(took, Ms(kIdleTimeoutS * 1000 - 200)) << "kept while idle under --idle-timeout-s";
}

TEST_F(Hostile, StreamClientThatDisconnectsMidStreamCancelsItsJob) {
  bystander_->pause();  // so the group's KV is the stream's alone
  struct Resume {
    ~Resume() { bystander_->resume(); }
  } resume;
  Conn c(svc().http_port);
  // Greedy decoding of this prompt runs the whole max_tokens (no end-of-sequence token).
  const std::string body = json{{"prompt", kPrompt}, {"max_tokens", 1500}, {"temperature", 0}, {"stream", true}}.dump();
  c.send(std::string("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ") + kKey +
         fmt::format("\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.size()) + body);
  // Read until two text deltas arrived: the job is decoding.
  std::string got;
  std::string id;
  const auto deadline = Clock::now() + 30s;
  while (Clock::now() < deadline) {
    char buf[4096];
    if (!c.readable(Ms(100))) continue;
    const ssize_t n = ::recv(c.socket.native_handle(), buf, sizeof buf, 0);
    ASSERT_GT(n, 0) << "the stream ended early: " << got;
    got.append(buf, static_cast<size_t>(n));
    size_t events = 0;
    for (size_t at = 0; (at = got.find("\"text\":\"", at)) != std::string::npos; ++at)
      if (got.compare(at, 9, "\"text\":\"\"") != 0) ++events;
    const size_t cmpl = got.find("\"id\":\"cmpl-");
    if (cmpl != std::string::npos && id.empty()) id = got.substr(cmpl + 11, got.find('"', cmpl + 11) - cmpl - 11);
    if (events >= 2) break;
  }
  ASSERT_FALSE(id.empty()) << got;
  c.socket.close();
  json job;
  ASSERT_TRUE(eventually([&] {
    job = svc().get("/v1/jobs/" + id).json_body();
    return job.value("status", "") == "cancelled";
  })) << job.dump();
  EXPECT_LT(job["progress"]["generated_tokens"].get<int64_t>(), 1500);
  EXPECT_TRUE(eventually([&] {
    return svc().metric("unshackle_worker_kv_tokens{group=\"g0\",rank=\"0\"}") == 0.0 &&
           svc().metric("unshackle_worker_kv_tokens{group=\"g0\",rank=\"1\"}") == 0.0;
  })) << "the job's KV is released on every rank";
}

// ---- auth ----

struct Route {
  const char* method;
  const char* target;
};
const std::vector<Route>& routes() {
  static const std::vector<Route> all = {
      {"GET", "/ready"},           {"GET", "/metrics"},          {"GET", "/v1/models"},
      {"POST", "/v1/completions"}, {"POST", "/v1/jobs"},         {"GET", "/v1/jobs"},
      {"GET", "/v1/jobs/job-x"},   {"GET", "/v1/jobs/job-x/result"}, {"POST", "/v1/jobs/job-x/cancel"},
      {"POST", "/v1/contexts"},    {"GET", "/v1/contexts/ctx-x"}, {"DELETE", "/v1/contexts/ctx-x"},
      {"POST", "/v1/files"},       {"GET", "/v1/files"},         {"GET", "/v1/files/file-x"},
      {"GET", "/v1/files/file-x/content"}, {"DELETE", "/v1/files/file-x"}, {"POST", "/v1/batches"},
      {"GET", "/v1/batches"},      {"GET", "/v1/batches/batch-x"}, {"POST", "/v1/batches/batch-x/cancel"},
      {"GET", "/v2/unknown"},      {"PUT", "/v1/models"},
  };
  return all;
}

TEST_F(Hostile, EveryRouteButHealthRefusesAMissingOrWrongKey) {
  const std::string key = kKey;
  struct Credential {
    const char* what;
    std::string header;  // the Authorization line, "" for none
    const char* code;
  };
  const std::vector<Credential> credentials = {
      {"no header", "", "missing_api_key"},
      {"empty header", "Authorization: \r\n", "missing_api_key"},
      {"wrong key", "Authorization: Bearer sk-wrong-0000\r\n", "invalid_api_key"},
      {"key plus a byte", "Authorization: Bearer " + key + "x\r\n", "invalid_api_key"},
      {"key less its last byte", "Authorization: Bearer " + key.substr(0, key.size() - 1) + "\r\n", "invalid_api_key"},
      {"key with its last byte changed", "Authorization: Bearer " + key.substr(0, key.size() - 1) + "c\r\n", "invalid_api_key"},
      {"empty bearer", "Authorization: Bearer \r\n", "invalid_api_key"},
      {"key without Bearer", "Authorization: " + key + "\r\n", "invalid_api_key"},
      {"lower-case bearer", "Authorization: bearer " + key + "\r\n", "invalid_api_key"},
      {"Basic scheme", "Authorization: Basic c2staG9zdGlsZTo=\r\n", "invalid_api_key"},
      {"key of 8 KiB", "Authorization: Bearer " + std::string(8192, 'k') + "\r\n", "invalid_api_key"},
  };
  for (const Route& route : routes()) {
    for (const Credential& cred : credentials) {
      SCOPED_TRACE(fmt::format("{} {} with {}", route.method, route.target, cred.what));
      const std::string body = R"({"prompt":"a","max_tokens":77})";  // 77: found below if it ran
      const HttpResult r = send_raw(svc().http_port, std::string(route.method) + " " + route.target +
                                                         " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + cred.header +
                                                         fmt::format("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                                                                     body.size()) + body);
      EXPECT_EQ(r.status, 401) << r.body;
      expect_envelope(r, cred.code);
      EXPECT_EQ(r.body.find(key), std::string::npos) << "the answer does not echo the key";
    }
  }
  // Nothing ran for a refused request.
  const json jobs = svc().get("/v1/jobs?limit=1000").json_body();  // not a temporary: the loop outlives it
  for (const json& job : jobs["data"])
    EXPECT_NE(job["progress"]["max_tokens"], 77) << "a refused request ran: " << job.dump();
  // Liveness needs no key; with the key no route answers 401.
  EXPECT_EQ(send_raw(svc().http_port, "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").status, 200);
  for (const Route& route : routes()) {
    const std::string body = R"({"prompt":"a","max_tokens":2})";
    const HttpResult r = send_raw(svc().http_port, std::string(route.method) + " " + route.target +
                                                       " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer " +
                                                       key + fmt::format("\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                                                                         body.size()) + body);
    EXPECT_NE(r.status, 401) << route.method << " " << route.target << ": " << r.body;
    EXPECT_NE(r.status, 0) << route.method << " " << route.target;
  }
}

// Last: every request so far carried the key (and wrong keys); no log line holds either.
TEST_F(Hostile, ZzKeysNeverReachTheLogs) {
  // More work with the key, including failures that log (a cancelled job, a bad batch line).
  const HttpResult ok = svc().post("/v1/completions", json{{"prompt", "logging"}, {"max_tokens", 3}});
  EXPECT_EQ(ok.status, 200) << ok.body;
  bystander_->stop();
  const std::string coordinator = svc().coordinator().log_text();
  const std::string workers = svc().group("g0").log_text();
  EXPECT_FALSE(coordinator.empty()) << "the coordinator logs (so the check can fail)";
  EXPECT_NE(coordinator.find("auth on"), std::string::npos) << coordinator;
  const std::string secret = std::string(kKey).substr(3);  // without the common "sk-"
  for (const auto& [what, log] : {std::pair{"coordinator", &coordinator}, std::pair{"workers", &workers}}) {
    EXPECT_EQ(log->find(secret), std::string::npos) << what << " log holds the key:\n" << *log;
    EXPECT_EQ(log->find("sk-wrong-0000"), std::string::npos) << what << " log holds a presented key:\n" << *log;
  }
}

// The bystander's answers: all 200 and equal to `unshackle generate` (checked once at the end,
// after every hostile test ran beside it).
TEST_F(Hostile, ZzzNormalWorkBesideTheHostileClientsGetsTheRightAnswer) {
  bystander_->stop();
  const auto answers = bystander_->answers();
  ASSERT_GE(answers.size(), 5u) << "the bystander ran while the hostile tests did";
  const json g = run_generate(svc(), kPrompt, 12, 0.9, 11);
  ASSERT_TRUE(g.is_object());
  const std::string want = service_text(svc(), g);
  size_t wrong = 0;
  for (const HttpResult& r : answers) {
    if (r.status != 200 || r.json_body()["choices"][0]["text"] != want) {
      ++wrong;
      ADD_FAILURE() << "bystander answer " << r.status << ": " << r.body.substr(0, 300);
    }
  }
  EXPECT_EQ(wrong, 0u) << "of " << answers.size() << " answers";
  std::printf("bystander: %zu completions beside the hostile clients, all equal to unshackle generate\n", answers.size());
}

}  // namespace
}  // namespace unshackle::live
