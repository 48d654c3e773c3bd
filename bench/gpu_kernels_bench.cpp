// Each CUDA operation of the decode step at 128k, 256k and 1M rows per rank, Llama-3-8B
// shape (H = 32, G = 8, d = 128, d' = 128, k = 2048), bf16 storage. Median over 50 runs after
// warm-up, inputs rotated over 4 copies so no run reads from L2; achieved bandwidth against a
// device-to-device copy measured in the same run.
//   bench_gpu_kernels [rows...]
// Formulas (n rows): score reads n * d' * 2 B; top-k reads n * (4 + 8) B; attend over
// R = 6272 rows reads R * 2 * G * d * 2 B (plus q); full decode attention reads n * 2 * G * d * 2 B.
#include <cuda_runtime.h>
#include <curand.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <vector>

#include "unshackle/kernels/attention_config.h"
#include "unshackle/kernels/backend.h"

using namespace unshackle;

namespace {

constexpr int kH = 32, kG = 8, kD = 128, kDc = 128, kCopies = 4;

double median_us(Backend& backend, const std::function<void(int)>& op) {
  for (int i = 0; i < 5; ++i) op(i % kCopies);
  backend.synchronize();
  std::vector<double> times;
  for (int i = 0; i < 50; ++i) {
    const auto start = std::chrono::steady_clock::now();
    op(i % kCopies);
    backend.synchronize();
    times.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void fill_normal(curandGenerator_t gen, Backend& backend, BackendBuffer& buffer, size_t floats, DType dtype) {
  BackendBuffer staging(backend, (floats + 1) * 4);  // curand fills an even count
  curandGenerateNormal(gen, staging.as<float>(), floats + (floats % 2), 0.0f, 1.0f);
  cudaDeviceSynchronize();
  backend.convert(staging.data(), DType::kF32, buffer.data(), dtype, floats);
  backend.synchronize();
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda_backend_available()) {
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  std::vector<int64_t> sizes;
  for (int i = 1; i < argc; ++i) sizes.push_back(std::atoll(argv[i]));
  if (sizes.empty()) sizes = {131072, 262144, 1048576};
  auto backend = make_cuda_backend(0);
  curandGenerator_t gen;
  curandCreateGenerator(&gen, CURAND_RNG_PSEUDO_PHILOX4_32_10);
  curandSetPseudoRandomGeneratorSeed(gen, 7);

  // Ceiling: a device-to-device copy of 2 GiB, bytes read + written.
  const size_t copy_bytes = size_t{2} << 30;
  BackendBuffer a(*backend, copy_bytes), b(*backend, copy_bytes);
  const double copy_us = median_us(*backend, [&](int) { backend->copy_within(b.data(), a.data(), copy_bytes); });
  const double ceiling = 2.0 * static_cast<double>(copy_bytes) / copy_us * 1e-3;  // GB/s
  a.reset();
  b.reset();
  std::printf("device %s; copy ceiling %.0f GB/s (2 GiB D2D, read + write)\n", backend->name().c_str(), ceiling);
  std::printf("%-28s %10s %12s %10s %8s\n", "op", "rows", "median us", "GB/s", "of copy");
  const auto report = [&](const char* op, int64_t rows, double us, double bytes) {
    const double gbs = bytes / us * 1e-3;
    std::printf("%-28s %10lld %12.1f %10.0f %7.0f%%\n", op, static_cast<long long>(rows), us, gbs, 100 * gbs / ceiling);
    std::fflush(stdout);
  };
  const auto inv_host = rope_inv_freq(kD, 500000.0);
  BackendBuffer inv(*backend, inv_host.size() * 4), q(*backend, kH * kD * 4), o(*backend, kH * kD * 4),
      lse(*backend, kH * 4), qc(*backend, kDc * 4);
  backend->copy_to_backend(inv.data(), inv_host.data(), inv_host.size() * 4);
  fill_normal(gen, *backend, q, kH * kD, DType::kF32);
  fill_normal(gen, *backend, qc, kDc, DType::kF32);

  for (int64_t n : sizes) {
    // Scoring: the decode GEMV over k'.
    std::vector<BackendBuffer> kc;
    for (int c = 0; c < kCopies; ++c) {
      kc.emplace_back(*backend, static_cast<size_t>(n) * kDc * 2);
      fill_normal(gen, *backend, kc.back(), static_cast<size_t>(n) * kDc, DType::kBF16);
    }
    BackendBuffer scores(*backend, static_cast<size_t>(n) * 4 * kCopies);
    const double score_us = median_us(*backend, [&](int c) {
      backend->score_chunk({.qc = qc.as<float>(), .kc = kc[static_cast<size_t>(c)].data(), .kc_dtype = DType::kBF16,
                            .n = n, .l_C = 1, .d_c = kDc, .score_out = scores.as<float>() + c * n});
    });
    report("score (decode GEMV, bf16 k')", n, score_us, static_cast<double>(n) * kDc * 2 + static_cast<double>(n) * 4);
    kc.clear();
    // Top-k over the scores.
    std::vector<int64_t> tokens_host(static_cast<size_t>(n));
    std::iota(tokens_host.begin(), tokens_host.end(), 0);
    BackendBuffer tokens(*backend, static_cast<size_t>(n) * 8), out_v(*backend, 2048 * 4), out_t(*backend, 2048 * 8);
    backend->copy_to_backend(tokens.data(), tokens_host.data(), tokens_host.size() * 8);
    int64_t count = 0;
    const double topk_us = median_us(*backend, [&](int c) {
      backend->top_k({.values = scores.as<float>() + c * n, .tokens = tokens.as<int64_t>(), .n = n, .k = 2048,
                      .out_values = out_v.as<float>(), .out_tokens = out_t.as<int64_t>(), .out_count = &count});
    });
    report("top-k (k = 2048, radix sort)", n, topk_us, static_cast<double>(n) * 12);
    // Full decode attention over n rows (the baseline kernel), and ESA's 6272-row attention.
    BackendBuffer k(*backend, static_cast<size_t>(n) * kG * kD * 2), v(*backend, static_cast<size_t>(n) * kG * kD * 2);
    fill_normal(gen, *backend, k, static_cast<size_t>(n) * kG * kD, DType::kBF16);
    fill_normal(gen, *backend, v, static_cast<size_t>(n) * kG * kD, DType::kBF16);
    AttendParams p{.q = q.as<float>(), .q_token0 = n, .k = k.data(), .v = v.data(), .kv_dtype = DType::kBF16,
                   .key_tokens = tokens.as<int64_t>(), .n = n, .l_C = 1, .H = kH, .G = kG, .d = kD, .causal = true,
                   .positions = PositionScheme::kRelative, .origin = 0, .inv_freq = inv.as<float>(),
                   .scale = 1.0f / std::sqrt(128.0f), .o = o.as<float>(), .lse = lse.as<float>()};
    const double full_us = median_us(*backend, [&](int) { backend->attend(p); });
    report("attend, full (n rows)", n, full_us, static_cast<double>(n) * 2 * kG * kD * 2);
    if (n == sizes.front()) {
      p.n = 6272;
      const double esa_us = median_us(*backend, [&](int) { backend->attend(p); });
      report("attend, ESA rows (6272)", 6272, esa_us, 6272.0 * 2 * kG * kD * 2);
      BackendBuffer parts(*backend, 4 * kH * kD * 4), part_lse(*backend, 4 * kH * 4);
      fill_normal(gen, *backend, parts, 4 * kH * kD, DType::kF32);
      fill_normal(gen, *backend, part_lse, 4 * kH, DType::kF32);
      const double merge_us = median_us(*backend, [&](int) {
        backend->merge({.o_parts = parts.as<float>(), .lse_parts = part_lse.as<float>(), .n_parts = 4, .rows = kH,
                        .d = kD, .o = o.as<float>()});
      });
      report("merge (4 partials)", kH, merge_us, 4.0 * kH * (kD + 1) * 4);
    }
  }
  curandDestroyGenerator(gen);
  return 0;
}
