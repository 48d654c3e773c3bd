#include "unshackle/common/sd_notify.h"

#include <dlfcn.h>

#include <cstdlib>

#if UNS_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

namespace unshackle {

namespace {
bool send(const std::string& state) {
#if UNS_HAVE_SYSTEMD
  if (std::getenv("NOTIFY_SOCKET") == nullptr) return false;
  // libsystemd is opened at run time, not linked: the same binaries run in containers and on
  // GPU hosts without it, where there is no systemd to notify anyway.
  using SdNotify = decltype(&sd_notify);
  static const SdNotify notify = [] {
    void* library = dlopen("libsystemd.so.0", RTLD_NOW | RTLD_LOCAL);
    return library ? reinterpret_cast<SdNotify>(dlsym(library, "sd_notify")) : nullptr;
  }();
  // unset_environment = 0 keeps $NOTIFY_SOCKET for the later STOPPING=1.
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

}  // namespace unshackle
