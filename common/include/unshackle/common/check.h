// One check macro for the whole project: names file, line and the failed expression.
// Inside a component we throw; at a component boundary (HTTP handler, worker loop,
// CLI main) the exception becomes a status, never an exit() on a service path.
#pragma once

#include <fmt/format.h>

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

namespace detail {
[[noreturn]] void throw_check_failure(ErrorKind kind, const char* file, int line,
                                      const char* expression, const std::string& message);
inline std::string check_message() { return {}; }
template <typename... Args>
std::string check_message(fmt::format_string<Args...> format, Args&&... args) {
  return fmt::format(format, std::forward<Args>(args)...);
}
}  // namespace detail

// Throws Error(kind, "<message> [file:line: expression]").
[[noreturn]] inline void fail(ErrorKind kind, const std::string& message) { throw Error(kind, message); }

}  // namespace unshackle

// UNS_CHECK(cond, "format {}", args...): internal invariant or bad argument.
#define UNS_CHECK(cond, ...)                                                                   \
  do {                                                                                         \
    if (!(cond)) [[unlikely]]                                                                  \
      ::unshackle::detail::throw_check_failure(::unshackle::ErrorKind::kInvalidArgument,       \
                                               __FILE__, __LINE__, #cond,                      \
                                               ::unshackle::detail::check_message(__VA_ARGS__)); \
  } while (0)

// UNS_CHECK_KIND(kind, cond, "format {}", args...): the same with an explicit error kind.
#define UNS_CHECK_KIND(kind, cond, ...)                                                          \
  do {                                                                                           \
    if (!(cond)) [[unlikely]]                                                                    \
      ::unshackle::detail::throw_check_failure(::unshackle::ErrorKind::kind, __FILE__, __LINE__, \
                                               #cond, ::unshackle::detail::check_message(__VA_ARGS__)); \
  } while (0)
