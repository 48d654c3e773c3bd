// unshackle-worker: one rank of a worker group. Launch a group of N ranks as one MPI job:
//   mpirun -np N unshackle-worker --model DIR --coordinator HOST:PORT [--group NAME]
// Rank 0 connects to the coordinator and relays its calls to the other ranks (worker/service);
// every rank holds the model and its share of every context's KV (worker/engine).
// Without mpirun it runs as a group of one rank.
//
// Exit codes: 0 the coordinator closed the link or SIGTERM/SIGINT; 2 bad arguments or an
// unloadable model (the message names the option or file); 3 coordinator unreachable, silent
// or it rejected the group; 4 the group broke (a rank died or a collective failed).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>

#include "unshackle/common/check.h"
#include "unshackle/common/sd_notify.h"
#include "unshackle/engine/model_engine.h"
#include "unshackle/service/worker_service.h"
#include "unshackle/service/wire.h"
#if UNS_HAVE_MPI
#include "unshackle/cluster/mpi_communicator.h"
#endif

using namespace unshackle;

namespace {

std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop.store(true); }

// "HOST:PORT" (an IPv6 host in brackets: "[::1]:8001").
void parse_endpoint(const std::string& text, WorkerOptions& options) {
  const size_t colon = text.rfind(':');
  UNS_CHECK(colon != std::string::npos && colon > 0 && colon + 1 < text.size(), "--coordinator: expected HOST:PORT (got '{}')",
            text);
  std::string host = text.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  int port = 0;
  try {
    size_t used = 0;
    port = std::stoi(text.substr(colon + 1), &used);
    UNS_CHECK(used == text.size() - colon - 1, "--coordinator: '{}' is not a port", text.substr(colon + 1));
  } catch (const std::logic_error&) {
    port = -1;
  }
  UNS_CHECK(port > 0 && port < 65536, "--coordinator: port must be in 1..65535 (got '{}')", text.substr(colon + 1));
  options.coordinator_host = host;
  options.coordinator_port = static_cast<uint16_t>(port);
}

}  // namespace

#if defined(__SANITIZE_ADDRESS__)
// ASan builds only (UNS_SANITIZE, tests/sanitize): OpenMPI's components allocate at MPI_Init and
// are dlclose'd at MPI_Finalize, so at exit the fast unwinder's leak stacks end in "<unknown
// module>" and tests/sanitize/lsan.supp cannot name them. The slow unwinder walks on into
// libmpi, which the suppressions name. Only the worker pays for it (few, large allocations).
extern "C" const char* __asan_default_options() { return "fast_unwind_on_malloc=0"; }
#endif

