// One rank of a worker group serving the coordinator (issue 6).
//
// Rank 0 connects to the coordinator (retrying until connect_timeout), says hello with the
// model's info and the group size, then relays every call it receives to the other ranks
// (a broadcast over the group's Communicator), executes it on its own Engine and sends back
// its result. Between calls it broadcasts a usage poll every heartbeat, so idle ranks never
// time out and rank 0 learns each rank's KV use for its heartbeats. Ranks > 0 only follow
// the broadcasts.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

#include "unshackle/cluster/communicator.h"
#include "unshackle/worker/engine.h"

namespace unshackle {

struct WorkerOptions {
  std::string coordinator_host = "127.0.0.1";
  uint16_t coordinator_port = 0;
  std::string group = "g0";                                 // unique per coordinator
  std::chrono::milliseconds heartbeat{1000};                // send period
  std::chrono::milliseconds coordinator_timeout{10000};     // silence that means the coordinator is gone
  std::chrono::milliseconds connect_timeout{30000};         // keep retrying the first connect this long
  // When set and it turns true (a signal handler), rank 0 finishes the call in progress, stops
  // the other ranks and returns kWorkerExitClosed within one heartbeat. Ranks > 0 ignore it:
  // they stop when rank 0 tells them (or when rank 0 is gone, after the collective timeout).
  const std::atomic<bool>* stop = nullptr;
};

// Exit codes of run_worker_rank (and of unshackle-worker).
inline constexpr int kWorkerExitClosed = 0;       // the coordinator closed the link, or `stop`
inline constexpr int kWorkerExitCoordinator = 3;  // coordinator unreachable, silent or rejected the group
inline constexpr int kWorkerExitGroupBroken = 4;  // a collective failed: the group must be restarted whole

// Runs until the coordinator goes away or the group breaks; returns an exit code above.
// comm may be null for a one-rank group. Progress and errors go to stderr.
int run_worker_rank(Engine& engine, Communicator* comm, const WorkerOptions& options);

}  // namespace unshackle
