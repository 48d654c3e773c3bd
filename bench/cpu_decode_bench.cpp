// One decode step of one Llama-3-8B-shaped layer on the CPU reference backend
// (H = 32, G = 8, d = 128, d' = 128, l_I = 128, l_L = 4096, k = 2048, eps = 1, fp32),
// at 32k and 128k preceding tokens: the ESA step and its parts against full attention.
//
// Formulas (n = preceding tokens, R = l_I + k + l_L = 6272 attended rows):
//   scoring  bytes = n * d' * 4            FLOPs = 2 * n * d'
//   attend   bytes = R * 2 * G * d * 4     FLOPs = 4 * R * H * d
//   full     bytes = n * 2 * G * d * 4     FLOPs = 4 * n * H * d
// Run: build with -DUNS_BUILD_BENCH=ON, then build/bench/bench_cpu_decode.
#include <benchmark/benchmark.h>

#include <cmath>
#include <memory>
#include <numeric>
#include <vector>

#include "unshackle/cluster/communicator.h"
#include "unshackle/worker/context_attention.h"

namespace unshackle {
namespace {

constexpr int kH = 32, kG = 8, kD = 128, kDc = 128;

std::vector<float> seeded(size_t n, uint64_t seed) {
  std::vector<float> out(n);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& value : out) {  // xorshift; uniform in [-1, 1): never zeros
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    value = static_cast<float>(static_cast<double>(x >> 11) / 4503599627370496.0 - 1.0);
  }
  return out;
}

AttentionConfig llama_config(AttentionMode mode) {
  AttentionConfig c;
  c.mode = mode;
  c.l_I = 128; c.l_L = 4096; c.top_k = 2048; c.eps = 1;
  return c;
}

// A one-layer context of n tokens on one rank, ready for decode steps.
struct Context {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  std::vector<std::unique_ptr<Communicator>> comms = make_local_communicators(1);
  CompressionWeights weights;
  std::unique_ptr<ContextAttention> attention;
  std::vector<float> q, k, v, o;