int main(int argc, char** argv) {
  CLI::App app{"unshackle-worker: one rank of an Unshackle worker group (launch N ranks with mpirun -np N)"};
  ModelEngineOptions engine_options;
  WorkerOptions worker_options;
  std::string coordinator;
  int64_t heartbeat_ms = 1000, coordinator_timeout_ms = 10000, connect_timeout_ms = 30000;
  double collective_timeout_s = 60;
  app.add_option("--model", engine_options.model_dir, "checkpoint directory (config.json, *.safetensors, tokenizer)")
      ->required();
  app.add_option("--coordinator", coordinator, "the coordinator's worker endpoint HOST:PORT (its --worker-port)")->required();
  app.add_option("--group", worker_options.group, "group name, unique per coordinator")->capture_default_str();
  app.add_option("--model-name", engine_options.name, "served model name (default: the directory's name)");
  app.add_option("--kv-capacity-tokens", engine_options.kv_capacity_tokens,
                 "tokens of KV all contexts of the group may reserve together (0: 4 x max context)")
      ->capture_default_str();
  app.add_option("--max-context-tokens", engine_options.max_context_tokens,
                 "one context's limit, prompt + generated (0: max_position_embeddings)")
      ->capture_default_str();
  app.add_option("--backend", engine_options.backend,
                 "compute backend: cpu, or cuda (rank r uses GPU (node-local rank) % visible GPUs)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--kv-dtype", engine_options.kv_dtype,
                 "storage of K, V and the scoring keys: auto (bf16 with --backend cuda, f32 with cpu), bf16 or f32")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "bf16", "f32"}));
  app.add_option("--compression", engine_options.compression, "ESA compression weights (needed for esa and block modes)");
  app.add_option("--kv-block", engine_options.kv_block, "tokens per KV placement block across ranks")->capture_default_str();
  app.add_option("--chunk", engine_options.chunk, "longest forward pass inside one prefill call")->capture_default_str();
  app.add_option("--attention-share-every", engine_options.attention_share_every,
                 "measure the attention share (initial/selected/window) on a context's first and every N-th decode "
                 "step (0: never)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--heartbeat-ms", heartbeat_ms, "heartbeat period")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--coordinator-timeout-ms", coordinator_timeout_ms, "coordinator silence after which the group exits")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--connect-timeout-ms", connect_timeout_ms, "how long to retry the first connect")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--collective-timeout-s", collective_timeout_s,
                 "longest wait inside one collective (a dead or hung rank is detected after this)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  worker_options.heartbeat = std::chrono::milliseconds(heartbeat_ms);
  worker_options.coordinator_timeout = std::chrono::milliseconds(coordinator_timeout_ms);
  worker_options.connect_timeout = std::chrono::milliseconds(connect_timeout_ms);
  worker_options.stop = &g_stop;
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  std::signal(SIGPIPE, SIG_IGN);

  int rank = 0;
  try {
    parse_endpoint(coordinator, worker_options);
    // The session outlives the communicator (MPI_Comm_free before MPI_Finalize).
#if UNS_HAVE_MPI
    std::unique_ptr<MpiSession> session;
#endif
    std::unique_ptr<Communicator> comm;
#if UNS_HAVE_MPI
    if (MpiSession::launched_by_mpirun()) {
      session = std::make_unique<MpiSession>(&argc, &argv);
      comm = make_mpi_communicator();
    }
#endif
    if (!comm) comm = std::move(make_local_communicators(1).front());
    comm->set_timeout(std::chrono::milliseconds(static_cast<int64_t>(collective_timeout_s * 1000)));
    rank = comm->rank();
    // One GPU per rank on each node: mpirun and srun say which local rank this is.
    engine_options.device_index = rank;
    for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"})
      if (const char* local = std::getenv(name)) {
        engine_options.device_index = std::atoi(local);
        break;
      }
    std::unique_ptr<ModelEngine> engine;
    try {
      engine = std::make_unique<ModelEngine>(engine_options, *comm);
    } catch (const Error& e) {
      std::fprintf(stderr, "unshackle-worker: rank %d: %s\n", rank, wire::plain_message(e).c_str());
      // Every rank loads the same files, so every rank fails alike; exit without the group.
      return e.kind() == ErrorKind::kInvalidArgument || e.kind() == ErrorKind::kNotFound ||
                     e.kind() == ErrorKind::kUnsupported
                 ? 2
                 : 1;
    }
    if (rank == 0) {
      const ModelInfo info = engine->info();
      std::fprintf(stderr,
                   "unshackle-worker: group '%s', %d rank(s), model '%s' (%d layers, vocab %lld), max context %lld "
                   "tokens, KV capacity %lld tokens, backend %s, KV %s\n",
                   worker_options.group.c_str(), comm->size(), info.name.c_str(), info.layers,
                   static_cast<long long>(info.vocab_size), static_cast<long long>(info.max_context_tokens),
                   static_cast<long long>(info.kv_capacity_tokens), engine_options.backend.c_str(),
                   std::string(dtype_name(engine->kv_dtype())).c_str());
    }
    // systemd (Type=notify, deploy/systemd): READY=1 from rank 0 once every rank has loaded the
    // model. Loads may finish minutes apart, so this one barrier waits longer than a collective.
    if (comm->size() > 1) {
      comm->set_timeout(std::chrono::minutes(30));
      comm->barrier();
      comm->set_timeout(std::chrono::milliseconds(static_cast<int64_t>(collective_timeout_s * 1000)));
    }
    if (rank == 0)
      notify_ready(fmt::format("group '{}': {} rank(s) joined, model loaded; serving {}", worker_options.group,
                               comm->size(), coordinator));
    const int code = run_worker_rank(*engine, comm->size() > 1 ? comm.get() : nullptr, worker_options);
    if (rank == 0) std::fprintf(stderr, "unshackle-worker: exiting with code %d\n", code);
    if (code == kWorkerExitGroupBroken) {
      // A peer is gone: MPI_Finalize would wait for it. Leave without it.
      std::fflush(stderr);
      std::_Exit(code);
    }
    return code;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unshackle-worker: rank %d: %s\n", rank, wire::plain_message(e).c_str());
    if (const auto* error = dynamic_cast<const Error*>(&e); error && error->kind() == ErrorKind::kInvalidArgument) return 2;
    return 1;
  }
}
