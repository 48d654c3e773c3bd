// Top-k kernel bodies (launcher: topk.cu). SPEC tie rule: value descending, then token
// ascending; NaN below every number; token < 0 is padding, never selected.
//
// Every candidate gets a unique 64-bit ranking key: the high word orders values (order-
// preserving float bits, NaN = 0, -0 = +0), the low word is ~token (a lower token ranks
// higher). The top-k set is then "the k largest keys", found by a radix select over six
// digits (12, 11, 11, 10, 10, 10 bits from the top): each pass histograms the digit of the
// surviving candidates, the bucket holding the k-th key is picked (by the last block to
// finish, in the grid passes), and the next pass sends keys above that bucket to the output
// list and keeps those inside it. Once a bucket holds exactly the keys still wanted, it is
// taken whole and the later passes see no candidates. Passes 0 and 1 read the whole input
// (grid kernels); passes 2..5 and the last filter run in one block; the rank order of the
// <= k selected keys comes from counting, over many blocks. A memset, four launches and one
// 4-byte copy to the host in all.
// Tokens must lie in [0, 2^32 - 1) and be distinct for the low word to be unique.
#pragma once

#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace unshackle::cuda::topk {

constexpr int kPasses = 6;
constexpr int kMaxBins = 4096;
constexpr int kThreads = 256;
constexpr int kMaxSorted = 4096;  // largest min(k, n) of the radix-select path
__host__ __device__ constexpr int digit_bits(int pass) { return pass == 0 ? 12 : pass < 3 ? 11 : 10; }
__host__ __device__ constexpr int digit_shift(int pass) {
  return pass == 0 ? 52 : pass == 1 ? 41 : pass == 2 ? 30 : pass == 3 ? 20 : pass == 4 ? 10 : 0;
}

// The select decision of one pass: keys whose digit is above `bucket` are in; those equal to
// it are in when `whole`, else they are the next pass's candidates (`remaining` still wanted).
struct Decision {
  uint32_t bucket;
  uint32_t remaining;
  uint32_t whole;
  uint32_t pad;
};

// Device state, zeroed by one memset before each top-k.
struct State {
  uint32_t hist[kPasses][kMaxBins];
  uint32_t ticket[kPasses + 1];
  uint32_t candidates[kPasses + 1];  // candidates written by pass j (j >= 1)
  uint32_t valid;                    // entries with token >= 0
  uint32_t selected;                 // length of the output list
  Decision decision[kPasses];
};

struct Candidate {
  uint64_t key;
  uint32_t index;
  uint32_t pad;
};

__device__ __forceinline__ uint64_t ranking_key(float value, int64_t token) {
  uint32_t bits = __float_as_uint(value);
  if (value != value) bits = 0;            // NaN: below every number
  else if (value == 0.0f) bits = 0x80000000u;  // -0 ties with +0, as in the CPU's comparison
  else bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | (0xffffffffu - static_cast<uint32_t>(token));
}

__device__ __forceinline__ uint32_t digit_of(uint64_t key, int pass) {
  return static_cast<uint32_t>(key >> digit_shift(pass)) & ((1u << digit_bits(pass)) - 1u);
}

// Warp-aggregated append: every lane of the warp calls it; lanes with `take` get a slot.
__device__ __forceinline__ uint32_t warp_append(bool take, uint32_t* counter) {
  const unsigned mask = __ballot_sync(0xffffffffu, take);
  if (mask == 0) return 0;
  const int lane = threadIdx.x % 32, leader = __ffs(mask) - 1;
  uint32_t base = 0;
  if (lane == leader) base = atomicAdd(counter, static_cast<uint32_t>(__popc(mask)));
  base = __shfl_sync(0xffffffffu, base, leader);
  return base + static_cast<uint32_t>(__popc(mask & ((1u << lane) - 1u)));
}

// Histogram increment, one shared atomic per distinct digit in the warp (every lane calls it;
// lanes with take == false pass any digit and add nothing).
__device__ __forceinline__ void warp_histogram_add(uint32_t* hist, uint32_t digit, bool take) {
  const unsigned active = __ballot_sync(0xffffffffu, take);
  const unsigned peers = __match_any_sync(0xffffffffu, take ? digit : 0xffffffffu) & active;
  const int lane = threadIdx.x % 32;
  if (take && lane == __ffs(peers) - 1) atomicAdd(hist + digit, static_cast<uint32_t>(__popc(peers)));
}

