#include "unshackle/service/wire.h"

#include <fmt/format.h>

#include <array>
#include <cmath>
#include <limits>

#include "unshackle/common/check.h"

namespace unshackle::wire {

namespace net = boost::asio;
using nlohmann::json;

std::string encode_frame(const json& message, size_t max_frame) {
  std::string text = message.dump(-1, ' ', false, json::error_handler_t::replace);
  UNS_CHECK(text.size() <= max_frame, "message of {} bytes exceeds the frame limit of {} bytes", text.size(),
            max_frame);
  const auto n = static_cast<uint32_t>(text.size());
  std::string frame;
  frame.reserve(4 + text.size());
  frame.push_back(static_cast<char>((n >> 24) & 0xff));
  frame.push_back(static_cast<char>((n >> 16) & 0xff));
  frame.push_back(static_cast<char>((n >> 8) & 0xff));
  frame.push_back(static_cast<char>(n & 0xff));
  frame += text;
  return frame;
}

std::optional<json> FrameDecoder::next() {
  if (buffered() < 4) return std::nullopt;
  const auto* p = reinterpret_cast<const unsigned char*>(buffer_.data() + offset_);
  const size_t n = (size_t{p[0]} << 24) | (size_t{p[1]} << 16) | (size_t{p[2]} << 8) | size_t{p[3]};
  if (n > max_frame_) fail(ErrorKind::kComm, fmt::format("frame of {} bytes exceeds the limit of {} bytes", n, max_frame_));
  if (buffered() < 4 + n) return std::nullopt;
  json message = json::parse(buffer_.begin() + static_cast<std::ptrdiff_t>(offset_ + 4),
                             buffer_.begin() + static_cast<std::ptrdiff_t>(offset_ + 4 + n), nullptr, false);
  offset_ += 4 + n;
  if (offset_ == buffer_.size() || offset_ > (size_t{1} << 20)) {
    buffer_.erase(0, offset_);
    offset_ = 0;
  }
  if (message.is_discarded()) fail(ErrorKind::kComm, "frame is not valid JSON");
  if (!message.is_object() || !message.contains("type") || !message["type"].is_string())
    fail(ErrorKind::kComm, "frame is not a JSON object with a string \"type\"");
  return message;
}

ErrorKind error_kind_from_name(std::string_view name) {
  for (ErrorKind kind : {ErrorKind::kInvalidArgument, ErrorKind::kCapacity, ErrorKind::kNotFound, ErrorKind::kIo,
                         ErrorKind::kComm, ErrorKind::kTimeout, ErrorKind::kUnsupported, ErrorKind::kInternal}) {
    if (name == error_kind_name(kind)) return kind;
  }
  return ErrorKind::kInternal;
}

json error_to_json(ErrorKind kind, std::string_view message) {
  return json{{"kind", error_kind_name(kind)}, {"message", message}};
}

void throw_remote_error(const json& error) {
  const std::string kind = error.is_object() && error.value("kind", json()).is_string() ? error["kind"].get<std::string>() : "internal";
  const std::string message =
      error.is_object() && error.value("message", json()).is_string() ? error["message"].get<std::string>() : "unknown error";
  throw Error(error_kind_from_name(kind), message);
}

std::string plain_message(const std::exception& error) {
  std::string message = error.what();
  // UNS_CHECK appends " [file.cpp:123: expression]".
  if (!message.empty() && message.back() == ']') {
    const size_t open = message.rfind(" [");
    if (open != std::string::npos && message.find(".cpp:", open) != std::string::npos) message.resize(open);
    else if (open != std::string::npos && message.find(".h:", open) != std::string::npos) message.resize(open);
  }
  return message;
}

json attention_to_json(const AttentionConfig& c) {
  return json{{"mode", std::string(mode_name(c.mode))},
              {"l_I", c.l_I},
              {"l_L", c.l_L},
              {"top_k", c.top_k},
              {"eps", c.eps},
              {"w", c.w},
              {"block", c.block},
              {"lag", c.lag},
              {"lag_ratio", c.lag_ratio}};
}

namespace {
int64_t integer_field(const json& value, const std::string& name) {
  // Token counts and positions fit in 32 bits (token positions are int32): larger values are
  // out of range here, before they reach position arithmetic (eps + position, w as a position)
  // where they would overflow.
  constexpr int64_t kLimit = std::numeric_limits<int32_t>::max();
  int64_t v = 0;
  if (value.is_number_unsigned()) {
    const uint64_t u = value.get<uint64_t>();
    if (u > uint64_t(kLimit)) fail(ErrorKind::kInvalidArgument, fmt::format("{}: {} is out of range (at most {})", name, u, kLimit));
    v = static_cast<int64_t>(u);
  } else if (value.is_number_integer()) {
    v = value.get<int64_t>();
  } else if (value.is_number_float() && std::isfinite(value.get<double>()) && std::floor(value.get<double>()) == value.get<double>() &&
             std::fabs(value.get<double>()) < 9e15) {
    v = static_cast<int64_t>(value.get<double>());
  } else {
    fail(ErrorKind::kInvalidArgument, fmt::format("{}: must be an integer", name));
  }
  if (v > kLimit || v < -kLimit) fail(ErrorKind::kInvalidArgument, fmt::format("{}: {} is out of range (at most {})", name, v, kLimit));
  return v;
}
}  // namespace

AttentionConfig attention_from_json(const json& object, const AttentionConfig& base, std::string_view prefix) {
  const std::string p(prefix);
  const std::string whole = p.empty() ? "attention" : p.substr(0, p.size() - 1);
  if (!object.is_object()) fail(ErrorKind::kInvalidArgument, fmt::format("{}: must be an object", whole));
  AttentionConfig c = base;
  for (const auto& [key, value] : object.items()) {
    const std::string name = p + key;
    if (key == "mode") {
      if (!value.is_string()) fail(ErrorKind::kInvalidArgument, fmt::format("{}: must be a string", name));
      try {
        c.mode = parse_mode(value.get<std::string>());
      } catch (const Error& e) {
        fail(ErrorKind::kInvalidArgument, p + plain_message(e));
      }
    } else if (key == "l_I") {
      c.l_I = integer_field(value, name);
    } else if (key == "l_L") {
      c.l_L = integer_field(value, name);
    } else if (key == "top_k") {
      c.top_k = integer_field(value, name);
    } else if (key == "eps") {
      c.eps = integer_field(value, name);
    } else if (key == "w") {
      c.w = integer_field(value, name);
    } else if (key == "block") {
      c.block = integer_field(value, name);
    } else if (key == "lag") {
      c.lag = integer_field(value, name);
    } else if (key == "lag_ratio") {
      if (!value.is_number()) fail(ErrorKind::kInvalidArgument, fmt::format("{}: must be a number", name));
      c.lag_ratio = value.get<double>();
    } else {
      fail(ErrorKind::kInvalidArgument,
           fmt::format("{}: unknown field (expected mode, top_k, l_I, l_L, eps, w, block, lag, lag_ratio)", name));
    }
  }
  try {
    c.validate(1, 1);
  } catch (const Error& e) {
    fail(ErrorKind::kInvalidArgument, p + plain_message(e));
  }
  return c;
}

// ---- Link ----

Link::Link(net::ip::tcp::socket socket, size_t max_frame, size_t max_queued)
    : socket_(std::move(socket)), decoder_(max_frame), max_frame_(max_frame), max_queued_(max_queued) {
  boost::system::error_code ec;
  const auto endpoint = socket_.remote_endpoint(ec);
  peer_ = ec ? std::string("?") : fmt::format("{}:{}", endpoint.address().to_string(), endpoint.port());
  socket_.set_option(net::ip::tcp::no_delay(true), ec);
}

void Link::start(OnMessage on_message, OnClose on_close) {
  net::dispatch(socket_.get_executor(), [self = shared_from_this(), on_message = std::move(on_message),
                                         on_close = std::move(on_close)]() mutable {
    self->on_message_ = std::move(on_message);
    self->on_close_ = std::move(on_close);
    self->do_read();
  });
}

void Link::do_read() {
  socket_.async_read_some(net::buffer(read_buffer_), [self = shared_from_this()](boost::system::error_code ec, size_t n) {
    if (self->closed_) return;
    if (ec) {
      self->shutdown(ec == net::error::eof ? "peer closed the connection" : "read failed: " + ec.message());
      return;
    }
    self->decoder_.feed(self->read_buffer_, n);
    try {
      while (auto message = self->decoder_.next()) {
        if (self->on_message_) self->on_message_(std::move(*message));
        if (self->closed_) return;
      }
    } catch (const std::exception& e) {
      self->shutdown(std::string("protocol error: ") + e.what());
      return;
    }
    self->do_read();
  });
}

void Link::send(const json& message) {
  std::string frame;
  try {
    frame = encode_frame(message, max_frame_);
  } catch (const std::exception& e) {
    close(std::string("cannot send: ") + plain_message(e));
    return;
  }
  net::post(socket_.get_executor(), [self = shared_from_this(), frame = std::move(frame)]() mutable {
    if (self->closed_) return;
    self->queued_bytes_ += frame.size();
    if (self->queued_bytes_ > self->max_queued_) {
      self->shutdown(fmt::format("peer does not read: {} bytes queued", self->queued_bytes_));
      return;
    }
    self->queue_.push_back(std::move(frame));
    if (!self->writing_) self->do_write();
  });
}

void Link::do_write() {
  writing_ = true;
  net::async_write(socket_, net::buffer(queue_.front()), [self = shared_from_this()](boost::system::error_code ec, size_t) {
    self->writing_ = false;
    if (self->closed_) return;
    if (ec) {
      self->shutdown("write failed: " + ec.message());
      return;
    }
    self->queued_bytes_ -= self->queue_.front().size();
    self->queue_.pop_front();
    if (!self->queue_.empty()) self->do_write();
    else if (self->close_when_flushed_) self->shutdown(self->close_reason_);
  });
}

void Link::close_after_flush(const std::string& why) {
  net::post(socket_.get_executor(), [self = shared_from_this(), why] {
    if (self->closed_) return;
    if (self->queue_.empty() && !self->writing_) {
      self->shutdown(why);
      return;
    }
    self->close_when_flushed_ = true;
    self->close_reason_ = why;
  });
}

void Link::close(const std::string& why) {
  net::dispatch(socket_.get_executor(), [self = shared_from_this(), why] { self->shutdown(why); });
}

void Link::shutdown(const std::string& why) {
  if (closed_) return;
  closed_ = true;
  boost::system::error_code ec;
  socket_.shutdown(net::ip::tcp::socket::shutdown_both, ec);
  socket_.close(ec);
  queue_.clear();
  queued_bytes_ = 0;
  auto on_close = std::move(on_close_);
  on_message_ = nullptr;
  if (on_close) on_close(why);
}

}  // namespace unshackle::wire
