// Whole-model attention steps on GPUs through ContextAttention (issue 5, benchmarks 2-4),
// Llama-3-8B shape: 32 layers, H = 32, G = 8, d = 128, d' = 128, bf16 KV and k', ESA with
// l_I = 128, l_L = 4096, k = 2048, eps = 1. One MPI process per GPU, NCCL, the CUDA backend.
//
//   mpirun -np P bench_gpu_step decode N [distinct_layers]
//     One decode token through all 32 layers (32 layer steps) at a context of N tokens, ESA
//     and `full` over the same sharded KV, median of 5 after warm-up. KV of all 32 layers
//     at 1M tokens (146 GB with k') does not fit one H200, so `distinct_layers` (default 8)
//     layers hold distinct KV and the 32 layer steps are 32 / distinct_layers tokens x
//     distinct_layers layers; each layer's KV (4.3 GB at 1M) is far above L2 (60 MB), so
//     every step reads its rows from HBM as a real 32-layer model would.
//     Bytes per step (per rank, n = N / P): full 32 * n * 4096 B; ESA 32 * (n * 256 B of k'
//     + 6272 * 4096 B / P of rows). Next to the wall time: the host time of the launch loop,
//     the GPU time (CUDA events on the backend's stream) and, on one rank, the GPU time with
//     every launch queued ahead (no launch gaps: what a CUDA graph of the step could reach).
//   mpirun -np P bench_gpu_step prefill N [layers]
//     Prefill of N tokens in 512-token chunks through `layers` (default 1) layers, ESA; the
//     32-layer figure is 32 / layers times it (layers are independent and identical in cost).
//   mpirun -np P bench_gpu_step breakdown N
//     Where an ESA decode layer step's wall time goes: ContextAttention runs on a decorator of
//     the CUDA backend that times every backend call on the host, once as is (the time the host
//     spends inside each call: blocking copies and synchronisations show up) and once with a
//     stream synchronisation after every call (each op's own launch-to-finish time). Both modes
//     run with record_selection off, as the service does.
//   mpirun -np P bench_gpu_step capacity [weights_GB]
//     The longest ESA context whose 32 layers of KV, k' and token tables fit next to
//     `weights_GB` (default 16) of allocated model weights: estimated from the shard's bytes
//     per token and the free memory, then actually reserved, loaded and run for one 32-layer
//     decode step; on failure 3% shorter, up to 4 tries.
#include <cuda_runtime.h>
#include <curand.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "unshackle/cluster/mpi_communicator.h"
#include "unshackle/cluster/nccl_communicator.h"
#include "unshackle/common/check.h"
#include "unshackle/worker/context_attention.h"

using namespace unshackle;

