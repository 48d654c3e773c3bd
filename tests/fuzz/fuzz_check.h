// What every fuzzer shares: FUZZ_CHECK, a property the harness asserts beyond "no crash"
// (a failure prints why and aborts, so libFuzzer saves the input as a crash artifact).
#pragma once

#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace unshackle::fuzz {

[[noreturn]] inline void check_failed(const char* expression, const char* file, int line, const std::string& why) {
  std::fprintf(stderr, "FUZZ_CHECK failed at %s:%d: %s: %s\n", file, line, expression, why.c_str());
  std::abort();
}

}  // namespace unshackle::fuzz

#define FUZZ_CHECK(cond, ...)                                                                  \
  do {                                                                                         \
    if (!(cond)) ::unshackle::fuzz::check_failed(#cond, __FILE__, __LINE__, fmt::format(__VA_ARGS__)); \
  } while (0)
