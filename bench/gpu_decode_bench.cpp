// The collectives' share of a decode step on GPUs (issue 3), and ESA vs full decode of one
// Llama-3-8B-shaped layer over the same sharded KV: one MPI process per GPU, NCCL, the CUDA
// backend, bf16 KV and k' (H = 32, G = 8, d = 128, d' = 128, k = 2048, l_I = 128, l_L = 4096).
// Per context length: median wall time of ContextAttention::forward for one decode token,
// the time inside collectives (LayerStepStats::collective_seconds), and, in the same run, a
// bare NCCL all-gather of the step's two payloads (candidates k x 12 B, partials H x (d+1) x 4 B).
//   mpirun -np P bench_gpu_decode [tokens...]      (default 131072 1048576)
#include <cuda_runtime.h>
#include <curand.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "unshackle/cluster/mpi_communicator.h"
#include "unshackle/cluster/nccl_communicator.h"
#include "unshackle/worker/context_attention.h"

using namespace unshackle;

namespace {

constexpr int kH = 32, kG = 8, kD = 128, kDc = 128;

#define CURAND_OK(expr) \
  do { if ((expr) != CURAND_STATUS_SUCCESS) { std::fprintf(stderr, "curand failed: %s\n", #expr); std::exit(1); } } while (0)

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Result {
  double step_us = 0, collective_us = 0;
};

Result run(AttentionMode mode, int64_t tokens, Backend& backend, Communicator& comm, curandGenerator_t gen,
           const CompressionWeights& weights) {
  AttentionConfig cfg;
  cfg.mode = mode;
  cfg.l_I = 128; cfg.l_L = 4096; cfg.top_k = 2048; cfg.eps = 1;
  ContextAttentionOptions options{.attention = cfg, .layers = 1, .H = kH, .G = kG, .d = kD, .kv_dtype = DType::kBF16,
                                  .kv_block = 256, .inv_freq = rope_inv_freq(kD, 500000.0),
                                  .compression = &weights, .reserve_tokens = tokens + 1024};
  ContextAttention attention(backend, comm, options);
  const int64_t chunk = 65536;
  BackendBuffer k(backend, static_cast<size_t>(chunk) * kG * kD * 4), v(backend, static_cast<size_t>(chunk) * kG * kD * 4);
  for (int64_t t = 0; t < tokens; t += chunk) {  // every rank generates the same rows (same seed)
    const int64_t n = std::min(chunk, tokens - t);
    CURAND_OK(curandSetPseudoRandomGeneratorSeed(gen, 1000 + static_cast<unsigned long long>(t)));
    CURAND_OK(curandGenerateNormal(gen, k.as<float>(), static_cast<size_t>(n) * kG * kD, 0.0f, 1.0f));
    CURAND_OK(curandGenerateNormal(gen, v.as<float>(), static_cast<size_t>(n) * kG * kD, 0.0f, 1.0f));
    cudaDeviceSynchronize();
    attention.load_kv(0, k.as<float>(), v.as<float>(), n);
    attention.commit_chunk(n);
  }
  BackendBuffer q(backend, kH * kD * 4), o(backend, kH * kD * 4);
  CURAND_OK(curandGenerateNormal(gen, q.as<float>(), kH * kD, 0.0f, 1.0f));
  std::vector<double> step, collective;
  for (int i = 0; i < 40; ++i) {
    comm.barrier();
    const auto start = std::chrono::steady_clock::now();
    attention.forward(0, q.as<float>(), k.as<float>(), v.as<float>(), 1, o.as<float>());
    backend.synchronize();
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    attention.commit_chunk(1);
    if (i >= 10) {  // warm-up first
      step.push_back(us);
      collective.push_back(attention.last_stats(0).collective_seconds * 1e6);
    }
  }
  return {median(step), median(collective)};
}

double bare_all_gather_us(Communicator& comm, Backend& backend, size_t bytes) {
  BackendBuffer send(backend, bytes), recv(backend, bytes * static_cast<size_t>(comm.size()));
  std::vector<double> times;
  for (int i = 0; i < 60; ++i) {
    comm.barrier();
    const auto start = std::chrono::steady_clock::now();
    comm.all_gather(send.data(), recv.data(), bytes);
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    if (i >= 10) times.push_back(us);
  }
  return median(times);
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession session(&argc, &argv);
  auto host = make_mpi_communicator();
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    if (host->rank() == 0) std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  std::vector<int64_t> lengths;
  for (int i = 1; i < argc; ++i) lengths.push_back(std::atoll(argv[i]));
  if (lengths.empty()) lengths = {131072, 1048576};
  const int device = host->rank() % devices;
  auto comm = make_nccl_communicator(host->rank(), host->size(), nccl_id_over(*host), device);
  auto backend = make_cuda_backend(device);
  curandGenerator_t gen;
  CURAND_OK(curandCreateGenerator(&gen, CURAND_RNG_PSEUDO_PHILOX4_32_10));
  CompressionWeights weights;  // random projections of the right shape (timing only)
  weights.d_c = kDc;
  weights.wq.emplace_back(static_cast<size_t>(kDc) * kH * kD);
  weights.wk.emplace_back(static_cast<size_t>(kDc) * kG * kD);
  uint64_t x = 88172645463325252ull;
  for (auto* w : {&weights.wq[0], &weights.wk[0]})
    for (auto& value : *w) {
      x ^= x << 13; x ^= x >> 7; x ^= x << 17;
      value = static_cast<float>(static_cast<double>(x >> 11) / 9007199254740992.0 - 0.5) * 0.05f;
    }
  const double gather_candidates = bare_all_gather_us(*comm, *backend, 2048 * 12);
  const double gather_partials = bare_all_gather_us(*comm, *backend, kH * (kD + 1) * 4);
  if (host->rank() == 0) {
    std::printf("device %s, %d ranks (NCCL), bf16 KV, one layer, decode (l_C = 1)\n", backend->name().c_str(), host->size());
    std::printf("bare NCCL all-gather: candidates %d B/rank %.1f us; partials %d B/rank %.1f us\n", 2048 * 12,
                gather_candidates, kH * (kD + 1) * 4, gather_partials);
    std::printf("%-10s %-6s %12s %16s %10s %18s\n", "tokens", "mode", "step us", "collectives us", "share", "bare gathers us");
  }
  for (int64_t tokens : lengths) {
    for (AttentionMode mode : {AttentionMode::kEsa, AttentionMode::kFull}) {
      const Result r = run(mode, tokens, *backend, *comm, gen, weights);
      if (host->rank() == 0)
        std::printf("%-10lld %-6s %12.1f %16.1f %9.0f%% %18.1f\n", static_cast<long long>(tokens),
                    std::string(mode_name(mode)).c_str(), r.step_us, r.collective_us, 100 * r.collective_us / r.step_us,
                    mode == AttentionMode::kEsa ? gather_candidates + gather_partials : gather_partials);
      std::fflush(stdout);
    }
  }
  curandDestroyGenerator(gen);
  return 0;
}
