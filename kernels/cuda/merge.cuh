// LSE merge kernel body (launchers: merge.cu, and attend.cu for its split combine).
// Parts whose lse is -inf contribute nothing; a row with no part gets o = 0, lse = -inf.
#pragma once

#include "common.cuh"

namespace unshackle::cuda::merge {

constexpr int kWeightTile = 1024;  // part weights held in shared memory at a time
constexpr int kMaxThreads = 1024;
constexpr int kColumns = 4;        // column passes per thread: d <= kColumns * cols (launchers check)

// Block-wide max / sum for blockDim.x a multiple of 32 (<= 1024); every thread gets the result.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch /* [32] */) {
  v = kMax ? warp_max(v) : warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // scratch may still be read by an earlier reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : (kMax ? neg_inf() : 0.0f);
  return kMax ? warp_max(v) : warp_sum(v);
}

// The launch shape: `cols` column lanes times `lanes` part lanes (blockDim.x, rounded up to
// a warp, >= cols * lanes). Part lanes let ~100 split partials of one row be read in parallel.
struct Shape {
  int cols;
  int lanes;
  unsigned threads;
};
inline Shape merge_shape(int d, int parts) {
  const int cols = d < kMaxThreads ? d : kMaxThreads;
  int lanes = kMaxThreads / 2 / cols;  // up to 512 threads
  lanes = lanes < 1 ? 1 : lanes > 8 ? 8 : lanes;
  lanes = lanes > parts ? (parts < 1 ? 1 : parts) : lanes;
  const unsigned threads = static_cast<unsigned>((cols * lanes + 31) / 32 * 32);
  return {cols, lanes, threads};
}

// static: attend.cu and merge.cu both launch it (one copy per translation unit).
// Merges `parts` partials per output row r (one block per row, shape from merge_shape).
// Part i of row r lives at at = i * stride_part + r * stride_row: lse at lse_parts[at], o at
// o_parts[at * d ...]. The part weights exp(lse_i - max) are computed by all threads at once
// into shared memory, then part lane s sums parts s, s + lanes, ... with independent loads
// (the serial version did a dependent lse load per part: latency-bound at ~100 splits).
static __global__ void merge_kernel(const float* o_parts, const float* lse_parts, int parts, int64_t stride_part,
                                    int64_t stride_row, int d, Shape shape, float* o, float* lse) {
  __shared__ float weight[kWeightTile];
  __shared__ float partial[kMaxThreads];
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const int col = threadIdx.x % shape.cols, lane = threadIdx.x / shape.cols;
  const bool active = lane < shape.lanes;
  float best = neg_inf();
  for (int i = threadIdx.x; i < parts; i += blockDim.x) best = fmaxf(best, lse_parts[i * stride_part + r * stride_row]);
  best = block_reduce<true>(best, scratch);
  float sum = 0;                  // this thread's share of the weight sum
  float value[kColumns] = {};     // columns col + c * cols
  if (best != neg_inf()) {
    for (int tile = 0; tile < parts; tile += kWeightTile) {
      const int count = min(kWeightTile, parts - tile);
      __syncthreads();  // the previous tile's weights are consumed
      for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const float part_lse = lse_parts[(tile + i) * stride_part + r * stride_row];
        const float w = part_lse == neg_inf() ? 0.0f : expf(part_lse - best);
        weight[i] = w;
        sum += w;
      }
      __syncthreads();
      if (!active) continue;
#pragma unroll
      for (int c = 0; c < kColumns; ++c) {
        const int j = col + c * shape.cols;
        if (j >= d) break;
        float acc = value[c];
#pragma unroll 4
        for (int i = lane; i < count; i += shape.lanes) {
          const float x = o_parts[((tile + i) * stride_part + r * stride_row) * d + j];
          acc = weight[i] > 0 ? fmaf(weight[i], x, acc) : acc;  // a select: the loads stay independent
        }
        value[c] = acc;
      }
    }
  }
  sum = block_reduce<false>(sum, scratch);
#pragma unroll
  for (int c = 0; c < kColumns; ++c) {
    if (c * shape.cols >= d) break;  // uniform across the block
    __syncthreads();                 // partial[] of the previous column pass is consumed
    if (active) partial[threadIdx.x] = value[c];
    __syncthreads();
    const int j = col + c * shape.cols;
    if (lane == 0 && j < d) {
      float total = 0;
      for (int s = 0; s < shape.lanes; ++s) total += partial[s * shape.cols + col];
      o[r * d + j] = sum > 0 ? total / sum : 0.0f;
    }
  }
  if (threadIdx.x == 0 && lse) lse[r] = sum > 0 ? best + logf(sum) : neg_inf();
}

}  // namespace unshackle::cuda::merge
