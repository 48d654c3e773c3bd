#include "unshackle/coordinator/http_server.h"

#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <optional>

namespace unshackle::coord {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using nlohmann::json;

namespace {

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(net::ip::tcp::socket socket, std::shared_ptr<HttpServer::Shared> shared)
      : stream_(std::move(socket)), read_timer_(stream_.get_executor()), shared_(std::move(shared)) {}
  ~Session() {
    --shared_->connections;
    if (job_ && !job_->done()) shared_->scheduler.cancel_job(job_->id);  // the client went away
  }

  void run() {
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->do_read(true); });
  }

 private:
  // A request must arrive whole within io_timeout of its first byte (a slow client, e.g.
  // headers dribbled byte by byte or a body that never completes, gets 408 then); a
  // keep-alive connection may wait idle_timeout for that first byte.
  void do_read(bool first) {
    parser_.emplace();
    parser_->header_limit(shared_->options.header_limit);
    parser_->body_limit(shared_->options.body_limit);
    if (first || buffer_.size() > 0) return read_request();
    stream_.expires_after(shared_->options.idle_timeout);  // the stream closes the idle socket
    stream_.async_read_some(buffer_.prepare(4096), [self = shared_from_this()](beast::error_code ec, size_t n) {
      if (ec) return self->close();
      self->buffer_.commit(n);
      self->read_request();
    });
  }

  void read_request() {
    // Our own timer, not the stream's expiry: that would close the socket, and the client
    // could not be told 408.
    stream_.expires_never();
    timed_out_ = false;
    read_timer_.expires_after(shared_->options.io_timeout);
    read_timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec) return;  // cancelled: the read ended first
      self->timed_out_ = true;
      beast::error_code ignored;
      self->stream_.socket().cancel(ignored);  // the read completes with operation_aborted
    });
    http::async_read(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) {
      self->read_timer_.cancel();
      self->on_read(ec);
    });
  }

  void on_read(beast::error_code ec) {
    if (ec && timed_out_) {
      keep_alive_ = false;
      if (!parser_->got_some() && buffer_.size() == 0) return close();  // it never sent anything
      buffer_.consume(buffer_.size());
      return write(error_response(ApiError(
          408, fmt::format("The request did not arrive within {} ms", shared_->options.io_timeout.count()), "",
          "request_timeout")));
    }
    if (ec == http::error::end_of_stream || ec == net::error::eof || ec == beast::error::timeout ||
        ec == net::error::operation_aborted || ec == net::error::connection_reset)
      return close();
    if (ec == http::error::body_limit) {
      keep_alive_ = false;
      return write(error_response(ApiError(413, fmt::format("The request body exceeds the limit of {} bytes", shared_->options.body_limit), "",
                                           "request_too_large")));
    }
    if (ec == http::error::header_limit) {
      keep_alive_ = false;
      return write(error_response(ApiError(431, "The request headers are too large", "", "headers_too_large")));
    }
    if (ec) {
      keep_alive_ = false;
      return write(error_response(ApiError(400, fmt::format("Malformed HTTP request: {}", ec.message()), "", "bad_http")));
    }
    auto& req = parser_->get();
    keep_alive_ = req.keep_alive();
    version_ = req.version();
    HttpRequest request;
    request.method = std::string(req.method_string());
    request.target = std::string(req.target());
    request.authorization = std::string(req[http::field::authorization]);
    request.content_type = std::string(req[http::field::content_type]);
    request.body = std::move(req.body());
    head_ = request.method == "HEAD";
    Reply reply = shared_->router.handle(request);
    switch (reply.mode) {
      case Reply::Mode::kResponse: return write(std::move(reply.response));
      case Reply::Mode::kWait: return follow(std::move(reply.job), false, false);
      case Reply::Mode::kStream: return follow(std::move(reply.job), true, reply.include_usage);
    }
  }

  void write(HttpResponse response) {
    auto res = std::make_shared<http::response<http::string_body>>(static_cast<http::status>(response.status), version_);
    res->set(http::field::server, "unshackle");
    res->set(http::field::content_type, response.content_type);
    for (const auto& [name, value] : response.headers) res->set(name, value);
    res->keep_alive(keep_alive_);
    res->body() = std::move(response.body);
    res->prepare_payload();
    if (head_) res->body().clear();
    stream_.expires_after(shared_->options.io_timeout);
    http::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code ec, size_t) {
      if (ec) return self->close();
      if (!self->keep_alive_) return self->linger_close();
      self->job_.reset();
      self->do_read(false);
    });
  }

  // After the last answer: stop sending, then read and drop what the client still sends (the
  // rest of a body over the limit, say) for up to a second before closing. Closing with
  // unread bytes would send a TCP reset, and the client could lose the answer it was sent.
  void linger_close() {
    beast::error_code ignored;
    stream_.socket().shutdown(net::ip::tcp::socket::shutdown_send, ignored);
    buffer_.consume(buffer_.size());
    linger_until_ = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    drain();
  }
  void drain() {
    stream_.expires_at(linger_until_);
    stream_.async_read_some(buffer_.prepare(64 * 1024), [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return self->close();  // end of stream, or the second is over
      self->drain();                  // dropped: the buffer is reused without commit
    });
  }

  // A job the session waits for (whole response at the end) or streams (SSE).
  void follow(std::shared_ptr<Job> job, bool stream, bool include_usage) {
    job_ = std::move(job);
    streaming_ = stream;
    include_usage_ = include_usage;
    sent_ = 0;
    finished_ = false;
    stream_.expires_never();
    // The listener keeps the session alive while it follows the job; finishing or closing
    // clears it (Job -> listener -> Session -> Job is broken there).
    auto self = shared_from_this();
    auto executor = stream_.get_executor();
    if (stream) {
      header_.emplace(http::status::ok, version_);
      header_->set(http::field::server, "unshackle");
      header_->set(http::field::content_type, "text/event-stream");
      header_->set(http::field::cache_control, "no-cache");
      header_->keep_alive(keep_alive_);
      header_->chunked(true);
      serializer_.emplace(*header_);
      writing_ = true;
      stream_.expires_after(shared_->options.io_timeout);
      http::async_write_header(stream_, *serializer_, [self = shared_from_this()](beast::error_code ec, size_t) {
        self->writing_ = false;
        if (ec) return self->close();
        self->pump();
      });
    }
    job_->set_listener([self, executor] { net::post(executor, [self] { self->pump(); }); });
    watch_peer(job_);
  }

  // Nothing is written during a long prefill, so a write error cannot tell that the client
  // went away: wait for the socket to turn readable and peek. End of stream (or an error)
  // while the job runs closes the session, which cancels the job. Bytes of a pipelined
  // request are left for the next read.
  void watch_peer(std::shared_ptr<Job> job) {
    stream_.socket().async_wait(net::ip::tcp::socket::wait_read, [self = shared_from_this(), job](beast::error_code ec) {
      if (ec == net::error::operation_aborted || self->job_ != job || job->done()) return;
      char byte = 0;
      beast::error_code peek_ec;
      const size_t n = self->stream_.socket().receive(net::buffer(&byte, 1), net::socket_base::message_peek, peek_ec);
      if (!ec && !peek_ec && n > 0) return;  // a pipelined request: not a disconnect
      self->close();
    });
  }

  void pump() {
    if (!job_ || writing_ || finished_) return;
    const Job::State s = job_->snapshot();
    if (!streaming_) {
      if (!s.finished) return;
      finished_ = true;
      auto job = job_;
      job->set_listener(nullptr);
      return write(completion_response(*job));
    }
    const std::string model = s.model.empty() ? job_->spec.model : s.model;
    out_.clear();
    if (s.text.size() > sent_) {
      out_ += sse_event(stream_chunk(*job_, model, s.text.substr(sent_), nullptr));
      sent_ = s.text.size();
    }
    if (s.finished) {
      finished_ = true;
      job_->set_listener(nullptr);
      if (s.phase == JobPhase::kCompleted) {
        out_ += sse_event(stream_chunk(*job_, model, "", s.finish_reason));
        if (include_usage_) {
          json usage = completion_json(*job_, s)["usage"];
          json chunk = stream_chunk(*job_, model, "", nullptr);
          chunk["choices"] = json::array();
          chunk["usage"] = usage;
          out_ += sse_event(chunk);
        }
      } else {
        // Headers are sent: the failure goes in band, as vLLM does.
        out_ += sse_event(error_json(job_error(s)));
      }
      out_ += "data: [DONE]\n\n";
    }
    if (out_.empty()) return;
    writing_ = true;
    stream_.expires_after(shared_->options.io_timeout);
    net::async_write(stream_, http::make_chunk(net::buffer(out_)), [self = shared_from_this()](beast::error_code ec, size_t) {
      self->writing_ = false;
      if (ec) return self->close();  // the destructor cancels the job
      if (!self->finished_) return self->pump();
      self->stream_.expires_after(self->shared_->options.io_timeout);
      net::async_write(self->stream_, http::make_chunk_last(), [self](beast::error_code ec2, size_t) {
        if (ec2 || !self->keep_alive_) return self->close();
        self->job_.reset();
        self->header_.reset();
        self->serializer_.reset();
        self->streaming_ = false;
        self->do_read(false);
      });
    });
  }

  void close() {
    if (job_ && !job_->done()) {
      job_->set_listener(nullptr);
      shared_->scheduler.cancel_job(job_->id);
    }
    beast::error_code ec;
    stream_.socket().shutdown(net::ip::tcp::socket::shutdown_both, ec);
    stream_.close();
  }

  beast::tcp_stream stream_;
  net::steady_timer read_timer_;
  bool timed_out_ = false;
  std::chrono::steady_clock::time_point linger_until_;
  std::shared_ptr<HttpServer::Shared> shared_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  bool keep_alive_ = false, head_ = false;
  unsigned version_ = 11;
  std::shared_ptr<Job> job_;
  bool streaming_ = false, include_usage_ = false, writing_ = false, finished_ = false;
  size_t sent_ = 0;
  std::string out_;
  std::optional<http::response<http::empty_body>> header_;
  std::optional<http::response_serializer<http::empty_body>> serializer_;
};

}  // namespace

