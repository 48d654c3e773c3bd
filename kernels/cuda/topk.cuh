// Top-k kernel bodies (launcher: topk.cu). SPEC tie rule: value descending, then token
// ascending; NaN below every number; token < 0 is padding, never selected.
//
// Every candidate gets a unique 64-bit ranking key: the high word orders values (order-
// preserving float bits, NaN = 0, -0 = +0), the low word is ~token (a lower token ranks
// higher). The top-k set is "the k largest keys", found by a radix select from the top bits.
// One launch (two with UNS_TOPK_SPLIT_RANK, for the bench's breakdown), no memset, no host wait:
// select_kernel (grid, cooperative: every block resident): digit 0 (key bits 63..52) of every
// live entry into a global histogram; a grid barrier; every block picks the bucket b0 that
// holds the k-th key itself and filters its entries (its first tile still in registers): those
// above b0 go to the selected list, those in b0 to the candidate buffer (with their digit 1,
// bits 51..41, into a second histogram). The last block to finish completes the select on the
// candidates alone (tail: more digits over the candidates still tied, in shared memory once
// they fit, the last <= 32 ranked by one warp), zeroes the state and bumps the epoch; the other
// blocks wait for that, then every block ranks a share of the <= 4096 selected keys by counting
// (keys are unique: the key of rank r has exactly r larger keys) and writes the padding
// (-inf, -1). On normal-like scores b0 holds ~1-3k candidates (docs/kernels_notes.md).
// Split mode: the blocks exit after the filter and rank_kernel (dependent launch on sm_90)
// ranks. Each block loads all its items before it uses any, and makes at most one global
// atomic per counter per tile: the serial chain is short.
// The state stays zeroed between calls (the last block restores it); the launcher zeroes it
// once when the workspace is (re)allocated.
// The output token comes from the key's low word: tokens must lie in [0, 2^32 - 1) and be
// distinct (the key is then unique).
#pragma once

#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace unshackle::cuda::topk {

constexpr int kMaxSorted = 4096;           // largest min(k, n) of the radix-select path
constexpr int kBins0 = 4096, kShift0 = 52;  // digit 0: key bits 63..52
constexpr int kBins1 = 2048, kShift1 = 41;  // digit 1: key bits 51..41
constexpr int kFixed1 = 23;                 // key bits fixed by digits 0 and 1
constexpr int kSelectThreads = 512, kSelectItems = 4;  // a tile: 2048 entries per block
constexpr int kTailItems = 8;   // candidates per thread in flight in the tail's scans
constexpr int kShared = 2048;   // tied candidates the tail moves to shared memory
constexpr int kFew = 32;        // tied candidates one warp ranks directly
constexpr int kRankThreads = 256, kRankKeysPerWarp = 2, kRankKeys = kRankThreads / 32 * kRankKeysPerWarp;
constexpr uint32_t kNone = 0xffffffffu;  // a bucket above every digit: nothing taken
// Digits after the first 23 bits: 11, 10, 10, 10 (23 -> 34 -> 44 -> 54 -> 64).
__host__ __device__ constexpr int tail_bits(int fixed) { return fixed == kFixed1 ? 11 : 10; }

// One select step: keys whose digit is above `bucket` are in; those equal to it are in when
// `whole`, else `remaining` of them (of `count`) are still wanted.
struct Decision {
  uint32_t bucket;
  uint32_t remaining;
  uint32_t whole;
  uint32_t count;
};

// Device state. Everything but `result` and `epoch` is zero between calls.
struct State {
  uint32_t hist0[kBins0];
  uint32_t hist1[kBins1];
  uint32_t ticket0, ticket1;  // blocks at the grid barrier, blocks done filtering (kernel 1)
  uint32_t valid;             // entries with token >= 0
  uint32_t selected;          // length of the selected list
  uint32_t candidates;        // length of the candidate buffer
  uint32_t result;            // final selected count: the rank and the host read it
  uint32_t epoch;             // calls whose tail finished (not zeroed: blocks wait for a change)
};