// Picks the bucket of the r-th largest key (1-based) from a finished histogram. One block.
template <int kBlock, bool kSharedHist>
__device__ void choose_bucket(const uint32_t* hist, int bins, uint32_t total, uint32_t r, Decision* out) {
  using Scan = cub::BlockScan<uint32_t, kBlock>;
  __shared__ typename Scan::TempStorage scan_storage;
  if (r == 0) {  // nothing wanted: no digit is above 0xffffffff
    if (threadIdx.x == 0) *out = {0xffffffffu, 0, 1, 0};
    return;
  }
  if (total <= r) {  // everything is wanted
    if (threadIdx.x == 0) *out = {0, total, 1, 0};
    return;
  }
  // Thread t owns `per` bins, the highest bins going to thread 0.
  const int per = bins / kBlock;
  const int hi = bins - threadIdx.x * per, lo = hi - per;
  uint32_t sum = 0;
  const auto bin = [&](int b) { return kSharedHist ? hist[b] : __ldcg(hist + b); };
  for (int b = lo; b < hi; ++b) sum += bin(b);
  uint32_t above = 0;
  Scan(scan_storage).ExclusiveSum(sum, above);
  if (above < r && r <= above + sum) {
    for (int b = hi - 1; b >= lo; --b) {
      const uint32_t h = bin(b);
      if (above + h >= r) {
        const uint32_t remaining = r - above;
        *out = {static_cast<uint32_t>(b), remaining, h == remaining ? 1u : 0u, 0};
        break;
      }
      above += h;
    }
  }
}

// True in every thread of the block that finished last (after its global atomics).
__device__ __forceinline__ bool last_block_done(uint32_t* ticket) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

__device__ __forceinline__ void flush_histogram(const uint32_t* shared_hist, uint32_t* hist, int bins) {
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x)
    if (shared_hist[b]) atomicAdd(hist + b, shared_hist[b]);
}

// Pass 0: keys of the raw input, histogram of digit 0, count of valid entries.
__global__ void __launch_bounds__(kThreads) first_pass_kernel(TopKParams p, State* state, uint32_t k) {
  __shared__ uint32_t shared_hist[kMaxBins];
  __shared__ uint32_t block_valid;
  constexpr int bins = 1 << digit_bits(0);
  for (int b = threadIdx.x; b < bins; b += blockDim.x) shared_hist[b] = 0;
  if (threadIdx.x == 0) block_valid = 0;
  __syncthreads();
  uint32_t valid = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); base < p.n;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = base + threadIdx.x % 32;
    const int64_t token = i < p.n ? p.tokens[i] : -1;
    const bool live = token >= 0;
    valid += live;
    warp_histogram_add(shared_hist, live ? digit_of(ranking_key(p.values[i], token), 0) : 0, live);
  }
  valid = __reduce_add_sync(0xffffffffu, valid);
  if (threadIdx.x % 32 == 0 && valid) atomicAdd(&block_valid, valid);
  flush_histogram(shared_hist, state->hist[0], bins);
  if (threadIdx.x == 0 && block_valid) atomicAdd(&state->valid, block_valid);
  if (!last_block_done(&state->ticket[0])) return;
  const uint32_t total = __ldcg(&state->valid);
  choose_bucket<kThreads, false>(state->hist[0], bins, total, min(k, total), &state->decision[0]);
}

// Pass 1 (grid): filter the raw input by pass 0's decision (above the bucket: output list;
// inside it: output when taken whole, else a candidate of pass 1), histogram digit 1, decide.
__global__ void __launch_bounds__(kThreads) second_pass_kernel(TopKParams p, State* state, Candidate* next,
                                                              uint64_t* out_keys, uint32_t* out_index) {
  constexpr int bins = 1 << digit_bits(1);
  __shared__ uint32_t shared_hist[bins];
  const Decision prev = state->decision[0];
  for (int b = threadIdx.x; b < bins; b += blockDim.x) shared_hist[b] = 0;
  __syncthreads();
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); base < p.n;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = base + threadIdx.x % 32;
    const int64_t token = i < p.n ? p.tokens[i] : -1;
    const bool live = token >= 0;
    const uint64_t key = live ? ranking_key(p.values[i], token) : 0;
    const uint32_t digit = digit_of(key, 0);
    const bool take = live && (digit > prev.bucket || (prev.whole && digit == prev.bucket));
    const bool keep = live && !prev.whole && digit == prev.bucket;
    const uint32_t slot = warp_append(take, &state->selected);
    if (take && slot < kMaxSorted) {
      out_keys[slot] = key;
      out_index[slot] = static_cast<uint32_t>(i);
    }
    const uint32_t at = warp_append(keep, &state->candidates[1]);
    if (keep) next[at] = {key, static_cast<uint32_t>(i), 0};
    warp_histogram_add(shared_hist, digit_of(key, 1), keep);
  }
  flush_histogram(shared_hist, state->hist[1], bins);
  if (!last_block_done(&state->ticket[1])) return;
  if (prev.whole) {
    if (threadIdx.x == 0) state->decision[1] = {0xffffffffu, 0, 1, 0};
    return;
  }
  choose_bucket<kThreads, false>(state->hist[1], bins, __ldcg(&state->candidates[1]), prev.remaining, &state->decision[1]);
}

