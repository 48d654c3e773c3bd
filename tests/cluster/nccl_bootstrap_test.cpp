// The TCP bootstrap of the NCCL unique id (for launchers without MPI): every rank gets rank
// 0's id, and a rank whose rank 0 never listens fails within its timeout. Needs libnccl,
// not a GPU (ncclGetUniqueId only touches the network); skips if NCCL refuses here.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <thread>

#include "unshackle/cluster/nccl_communicator.h"
#include "unshackle/common/check.h"

namespace unshackle {
namespace {

// A loopback port free a moment ago (the kernel's pick for port 0). A port derived from the
// pid collided under `ctest -j`: two test processes with neighbouring pids picked the same one,
// and one's rank connected to the other's rank 0.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  UNS_CHECK(fd >= 0, "socket() failed");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof address;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  ::close(fd);
  UNS_CHECK(ok, "no free loopback port");
  return ntohs(address.sin_port);
}

TEST(NcclBootstrap, TcpHandsRankZerosIdToEveryRank) {
  try {
    (void)nccl_new_id();
  } catch (const Error& e) {
    GTEST_SKIP() << "ncclGetUniqueId unavailable on this machine: " << e.what();
  }
  const int ranks = 3, port = free_port();
  std::vector<NcclId> ids(ranks);
  std::vector<std::string> errors(ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        ids[static_cast<size_t>(r)] = nccl_id_over_tcp("127.0.0.1", port, r, ranks, std::chrono::seconds(10));
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < ranks; ++r) EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
  EXPECT_NE(ids[0].bytes, NcclId{}.bytes) << "rank 0 made a real id";
  for (int r = 1; r < ranks; ++r) EXPECT_EQ(ids[static_cast<size_t>(r)].bytes, ids[0].bytes) << "rank " << r;
}

TEST(NcclBootstrap, MissingRankZeroTimesOut) {
  const auto start = std::chrono::steady_clock::now();
  try {
    nccl_id_over_tcp("127.0.0.1", free_port(), 1, 2, std::chrono::milliseconds(800));
    ADD_FAILURE() << "connected to nobody";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kTimeout);
    EXPECT_NE(std::string(e.what()).find("did not answer"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
}

}  // namespace
}  // namespace unshackle
