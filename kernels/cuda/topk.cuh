// Top-k kernel bodies (launcher: topk.cu). SPEC tie rule: value descending, then token
// ascending; NaN below every number; token < 0 is padding, never selected.
//
// Every candidate gets a unique 64-bit ranking key: the high word orders values (order-
// preserving float bits, NaN = 0, -0 = +0), the low word is ~token (a lower token ranks
// higher). The top-k set is then "the k largest keys", found by a radix select over six
// digits (12, 11, 11, 10, 10, 10 bits from the top): each pass histograms the digit of the
// surviving candidates, the last block to finish picks the bucket holding the k-th key, and
// the next pass sends keys above that bucket to the output list and keeps those inside it.
// Once a bucket holds exactly the keys still wanted, it is taken whole and the later passes
// see no candidates. The <= k selected keys are then sorted in one block (bitonic) into
// rank order. Tokens must lie in [0, 2^32 - 1) for the low word to be unique.
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

// Picks the bucket of the r-th largest key (1-based) from a finished histogram. One block.
__device__ void choose_bucket(const uint32_t* hist, int bins, uint32_t total, uint32_t r, Decision* out) {
  using Scan = cub::BlockScan<uint32_t, kThreads>;
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
  const int per = bins / kThreads;
  const int hi = bins - threadIdx.x * per, lo = hi - per;
  uint32_t sum = 0;
  for (int b = lo; b < hi; ++b) sum += __ldcg(hist + b);
  uint32_t above = 0;
  Scan(scan_storage).ExclusiveSum(sum, above);
  if (above < r && r <= above + sum) {
    for (int b = hi - 1; b >= lo; --b) {
      const uint32_t h = __ldcg(hist + b);
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
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t token = p.tokens[i];
    if (token < 0) continue;
    ++valid;
    atomicAdd(shared_hist + digit_of(ranking_key(p.values[i], token), 0), 1u);
  }
  valid = __reduce_add_sync(0xffffffffu, valid);
  if (threadIdx.x % 32 == 0 && valid) atomicAdd(&block_valid, valid);
  flush_histogram(shared_hist, state->hist[0], bins);
  if (threadIdx.x == 0 && block_valid) atomicAdd(&state->valid, block_valid);
  if (!last_block_done(&state->ticket[0])) return;
  const uint32_t total = __ldcg(&state->valid);
  choose_bucket(state->hist[0], bins, total, min(k, total), &state->decision[0]);
}

// Pass j in 1..6: filter the candidates by pass j-1's decision (above: output; inside the
// bucket: output when taken whole, else a candidate of pass j), histogram digit j, decide.
template <int kPass>
__global__ void __launch_bounds__(kThreads) filter_pass_kernel(TopKParams p, State* state, const Candidate* in,
                                                               Candidate* next, uint64_t* out_keys,
                                                               uint32_t* out_index, uint32_t out_capacity) {
  constexpr bool kHistogram = kPass < kPasses;
  constexpr int bins = kHistogram ? 1 << digit_bits(kPass < kPasses ? kPass : 0) : 1;
  __shared__ uint32_t shared_hist[bins];
  const Decision prev = state->decision[kPass - 1];
  const int64_t count = kPass == 1 ? p.n : static_cast<int64_t>(__ldcg(&state->candidates[kPass - 1]));
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31);
  const bool work = static_cast<int64_t>(blockIdx.x) * blockDim.x < count;
  if (work) {
    if (kHistogram && !prev.whole) {
      for (int b = threadIdx.x; b < bins; b += blockDim.x) shared_hist[b] = 0;
      __syncthreads();
    }
    for (int64_t base = first; base < count; base += stride) {
      const int64_t i = base + threadIdx.x % 32;
      bool live = i < count;
      uint64_t key = 0;
      uint32_t index = 0;
      if (live) {
        if constexpr (kPass == 1) {
          const int64_t token = p.tokens[i];
          live = token >= 0;
          key = ranking_key(p.values[i], token);
          index = static_cast<uint32_t>(i);
        } else {
          key = in[i].key;
          index = in[i].index;
        }
      }
      const uint32_t digit = digit_of(key, kPass - 1);
      const bool take = live && (digit > prev.bucket || (prev.whole && digit == prev.bucket));
      const bool keep = live && !prev.whole && digit == prev.bucket;
      const uint32_t slot = warp_append(take, &state->selected);
      if (take && slot < out_capacity) {
        out_keys[slot] = key;
        out_index[slot] = index;
      }
      if constexpr (kHistogram) {
        const uint32_t at = warp_append(keep, &state->candidates[kPass]);
        if (keep) {
          next[at] = {key, index, 0};
          atomicAdd(shared_hist + digit_of(key, kPass < kPasses ? kPass : 0), 1u);
        }
      }
    }
    if (kHistogram && !prev.whole) flush_histogram(shared_hist, state->hist[kPass < kPasses ? kPass : 0], bins);
  }
  if constexpr (kHistogram) {
    if (!last_block_done(&state->ticket[kPass])) return;
    if (prev.whole) {
      if (threadIdx.x == 0) state->decision[kPass] = {0xffffffffu, 0, 1, 0};
      return;
    }
    choose_bucket(state->hist[kPass < kPasses ? kPass : 0], bins, __ldcg(&state->candidates[kPass]), prev.remaining,
                  &state->decision[kPass]);
  }
}

// One block: sorts the selected keys (bitonic, descending: unique keys give the rank order)
// and writes values and tokens, padded with (-inf, -1) up to k.
__global__ void __launch_bounds__(1024) sort_output_kernel(TopKParams p, const State* state, const uint64_t* out_keys,
                                                           const uint32_t* out_index) {
  extern __shared__ uint64_t sorted_keys[];  // [size] then [size] uint32 indices
  const uint32_t selected = min(static_cast<uint32_t>(kMaxSorted), state->selected);
  uint32_t size = 2;
  while (size < selected) size <<= 1;
  auto* sorted_index = reinterpret_cast<uint32_t*>(sorted_keys + size);
  for (uint32_t i = threadIdx.x; i < size; i += blockDim.x) {
    sorted_keys[i] = i < selected ? out_keys[i] : 0;  // real keys are > 0
    sorted_index[i] = i < selected ? out_index[i] : 0xffffffffu;
  }
  __syncthreads();
  for (uint32_t span = 2; span <= size; span <<= 1) {
    for (uint32_t j = span >> 1; j > 0; j >>= 1) {
      for (uint32_t i = threadIdx.x; i < size; i += blockDim.x) {
        const uint32_t partner = i ^ j;
        if (partner <= i) continue;
        const uint64_t a = sorted_keys[i], b = sorted_keys[partner];
        const bool descending = (i & span) == 0;
        if (descending ? a < b : a > b) {
          sorted_keys[i] = b;
          sorted_keys[partner] = a;
          const uint32_t t = sorted_index[i];
          sorted_index[i] = sorted_index[partner];
          sorted_index[partner] = t;
        }
      }
      __syncthreads();
    }
  }
  for (int64_t i = threadIdx.x; i < p.k; i += blockDim.x) {
    if (i < selected) {
      const uint32_t j = sorted_index[i];
      p.out_values[i] = p.values[j];
      p.out_tokens[i] = p.tokens[j];
    } else {
      p.out_values[i] = neg_inf();
      p.out_tokens[i] = -1;
    }
  }
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
