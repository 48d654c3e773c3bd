// The HTTP transport (Boost.Beast): an acceptor and one async session per connection, on
// the coordinator's io_context. Bounded: header and body limits, a timeout on every read and
// write (a request that does not arrive whole in time gets 408), a connection limit. Requests
// on a connection are answered in order, one at a time (pipelined requests wait in the read
// buffer, which the header and body limits bound).
// All logic is in Router::handle; a session only follows a job it was handed (waiting for a
// completion, or streaming it as SSE, cancelling it when the client goes away).
#pragma once

#include <boost/asio.hpp>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>

#include "unshackle/coordinator/routes.h"

namespace unshackle::coord {

struct HttpOptions {
  std::chrono::milliseconds io_timeout{30000};     // a whole request from its first byte (408 after), each write
  std::chrono::milliseconds idle_timeout{120000};  // keep-alive wait for the next request's first byte
  uint32_t header_limit = 16 * 1024;
  uint64_t body_limit = uint64_t{64} << 20;
  size_t max_connections = 1024;
};

class HttpServer {
 public:
  HttpServer(boost::asio::io_context& ioc, Router& router, Scheduler& scheduler, HttpOptions options);
  uint16_t listen(const std::string& address, uint16_t port);  // returns the bound port
  void stop();

  struct Shared {
    Shared(Router& r, Scheduler& s, HttpOptions o) : router(r), scheduler(s), options(o) {}
    Router& router;
    Scheduler& scheduler;
    HttpOptions options;
    std::atomic<size_t> connections{0};
  };

 private:
  void do_accept();
  boost::asio::io_context& ioc_;
  boost::asio::ip::tcp::acceptor acceptor_;
  std::shared_ptr<Shared> shared_;
};

}  // namespace unshackle::coord
