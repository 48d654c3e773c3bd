// unshackle-coordinator: the HTTP API, the scheduler, the registry of worker groups and the
// metrics, on one io_context (one I/O thread) plus one driver thread per worker group.
#include <CLI/CLI.hpp>
#include <boost/asio/signal_set.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>

#include "unshackle/common/sd_notify.h"
#include "unshackle/coordinator/http_server.h"
#include "unshackle/service/wire.h"

using namespace unshackle;
using namespace unshackle::coord;

int main(int argc, char** argv) {
  CLI::App app{"unshackle-coordinator: HTTP API and scheduler for Unshackle worker groups"};
  std::string host = "127.0.0.1", worker_host = "127.0.0.1", api_key, port_file;
  uint16_t port = 8000, worker_port = 8001;
  size_t max_queued = 64;
  int64_t prefill_chunk = 512, heartbeat_ms = 1000, heartbeat_timeout_ms = 5000;
  double step_timeout_s = 600, io_timeout_s = 30, idle_timeout_s = 120;
  uint64_t max_body_bytes = uint64_t{64} << 20, max_store_bytes = uint64_t{1} << 30;
  std::string attention_json, state_dir;
  app.add_option("--host", host, "HTTP listen address")->capture_default_str();
  app.add_option("--port", port, "HTTP port (0: any free port, see --port-file)")->capture_default_str();
  app.add_option("--worker-host", worker_host, "address worker groups connect to")->capture_default_str();
  app.add_option("--worker-port", worker_port, "port worker groups connect to (0: any)")->capture_default_str();
  app.add_option("--api-key", api_key, "Bearer key required on every route but /health (default: $UNSHACKLE_API_KEY)");
  app.add_option("--port-file", port_file, "write {\"http\":P,\"worker\":Q} here once listening");
  app.add_option("--max-queued", max_queued, "waiting requests before 429")->capture_default_str();
  app.add_option("--prefill-chunk", prefill_chunk, "tokens per prefill step")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--heartbeat-ms", heartbeat_ms, "heartbeat period")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--heartbeat-timeout-ms", heartbeat_timeout_ms, "silence that marks a worker group down")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--step-timeout-s", step_timeout_s, "longest one worker call may take")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--io-timeout-s", io_timeout_s, "HTTP timeout: a whole request from its first byte (else 408), each write")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--idle-timeout-s", idle_timeout_s, "keep-alive connection's wait for the next request's first byte")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--max-body-bytes", max_body_bytes, "request body limit")->capture_default_str();
  app.add_option("--max-file-store-bytes", max_store_bytes, "all uploaded and batch output files together")->capture_default_str();
  app.add_option("--state-dir", state_dir,
                 "keep /v1/files and /v1/batches here so a restarted coordinator has them (default: memory only)");
  app.add_option("--attention", attention_json, "default attention settings as JSON, e.g. '{\"mode\":\"esa\",\"top_k\":2048}'");
  CLI11_PARSE(app, argc, argv);
  if (api_key.empty())
    if (const char* env = std::getenv("UNSHACKLE_API_KEY")) api_key = env;

  try {
    AttentionConfig attention;
    if (!attention_json.empty()) {
      const auto parsed = nlohmann::json::parse(attention_json, nullptr, false);
      if (parsed.is_discarded()) throw Error(ErrorKind::kInvalidArgument, "--attention: not valid JSON");
      attention = wire::attention_from_json(parsed, AttentionConfig{}, "--attention ");
    }
    boost::asio::io_context ioc{1};
    Metrics metrics;
    RegistryOptions registry_options;
    registry_options.heartbeat = std::chrono::milliseconds(heartbeat_ms);
    registry_options.heartbeat_timeout = std::chrono::milliseconds(heartbeat_timeout_ms);
    Registry registry(ioc, registry_options, metrics);
    SchedulerOptions scheduler_options;
    scheduler_options.max_queued = max_queued;
    scheduler_options.prefill_chunk = prefill_chunk;
    scheduler_options.step_timeout = std::chrono::milliseconds(static_cast<int64_t>(step_timeout_s * 1000));
    Scheduler scheduler(registry, metrics, scheduler_options);
    scheduler.attach();
    BatchOptions batch_options;
    batch_options.max_store_bytes = max_store_bytes;
    batch_options.default_attention = attention;
    batch_options.state_dir = state_dir;
    BatchStore batches(scheduler, batch_options);
    batches.start();
    RouterOptions router_options;
    router_options.api_key = api_key;
    router_options.max_body_bytes = max_body_bytes;
    router_options.default_attention = attention;
    Router router(scheduler, registry, metrics, batches, router_options);
    HttpOptions http_options;
    http_options.io_timeout = std::chrono::milliseconds(static_cast<int64_t>(io_timeout_s * 1000));
    http_options.idle_timeout = std::chrono::milliseconds(static_cast<int64_t>(idle_timeout_s * 1000));
    http_options.body_limit = max_body_bytes;
    HttpServer server(ioc, router, scheduler, http_options);

    const uint16_t http_port = server.listen(host, port);
    const uint16_t bound_worker_port = registry.listen(worker_host, worker_port);
    std::fprintf(stderr, "unshackle-coordinator: HTTP on %s:%u, workers on %s:%u, auth %s\n", host.c_str(), http_port,
                 worker_host.c_str(), bound_worker_port, api_key.empty() ? "off" : "on");
    if (!port_file.empty()) {
      const std::string tmp = port_file + ".tmp";
      std::ofstream(tmp) << fmt::format("{{\"http\":{},\"worker\":{}}}\n", http_port, bound_worker_port);
      std::rename(tmp.c_str(), port_file.c_str());
    }
    notify_ready(fmt::format("HTTP on {}:{}, workers on {}:{}", host, http_port, worker_host, bound_worker_port));
    // WatchdogSec= in the unit: WATCHDOG=1 from the I/O thread, so a stuck event loop is restarted.
    boost::asio::steady_timer watchdog(ioc);
    std::function<void()> ping = [&, every = watchdog_interval()] {
      if (every.count() == 0) return;
      notify_watchdog();
      watchdog.expires_after(every);
      watchdog.async_wait([&](const boost::system::error_code& ec) {
        if (!ec) ping();
      });
    };
    ping();
    boost::asio::signal_set signals(ioc, SIGINT, SIGTERM);
    signals.async_wait([&](const boost::system::error_code&, int) {
      std::fprintf(stderr, "unshackle-coordinator: shutting down\n");
      notify_stopping();
      watchdog.cancel();
      server.stop();
      registry.stop();
      boost::asio::post(ioc, [&] { ioc.stop(); });
    });
    ioc.run();
    batches.stop();
    scheduler.stop();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unshackle-coordinator: %s\n", wire::plain_message(e).c_str());
    return 1;
  }
}
