// Proximity influence kernel body (launcher: proximity.cu): F'(j) = max F(i) over the entries
// whose token lies within eps of token j; tokens strictly ascending, so the window is a
// contiguous run around j, walked outwards from j (eps is small: 1 in ESA).
#pragma once

#include "common.cuh"

namespace unshackle::cuda::proximity {

__global__ void proximity_kernel(ProximityParams p) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < p.n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = p.tokens[j];
    float best = fmaxf(neg_inf(), p.score[j]);  // NaN is skipped, as std::max skips it on the CPU
    for (int64_t i = j - 1; i >= 0 && p.tokens[i] >= t - p.eps; --i) best = fmaxf(best, p.score[i]);
    for (int64_t i = j + 1; i < p.n && p.tokens[i] <= t + p.eps; ++i) best = fmaxf(best, p.score[i]);
    p.out[j] = best;
  }
}

}  // namespace unshackle::cuda::proximity
