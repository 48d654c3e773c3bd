// The sd_notify helper speaks to a real notify socket the way systemd listens on one: an
// AF_UNIX datagram socket named by $NOTIFY_SOCKET. What arrives is what systemd would read.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "unshackle/common/sd_notify.h"

namespace unshackle {
namespace {

class NotifySocket {
 public:
  NotifySocket() {
    path_ = (std::filesystem::temp_directory_path() / ("uns_notify_" + std::to_string(::getpid()))).string();
    std::filesystem::remove(path_);
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    path_.copy(address.sun_path, sizeof(address.sun_path) - 1);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) ADD_FAILURE() << "bind " << path_;
    timeval timeout{2, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    ::setenv("NOTIFY_SOCKET", path_.c_str(), 1);
  }
  ~NotifySocket() {
    ::unsetenv("NOTIFY_SOCKET");
    ::close(fd_);
    std::filesystem::remove(path_);
  }
  std::string receive() {
    char buffer[4096];
    const ssize_t n = ::recv(fd_, buffer, sizeof(buffer), 0);
    return n > 0 ? std::string(buffer, static_cast<size_t>(n)) : std::string("<nothing within 2 s>");
  }

 private:
  std::string path_;
  int fd_ = -1;
};

TEST(SdNotify, WithoutSystemdEveryCallIsANoOp) {
  ::unsetenv("NOTIFY_SOCKET");
  EXPECT_FALSE(notify_ready("listening"));
  EXPECT_FALSE(notify_status("waiting"));
  EXPECT_FALSE(notify_stopping());
}

TEST(SdNotify, ReadyStatusAndStoppingReachTheSocket) {
  NotifySocket socket;
  ASSERT_TRUE(notify_ready("HTTP on 127.0.0.1:8000\nworkers on 8001")) << "libsystemd.so.0 missing or sd_notify failed";
  EXPECT_EQ(socket.receive(), "READY=1\nSTATUS=HTTP on 127.0.0.1:8000 workers on 8001");
  ASSERT_TRUE(notify_status("group g0: 4 ranks joined"));
  EXPECT_EQ(socket.receive(), "STATUS=group g0: 4 ranks joined");
  ASSERT_TRUE(notify_stopping());
  EXPECT_EQ(socket.receive(), "STOPPING=1");
}

TEST(SdNotify, WatchdogIntervalIsHalfOfWatchdogUsecForThisProcessOnly) {
  ::unsetenv("WATCHDOG_PID");
  ::unsetenv("WATCHDOG_USEC");
  EXPECT_EQ(watchdog_interval().count(), 0) << "no WatchdogSec=: no pings";
  ::setenv("WATCHDOG_USEC", "30000000", 1);
  EXPECT_EQ(watchdog_interval(), std::chrono::seconds(15));
  ::setenv("WATCHDOG_PID", std::to_string(::getpid()).c_str(), 1);
  EXPECT_EQ(watchdog_interval(), std::chrono::seconds(15));
  ::setenv("WATCHDOG_PID", std::to_string(::getpid() + 1).c_str(), 1);
  EXPECT_EQ(watchdog_interval().count(), 0) << "the watchdog belongs to another process (mpirun's child ranks)";
  ::unsetenv("WATCHDOG_PID");
  ::unsetenv("WATCHDOG_USEC");
}

TEST(SdNotify, WatchdogPingReachesTheSocket) {
  NotifySocket socket;
  ASSERT_TRUE(notify_watchdog());
  EXPECT_EQ(socket.receive(), "WATCHDOG=1");
}

}  // namespace
}  // namespace unshackle
