// One check macro for the whole project: names file, line and the failed expression.
// Inside a component we throw; at a component boundary (HTTP handler, worker loop,
// CLI main) the exception becomes a status, never an exit() on a service path.
#pragma once

#include <fmt/format.h>

#include <string>

#include "unshackle/common/error.h"

namespace unshackle {

namespace detail {
inline std::string check_message() { return {}; }
template <typename... Args>
std::string check_message(fmt::format_string<Args...> format, Args&&... args) {
  return fmt::format(format, std::forward<Args>(args)...);
}
}  // namespace detail

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
