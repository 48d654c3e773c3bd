#include "unshackle/common/sd_notify.h"

#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>

#if UNS_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

namespace unshackle {

namespace {
#if UNS_HAVE_SYSTEMD
// libsystemd is opened at run time, not linked: the same binaries run in containers and on
// GPU hosts without it, where there is no systemd to notify anyway.
void* systemd_symbol(const char* name) {
  static void* const library = dlopen("libsystemd.so.0", RTLD_NOW | RTLD_LOCAL);
  return library ? dlsym(library, name) : nullptr;
}
#endif

bool send(const std::string& state) {
#if UNS_HAVE_SYSTEMD
  if (std::getenv("NOTIFY_SOCKET") == nullptr) return false;
  static const auto notify = reinterpret_cast<decltype(&sd_notify)>(systemd_symbol("sd_notify"));
  // unset_environment = 0 keeps $NOTIFY_SOCKET for the later STOPPING=1 and WATCHDOG=1.
  return notify != nullptr && notify(0, state.c_str()) > 0;
#else
  (void)state;
  return false;
#endif
}

// STATUS= ends at the first newline; keep one line.
std::string one_line(std::string text) {
  for (char& c : text)
    if (c == '\n') c = ' ';
  return text;
}
}  // namespace

bool notify_ready(const std::string& status) { return send("READY=1\nSTATUS=" + one_line(status)); }
bool notify_status(const std::string& status) { return send("STATUS=" + one_line(status)); }
bool notify_stopping() { return send("STOPPING=1"); }
bool notify_watchdog() { return send("WATCHDOG=1"); }

std::chrono::microseconds watchdog_interval() {
#if UNS_HAVE_SYSTEMD
  static const auto enabled = reinterpret_cast<decltype(&sd_watchdog_enabled)>(systemd_symbol("sd_watchdog_enabled"));
  uint64_t usec = 0;
  // Checks $WATCHDOG_USEC and that $WATCHDOG_PID, when set, is this process.
  if (enabled != nullptr && enabled(0, &usec) > 0 && usec > 0) return std::chrono::microseconds(usec / 2);
#endif
  return std::chrono::microseconds(0);
}

}  // namespace unshackle
