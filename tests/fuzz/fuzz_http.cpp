// fuzz_http: the raw bytes a client sends on one connection, through Beast's request parser
// with the limits the server sets (HttpOptions), turned into the request as Session::on_read
// does, handled by the Router, and the response serialized as Session::write does. Request
// after request while keep-alive holds (pipelining), as one session reads them. A request
// with an Authorization header goes to a router that has an API key ("fuzz-key"), one
// without to a router with none, so both the auth checks and every route are reached.
#include <boost/beast/_experimental/test/stream.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <cstddef>
#include <cstdint>
#include <sstream>

#include "coordinator_harness.h"
#include "unshackle/coordinator/http_server.h"

namespace beast = boost::beast;
namespace http = beast::http;
using namespace unshackle;
using namespace unshackle::coord;

namespace {

constexpr int kMaxRequests = 16;  // per input; the parser limits bound each one

// What Session::on_read answers for a parse error (413, 431, 400), or nothing (the session
// just closes: end of stream, a partial request at EOF).
void answer_parse_error(const beast::error_code& ec, const HttpOptions& options) {
  if (ec == http::error::end_of_stream || ec == beast::error::timeout) return;
  if (ec == http::error::body_limit) {
    fuzz::check_response(error_response(ApiError(413, fmt::format("The request body exceeds the limit of {} bytes", options.body_limit),
                                           "", "request_too_large")));
  } else if (ec == http::error::header_limit) {
    fuzz::check_response(error_response(ApiError(431, "The request headers are too large", "", "headers_too_large")));
  } else {
    fuzz::check_response(error_response(ApiError(400, fmt::format("Malformed HTTP request: {}", ec.message()), "", "bad_http")));
  }
}

// Session::write: the response as it goes on the wire.
void serialize(const HttpResponse& response, unsigned version, bool keep_alive, bool head) {
  http::response<http::string_body> res(static_cast<http::status>(response.status), version);
  res.set(http::field::server, "unshackle");
  res.set(http::field::content_type, response.content_type);
  for (const auto& [name, value] : response.headers) res.set(name, value);
  res.keep_alive(keep_alive);
  res.body() = response.body;
  res.prepare_payload();
  if (head) res.body().clear();
  std::ostringstream out;
  out << res;
  FUZZ_CHECK(out.str().rfind("HTTP/", 0) == 0, "response does not start with a status line");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Coordinator& c = fuzz::Coordinator::get();
  BatchStore batches(c.scheduler, BatchOptions{});
  Router open(c.scheduler, c.registry, c.metrics, batches, RouterOptions{});
  RouterOptions keyed_options;
  keyed_options.api_key = "fuzz-key";
  Router keyed(c.scheduler, c.registry, c.metrics, batches, keyed_options);
  const HttpOptions options;

  boost::asio::io_context ioc;
  beast::test::stream stream(ioc, beast::string_view(reinterpret_cast<const char*>(data), size));
  stream.close_remote();  // the client's bytes end here: reads then see EOF
  beast::flat_buffer buffer;
  for (int i = 0; i < kMaxRequests; ++i) {
    http::request_parser<http::string_body> parser;
    parser.header_limit(options.header_limit);
    parser.body_limit(options.body_limit);
    beast::error_code ec;
    http::read(stream, buffer, parser, ec);
    if (ec) {
      answer_parse_error(ec, options);
      break;
    }
    auto& req = parser.get();
    const bool keep_alive = req.keep_alive();
    HttpRequest request;
    request.method = std::string(req.method_string());
    request.target = std::string(req.target());
    request.authorization = std::string(req[http::field::authorization]);
    request.content_type = std::string(req[http::field::content_type]);
    request.body = std::move(req.body());
    const bool head = request.method == "HEAD";
    const Reply reply = (request.authorization.empty() ? open : keyed).handle(request);
    fuzz::check_reply(reply);
    serialize(reply.response, req.version(), keep_alive, head);
    if (!keep_alive) break;
  }
  return 0;
}
