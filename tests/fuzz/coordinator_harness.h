// The coordinator's parts as the service wires them, without workers: the registry never
// listens, so no group ever registers and every request that would become a job ends in
// 503 no_ready_group inside Scheduler::submit (after its validation). Nothing can wait for a
// worker, so a fuzz input never blocks.
#pragma once

#include <boost/asio/io_context.hpp>
#include <nlohmann/json.hpp>

#include "fuzz_check.h"
#include "unshackle/coordinator/routes.h"

namespace unshackle::fuzz {

struct Coordinator {
  boost::asio::io_context ioc;  // never run: nothing listens
  coord::Metrics metrics;
  coord::Registry registry{ioc, coord::RegistryOptions{}, metrics};
  coord::Scheduler scheduler{registry, metrics, coord::SchedulerOptions{}};

  // One per process (never destroyed: no order problems at exit). Per input the harnesses
  // make a fresh BatchStore and Router, so files from one input do not pile up.
  static Coordinator& get() {
    static Coordinator* instance = new Coordinator();
    return *instance;
  }
};

// What every response must be: a real status (no 500: bad input is the client's error, so an
// internal error means input reached code that did not validate it), JSON bodies that parse,
// and the OpenAI error envelope on every error.
inline void check_response(const coord::HttpResponse& r) {
  FUZZ_CHECK(r.status >= 200 && r.status < 600, "status {}", r.status);
  FUZZ_CHECK(r.status != 500, "internal error for client input: {}", r.body);
  for (const auto& [name, value] : r.headers) FUZZ_CHECK(!name.empty(), "empty header name (value '{}')", value);
  if (r.content_type != "application/json") return;
  const nlohmann::json body = nlohmann::json::parse(r.body, nullptr, false);
  FUZZ_CHECK(!body.is_discarded(), "the body is not JSON: {}", r.body);
  if (r.status < 400) return;
  FUZZ_CHECK(body.is_object() && body.contains("error") && body["error"].is_object(), "no error envelope: {}", r.body);
  const nlohmann::json& e = body["error"];
  FUZZ_CHECK(e.contains("message") && e["message"].is_string() && e.contains("type") && e["type"].is_string() &&
                 e.contains("param") && e.contains("code"),
             "incomplete error envelope: {}", r.body);
}

// A router reply: without workers it is always a response (a job would need a group).
inline void check_reply(const coord::Reply& reply) {
  FUZZ_CHECK(reply.mode == coord::Reply::Mode::kResponse && !reply.job, "a job was admitted without a worker group");
  check_response(reply.response);
}

}  // namespace unshackle::fuzz
