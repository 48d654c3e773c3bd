// Attention kernel bodies (launcher: attend.cu): partial attention of a chunk's queries over
// stored rows (SPEC §4), split along the rows over many CTAs; the splits are combined by the
// LSE merge (merge.cuh). One CTA = one (split, KV head g, query token c) and serves every
// query head of g's GQA group, so each K/V row is read once per query token.
//
// A rows entry < 0 is no row: both paths skip it (it contributes nothing; params.h).
//
// Fast path (head dim 32/64/128, and 256 in bf16; group of 1/2/4/8 heads, 16-byte aligned
// rows): a "worker" of L = d / (16 / sizeof(T)) lanes owns one row at a time and reads it
// with one 16-byte load per lane (bf16 d = 128: 16 lanes, 8 elements each), so a 128-thread
// CTA has 128 / L workers on consecutive rows. L must be a power of two within one warp
// (the shuffles below): 4..32, so f32 d = 256 (L = 64) and d = 96 (L = 12 or 24) take the
// generic path. Each worker keeps its own online softmax (m, l, acc) per head
// in registers, with the next rows' K/V already loaded while the current ones are used;
// workers are combined through shared memory at the end. RoPE's rotate-half partner of a
// lane's elements sits L/2 lanes away (one shuffle). Angles: position * inv_freq reduced in
// double, then sincosf for the queries and the hardware __sincosf for the keys (every row's
// rotation is the kernel's main arithmetic; see common.cuh for the error bounds).
#pragma once

#include "common.cuh"

namespace unshackle::cuda::attend {

constexpr int kThreads = 128;

template <typename T, int D, int GH>
struct Shape {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  static constexpr int kLanes = D / kElems;               // lanes per row (4..32)
  static_assert(kLanes >= 2 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "a row's lanes: a power of two in a warp");
  static constexpr int kWorkers = kThreads / kLanes;
  static constexpr int kRows = GH >= 8 ? 1 : 2;           // rows per worker per step (plus the prefetched step)
  static constexpr int kRowsPerStep = kWorkers * kRows;
};

__device__ __forceinline__ void unpack(const uint4& raw, float* out, float) {
  out[0] = __uint_as_float(raw.x); out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z); out[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ void unpack(const uint4& raw, float* out, __nv_bfloat16) {
  const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Rotates this lane's E elements (element lane * E + e of the head) by RoPE at `position`.
template <int E, int L, bool kFast>
__device__ __forceinline__ void rope_lane(float* x, int lane, int64_t position, const float* inv_freq) {
  const bool first_half = lane < L / 2;
  const int f0 = (lane % (L / 2)) * E;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const float partner = __shfl_xor_sync(0xffffffffu, x[e], L / 2);
    float s, c;
    if (kFast) rope_sincos_fast(position, inv_freq[f0 + e], &s, &c);
    else rope_sincos(position, inv_freq[f0 + e], &s, &c);
    x[e] = first_half ? x[e] * c - partner * s : x[e] * c + partner * s;
  }
}

template <int L>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = L / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Writes (o, lse) of (c, h, split) either to the partials or, with one split, to the output.
struct Outputs {
  float* o;    // [l_C * H * splits, D] row (c * H + h) * splits + split
  float* lse;  // [l_C * H * splits]
  int splits;
};

template <typename T, int D, int GH>
__global__ void __launch_bounds__(kThreads, 4) attend_rows_kernel(AttendParams p, int64_t rows_per_split, Outputs out) {
  using S = Shape<T, D, GH>;
  constexpr int E = S::kElems, L = S::kLanes, W = S::kWorkers, R = S::kRows;
  __shared__ float shared_m[W][GH], shared_l[W][GH];
  __shared__ float shared_acc[W][GH][D];
  const int split = blockIdx.x, g = blockIdx.y, c = blockIdx.z;
  const int lane = threadIdx.x % L, worker = threadIdx.x / L;
  const int64_t query_token = p.q_token0 + c;
  const bool relative = p.positions == PositionScheme::kRelative;
  const int64_t query_position = relative ? query_token - p.origin : p.query_position;

  const int64_t begin = split * rows_per_split;
  const int64_t end = min(static_cast<int64_t>(p.n), begin + rows_per_split);
  const auto* keys = static_cast<const uint4*>(p.k);
  const auto* values = static_cast<const uint4*>(p.v);
  // Row r of a step starting at `first`: first + r * W + worker (consecutive workers, consecutive rows).
  const auto load = [&](int64_t first, uint4 (&raw_k)[R], uint4 (&raw_v)[R], int64_t (&row)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = first + r * W + worker;
      // -1 past the split's end; a rows entry < 0 (no row) stays negative: neither is loaded
      // (zeros), and both give logit -inf below, in this step and in the prefetched one.
      row[r] = i < end ? (p.rows ? static_cast<int64_t>(p.rows[i]) : i) : -1;
      const int64_t at = (row[r] * p.G + g) * (D / E) + lane;
      raw_k[r] = row[r] >= 0 ? __ldcs(keys + at) : make_uint4(0, 0, 0, 0);
      raw_v[r] = row[r] >= 0 ? __ldcs(values + at) : make_uint4(0, 0, 0, 0);
    }
  };
  // The first rows are requested before the query rotation below, which then hides their latency.
  uint4 raw_k[R], raw_v[R];
  int64_t row[R];
  load(begin, raw_k, raw_v, row);

  // The group's rotated queries in shared memory (registers go to the in-flight rows).
  __shared__ __align__(16) float query[GH][D];
  float acc[GH][E], m[GH], l[GH];
#pragma unroll
  for (int h = 0; h < GH; ++h) {
    const float* src = p.q + (static_cast<size_t>(c) * p.H + g * GH + h) * D + lane * E;
    float x[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      x[e] = src[e];
      acc[h][e] = 0;
    }
    rope_lane<E, L, false>(x, lane, query_position, p.inv_freq);
    if (worker == 0) {
#pragma unroll
      for (int e = 0; e < E; ++e) query[h][lane * E + e] = x[e];
    }
    m[h] = neg_inf();
    l[h] = 0;
  }
  __syncthreads();

  for (int64_t first = begin; first < end; first += S::kRowsPerStep) {
    uint4 next_k[R], next_v[R];
    int64_t next_row[R];
    load(first + S::kRowsPerStep, next_k, next_v, next_row);  // in flight while this step computes
    float logit[R][GH], value[R][E];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float key[E];
      unpack(raw_k[r], key, T{});
      unpack(raw_v[r], value[r], T{});
      const bool live = row[r] >= 0;
      const int64_t token = live && (relative || p.causal) ? p.key_tokens[row[r]] : 0;
      if (relative) rope_lane<E, L, true>(key, lane, token - p.origin, p.inv_freq);
      const bool visible = live && !(p.causal && token > query_token);
#pragma unroll
      for (int h = 0; h < GH; ++h) {
        float dot = 0;
#pragma unroll
        for (int e = 0; e < E; e += 4) {
          const float4 qv = *reinterpret_cast<const float4*>(&query[h][lane * E + e]);
          dot = fmaf(qv.x, key[e], dot);
          dot = fmaf(qv.y, key[e + 1], dot);
          dot = fmaf(qv.z, key[e + 2], dot);
          dot = fmaf(qv.w, key[e + 3], dot);
        }
        dot = group_sum<L>(dot);
        logit[r][h] = visible ? dot * p.scale : neg_inf();
      }
    }
#pragma unroll
    for (int h = 0; h < GH; ++h) {
      float step_max = logit[0][h];
#pragma unroll
      for (int r = 1; r < R; ++r) step_max = fmaxf(step_max, logit[r][h]);
      const float m_new = fmaxf(m[h], step_max);
      if (m_new == neg_inf()) continue;  // nothing visible yet
      const float correction = expf(m[h] - m_new);
      l[h] *= correction;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] *= correction;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float w = logit[r][h] == neg_inf() ? 0.0f : expf(logit[r][h] - m_new);
        l[h] += w;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] = fmaf(w, value[r][e], acc[h][e]);
      }
      m[h] = m_new;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      raw_k[r] = next_k[r];
      raw_v[r] = next_v[r];
      row[r] = next_row[r];
    }
  }

  // Combine the workers.
