// Errors of the whole project, without any formatting dependency (CUDA sources include this).
#pragma once

#include <stdexcept>
#include <string>

namespace unshackle {

// What went wrong, so that boundaries can map it (HTTP status, exit code).
enum class ErrorKind {
  kInvalidArgument,  // bad input: malformed file, wrong shape, bad setting
  kCapacity,         // context beyond what the store can hold
  kNotFound,
  kIo,
  kComm,     // a collective failed or a peer is gone
  kTimeout,  // a collective or request outlived its deadline
  kUnsupported,
  kInternal,
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// Throws Error(kind, message).
[[noreturn]] inline void fail(ErrorKind kind, const std::string& message) { throw Error(kind, message); }

namespace detail {
[[noreturn]] void throw_check_failure(ErrorKind kind, const char* file, int line, const char* expression,
                                      const std::string& message);
}  // namespace detail

}  // namespace unshackle
