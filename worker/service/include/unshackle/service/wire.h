// The wire protocol between the coordinator and rank 0 of a worker group.
//
// TCP, the worker connects. Every message is one frame: a 4-byte big-endian length, then
// that many bytes of UTF-8 JSON (an object with a "type"). Frames over the limit, bad
// JSON or a non-object close the link. Messages (protocol 1):
//
//   worker → coordinator
//     {"type":"hello","protocol":1,"group":"g0","ranks":P,"model":{ModelInfo}}
//     {"type":"heartbeat","ranks":[{"rank":r,"kv_bytes":..,"kv_tokens":..,"contexts":..}]}
//     {"type":"result","id":N,"ok":true,"result":{..}}
//     {"type":"result","id":N,"ok":false,"error":{"kind":"capacity","message":".."}}
//     {"type":"fatal","message":".."}            the group is broken; the worker exits
//   coordinator → worker
//     {"type":"welcome","heartbeat_ms":T}  or  {"type":"reject","message":".."}
//     {"type":"call","id":N,"op":OP,"args":{..}}  ops: see engine_ops.h
//     {"type":"heartbeat"}
//
// Both sides send a heartbeat every heartbeat_ms; a side that hears nothing (no message
// of any kind) for its timeout treats the link as lost.
#pragma once

#include <boost/asio.hpp>
#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "unshackle/common/error.h"
#include "unshackle/kernels/attention_config.h"

namespace unshackle::wire {

inline constexpr int kProtocolVersion = 1;
inline constexpr size_t kDefaultMaxFrame = size_t{16} << 20;  // 16 MiB

// One frame: length prefix + JSON text. Throws Error(kInvalidArgument) past max_frame.
std::string encode_frame(const nlohmann::json& message, size_t max_frame = kDefaultMaxFrame);

// Incremental decoder: feed bytes as they arrive, take whole messages out.
class FrameDecoder {
 public:
  explicit FrameDecoder(size_t max_frame = kDefaultMaxFrame) : max_frame_(max_frame) {}
  void feed(const char* data, size_t size) { buffer_.append(data, size); }
  // The next whole message, or nullopt when more bytes are needed. Throws Error(kComm) on a
  // frame over the limit, invalid JSON or a message that is not an object with a "type".
  std::optional<nlohmann::json> next();
  size_t buffered() const { return buffer_.size() - offset_; }

 private:
  size_t max_frame_;
  std::string buffer_;
  size_t offset_ = 0;
};

// "invalid_argument" etc. back to the kind (error_kind_name's inverse); unknown → kInternal.
ErrorKind error_kind_from_name(std::string_view name);

// The error member of a failed result, and the Error it stands for.
nlohmann::json error_to_json(ErrorKind kind, std::string_view message);
[[noreturn]] void throw_remote_error(const nlohmann::json& error);

// AttentionConfig <-> {"mode","l_I","l_L","top_k","eps","w","block","lag","lag_ratio"}.
// attention_from_json is strict: an unknown key, a wrong type or an invalid value throws
// Error(kInvalidArgument) whose message starts with "<prefix><field>: ". Missing keys keep
// the defaults of `base`. The result is checked with validate(1, 1) (field checks only; the
// head-count check needs the model and is done where the model is known).
nlohmann::json attention_to_json(const AttentionConfig& config);
AttentionConfig attention_from_json(const nlohmann::json& object, const AttentionConfig& base,
                                    std::string_view prefix = "attention.");

// An Error's message without the " [file:line: expression]" suffix that UNS_CHECK adds.
std::string plain_message(const std::exception& error);

// One framed TCP link (both sides use it). Callbacks run on the link's strand; send() and
// close() may be called from any thread. The write queue is bounded: past max_queued bytes the
// link closes (a peer that does not read is lost, not buffered without end).
class Link : public std::enable_shared_from_this<Link> {
 public:
  using OnMessage = std::function<void(nlohmann::json)>;
  using OnClose = std::function<void(const std::string& why)>;

  Link(boost::asio::ip::tcp::socket socket, size_t max_frame = kDefaultMaxFrame,
       size_t max_queued = size_t{256} << 20);
  // Starts reading. on_close is called once, whatever closed the link.
  void start(OnMessage on_message, OnClose on_close);
  void send(const nlohmann::json& message);
  void close(const std::string& why);
  // Closes once every message queued so far has been written (a last "reject" or "fatal").
  void close_after_flush(const std::string& why);
  std::string peer() const { return peer_; }

 private:
  void do_read();
  void do_write();
  void shutdown(const std::string& why);  // on the strand

  boost::asio::ip::tcp::socket socket_;
  FrameDecoder decoder_;
  size_t max_frame_, max_queued_;
  std::string peer_;
  char read_buffer_[64 * 1024];
  std::deque<std::string> queue_;
  size_t queued_bytes_ = 0;
  bool writing_ = false, closed_ = false, close_when_flushed_ = false;
  std::string close_reason_;
  OnMessage on_message_;
  OnClose on_close_;
};

}  // namespace unshackle::wire
