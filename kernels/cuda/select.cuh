// rows_of_tokens kernel body (launcher: select.cu): the global part's row list from the
// selected tokens, on the device (params.h, RowsOfTokensParams).
//
// One team of kTeam consecutive lanes per selected entry:
//  - its place in token order is its rank: how many entries sort before it (padding as the
//    largest key, equal keys by index: a stable sort). The team splits the k comparisons,
//    over the selected tokens staged in shared memory, and sums them with shuffles;
//  - its row is found by a kTeam-ary search over the store's tokens: each round the team
//    probes the bracket's two ends and kTeam - 2 evenly spaced rows between, and keeps the gap
//    the token falls in (about log_7 of the rows in rounds, 7 at 1M, against a binary
//    search's 20 dependent loads). Tokens are distinct integers, so a probe x < t also says
//    the answer lies at most t - x rows further (and x > t at most x - t rows before): in a
//    dense stretch the search ends in one round.
#pragma once

#include "common.cuh"

namespace unshackle::cuda::select {

constexpr int kThreads = 256;
constexpr int kTeam = 8;                     // lanes per selected entry
constexpr int kEntries = kThreads / kTeam;  // entries per CTA
constexpr int kTile = 2048;                  // selected tokens in shared memory per pass

__device__ __forceinline__ int64_t sort_key(int64_t token) {
  return token < 0 ? INT64_MAX : token;
}

// First index in [lo, hi) whose token is >= t (hi if none), found by the team of `member`
// (every lane of the team calls it with the same arguments; `team` is the team's lane mask).
__device__ __forceinline__ int64_t team_lower_bound(const int64_t* tokens, int64_t lo, int64_t hi, int64_t t,
                                                    int member, unsigned team) {
  const int leader = (threadIdx.x % 32) - member;  // the team's first lane in the warp
  int64_t a = lo, b = hi;                          // the answer lies in [a, b]
  while (a < b) {
    // Non-decreasing probes in [a, b - 1] (some coincide when the bracket is short): both
    // ends, where the distance bounds of the last round point when the rows there are dense,
    // and kTeam - 2 evenly spaced between.
    const int64_t probe = member == kTeam - 1 ? b - 1 : a + (b - a) * member / (kTeam - 1);
    const int64_t x = tokens[probe];
    const unsigned below = (__ballot_sync(team, x < t) >> leader) & ((1u << kTeam) - 1);
    const int count = __popc(below);  // probes below t: a prefix of the team
    if (count > 0) {                  // the last probe below t bounds the answer from below and above
      const int64_t p_lo = __shfl_sync(team, probe, leader + count - 1);
      const int64_t x_lo = __shfl_sync(team, x, leader + count - 1);
      a = p_lo + 1;
      b = min(b, p_lo + (t - x_lo));
    }
    if (count < kTeam) {              // the first probe at or above t
      const int64_t p_hi = __shfl_sync(team, probe, leader + count);
      const int64_t x_hi = __shfl_sync(team, x, leader + count);
      b = min(b, p_hi);
      a = max(a, p_hi - (x_hi - t));
    }
  }
  return a;
}

__global__ void __launch_bounds__(kThreads) rows_of_tokens_kernel(RowsOfTokensParams p) {
  __shared__ int64_t tile[kTile];
  const int64_t n_initial = p.initial_end - p.initial_begin;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n_initial;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    p.rows_out[i] = static_cast<int32_t>(p.initial_begin + i);

  const int member = threadIdx.x % kTeam;
  const unsigned team = ((1u << kTeam) - 1) << ((threadIdx.x % 32) - member);
  const int64_t entry = static_cast<int64_t>(blockIdx.x) * kEntries + threadIdx.x / kTeam;
  const bool live = entry < p.k;
  const int64_t key = live ? sort_key(p.selected[entry]) : 0;
  int rank = 0;
  for (int64_t base = 0; base < p.k; base += kTile) {
    const int count = static_cast<int>(min(static_cast<int64_t>(kTile), p.k - base));
    __syncthreads();  // the previous tile is consumed
    for (int j = threadIdx.x; j < count; j += kThreads) tile[j] = sort_key(p.selected[base + j]);
    __syncthreads();
    if (live)
      for (int j = member; j < count; j += kTeam) {
        const int64_t other = tile[j];
        rank += other < key || (other == key && base + j < entry);
      }
  }
  if (!live) return;  // whole teams: k entries end at a team boundary
#pragma unroll
  for (int offset = kTeam / 2; offset > 0; offset >>= 1) rank += __shfl_xor_sync(team, rank, offset);
  int32_t row = -1;
  if (key != INT64_MAX) {
    const int64_t at = team_lower_bound(p.tokens, p.search_begin, p.search_end, key, member, team);
    if (at < p.search_end && p.tokens[at] == key) row = static_cast<int32_t>(at);
  }
  if (member == 0) p.rows_out[n_initial + rank] = row;
}

}  // namespace unshackle::cuda::select