// Selected list (<= kMaxSorted, unordered) and candidate buffer (<= n): key and raw value.
struct Lists {
  uint64_t* selected_keys;
  float* selected_values;
  uint64_t* candidate_keys;
  float* candidate_values;
};

__device__ __forceinline__ uint32_t ordered_bits(float value) {
  const uint32_t bits = __float_as_uint(value);
  if (value != value) return 0;               // NaN: below every number
  if (value == 0.0f) return 0x80000000u;      // -0 ties with +0, as in the CPU's comparison
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Live entries only (token >= 0): the low word is >= 1, so no live key is 0.
__device__ __forceinline__ uint64_t ranking_key(float value, int64_t token) {
  return (static_cast<uint64_t>(ordered_bits(value)) << 32) | (0xffffffffu - static_cast<uint32_t>(token));
}

__device__ __forceinline__ int64_t token_of(uint64_t key) {
  return static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(key));
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
  if (active == 0) return;
  const unsigned peers = __match_any_sync(0xffffffffu, take ? digit : 0xffffffffu) & active;
  const int lane = threadIdx.x % 32;
  if (take && lane == __ffs(peers) - 1) atomicAdd(hist + digit, static_cast<uint32_t>(__popc(peers)));
}

// The bucket holding the r-th largest (1-based) of `total` keys counted in `hist` (a higher
// bin holds larger keys). Block-wide (every thread calls it with the same arguments and gets
// the answer). r == 0 takes nothing; r >= total takes everything.
template <int kThreads, int kBins, bool kGlobal>
__device__ Decision choose_bucket(const uint32_t* hist, uint32_t total, uint32_t r) {
  static_assert(kBins % kThreads == 0, "whole bins per thread");
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ Decision answer;
  if (r == 0) return {kNone, 0, 1, 0};
  if (r >= total) return {0, total, 1, total};
  constexpr int per = kBins / kThreads;
  const int top = kBins - 1 - static_cast<int>(threadIdx.x) * per;  // thread 0 owns the highest bins
  uint32_t h[per], sum = 0;
#pragma unroll
  for (int q = 0; q < per; ++q) {
    if constexpr (kGlobal) h[q] = __ldcg(hist + top - q);  // other blocks' atomics: from L2
    else h[q] = hist[top - q];
    sum += h[q];
  }
  __syncthreads();  // the storage and answer of an earlier call are free
  uint32_t above = 0;
  Scan(scan_storage).ExclusiveSum(sum, above);
  if (above < r && r <= above + sum) {
#pragma unroll
    for (int q = 0; q < per; ++q) {
      if (above + h[q] >= r) {
        const uint32_t remaining = r - above;
        answer = {static_cast<uint32_t>(top - q), remaining, h[q] == remaining ? 1u : 0u, h[q]};
        break;
      }
      above += h[q];
    }
  }
  __syncthreads();
  return answer;
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

// Calls f(key, value, live) for the entries [0, count) of (keys, values), kTailItems per
// thread loaded before any is used; every lane calls f equally often (f may use warp votes).
template <bool kGlobal, typename F>
__device__ __forceinline__ void for_each_candidate(const uint64_t* keys, const float* values, int64_t count, F&& f) {
  constexpr int64_t chunk = kSelectThreads * kTailItems;
  for (int64_t base = 0; base < count; base += chunk) {
    uint64_t key[kTailItems];
    float value[kTailItems];
#pragma unroll
    for (int j = 0; j < kTailItems; ++j) {
      const int64_t i = base + j * kSelectThreads + threadIdx.x;
      key[j] = 0;
      value[j] = 0.0f;
      if (i < count) {
        if constexpr (kGlobal) {  // written by other blocks of this kernel: from L2
          key[j] = __ldcg(keys + i);
          value[j] = __ldcg(values + i);
        } else {
          key[j] = keys[i];
          value[j] = values[i];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kTailItems; ++j) f(key[j], value[j], key[j] != 0);
  }
}

// Loads one tile (kSelectItems per thread, every load in flight before any is used) as
// ranking keys (0 = padding or past the end) and raw values.
__device__ __forceinline__ void load_tile(const TopKParams& p, int64_t base, uint64_t (&key)[kSelectItems],
                                          float (&value)[kSelectItems]) {
  int64_t token[kSelectItems];
#pragma unroll
  for (int j = 0; j < kSelectItems; ++j) {
    const int64_t i = base + j * kSelectThreads + threadIdx.x;
    token[j] = i < p.n ? __ldg(p.tokens + i) : -1;
    value[j] = i < p.n ? __ldg(p.values + i) : 0.0f;
  }
#pragma unroll
  for (int j = 0; j < kSelectItems; ++j) key[j] = token[j] >= 0 ? ranking_key(value[j], token[j]) : 0;
}

// Grid-wide barrier (the launch is cooperative: every block is resident). `arrived` counts the
// blocks; the select's last block resets it once every block is past (it is then in ticket1).
__device__ __forceinline__ void grid_barrier(uint32_t* arrived) {
  __syncthreads();  // the block's global atomics are issued
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(arrived, 1u);
    uint32_t seen = 0;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(arrived) : "memory");
    } while (seen < gridDim.x);
    __threadfence();
  }
  __syncthreads();
}

