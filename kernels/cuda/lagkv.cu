// LagKV scoring stages (SPEC §5; see params.h). Rare and small: plain kernels.
#include <algorithm>

#include "common.cuh"
#include "cuda_check.h"
#include "launchers.h"

namespace unshackle::cuda {
namespace {

// One thread per (K|V, column): max and -min over the reference rows.
__global__ void extrema_kernel(LagExtremaParams p) {
  const int width = p.G * p.d;
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < 2 * width; idx += gridDim.x * blockDim.x) {
    const int kv = idx / width, col = idx % width;
    const void* base = kv == 0 ? p.k : p.v;
    float hi = neg_inf(), neg_lo = neg_inf();
    for (int64_t i = 0; i < p.n; ++i) {
      const int64_t row = p.rows ? p.rows[i] : i;
      const float x = load_as_float(base, p.kv_dtype, row * width + col);
      hi = fmaxf(hi, x);
      neg_lo = fmaxf(neg_lo, -x);
    }
    p.extrema[(2 * kv) * width + col] = hi;
    p.extrema[(2 * kv + 1) * width + col] = neg_lo;
  }
}

// One thread per (row, K|V, head): unbiased std over the head's channels, in double.
__global__ void token_std_kernel(LagStdParams p) {
  const int width = p.G * p.d;
  const int64_t total = p.n * 2 * p.G;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / (2 * p.G);
    const int kv = static_cast<int>((idx / p.G) % 2), g = static_cast<int>(idx % p.G);
    const int64_t row = p.rows ? p.rows[i] : i;
    const void* base = kv == 0 ? p.k : p.v;
    const float* hi = p.extrema + (2 * kv) * width;
    const float* neg_lo = p.extrema + (2 * kv + 1) * width;
    double sum = 0, sum_sq = 0;
    for (int j = 0; j < p.d; ++j) {
      const int col = g * p.d + j;
      const double lo = -static_cast<double>(neg_lo[col]);
      const double x = (load_as_float(base, p.kv_dtype, row * width + col) - lo) / fmax(hi[col] - lo, 1e-6);
      sum += x;
      sum_sq += x * x;
    }
    const double mean = sum / p.d;
    const double var = fmax(sum_sq - p.d * mean * mean, 0.0) / (p.d - 1);
    p.token_std[(i * 2 + kv) * p.G + g] = static_cast<float>(sqrt(var));
  }
}

// One thread per token of the partition; each (K|V, head) column's softmax normaliser is
// recomputed per thread (lag is small).
__global__ void partition_scores_kernel(LagScoreParams p) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < p.lag;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double score = 0;
    for (int kv = 0; kv < 2; ++kv) {
      for (int g = 0; g < p.G; ++g) {
        double mx = -INFINITY, z = 0;
        for (int64_t u = 0; u < p.lag; ++u) mx = fmax(mx, static_cast<double>(p.token_std[(u * 2 + kv) * p.G + g]));
        for (int64_t u = 0; u < p.lag; ++u) z += exp(static_cast<double>(p.token_std[(u * 2 + kv) * p.G + g]) - mx);
        score += exp(static_cast<double>(p.token_std[(t * 2 + kv) * p.G + g]) - mx) / z / (2.0 * p.G);
      }
    }
    p.score[t] = static_cast<float>(score);
  }
}

}  // namespace

void launch_lag_reference_extrema(const LagExtremaParams& p, cudaStream_t stream) {
  p.check();
  extrema_kernel<<<std::max(1, (2 * p.G * p.d + 255) / 256), 256, 0, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

void launch_lag_token_std(const LagStdParams& p, cudaStream_t stream) {
  p.check();
  if (p.n == 0) return;
  token_std_kernel<<<static_cast<unsigned>(std::clamp<int64_t>((p.n * 2 * p.G + 255) / 256, 1, 4096)), 256, 0, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

void launch_lag_partition_scores(const LagScoreParams& p, cudaStream_t stream) {
  p.check();
  if (p.lag == 0) return;
  partition_scores_kernel<<<static_cast<unsigned>(std::clamp<int64_t>((p.lag + 127) / 128, 1, 4096)), 128, 0, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

}  // namespace unshackle::cuda
