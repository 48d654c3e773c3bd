#include "unshackle/common/check.h"

#include <cstring>

namespace unshackle {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidArgument: return "invalid_argument";
    case ErrorKind::kCapacity: return "capacity";
    case ErrorKind::kNotFound: return "not_found";
    case ErrorKind::kIo: return "io";
    case ErrorKind::kComm: return "comm";
    case ErrorKind::kTimeout: return "timeout";
    case ErrorKind::kUnsupported: return "unsupported";
    case ErrorKind::kInternal: return "internal";
  }
  return "unknown";
}

namespace detail {
void throw_check_failure(ErrorKind kind, const char* file, int line, const char* expression,
                         const std::string& message) {
  const char* base = std::strrchr(file, '/');
  base = base ? base + 1 : file;
  if (message.empty()) throw Error(kind, fmt::format("check failed: {} [{}:{}]", expression, base, line));
  throw Error(kind, fmt::format("{} [{}:{}: {}]", message, base, line, expression));
}
}  // namespace detail

}  // namespace unshackle
