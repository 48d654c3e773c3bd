// Scores of compressed queries against stored compressed keys (SPEC §3), fused with the
// per-query maxima and the max over the chunk, so the [l_C x n] score matrix is never
// written; and proximity influence.
#include <algorithm>
#include <limits>

#include "common.cuh"
#include "cuda_check.h"
#include "launchers.h"

namespace unshackle::cuda {
namespace {

constexpr int kWarps = 8;

__device__ __forceinline__ int64_t row_of(const ScoreParams& p, int64_t i) { return p.rows ? p.rows[i] : i; }

// s(m, c) for one row, reduced over the warp (every lane gets it).
__device__ __forceinline__ float warp_score(const ScoreParams& p, int64_t row, const float* qc) {
  float acc = 0;
  const int64_t base = row * p.d_c;
  for (int e = threadIdx.x % 32; e < p.d_c; e += 32) acc = fmaf(load_as_float(p.kc, p.kc_dtype, base + e), qc[e], acc);
  return warp_sum(acc);
}

// Decode fast path: l_C = 1, d_c = 128, bf16 keys, contiguous rows. A half-warp per row,
// one 16-byte load per lane (8 bf16), the query in registers.
__global__ void score_decode_bf16_d128_kernel(ScoreParams p) {
  const int lane16 = threadIdx.x % 16;
  float q[8];
  for (int i = 0; i < 8; ++i) q[i] = p.qc[lane16 * 8 + i];
  const float row_max = p.row_max ? p.row_max[0] : 0.0f;
  const auto* keys = static_cast<const uint4*>(p.kc);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  const int half = (threadIdx.x % 32) / 16;
  // The loop is uniform per warp (both halves iterate together) so the shuffles never diverge.
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32 * 2; base < p.n;
       base += 2 * warps) {
    const int64_t row = base + half;
    float acc = 0;
    if (row < p.n) {
      const uint4 packed = keys[row * 16 + lane16];
      const auto* k = reinterpret_cast<const __nv_bfloat162*>(&packed);
      for (int i = 0; i < 4; ++i) {
        const float2 kf = __bfloat1622float2(k[i]);
        acc = fmaf(kf.x, q[2 * i], acc);
        acc = fmaf(kf.y, q[2 * i + 1], acc);
      }
    }
    for (int offset = 8; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (row < p.n && lane16 == 0) p.score_out[row] = acc - row_max;
  }
}

__global__ void score_chunk_kernel(ScoreParams p) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; i < p.n; i += warps) {
    const int64_t row = row_of(p, i);
    float best = neg_inf();
    for (int c = 0; c < p.l_C; ++c) {
      float s = warp_score(p, row, p.qc + static_cast<size_t>(c) * p.d_c);
      if (p.row_max) s -= p.row_max[c];
      best = fmaxf(best, s);
    }
    if (threadIdx.x % 32 == 0) p.score_out[i] = best;
  }
}

__global__ void fill_kernel(float* out, int n, float value) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = value;
}

// Each block owns a tile of rows; per query, warps take the max over their rows, the block
// combines them, and one atomic per (block, query) publishes it.
constexpr int kRowsPerWarp = 32;
__global__ void score_query_max_kernel(ScoreParams p) {
  __shared__ float warp_best[kWarps];
  const int warp = threadIdx.x / 32;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRowsPerWarp;
  const int64_t last = min(first + kRowsPerWarp, p.n);
  for (int c = 0; c < p.l_C; ++c) {
    const float* qc = p.qc + static_cast<size_t>(c) * p.d_c;
    float best = neg_inf();
    for (int64_t i = first; i < last; ++i) best = fmaxf(best, warp_score(p, row_of(p, i), qc));
    if (threadIdx.x % 32 == 0) warp_best[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
      float block_best = warp_best[0];
      for (int w = 1; w < kWarps; ++w) block_best = fmaxf(block_best, warp_best[w]);
      if (block_best != neg_inf()) atomic_max_float(p.query_max_out + c, block_best);
    }
    __syncthreads();
  }
}

__global__ void proximity_kernel(ProximityParams p) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < p.n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = p.tokens[j];
    float best = p.score[j];
    for (int64_t i = j - 1; i >= 0 && p.tokens[i] >= t - p.eps; --i) best = fmaxf(best, p.score[i]);
    for (int64_t i = j + 1; i < p.n && p.tokens[i] <= t + p.eps; ++i) best = fmaxf(best, p.score[i]);
    p.out[j] = best;
  }
}

unsigned grid_for(int64_t items, int per_block) {
  return static_cast<unsigned>(std::clamp<int64_t>((items + per_block - 1) / per_block, 1, 65535));
}

}  // namespace

void launch_score_query_max(const ScoreParams& p, cudaStream_t stream) {
  p.check();
  UNS_CUDA_REQUIRE(kInvalidArgument, p.query_max_out, "score_query_max: null output");
  fill_kernel<<<1, 256, 0, stream>>>(p.query_max_out, p.l_C, -std::numeric_limits<float>::infinity());
  UNS_CUDA_CHECK_LAUNCH();
  if (p.n == 0) return;
  const int64_t blocks = (p.n + kWarps * kRowsPerWarp - 1) / (kWarps * kRowsPerWarp);
  UNS_CUDA_REQUIRE(kInvalidArgument, blocks < (int64_t{1} << 31), "score_query_max: too many rows");
  score_query_max_kernel<<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

void launch_score_chunk(const ScoreParams& p, cudaStream_t stream) {
  p.check();
  UNS_CUDA_REQUIRE(kInvalidArgument, p.score_out, "score_chunk: null output");
  if (p.n == 0) return;
  const bool aligned = (reinterpret_cast<uintptr_t>(p.kc) % 16) == 0;
  if (p.l_C == 1 && p.d_c == 128 && p.kc_dtype == DType::kBF16 && p.rows == nullptr && aligned) {
    score_decode_bf16_d128_kernel<<<grid_for(p.n * 16, 256), 256, 0, stream>>>(p);
  } else {
    score_chunk_kernel<<<grid_for(p.n * 32, 256), 256, 0, stream>>>(p);
  }
  UNS_CUDA_CHECK_LAUNCH();
}

void launch_proximity(const ProximityParams& p, cudaStream_t stream) {
  p.check();
  if (p.n == 0) return;
  proximity_kernel<<<grid_for(p.n, 256), 256, 0, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

}  // namespace unshackle::cuda