#pragma unroll
  for (int h = 0; h < GH; ++h) {
    if (lane == 0) {
      shared_m[worker][h] = m[h];
      shared_l[worker][h] = l[h];
    }
#pragma unroll
    for (int e = 0; e < E; ++e) shared_acc[worker][h][lane * E + e] = acc[h][e];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < GH * D; idx += blockDim.x) {
    const int h = idx / D, j = idx % D;
    float best = neg_inf();
#pragma unroll
    for (int w = 0; w < W; ++w) best = fmaxf(best, shared_m[w][h]);
    float sum = 0, total = 0;
    if (best != neg_inf()) {
#pragma unroll
      for (int w = 0; w < W; ++w) {
        if (shared_m[w][h] == neg_inf()) continue;
        const float scale = expf(shared_m[w][h] - best);
        sum = fmaf(shared_l[w][h], scale, sum);
        total = fmaf(shared_acc[w][h][j], scale, total);
      }
    }
    const size_t at = (static_cast<size_t>(c) * p.H + g * GH + h) * out.splits + split;
    out.o[at * D + j] = sum > 0 ? total / sum : 0.0f;
    if (j == 0) out.lse[at] = sum > 0 ? best + logf(sum) : neg_inf();
  }
}

// ---- generic path: head dim a multiple of 32 up to 256, any group up to 16, any alignment
// (tiles of up to 32 rows through shared memory) ----