  Context(AttentionMode mode, int64_t n) {
    weights.d_c = kDc;
    weights.wq.push_back(seeded(static_cast<size_t>(kDc) * kH * kD, 11));
    weights.wk.push_back(seeded(static_cast<size_t>(kDc) * kG * kD, 12));
    for (auto& w : weights.wq[0]) w /= std::sqrt(static_cast<float>(kH * kD));
    for (auto& w : weights.wk[0]) w /= std::sqrt(static_cast<float>(kG * kD));
    ContextAttentionOptions options{.attention = llama_config(mode), .layers = 1, .H = kH, .G = kG, .d = kD,
                                    .kv_dtype = DType::kF32, .kv_block = 1 << 30,
                                    .inv_freq = rope_inv_freq(kD, 500000.0), .compression = &weights,
                                    .reserve_tokens = n + 4096};
    attention = std::make_unique<ContextAttention>(*backend, *comms[0], options);
    const auto keys = seeded(static_cast<size_t>(n) * kG * kD, 1), values = seeded(static_cast<size_t>(n) * kG * kD, 2);
    attention->load_kv(0, keys.data(), values.data(), n);
    attention->commit_chunk(n);
    q = seeded(static_cast<size_t>(kH) * kD, 3);
    k = seeded(static_cast<size_t>(kG) * kD, 4);
    v = seeded(static_cast<size_t>(kG) * kD, 5);
    o.resize(q.size());
  }
  void step() {
    attention->forward(0, q.data(), k.data(), v.data(), 1, o.data());
    attention->commit_chunk(1);
  }
};

void set_rates(benchmark::State& state, double bytes, double flops) {
  state.counters["bytes"] = bytes;
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_DecodeStep(benchmark::State& state, AttentionMode mode) {
  const int64_t n = state.range(0);
  Context context(mode, n);
  for (auto _ : state) {
    context.step();
    benchmark::DoNotOptimize(context.o.data());
  }
  const double rows = mode == AttentionMode::kFull ? static_cast<double>(n) : 128.0 + 2048 + 4096;
  double bytes = rows * 2 * kG * kD * 4, flops = 4 * rows * kH * kD;
  if (mode == AttentionMode::kEsa) {
    bytes += static_cast<double>(n) * kDc * 4;
    flops += 2.0 * static_cast<double>(n) * kDc;
  }
  set_rates(state, bytes, flops);
}

// The ESA step's parts on the same shapes, each through the CPU backend.
void BM_Score(benchmark::State& state) {
  const int64_t n = state.range(0);
  auto backend = make_cpu_backend();
  const auto qc = seeded(kDc, 6), kc = seeded(static_cast<size_t>(n) * kDc, 7);
  std::vector<float> scores(static_cast<size_t>(n));
  for (auto _ : state) {
    backend->score_chunk({.qc = qc.data(), .kc = kc.data(), .n = n, .l_C = 1, .d_c = kDc, .score_out = scores.data()});
    benchmark::DoNotOptimize(scores.data());
  }
  set_rates(state, static_cast<double>(n) * kDc * 4, 2.0 * static_cast<double>(n) * kDc);
}

void BM_TopK(benchmark::State& state) {
  const int64_t n = state.range(0), k = 2048;
  auto backend = make_cpu_backend();
  const auto values = seeded(static_cast<size_t>(n), 8);
  std::vector<int64_t> tokens(static_cast<size_t>(n)), out_tokens(static_cast<size_t>(k));
  std::iota(tokens.begin(), tokens.end(), 0);
  std::vector<float> out_values(static_cast<size_t>(k));
  int64_t count = 0;
  for (auto _ : state) {
    backend->top_k({.values = values.data(), .tokens = tokens.data(), .n = n, .k = k, .out_values = out_values.data(),
                    .out_tokens = out_tokens.data(), .out_count = &count});
    benchmark::DoNotOptimize(out_tokens.data());
  }
  set_rates(state, static_cast<double>(n) * 12, 0);
}

void BM_Attend(benchmark::State& state) {
  const int64_t rows = state.range(0);
  auto backend = make_cpu_backend();
  const auto q = seeded(static_cast<size_t>(kH) * kD, 9);
  const auto k = seeded(static_cast<size_t>(rows) * kG * kD, 10), v = seeded(static_cast<size_t>(rows) * kG * kD, 13);
  std::vector<int64_t> tokens(static_cast<size_t>(rows));
  std::iota(tokens.begin(), tokens.end(), 0);
  const auto inv_freq = rope_inv_freq(kD, 500000.0);
  std::vector<float> o(q.size()), lse(kH);
  for (auto _ : state) {
    backend->attend({.q = q.data(), .q_token0 = rows, .k = k.data(), .v = v.data(), .key_tokens = tokens.data(),
                     .n = rows, .l_C = 1, .H = kH, .G = kG, .d = kD, .causal = true,
                     .positions = PositionScheme::kRelative, .origin = 0, .inv_freq = inv_freq.data(),
                     .scale = 1.0f / std::sqrt(static_cast<float>(kD)), .o = o.data(), .lse = lse.data()});
    benchmark::DoNotOptimize(o.data());
  }
  set_rates(state, static_cast<double>(rows) * 2 * kG * kD * 4, 4.0 * static_cast<double>(rows) * kH * kD);
}

void BM_Merge(benchmark::State& state) {
  const int parts = static_cast<int>(state.range(0));
  auto backend = make_cpu_backend();
  const auto o_parts = seeded(static_cast<size_t>(parts) * kH * kD, 14), lse = seeded(static_cast<size_t>(parts) * kH, 15);
  std::vector<float> o(static_cast<size_t>(kH) * kD);
  for (auto _ : state) {
    backend->merge({.o_parts = o_parts.data(), .lse_parts = lse.data(), .n_parts = parts, .rows = kH, .d = kD, .o = o.data()});
    benchmark::DoNotOptimize(o.data());
  }
  set_rates(state, static_cast<double>(parts) * kH * (kD + 1) * 4, 0);
}

BENCHMARK_CAPTURE(BM_DecodeStep, esa, AttentionMode::kEsa)->Arg(32768)->Arg(131072)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_DecodeStep, full, AttentionMode::kFull)->Arg(32768)->Arg(131072)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Score)->Arg(32768)->Arg(131072)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_TopK)->Arg(32768)->Arg(131072)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Attend)->Arg(6272)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Merge)->Arg(2)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
}  // namespace unshackle

BENCHMARK_MAIN();