// Kernel 1 (cooperative, one launch): digit 0 of every live entry into the global histogram;
// grid barrier; every block picks the bucket b0 of the wanted-th key itself (wanted =
// min(k, live entries)) and filters its entries (the first tile still in registers): above b0
// to the selected list, in b0 to the candidate buffer with digit 1 into a second histogram.
// The last block to finish completes the select on the candidates alone.
__global__ void __launch_bounds__(kSelectThreads, 2) select_kernel(TopKParams p, State* state, Lists lists,
                                                                     uint32_t wanted_max, bool rank_here) {
  // One buffer reused by phase: digit 0's histogram (words 0..4095); digit 1's and the tail's
  // digits (words 0..2047), the tail's shared candidate values (words 2048..4095) and keys
  // (pool[2048..4095]); then the selected keys for the rank (pool[0..4095]).
  __shared__ alignas(16) uint64_t pool[kMaxSorted];
  uint32_t* const hist = reinterpret_cast<uint32_t*>(pool);
  __shared__ uint32_t block_valid, take_count, keep_count, take_base, keep_base;
  launch_dependents();  // the rank kernel's blocks (split mode) may start; they wait on the device
  // The tail block bumps the epoch only after every block has reached ticket1: read before.
  const uint32_t epoch = threadIdx.x == 0 ? __ldcg(&state->epoch) : 0;
  for (int b = threadIdx.x; b < kBins0; b += kSelectThreads) hist[b] = 0;
  if (threadIdx.x == 0) block_valid = take_count = keep_count = 0;
  __syncthreads();
  constexpr int64_t tile = kSelectThreads * kSelectItems;
  const int64_t first_base = blockIdx.x * tile, stride = static_cast<int64_t>(gridDim.x) * tile;
  uint64_t key0[kSelectItems];  // this block's first tile, kept for the filter
  float value0[kSelectItems];
  load_tile(p, first_base, key0, value0);
  uint32_t valid = 0;
  const auto count_tile = [&](const uint64_t (&key)[kSelectItems]) {
#pragma unroll
    for (int j = 0; j < kSelectItems; ++j) {
      valid += key[j] != 0;
      warp_histogram_add(hist, static_cast<uint32_t>(key[j] >> kShift0), key[j] != 0);
    }
  };
  count_tile(key0);
  for (int64_t base = first_base + stride; base < p.n; base += stride) {
    uint64_t key[kSelectItems];
    float value[kSelectItems];
    load_tile(p, base, key, value);
    count_tile(key);
  }
  valid = __reduce_add_sync(0xffffffffu, valid);
  if (threadIdx.x % 32 == 0 && valid) atomicAdd(&block_valid, valid);
  flush_histogram(hist, state->hist0, kBins0);
  __syncthreads();
  if (threadIdx.x == 0 && block_valid) atomicAdd(&state->valid, block_valid);
  grid_barrier(&state->ticket0);

  for (int b = threadIdx.x; b < kBins1; b += kSelectThreads) hist[b] = 0;
  const uint32_t total = __ldcg(&state->valid);
  const Decision first =
      choose_bucket<kSelectThreads, kBins0, true>(state->hist0, total, min(wanted_max, total));
  __syncthreads();  // hist is zeroed (choose_bucket's early returns do not sync)
  // Slots within the block (shared atomics), then one global atomic per list per tile.
  const auto filter_tile = [&](const uint64_t (&key)[kSelectItems], const float (&value)[kSelectItems]) {
    uint32_t slot[kSelectItems], kind = 0;  // kind: 2 bits per item, 1 = selected, 2 = candidate
#pragma unroll
    for (int j = 0; j < kSelectItems; ++j) {
      const uint32_t digit = static_cast<uint32_t>(key[j] >> kShift0);
      const bool live = key[j] != 0;
      const bool take = live && (digit > first.bucket || (first.whole && digit == first.bucket));
      const bool keep = live && !first.whole && digit == first.bucket;
      const uint32_t take_slot = warp_append(take, &take_count), keep_slot = warp_append(keep, &keep_count);
      slot[j] = take ? take_slot : keep_slot;
      kind |= (take ? 1u : keep ? 2u : 0u) << (2 * j);
      warp_histogram_add(hist, static_cast<uint32_t>(key[j] >> kShift1) & (kBins1 - 1), keep);
    }
    __syncthreads();
    if (threadIdx.x == 0) take_base = take_count ? atomicAdd(&state->selected, take_count) : 0;
    if (threadIdx.x == 32) keep_base = keep_count ? atomicAdd(&state->candidates, keep_count) : 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kSelectItems; ++j) {
      const uint32_t k = (kind >> (2 * j)) & 3u;
      if (k == 1 && take_base + slot[j] < kMaxSorted) {
        lists.selected_keys[take_base + slot[j]] = key[j];
        lists.selected_values[take_base + slot[j]] = value[j];
      } else if (k == 2) {
        lists.candidate_keys[keep_base + slot[j]] = key[j];
        lists.candidate_values[keep_base + slot[j]] = value[j];
      }
    }
    __syncthreads();  // every thread has read the bases
    if (threadIdx.x == 0) take_count = keep_count = 0;
    __syncthreads();
  };
  filter_tile(key0, value0);
  for (int64_t base = first_base + stride; base < p.n; base += stride) {  // from L2 where n fits there
    uint64_t key[kSelectItems];
    float value[kSelectItems];
    load_tile(p, base, key, value);
    filter_tile(key, value);
  }
  flush_histogram(hist, state->hist1, kBins1);
  const bool last = last_block_done(&state->ticket1);
  if (!last && !rank_here) return;
  if (last) {

  // Tail (one block): the candidates all share digit 0 = b0; `first.remaining` of them are
  // wanted. Digit 1's bucket fixes 23 key bits (`prefix`); while more than kFew candidates tie
  // on the prefix and not all of them are wanted, histogram the next digit over those that
  // tie (from the candidate buffer, or from shared memory once they fit there). Candidates
  // above the prefix are selected; those on it are selected whole, or ranked by one warp.
  __shared__ uint32_t tail_selected, shared_count, few_count;
  __shared__ uint64_t few_keys[kFew];
  __shared__ float few_values[kFew];
  static_assert(kBins0 - kBins1 >= kShared && kMaxSorted - kBins1 / 2 >= kShared, "the tail's candidates fit in pool");
  float* const shared_values = reinterpret_cast<float*>(hist + kBins1);
  uint64_t* const shared_keys = pool + kBins1;
  if (threadIdx.x == 0) {
    state->ticket0 = 0;  // every block is past the barrier (they all reached ticket1)
    state->ticket1 = 0;
    tail_selected = min(__ldcg(&state->selected), static_cast<uint32_t>(kMaxSorted));
    shared_count = few_count = 0;
  }
  const uint32_t candidates = __ldcg(&state->candidates);
  __syncthreads();
  const auto select = [&](bool take, uint64_t key, float value) {
    const uint32_t at = warp_append(take, &tail_selected);
    if (take && at < kMaxSorted) {
      lists.selected_keys[at] = key;
      lists.selected_values[at] = value;
    }
  };
  if (!first.whole) {
    Decision d = choose_bucket<kSelectThreads, kBins1, true>(state->hist1, candidates, first.remaining);
    uint64_t prefix = (static_cast<uint64_t>(first.bucket) << (kShift0 - kShift1)) | d.bucket;
    int fixed = kFixed1;
    bool in_shared = false;
    const uint64_t* keys = lists.candidate_keys;
    const float* values = lists.candidate_values;
    int64_t count = candidates;
    // Scans the current source (the buffer in global memory, or shared memory).
    const auto scan = [&](auto&& f) {
      if (in_shared) for_each_candidate<false>(keys, values, count, f);
      else for_each_candidate<true>(keys, values, count, f);
    };
    while (!d.whole && d.count > static_cast<uint32_t>(kFew) && fixed < 64) {
      if (!in_shared && d.count <= static_cast<uint32_t>(kShared)) {
        // Into shared memory: those above the prefix are selected, those on it kept.
        scan([&](uint64_t key, float value, bool live) {
          const uint64_t top = key >> (64 - fixed);
          select(live && top > prefix, key, value);
          const bool tie = live && top == prefix;
          const uint32_t at = warp_append(tie, &shared_count);
          if (tie && at < kShared) {
            shared_keys[at] = key;
            shared_values[at] = value;
          }
        });
        __syncthreads();
        in_shared = true;
        keys = shared_keys;
        values = shared_values;
        count = min(shared_count, static_cast<uint32_t>(kShared));
      }
      const int bits = tail_bits(fixed), shift = 64 - fixed - bits;
      for (int b = threadIdx.x; b < (1 << bits); b += kSelectThreads) hist[b] = 0;
      __syncthreads();
      scan([&](uint64_t key, float, bool live) {
        const bool tie = live && (key >> (64 - fixed)) == prefix;
        warp_histogram_add(hist, static_cast<uint32_t>(key >> shift) & ((1u << bits) - 1u), tie);
      });
      __syncthreads();
      d = bits == 11 ? choose_bucket<kSelectThreads, 2048, false>(hist, d.count, d.remaining)
                     : choose_bucket<kSelectThreads, 1024, false>(hist, d.count, d.remaining);
      prefix = (prefix << bits) | d.bucket;
      fixed += bits;
    }
    // Last scan: above the prefix, or on it when all of those are wanted: selected; else the
    // (<= kFew) ties go to one warp.
    scan([&](uint64_t key, float value, bool live) {
      const uint64_t top = key >> (64 - fixed);
      select(live && (top > prefix || (d.whole && top == prefix)), key, value);
      const bool tie = live && !d.whole && top == prefix;
      const uint32_t at = warp_append(tie, &few_count);
      if (tie && at < kFew) {
        few_keys[at] = key;
        few_values[at] = value;
      }
    });
    __syncthreads();
    if (!d.whole && threadIdx.x < 32) {  // the d.remaining largest of the ties
      const uint32_t lane = threadIdx.x, few = min(few_count, static_cast<uint32_t>(kFew));
      const uint64_t mine = lane < few ? few_keys[lane] : 0;
      uint32_t above = 0;
      for (uint32_t j = 0; j < few; ++j) above += few_keys[j] > mine;
      select(lane < few && above < d.remaining, mine, lane < few ? few_values[lane] : 0.0f);
    }
  }
  __syncthreads();
  // Zero the state for the next call (every other block of this kernel is done with it).
  for (int b = threadIdx.x; b < kBins0; b += kSelectThreads) state->hist0[b] = 0;
  for (int b = threadIdx.x; b < kBins1; b += kSelectThreads) state->hist1[b] = 0;
  if (threadIdx.x == 0) {
    state->valid = 0;
    state->selected = 0;
    state->candidates = 0;
    state->result = min(tail_selected, static_cast<uint32_t>(kMaxSorted));
  }
  if (!rank_here) return;
  __syncthreads();  // the tail's selections are stored (and pool is free)
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(&state->epoch, 1u);  // release: the other blocks rank now
  }
  } else if (threadIdx.x == 0) {  // wait for the tail block
    uint32_t seen = epoch;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(&state->epoch) : "memory");
    } while (seen == epoch);
    __threadfence();
  }
  __syncthreads();

  // Rank (every block): padding, and the rank order of the selected keys (unique: the key of
  // rank r has exactly r larger keys); block b ranks a contiguous share, one key per warp at a
  // time, its lanes counting the larger keys over a stride of the keys in shared memory.
  const uint32_t selected = min(__ldcg(&state->result), static_cast<uint32_t>(kMaxSorted));
  for (int64_t j = selected + static_cast<int64_t>(blockIdx.x) * kSelectThreads + threadIdx.x; j < p.k;
       j += static_cast<int64_t>(gridDim.x) * kSelectThreads) {
    p.out_values[j] = neg_inf();
    p.out_tokens[j] = -1;
  }
  const uint32_t share = (selected + gridDim.x - 1) / gridDim.x, lo = blockIdx.x * share;
  if (lo >= selected) return;
  const uint32_t hi = min(lo + share, selected), lane = threadIdx.x % 32;