// One block: passes 2..5 over the (usually few) candidates left by pass 1 and the last
// filter into the output list (rank_kernel orders it). Many exact ties (say every value
// equal) leave many candidates: still right, one SM slower.
constexpr int kTailThreads = 1024;
__global__ void __launch_bounds__(kTailThreads) tail_kernel(TopKParams p, State* state, Candidate* buffer0,
                                                           Candidate* buffer1, uint64_t* out_keys, uint32_t* out_index) {
  extern __shared__ uint64_t dynamic_shared[];  // the histogram of each pass
  __shared__ Decision decision;
  auto* hist = reinterpret_cast<uint32_t*>(dynamic_shared);
  if (threadIdx.x == 0) decision = state->decision[1];
  __syncthreads();
  Candidate* in = buffer1;  // pass 1 wrote its candidates here
  Candidate* next = buffer0;
  for (int pass = 2; pass <= kPasses; ++pass) {
    const Decision prev = decision;
    const bool histogram = pass < kPasses && !prev.whole;
    const int bins = pass < kPasses ? 1 << digit_bits(pass) : 0;
    if (histogram)
      for (int b = threadIdx.x; b < bins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    const int64_t count = __ldcg(&state->candidates[pass - 1]);
    for (int64_t base = threadIdx.x & ~31; base < count; base += blockDim.x) {
      const int64_t i = base + threadIdx.x % 32;
      const bool live = i < count;
      const Candidate cand = live ? in[i] : Candidate{0, 0, 0};
      const uint32_t digit = digit_of(cand.key, pass - 1);
      const bool take = live && (digit > prev.bucket || (prev.whole && digit == prev.bucket));
      const bool keep = live && histogram && digit == prev.bucket;
      const uint32_t slot = warp_append(take, &state->selected);
      if (take && slot < kMaxSorted) {
        out_keys[slot] = cand.key;
        out_index[slot] = cand.index;
      }
      if (pass < kPasses) {
        const uint32_t at = warp_append(keep, &state->candidates[pass]);
        if (keep) next[at] = cand;
        warp_histogram_add(hist, digit_of(cand.key, pass < kPasses ? pass : 0), keep);
      }
    }
    __syncthreads();
    if (pass < kPasses) {
      if (!histogram) {
        if (threadIdx.x == 0) decision = {0xffffffffu, 0, 1, 0};
      } else {
        choose_bucket<kTailThreads, true>(hist, bins, __ldcg(&state->candidates[pass]), prev.remaining, &decision);
      }
    }
    __syncthreads();
    Candidate* t = in;
    in = next;
    next = t;
  }

}

// Rank-order output of the <= kMaxSorted selected keys, by counting: the key of rank r has
// exactly r larger keys (keys are unique), so thread i writes its entry at the count of keys
// above its own. Many blocks (kRankThreads keys each) replace the single-block bitonic sort
// (66 barrier stages at k = 2048). Entries [selected, k) are padded with (-inf, -1).
constexpr int kRankThreads = 128;
__global__ void __launch_bounds__(kRankThreads) rank_kernel(TopKParams p, const State* state, const uint64_t* out_keys,
                                                           const uint32_t* out_index) {
  __shared__ uint64_t keys[kMaxSorted];
  const uint32_t selected = min(static_cast<uint32_t>(kMaxSorted), __ldcg(&state->selected));
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Padding first (blocks past the selected keys do only this).
  for (int64_t j = selected + i; j < p.k; j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p.out_values[j] = neg_inf();
    p.out_tokens[j] = -1;
  }
  if (static_cast<int64_t>(blockIdx.x) * blockDim.x >= selected) return;
  for (uint32_t j = threadIdx.x; j < selected; j += blockDim.x) keys[j] = __ldcg(out_keys + j);
  __syncthreads();
  if (i >= selected) return;
  const uint64_t mine = keys[i];
  uint32_t rank = 0;
#pragma unroll 8
  for (uint32_t j = 0; j < selected; ++j) rank += keys[j] > mine;  // every lane reads keys[j]: a broadcast
  const uint32_t at = __ldcg(out_index + i);
  p.out_values[rank] = p.values[at];
  p.out_tokens[rank] = p.tokens[at];
}

// The general path (min(k, n) above kMaxSorted): a full descending radix sort of the keys.
__global__ void full_sort_keys_kernel(TopKParams p, uint64_t* keys, int32_t* index, uint32_t* valid) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t token = p.tokens[i];
    keys[i] = token < 0 ? 0 : ranking_key(p.values[i], token);
    index[i] = static_cast<int32_t>(i);
    if (token >= 0) atomicAdd(valid, 1u);
  }
}

__global__ void full_sort_gather_kernel(TopKParams p, const int32_t* sorted_index, const uint32_t* valid) {
  const int64_t count = min(static_cast<int64_t>(*valid), p.k);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < count) {
      const int32_t j = sorted_index[i];
      p.out_values[i] = p.values[j];
      p.out_tokens[i] = p.tokens[j];
    } else {
      p.out_values[i] = neg_inf();
      p.out_tokens[i] = -1;
    }
  }
}

}  // namespace unshackle::cuda::topk
