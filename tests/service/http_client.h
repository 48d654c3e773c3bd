// A real HTTP client for the service tests (Boost.Beast, one connection per request), the
// server-sent-events parser, and a free loopback port. Shared by the coordinator process
// tests (scripted peers) and the live end-to-end tests, so both speak HTTP the same way.
#pragma once

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <map>
#include <string>
#include <vector>

namespace unshackle::live {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using nlohmann::json;
using namespace std::chrono_literals;

struct HttpResult {
  int status = 0;
  std::map<std::string, std::string> headers;
  std::string body;
  json json_body() const { return json::parse(body, nullptr, false); }
  // A header's value (names compare case-insensitively), "" when absent.
  std::string header(std::string_view name) const {
    for (const auto& [k, v] : headers)
      if (k.size() == name.size() &&
          std::equal(k.begin(), k.end(), name.begin(), [](char a, char b) { return std::tolower(a) == std::tolower(b); }))
        return v;
    return "";
  }
  std::string error_code() const {
    const json j = json_body();
    return j.is_object() && j.contains("error") && j["error"]["code"].is_string() ? j["error"]["code"].get<std::string>() : "";
  }
  std::string error_param() const {
    const json j = json_body();
    return j.is_object() && j.contains("error") && j["error"]["param"].is_string() ? j["error"]["param"].get<std::string>() : "";
  }
};

inline HttpResult http_request(uint16_t port, http::verb verb, const std::string& target, const std::string& body,
                               const std::string& key, const std::string& content_type = "application/json",
                               std::chrono::seconds timeout = 120s) {
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  stream.connect(net::ip::tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
  stream.expires_after(timeout);
  http::request<http::string_body> req{verb, target, 11};
  req.set(http::field::host, "127.0.0.1");
  if (!key.empty()) req.set(http::field::authorization, "Bearer " + key);
  if (!body.empty() || verb == http::verb::post) {
    req.set(http::field::content_type, content_type);
    req.body() = body;
    req.prepare_payload();
  }
  http::write(stream, req);
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(64 << 20);
  http::read(stream, buffer, parser);
  HttpResult out;
  out.status = static_cast<int>(parser.get().result_int());
  for (const auto& field : parser.get()) out.headers[std::string(field.name_string())] = std::string(field.value());
  out.body = parser.get().body();
  beast::error_code ec;
  stream.socket().shutdown(net::ip::tcp::socket::shutdown_both, ec);
  return out;
}

// Server-sent events of a response body: the payload of every "data:" field, in order.
// Events are separated by a blank line; "data:" lines of one event are joined with "\n".
inline std::vector<std::string> parse_sse(const std::string& body) {
  std::vector<std::string> events;
  std::string data;
  bool have = false;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find('\n', pos);
    if (end == std::string::npos) end = body.size();
    std::string line = body.substr(pos, end - pos);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    pos = end + 1;
    if (line.empty()) {
      if (have) events.push_back(data);
      data.clear();
      have = false;
    } else if (line.rfind("data:", 0) == 0) {
      std::string value = line.substr(5);
      if (!value.empty() && value.front() == ' ') value.erase(0, 1);
      data = have ? data + "\n" + value : value;
      have = true;
    }  // comments (":") and other fields are ignored
  }
  if (have) events.push_back(data);
  return events;
}

inline uint16_t free_port() {
  net::io_context ioc;
  net::ip::tcp::acceptor a(ioc, net::ip::tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  return a.local_endpoint().port();
}

}  // namespace unshackle::live
