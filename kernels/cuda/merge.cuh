// LSE merge kernel body (launchers: merge.cu, and attend.cu for its split combine).
// Parts whose lse is -inf contribute nothing; a row with no part gets o = 0, lse = -inf.
#pragma once

#include "common.cuh"

namespace unshackle::cuda::merge {

// static: attend.cu and merge.cu both launch it (one copy per translation unit).
// Merges `parts` partials per output row r (one block per row). Part i of row r lives at
// at = i * stride_part + r * stride_row: lse at lse_parts[at], o at o_parts[at * d ...].
static __global__ void merge_kernel(const float* o_parts, const float* lse_parts, int parts, int64_t stride_part,
                             int64_t stride_row, int d, float* o, float* lse) {
  const int64_t r = blockIdx.x;
  float best = neg_inf();
  for (int i = 0; i < parts; ++i) best = fmaxf(best, lse_parts[i * stride_part + r * stride_row]);
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    float sum = 0, value = 0;
    if (best != neg_inf()) {
      for (int i = 0; i < parts; ++i) {
        const int64_t at = i * stride_part + r * stride_row;
        const float part_lse = lse_parts[at];
        if (part_lse == neg_inf()) continue;
        const float w = expf(part_lse - best);
        sum += w;
        value = fmaf(w, o_parts[at * d + j], value);
      }
    }
    o[r * d + j] = sum > 0 ? value / sum : 0.0f;
    if (j == 0 && lse) lse[r] = sum > 0 ? best + logf(sum) : neg_inf();
  }
}

}  // namespace unshackle::cuda::merge