HttpServer::HttpServer(net::io_context& ioc, Router& router, Scheduler& scheduler, HttpOptions options)
    : ioc_(ioc), acceptor_(ioc), shared_(std::make_shared<Shared>(router, scheduler, options)) {}

uint16_t HttpServer::listen(const std::string& address, uint16_t port) {
  const net::ip::tcp::endpoint endpoint(net::ip::make_address(address), port);
  acceptor_.open(endpoint.protocol());
  acceptor_.set_option(net::socket_base::reuse_address(true));
  acceptor_.bind(endpoint);
  acceptor_.listen(net::socket_base::max_listen_connections);
  do_accept();
  return acceptor_.local_endpoint().port();
}

void HttpServer::stop() {
  net::post(ioc_, [this] {
    beast::error_code ec;
    acceptor_.close(ec);
  });
}

void HttpServer::do_accept() {
  acceptor_.async_accept(net::make_strand(ioc_), [this](beast::error_code ec, net::ip::tcp::socket socket) {
    if (!acceptor_.is_open()) return;
    if (!ec) {
      if (shared_->connections.load() >= shared_->options.max_connections) {
        beast::error_code ignored;
        socket.close(ignored);  // over the connection limit
      } else {
        ++shared_->connections;
        std::make_shared<Session>(std::move(socket), shared_)->run();
      }
    }
    do_accept();
  });
}

}  // namespace unshackle::coord
