// The distributed layer step on GPUs: one MPI process per GPU, NCCL communicators
// bootstrapped over MPI, the CUDA backend, every scenario of scenario.h. Each rank checks
// its results against the CPU oracle (selected and evicted sets exactly; output within
// 1e-4 relative: the CUDA kernels accumulate in fp32, the oracle in double). Prints
// "N passed, N failed" on rank 0. Run: mpirun -np 2 worker_nccl_step [--mpi]
// With --kill-last-rank (run under mpirun --enable-recovery): after the scenarios the last
// rank SIGKILLs itself mid-run; every survivor's next layer step must fail within the NCCL
// communicator's timeout (5 s here) instead of hanging, and the survivors say so.
#include <cuda_runtime.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>

#include <cstdio>
#include <string>

#include "scenario.h"
#include "unshackle/cluster/mpi_communicator.h"
#include "unshackle/cluster/nccl_communicator.h"

using namespace unshackle;
using namespace unshackle::testing;

int main(int argc, char** argv) {
  MpiSession session(&argc, &argv);
  auto host = make_mpi_communicator();
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    if (host->rank() == 0) std::printf("SKIPPED: no CUDA device\n0 passed, 0 failed\n");
    return 0;
  }
  const int device = host->rank() % devices;
  // --mpi: the ranks talk through the MPI (host) communicator instead of NCCL, so several
  // ranks can share one GPU (NCCL refuses two ranks on one device); ContextAttention then
  // stages its collectives through host memory.
  const bool over_mpi = argc > 1 && std::strcmp(argv[1], "--mpi") == 0;
  std::unique_ptr<Communicator> nccl;
  if (!over_mpi) nccl = make_nccl_communicator(host->rank(), host->size(), nccl_id_over(*host), device);
  Communicator* comm = over_mpi ? host.get() : nccl.get();
  auto backend = make_cuda_backend(device);
  int passed = 0, failed = 0;
  for (Scenario s : all_scenarios()) {
    s.d = 64;  // the CUDA attention kernel takes head dims 64 and 128
    std::string problem;
    double worst = 0;
    try {
      // Inputs go to the device; run_scenario works in backend memory through host vectors,
      // so stage them here.
      const CompressionWeights cw = s.compression();
      ContextAttentionOptions options{.attention = s.config, .layers = s.layers, .H = s.H, .G = s.G, .d = s.d,
                                      .kv_dtype = DType::kF32, .kv_block = s.kv_block,
                                      .inv_freq = rope_inv_freq(s.d, s.rope_theta), .compression = &cw};
      ContextAttention attention(*backend, *comm, options);
      std::vector<std::vector<int64_t>> evicted(static_cast<size_t>(s.layers));
      int64_t p = 0;
      for (size_t step = 0; step < s.chunks.size() && problem.empty(); ++step) {
        const int64_t l_C = s.chunks[step];
        for (int layer = 0; layer < s.layers && problem.empty(); ++layer) {
          const auto q = s.rows(layer, 0, p, l_C), k = s.rows(layer, 1, p, l_C), v = s.rows(layer, 2, p, l_C);
          BackendBuffer dq(*backend, q.size() * 4), dk(*backend, k.size() * 4), dv(*backend, v.size() * 4),
              dout(*backend, q.size() * 4);
          backend->copy_to_backend(dq.data(), q.data(), q.size() * 4);
          backend->copy_to_backend(dk.data(), k.data(), k.size() * 4);
          backend->copy_to_backend(dv.data(), v.data(), v.size() * 4);
          attention.forward(layer, dq.as<float>(), dk.as<float>(), dv.as<float>(), l_C, dout.as<float>());
          std::vector<float> o(q.size());
          backend->copy_to_host(o.data(), dout.data(), o.size() * 4);
          const StepResult want = oracle_step(s, p, l_C, layer);
          auto& ev = evicted[static_cast<size_t>(layer)];
          const auto& stats = attention.last_stats(layer);
          ev.insert(ev.end(), stats.evicted.begin(), stats.evicted.end());
          std::sort(ev.begin(), ev.end());
          const double err = relative_error(o, want.o);
          worst = std::max(worst, err);
          if (stats.selected != want.selected) problem = "selected differs";
          else if (ev != want.evicted) problem = "evicted differs";
          else if (!(err < 1e-4)) problem = "relative error " + std::to_string(err);
          if (!problem.empty()) problem += " at step " + std::to_string(step) + " layer " + std::to_string(layer);
        }
        attention.commit_chunk(l_C);
        p += l_C;
      }
    } catch (const std::exception& e) {
      problem = std::string("exception: ") + e.what();
    }
    int64_t bad = problem.empty() ? 0 : 1;
    host->all_reduce(&bad, &bad, 1, DType::kI64, ReduceOp::kSum);
    if (!problem.empty()) std::fprintf(stderr, "rank %d: %s: %s\n", host->rank(), s.name().c_str(), problem.c_str());
    (bad == 0 ? passed : failed) += 1;
    if (host->rank() == 0)
      std::printf("%-18s P=%d %s+%s: %s (max rel err %.2e)\n", s.name().c_str(), host->size(), comm->name().c_str(), backend->name().c_str(),
                  bad == 0 ? "ok" : "FAILED", worst);
  }
  if (argc > 1 && std::strcmp(argv[1], "--kill-last-rank") == 0) {
    std::fflush(stdout);
    auto fragile = make_nccl_communicator(host->rank(), host->size(), nccl_id_over(*host), device,
                                          std::chrono::seconds(5));
    Scenario s = all_scenarios().at(2);
    s.d = 64;
    s.layers = 1;
    const CompressionWeights cw = s.compression();
    ContextAttention attention(*backend, *fragile,
                               ContextAttentionOptions{.attention = s.config, .layers = 1, .H = s.H, .G = s.G, .d = s.d,
                                                       .kv_block = s.kv_block, .inv_freq = rope_inv_freq(s.d, 1e4),
                                                       .compression = &cw});
    const auto q = s.rows(0, 0, 0, 64), k = s.rows(0, 1, 0, 64), v = s.rows(0, 2, 0, 64);
    BackendBuffer dq(*backend, q.size() * 4), dk(*backend, k.size() * 4), dv(*backend, v.size() * 4), dout(*backend, q.size() * 4);
    backend->copy_to_backend(dq.data(), q.data(), q.size() * 4);
    backend->copy_to_backend(dk.data(), k.data(), k.size() * 4);
    backend->copy_to_backend(dv.data(), v.data(), v.size() * 4);
    attention.forward(0, dq.as<float>(), dk.as<float>(), dv.as<float>(), 64, dout.as<float>());  // a good step
    attention.commit_chunk(64);
    if (host->rank() == host->size() - 1) raise(SIGKILL);
    const auto start = std::chrono::steady_clock::now();
    std::string error;
    try {
      attention.forward(0, dq.as<float>(), dk.as<float>(), dv.as<float>(), 1, dout.as<float>());
    } catch (const std::exception& e) {
      error = e.what();
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const bool ok = !error.empty() && seconds < 20;
    std::printf("rank %d: after the last rank died, the step failed after %.2f s: %s\n", host->rank(), seconds,
                error.c_str());
    if (host->rank() == 0) std::printf("%d passed, %d failed\n", passed + (ok ? 1 : 0), failed + (ok ? 0 : 1));
    std::fflush(stdout);
    _exit(failed == 0 && ok ? 0 : 1);  // MPI_Finalize would wait for the dead rank
  }
  if (host->rank() == 0) std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
