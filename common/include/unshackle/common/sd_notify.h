// systemd readiness for Type=notify units (deploy/systemd): the coordinator says READY=1 once
// it listens, a worker group's rank 0 once every rank has joined and loaded the model. Each
// call is a no-op returning false when the process was not started by systemd ($NOTIFY_SOCKET
// unset) or libsystemd.so.0 is missing, so callers never need to care.
#pragma once

#include <chrono>
#include <string>

namespace unshackle {

// READY=1 plus a STATUS= line shown by `systemctl status`.
bool notify_ready(const std::string& status);
// STATUS= only (e.g. "waiting for 3 of 4 ranks").
bool notify_status(const std::string& status);
// STOPPING=1: shutdown began, so systemd does not count the exit as a crash while it waits.
bool notify_stopping();

// WatchdogSec=: how often to send WATCHDOG=1 (half the unit's watchdog timeout), or zero when
// systemd watches nothing for this process.
std::chrono::microseconds watchdog_interval();
// WATCHDOG=1: the process is alive; systemd restarts it when these stop.
bool notify_watchdog();

}  // namespace unshackle