#pragma unroll 4
  for (uint32_t j = threadIdx.x; j < selected; j += kSelectThreads) pool[j] = __ldcg(lists.selected_keys + j);
  __syncthreads();
  for (uint32_t q = lo + threadIdx.x / 32; q < hi; q += kSelectThreads / 32) {  // uniform per warp
    const uint64_t mine = pool[q];
    const float value = __ldcg(lists.selected_values + q);
    uint32_t above = 0;
    for (uint32_t j = lane; j < selected; j += 32) above += pool[j] > mine;
    above = __reduce_add_sync(0xffffffffu, above);
    if (lane == 0 && above < p.k) {
      p.out_values[above] = value;
      p.out_tokens[above] = token_of(mine);
    }
  }
}

// Split mode's second launch: padding, and the rank order of the selected keys: warp w of block b ranks keys
// b * kRankKeys + w * kRankKeysPerWarp + q, its lanes counting the larger keys in a stride.
__global__ void __launch_bounds__(kRankThreads) rank_kernel(TopKParams p, const State* state, Lists lists) {
  __shared__ uint64_t keys[kMaxSorted];
  wait_for_prerequisites();
  const uint32_t selected = min(__ldcg(&state->result), static_cast<uint32_t>(kMaxSorted));
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kRankThreads + threadIdx.x;
  for (int64_t j = selected + thread; j < p.k; j += static_cast<int64_t>(gridDim.x) * kRankThreads) {
    p.out_values[j] = neg_inf();
    p.out_tokens[j] = -1;
  }
  const uint32_t first = blockIdx.x * kRankKeys;
  if (first >= selected) return;
  const uint32_t lane = threadIdx.x % 32, own = first + threadIdx.x / 32 * kRankKeysPerWarp;
  uint64_t mine[kRankKeysPerWarp];
  float value[kRankKeysPerWarp];
#pragma unroll
  for (int q = 0; q < kRankKeysPerWarp; ++q) {
    const bool valid = own + q < selected;
    mine[q] = valid ? __ldcg(lists.selected_keys + own + q) : ~0ull;
    value[q] = valid ? __ldcg(lists.selected_values + own + q) : 0.0f;
  }
#pragma unroll 4
  for (uint32_t j = threadIdx.x; j < selected; j += kRankThreads) keys[j] = __ldcg(lists.selected_keys + j);
  __syncthreads();
  uint32_t above[kRankKeysPerWarp] = {};
  for (uint32_t j = lane; j < selected; j += 32) {
    const uint64_t other = keys[j];
#pragma unroll
    for (int q = 0; q < kRankKeysPerWarp; ++q) above[q] += other > mine[q];
  }
#pragma unroll
  for (int q = 0; q < kRankKeysPerWarp; ++q) {
    const uint32_t rank = __reduce_add_sync(0xffffffffu, above[q]);
    if (lane == static_cast<uint32_t>(q) && own + q < selected && rank < p.k) {
      p.out_values[rank] = value[q];
      p.out_tokens[rank] = token_of(mine[q]);
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