constexpr int kTile = 32;
constexpr int kMaxGroup = 16;
// Rows per tile for head dim D: keys and values of a tile plus the group's queries stay in
// the 48 KB of static shared memory (D = 256: 32 rows would take 82 KB, 8 rows take 33 KB).
constexpr int generic_tile(int D) { return D <= 128 ? kTile : 8; }

// kTile here is the tile of this D (it shadows the namespace's 32).
template <int D, int kTile = generic_tile(D)>
__global__ void generic_attend_kernel(AttendParams p, int64_t rows_per_split, int splits, float* part_o, float* part_lse) {
  __shared__ float keys[kTile][D + 1];  // +1: lanes reading different rows hit different banks
  __shared__ float values[kTile][D + 1];
  __shared__ int64_t tokens[kTile];
  __shared__ bool live[kTile];  // false: a rows entry < 0 (no row), zero K/V and no logit
  __shared__ float queries[kMaxGroup][D];
  const int split = blockIdx.x, g = blockIdx.y, c = blockIdx.z;
  const int group = p.H / p.G, warp = threadIdx.x / 32, lane = threadIdx.x % 32, half = D / 2;
  const int h = g * group + warp;
  const int64_t query_token = p.q_token0 + c;
  const int64_t query_position = p.positions == PositionScheme::kGlobal ? p.query_position : query_token - p.origin;
  for (int idx = threadIdx.x; idx < group * half; idx += blockDim.x) {
    const int w = idx / half, i = idx % half;
    const float* q = p.q + (static_cast<size_t>(c) * p.H + g * group + w) * D;
    float s, co;
    rope_sincos(query_position, p.inv_freq[i], &s, &co);
    queries[w][i] = q[i] * co - q[i + half] * s;
    queries[w][i + half] = q[i + half] * co + q[i] * s;
  }
  const int64_t begin = split * rows_per_split, end = min(static_cast<long long>(p.n), static_cast<long long>(begin + rows_per_split));
  float m = neg_inf(), l = 0, acc[D / 32];
  for (int k = 0; k < D / 32; ++k) acc[k] = 0;
  for (int64_t tile = begin; tile < end; tile += kTile) {
    const int count = static_cast<int>(end - tile < kTile ? end - tile : kTile);
    __syncthreads();  // previous tile fully consumed (and queries written, first time)
    for (int idx = threadIdx.x; idx < kTile * half; idx += blockDim.x) {
      const int j = idx / half, i = idx % half;
      if (j >= count) continue;
      const int64_t row = p.rows ? p.rows[tile + j] : tile + j;
      if (row < 0) {  // zeros, not stale shared memory: the value loop multiplies them by weight 0
        keys[j][i] = keys[j][i + half] = values[j][i] = values[j][i + half] = 0.0f;
        if (i == 0) live[j] = false;
        continue;
      }
      const int64_t token = p.key_tokens[row];
      const int64_t base = (row * p.G + g) * D;
      float k1 = load_as_float(p.k, p.kv_dtype, base + i), k2 = load_as_float(p.k, p.kv_dtype, base + i + half);
      if (p.positions == PositionScheme::kRelative) {
        float s, co;
        rope_sincos(token - p.origin, p.inv_freq[i], &s, &co);
        const float r1 = k1 * co - k2 * s, r2 = k2 * co + k1 * s;
        k1 = r1;
        k2 = r2;
      }
      keys[j][i] = k1;
      keys[j][i + half] = k2;
      values[j][i] = load_as_float(p.v, p.kv_dtype, base + i);
      values[j][i + half] = load_as_float(p.v, p.kv_dtype, base + i + half);
      if (i == 0) {
        tokens[j] = token;
        live[j] = true;
      }
    }
    __syncthreads();
    float logit = neg_inf();
    if (lane < count && live[lane] && !(p.causal && tokens[lane] > query_token)) {
      float dot = 0;
      for (int i = 0; i < D; ++i) dot = fmaf(queries[warp][i], keys[lane][i], dot);
      logit = dot * p.scale;
    }
    const float tile_max = warp_max(logit);
    if (tile_max == neg_inf()) continue;  // nothing visible in this tile
    const float m_new = fmaxf(m, tile_max);
    const float correction = expf(m - m_new);
    const float weight = logit == neg_inf() ? 0.0f : expf(logit - m_new);
    l = l * correction + warp_sum(weight);
    for (int k = 0; k < D / 32; ++k) acc[k] *= correction;
    for (int j = 0; j < count; ++j) {
      const float w = __shfl_sync(0xffffffffu, weight, j);
      for (int k = 0; k < D / 32; ++k) acc[k] = fmaf(w, values[j][lane + 32 * k], acc[k]);
    }
    m = m_new;
  }
  const size_t part = (static_cast<size_t>(c) * p.H + h) * splits + split;
  for (int k = 0; k < D / 32; ++k) part_o[part * D + lane + 32 * k] = l > 0 ? acc[k] / l : 0.0f;
  if (lane == 0) part_lse[part] = l > 0 ? m + logf(l) : neg_inf();
}

}  // namespace unshackle::cuda::attend