namespace {

constexpr int kLayers = 32, kH = 32, kG = 8, kD = 128, kDc = 128;
constexpr int64_t kLoadChunk = 65536, kPrefillChunk = 512;

#define CURAND_OK(expr) \
  do { if ((expr) != CURAND_STATUS_SUCCESS) { std::fprintf(stderr, "curand failed: %s\n", #expr); std::exit(1); } } while (0)

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

CompressionWeights random_weights(int layers) {  // random projections of the right shape (timing only)
  CompressionWeights weights;
  weights.d_c = kDc;
  uint64_t x = 88172645463325252ull;
  for (int l = 0; l < layers; ++l) {
    weights.wq.emplace_back(static_cast<size_t>(kDc) * kH * kD);
    weights.wk.emplace_back(static_cast<size_t>(kDc) * kG * kD);
    for (auto* w : {&weights.wq.back(), &weights.wk.back()})
      for (auto& value : *w) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        value = static_cast<float>(static_cast<double>(x >> 11) / 9007199254740992.0 - 0.5) * 0.05f;
      }
  }
  return weights;
}

ContextAttentionOptions options_for(AttentionMode mode, int layers, int64_t reserve, const CompressionWeights& weights) {
  AttentionConfig cfg;
  cfg.mode = mode;
  cfg.l_I = 128; cfg.l_L = 4096; cfg.top_k = 2048; cfg.eps = 1;
  // record_selection off, as the service runs: the decode step never reads M_k back.
  return {.attention = cfg, .layers = layers, .H = kH, .G = kG, .d = kD, .kv_dtype = DType::kBF16, .kv_block = 256,
          .inv_freq = rope_inv_freq(kD, 500000.0), .compression = &weights, .reserve_tokens = reserve,
          .record_selection = false};
}

// Forwards every call to `inner`, adding the host time spent in it (and, with `sync_each`, in a
// stream synchronisation after it) to a per-operation total.
class TimingBackend final : public Backend {
 public:
  struct Total {
    double seconds = 0;
    int64_t calls = 0;
  };
  TimingBackend(Backend& inner, bool sync_each) : inner_(inner), sync_each_(sync_each) {}
  std::map<std::string, Total> totals;

  std::string name() const override { return inner_.name(); }
  MemorySpace memory_space() const override { return inner_.memory_space(); }
  bool supports(Op op, DType dtype, int dim) const override { return inner_.supports(op, dtype, dim); }
  void* allocate(size_t bytes) override { return timed("allocate", [&] { return inner_.allocate(bytes); }); }
  void deallocate(void* ptr) override { timed("deallocate", [&] { inner_.deallocate(ptr); }); }
  void copy_to_backend(void* dst, const void* src, size_t bytes) override {
    timed("copy_to_backend", [&] { inner_.copy_to_backend(dst, src, bytes); });
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    timed("copy_to_host", [&] { inner_.copy_to_host(dst, src, bytes); });
  }
  void copy_within(void* dst, const void* src, size_t bytes) override {
    timed("copy_within", [&] { inner_.copy_within(dst, src, bytes); });
  }
  void synchronize() override { timed("synchronize", [&] { inner_.synchronize(); }); }
  void* native_stream() const override { return inner_.native_stream(); }
  void convert(const void* src, DType s, void* dst, DType d, size_t count) override {
    timed("convert", [&] { inner_.convert(src, s, dst, d, count); });
  }
  void compress_query(const CompressQueryParams& p) override { timed("compress_query", [&] { inner_.compress_query(p); }); }
  void compress_keys(const CompressKeysParams& p) override { timed("compress_keys", [&] { inner_.compress_keys(p); }); }
  void score_query_max(const ScoreParams& p) override { timed("score_query_max", [&] { inner_.score_query_max(p); }); }
  void score_chunk(const ScoreParams& p) override { timed("score_chunk", [&] { inner_.score_chunk(p); }); }
  void proximity(const ProximityParams& p) override { timed("proximity", [&] { inner_.proximity(p); }); }
  void top_k(const TopKParams& p) override { timed("top_k", [&] { inner_.top_k(p); }); }
  void attend(const AttendParams& p) override {
    timed(p.rows ? "attend (rows list)" : "attend (contiguous)", [&] { inner_.attend(p); });
  }
  void merge(const MergeParams& p) override { timed("merge", [&] { inner_.merge(p); }); }
  void rows_of_tokens(const RowsOfTokensParams& p) override { timed("rows_of_tokens", [&] { inner_.rows_of_tokens(p); }); }
  void lag_reference_extrema(const LagExtremaParams& p) override {
    timed("lag_reference_extrema", [&] { inner_.lag_reference_extrema(p); });
  }
  void lag_token_std(const LagStdParams& p) override { timed("lag_token_std", [&] { inner_.lag_token_std(p); }); }
  void lag_partition_scores(const LagScoreParams& p) override {
    timed("lag_partition_scores", [&] { inner_.lag_partition_scores(p); });
  }

 private:
  template <typename F>
  auto timed(const char* what, F&& call) -> decltype(call()) {
    const auto start = Clock::now();
    struct Finish {  // runs after `call` returned (also for void calls)
      TimingBackend& self;
      const char* what;
      Clock::time_point start;
      ~Finish() {
        if (self.sync_each_) self.inner_.synchronize();
        Total& t = self.totals[what];
        t.seconds += seconds_since(start);
        ++t.calls;
      }
    } finish{*this, what, start};
    return call();
  }
  Backend& inner_;
  bool sync_each_;
};

// Scratch inputs in device memory: k, v of `rows` tokens and q, o of `q_rows` (float32, as the
// model passes them; loading needs no q).
struct Inputs {
  Inputs(Backend& backend, int64_t rows, int64_t q_rows)
      : k(backend, static_cast<size_t>(rows) * kG * kD * 4), v(backend, static_cast<size_t>(rows) * kG * kD * 4),
        q(backend, static_cast<size_t>(q_rows) * kH * kD * 4), o(backend, static_cast<size_t>(q_rows) * kH * kD * 4) {}
  void fill(curandGenerator_t gen, uint64_t seed, int64_t rows) {
    CURAND_OK(curandSetPseudoRandomGeneratorSeed(gen, seed));
    CURAND_OK(curandGenerateNormal(gen, k.as<float>(), static_cast<size_t>(rows) * kG * kD, 0.0f, 1.0f));
    CURAND_OK(curandGenerateNormal(gen, v.as<float>(), static_cast<size_t>(rows) * kG * kD, 0.0f, 1.0f));
    if (q.bytes()) CURAND_OK(curandGenerateNormal(gen, q.as<float>(), q.bytes() / 4, 0.0f, 1.0f));
  }
  BackendBuffer k, v, q, o;
};

// Every rank generates the same rows (same seeds) and keeps the ones it owns.
void load_context(ContextAttention& attention, Backend& backend, curandGenerator_t gen, int64_t tokens) {
  const int layers = attention.options().layers;
  Inputs in(backend, kLoadChunk, 0);
  for (int64_t t = 0; t < tokens; t += kLoadChunk) {
    const int64_t n = std::min(kLoadChunk, tokens - t);
    for (int l = 0; l < layers; ++l) {
      in.fill(gen, 1000 + static_cast<uint64_t>(t) * 64 + static_cast<uint64_t>(l), n);
      UNS_CHECK(cudaDeviceSynchronize() == cudaSuccess, "curand fill failed");
      attention.load_kv(l, in.k.as<float>(), in.v.as<float>(), n);
    }
    attention.commit_chunk(n);
  }
}

// The times of one 32-layer decode step, all on the host clock except `gpu`:
//  host  the launch loop itself (the 32 forward calls, before any synchronisation);
//  wall  from the first launch until the backend's stream is done;
//  gpu   CUDA events on the backend's stream around the step: from the first queued op to the
//        end of the last, idle gaps while the device waits for launches included.
// host close to gpu means the step is bound by launching (host code), not by the device.
struct StepTimes {
  double host = 0, wall = 0, gpu = 0;  // seconds
  bool valid = true;                   // gated: no wait inside the step held the gate open
};

// With `gated`, every launch of the step is queued before the device starts: the stream
// first waits for an event behind a host function that holds until the loop has queued the
// whole step, so `gpu` is the device time without launch gaps (what a CUDA graph of the step
// could reach). Only for steps that never wait for the device themselves (one rank: no
// collectives; no read-back of the selection): a wait inside would wait for the gate, which a
// 2 s watchdog then opens, and the run is reported invalid.
struct Gate {
  std::mutex mutex;
  std::condition_variable opened;
  bool open = false;
};

void CUDART_CB hold_gate(void* arg) {
  auto* gate = static_cast<Gate*>(arg);
  std::unique_lock<std::mutex> lock(gate->mutex);
  gate->opened.wait_for(lock, std::chrono::seconds(2), [&] { return gate->open; });
}

#define CUDA_OK(expr) UNS_CHECK((expr) == cudaSuccess, "CUDA call failed: {}", #expr)

StepTimes decode_step(ContextAttention& attention, Backend& backend, Communicator& comm, Inputs& in,
                      bool gated = false) {
  const int layers = attention.options().layers;
  auto* stream = static_cast<cudaStream_t>(backend.native_stream());
  comm.barrier();
  backend.synchronize();
  cudaEvent_t begin = nullptr, end = nullptr, gate_event = nullptr;
  cudaStream_t side = nullptr;
  Gate gate;
  CUDA_OK(cudaEventCreate(&begin));
  CUDA_OK(cudaEventCreate(&end));
  if (gated) {
    CUDA_OK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
    CUDA_OK(cudaEventCreateWithFlags(&gate_event, cudaEventDisableTiming));
    CUDA_OK(cudaLaunchHostFunc(side, hold_gate, &gate));
    CUDA_OK(cudaEventRecord(gate_event, side));
    CUDA_OK(cudaStreamWaitEvent(stream, gate_event, 0));
  }
  CUDA_OK(cudaEventRecord(begin, stream));
  const auto start = Clock::now();
  for (int step = 0; step < kLayers;) {
    for (int l = 0; l < layers && step < kLayers; ++l, ++step)
      attention.forward(l, in.q.as<float>(), in.k.as<float>(), in.v.as<float>(), 1, in.o.as<float>());
    attention.commit_chunk(1);
  }
  StepTimes t;
  t.host = seconds_since(start);
  CUDA_OK(cudaEventRecord(end, stream));
  if (gated) {
    t.valid = t.host < 1.0;  // the watchdog did not have to open the gate during the loop
    {
      std::lock_guard<std::mutex> lock(gate.mutex);
      gate.open = true;
    }
    gate.opened.notify_all();
  }
  backend.synchronize();
  t.wall = seconds_since(start);
  float ms = 0;
  CUDA_OK(cudaEventElapsedTime(&ms, begin, end));
  t.gpu = ms * 1e-3;
  if (gated) {
    CUDA_OK(cudaStreamSynchronize(side));
    cudaStreamDestroy(side);
    cudaEventDestroy(gate_event);
  }
  cudaEventDestroy(begin);
  cudaEventDestroy(end);
  return t;
}

void run_decode(int64_t tokens, int distinct, Backend& backend, Communicator& comm, curandGenerator_t gen) {
  UNS_CHECK(distinct > 0 && kLayers % distinct == 0, "distinct layers must divide 32");
  const CompressionWeights weights = random_weights(distinct);
  const bool root = comm.rank() == 0;
  if (root)
    std::printf("decode: context %lld tokens, %d ranks, 32 layer steps (%d distinct layers x %d tokens), bf16 KV; "
                "record_selection off (as the service runs)\n"
                "  host = the launch loop (host clock, before any sync); gpu = CUDA events on the backend's stream "
                "around the step; queued = gpu with every launch queued before the device starts (1 rank only)\n",
                static_cast<long long>(tokens), comm.size(), distinct, kLayers / distinct);
  double esa_ms = 0;
  for (AttentionMode mode : {AttentionMode::kEsa, AttentionMode::kFull}) {
    const auto load_start = Clock::now();
    ContextAttention attention(backend, comm, options_for(mode, distinct, tokens + 64, weights));
    load_context(attention, backend, gen, tokens);
    Inputs in(backend, 1, 1);
    in.fill(gen, 7, 1);
    const double load_s = seconds_since(load_start);
    std::vector<double> times, host, gpu, collective, queued;
    for (int rep = 0; rep < 6; ++rep) {
      const StepTimes s = decode_step(attention, backend, comm, in);
      if (rep == 0) continue;  // warm-up
      times.push_back(s.wall * 1e3);
      host.push_back(s.host * 1e3);
      gpu.push_back(s.gpu * 1e3);
      double c = 0;
      for (int l = 0; l < distinct; ++l) c += attention.last_stats(l).collective_seconds;
      collective.push_back(c * 1e3 * (kLayers / distinct));
    }
    bool queued_valid = comm.size() == 1;
    for (int rep = 0; rep < 3 && queued_valid; ++rep) {
      const StepTimes s = decode_step(attention, backend, comm, in, /*gated=*/true);
      queued_valid = s.valid;
      queued.push_back(s.gpu * 1e3);
    }
    const double ms = median(times);
    const int64_t n = tokens / comm.size();
    const double bytes = mode == AttentionMode::kFull ? 32.0 * static_cast<double>(n) * 4096
                                                      : 32.0 * (static_cast<double>(n) * 256 + 6272.0 * 4096 / comm.size());
    if (mode == AttentionMode::kEsa) esa_ms = ms;
    if (!root) continue;
    const std::string ratio = mode == AttentionMode::kFull ? " full/ESA " + std::to_string(ms / esa_ms) : "";
    const std::string queued_text =
        comm.size() > 1 ? "n/a (collectives wait)"
                        : queued_valid ? std::to_string(median(queued)) + " ms" : "invalid (the step waited inside)";
    std::printf("  %-5s 32-layer step %9.3f ms (min %.3f, max %.3f; per layer %.1f us) collectives %.3f ms; "
                "bytes/rank %.3f GB -> %.0f GB/s; load %.1f s%s\n"
                "        host %.3f ms (per layer %.1f us), gpu %.3f ms, queued %s\n",
                std::string(mode_name(mode)).c_str(), ms, *std::min_element(times.begin(), times.end()),
                *std::max_element(times.begin(), times.end()), ms * 1e3 / kLayers, median(collective), bytes * 1e-9,
                bytes / (ms * 1e-3) * 1e-9, load_s, ratio.c_str(), median(host), median(host) * 1e3 / kLayers,
                median(gpu), queued_text.c_str());
    std::fflush(stdout);
  }
}

void run_prefill(int64_t tokens, int layers, Backend& backend, Communicator& comm, curandGenerator_t gen) {
  const CompressionWeights weights = random_weights(layers);
  ContextAttention attention(backend, comm, options_for(AttentionMode::kEsa, layers, tokens + 64, weights));
  Inputs in(backend, kPrefillChunk, kPrefillChunk);
  in.fill(gen, 11, kPrefillChunk);  // the same chunk content each time: cost does not depend on values
  std::vector<double> marks;          // seconds at each 1/8 of the context
  comm.barrier();
  const auto start = Clock::now();
  int64_t chunks = 0;
  for (int64_t t = 0; t < tokens; t += kPrefillChunk, ++chunks) {
    const int64_t n = std::min(kPrefillChunk, tokens - t);
    for (int l = 0; l < layers; ++l)
      attention.forward(l, in.q.as<float>(), in.k.as<float>(), in.v.as<float>(), n, in.o.as<float>());
    attention.commit_chunk(n);
    if ((t + n) % std::max<int64_t>(tokens / 8, 1) < n) {
      backend.synchronize();
      marks.push_back(seconds_since(start));
    }
  }
  backend.synchronize();
  const double s = seconds_since(start);
  if (comm.rank() == 0) {
    std::printf("prefill: context %lld tokens, %d ranks, %lld chunks of %lld x %d layer(s): %.3f s; 32 layers: %.2f s "
                "(= 32/%d x measured)\n",
                static_cast<long long>(tokens), comm.size(), static_cast<long long>(chunks),
                static_cast<long long>(kPrefillChunk), layers, s, s * kLayers / layers, layers);
    std::printf("  elapsed at each 1/8 of the context (s):");
    for (double m : marks) std::printf(" %.3f", m);
    std::printf("\n");
  }
  std::fflush(stdout);
}

void run_breakdown(int64_t tokens, Backend& backend, Communicator& comm, curandGenerator_t gen) {
  const CompressionWeights weights = random_weights(1);
  const bool root = comm.rank() == 0;
  for (const bool sync_each : {false, true}) {
    TimingBackend timing(backend, sync_each);
    ContextAttention attention(timing, comm, options_for(AttentionMode::kEsa, 1, tokens + 64, weights));
    load_context(attention, timing, gen, tokens);
    Inputs in(timing, 1, 1);
    in.fill(gen, 7, 1);
    const auto step = [&] {
      attention.forward(0, in.q.as<float>(), in.k.as<float>(), in.v.as<float>(), 1, in.o.as<float>());
      attention.commit_chunk(1);
    };
    for (int i = 0; i < 3; ++i) step();  // warm-up
    timing.synchronize();
    timing.totals.clear();
    constexpr int kSteps = 20;
    comm.barrier();
    const auto start = Clock::now();
    for (int i = 0; i < kSteps; ++i) step();
    const double loop_us = seconds_since(start) * 1e6 / kSteps;  // the host's part, before the final wait
    timing.synchronize();
    const double step_us = seconds_since(start) * 1e6 / kSteps;
    if (!root) continue;
    std::printf("breakdown: ESA decode layer step at %lld tokens, %d rank(s), %s: %.1f us per step (mean of %d; "
                "the host loop alone %.1f us per step)\n",
                static_cast<long long>(tokens), comm.size(),
                sync_each ? "a stream synchronisation after every backend call" : "backend calls as they are", step_us,
                kSteps, loop_us);
    double inside = 0;
    for (const auto& [what, t] : timing.totals) {
      std::printf("  %-22s %6.2f calls/step %9.1f us/step\n", what.c_str(), static_cast<double>(t.calls) / kSteps,
                  t.seconds * 1e6 / kSteps);
      inside += t.seconds;
    }
    std::printf("  %-22s %25.1f us/step (host code between backend calls)\n", "outside backend calls",
                step_us - inside * 1e6 / kSteps);
    std::fflush(stdout);
  }
}

void run_capacity(double weights_gb, Backend& backend, Communicator& comm, curandGenerator_t gen) {
  const CompressionWeights weights = random_weights(kLayers);
  const bool root = comm.rank() == 0;
  double bytes_per_token = 0;
  {
    const int64_t probe = 1 << 20;
    ContextAttention small(backend, comm, options_for(AttentionMode::kEsa, kLayers, probe / 16, weights));
    bytes_per_token = static_cast<double>(small.shard().bytes_reserved()) / static_cast<double>(probe / 16);
  }
  BackendBuffer model_weights(backend, static_cast<size_t>(weights_gb * 1e9));  // stands for the model's weights
  size_t free_bytes = 0, total_bytes = 0;
  UNS_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess, "cudaMemGetInfo");
  const double workspace = 2.0 * (1 << 30);  // decode scratch, top-k and attend workspaces, k/v/q inputs, cuBLAS/NCCL
  int64_t tokens = static_cast<int64_t>((static_cast<double>(free_bytes) - workspace) / bytes_per_token) *
                   comm.size() / 65536 * 65536;
  if (root)
    std::printf("capacity: %.2f GB weights allocated; free %.2f of %.2f GB; shard %.0f B per token per rank (32 layers); "
                "workspace margin %.2f GB -> try %lld tokens\n",
                weights_gb, static_cast<double>(free_bytes) * 1e-9, static_cast<double>(total_bytes) * 1e-9, bytes_per_token, workspace * 1e-9,
                static_cast<long long>(tokens));
  for (int attempt = 0; attempt < 4; ++attempt) {
    try {
      const auto start = Clock::now();
      ContextAttention attention(backend, comm, options_for(AttentionMode::kEsa, kLayers, tokens + 64, weights));
      load_context(attention, backend, gen, tokens);
      Inputs in(backend, 1, 1);
      in.fill(gen, 7, 1);
      const double step = decode_step(attention, backend, comm, in).wall;
      size_t after_free = 0;
      UNS_CHECK(cudaMemGetInfo(&after_free, &total_bytes) == cudaSuccess, "cudaMemGetInfo");
      if (root)
        std::printf("  RAN: %lld tokens (%d ranks), 32-layer ESA decode step %.3f ms after loading in %.1f s; "
                    "shard %.2f GB/rank, free after %.2f GB\n",
                    static_cast<long long>(tokens), comm.size(), step * 1e3, seconds_since(start),
                    static_cast<double>(attention.shard().bytes_reserved()) * 1e-9, static_cast<double>(after_free) * 1e-9);
      std::fflush(stdout);
      return;
    } catch (const std::exception& e) {
      if (root) std::printf("  FAILED at %lld tokens: %s\n", static_cast<long long>(tokens), e.what());
      std::fflush(stdout);
      cudaGetLastError();
      tokens = static_cast<int64_t>(static_cast<double>(tokens) * 0.97) / 65536 * 65536;
    }
  }
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
  const std::string what = argc > 1 ? argv[1] : "decode";
  const int device = host->rank() % devices;
  auto comm = make_nccl_communicator(host->rank(), host->size(), nccl_id_over(*host), device);
  auto backend = make_cuda_backend(device);
  curandGenerator_t gen;
  CURAND_OK(curandCreateGenerator(&gen, CURAND_RNG_PSEUDO_PHILOX4_32_10));
  if (host->rank() == 0) std::printf("bench_gpu_step on %s, %d rank(s)\n", backend->name().c_str(), host->size());
  if (what == "decode") {
    run_decode(argc > 2 ? std::atoll(argv[2]) : 1048576, argc > 3 ? std::atoi(argv[3]) : 8, *backend, *comm, gen);
  } else if (what == "prefill") {
    run_prefill(argc > 2 ? std::atoll(argv[2]) : 131072, argc > 3 ? std::atoi(argv[3]) : 1, *backend, *comm, gen);
  } else if (what == "breakdown") {
    run_breakdown(argc > 2 ? std::atoll(argv[2]) : 1048576, *backend, *comm, gen);
  } else if (what == "capacity") {
    run_capacity(argc > 2 ? std::atof(argv[2]) : 16.0, *backend, *comm, gen);
  } else {
    std::fprintf(stderr, "usage: bench_gpu_step decode N [distinct_layers] | prefill N [layers] | breakdown N | capacity [weights_GB]\n");
    return 2;
  }
  curandDestroyGenerator(gen);
  return 0;
}
