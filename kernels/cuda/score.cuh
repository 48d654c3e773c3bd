// Scoring kernel bodies (launcher: score.cu). s(m, c) = q'_c . k'_m over stored compressed
// keys, fused with what the caller needs so that the [l_C x n] score matrix is never written:
//   kChunk:    score[m]     = max_c (s(m, c) - row_max[c])      (row_max may be null)
//   kQueryMax: query_max[c] = max_m s(m, c)                     (output pre-filled with -inf)
//
// Fast path (d_c in {64, 128, 256, 512, 1024}, 16-byte aligned rows): a sub-group of L lanes
// reads one row with 16-byte loads (bf16: 8 elements a load, fp32: 4), R rows per sub-group
// in flight before the first use, the shuffle reduction inside the sub-group. For l_C = 1
// (decode) the query sits in registers; for a chunk it is staged through shared memory in
// slices of 16 KB. Every other width takes the generic kernel (a warp per row).
#pragma once

#include "common.cuh"

namespace unshackle::cuda::score {

enum class Mode { kChunk, kQueryMax };

constexpr int kThreads = 256;
constexpr int kQuerySliceFloats = 4096;  // 16 KB of queries in shared memory

template <typename T, int kDc>
struct Shape {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));                   // per 16-byte load
  static constexpr int kLanes = kDc / kElems < 32 ? kDc / kElems : 32;               // per row
  static constexpr int kVectors = kDc / (kElems * kLanes);                           // loads per lane per row
  static constexpr int kRows = kVectors >= 4 ? 1 : 4 / kVectors;                     // rows per sub-group in flight
  static constexpr int kGroups = kThreads / kLanes;                                  // sub-groups per block
  static constexpr int kRowsPerIteration = kGroups * kRows;
  static constexpr int kSlice = kQuerySliceFloats / kDc;                             // queries per shared slice
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

template <int kLanes>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T, int kDc, Mode kMode, bool kSingle>
__global__ void __launch_bounds__(kThreads) score_rows_kernel(ScoreParams p) {
  using S = Shape<T, kDc>;
  constexpr int E = S::kElems, L = S::kLanes, V = S::kVectors, R = S::kRows;
  extern __shared__ float shared[];  // [kSlice * kDc] query slice (chunk), then [l_C] maxima (kQueryMax)
  float* query_slice = shared;
  float* block_max = shared + (kSingle ? 0 : S::kSlice * kDc);
  const int lane = threadIdx.x % L, group = threadIdx.x / L;
  const auto* keys = static_cast<const uint4*>(p.kc);
  constexpr int kRowVectors = kDc / E;

  float q[kSingle ? V : 1][E];  // decode: the query fragment of this lane
  if constexpr (kSingle) {
#pragma unroll
    for (int v = 0; v < V; ++v)
#pragma unroll
      for (int e = 0; e < E; ++e) q[v][e] = p.qc[(v * L + lane) * E + e];
  }
  const float row_max0 = kSingle && p.row_max ? p.row_max[0] : 0.0f;
  if constexpr (kMode == Mode::kQueryMax && !kSingle) {
    for (int c = threadIdx.x; c < p.l_C; c += blockDim.x) block_max[c] = neg_inf();
  }
  float running = neg_inf();  // kQueryMax, decode: this thread's max so far
  const bool resident = !kSingle && p.l_C <= S::kSlice;
  if (resident) {
    for (int i = threadIdx.x; i < p.l_C * kDc; i += blockDim.x) query_slice[i] = p.qc[i];
  }
  __syncthreads();

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * S::kRowsPerIteration; first < p.n;
       first += static_cast<int64_t>(gridDim.x) * S::kRowsPerIteration) {
    float key[R][V][E];
    bool live[R];
    {
      uint4 raw[R][V];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t i = first + group + static_cast<int64_t>(r) * S::kGroups;
        live[r] = i < p.n;
        const int64_t row = live[r] ? (p.rows ? static_cast<int64_t>(p.rows[i]) : i) : 0;
#pragma unroll
        for (int v = 0; v < V; ++v) raw[r][v] = live[r] ? __ldcs(keys + row * kRowVectors + v * L + lane) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int v = 0; v < V; ++v) unpack(raw[r][v], key[r][v], T{});
    }
    if constexpr (kSingle) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float acc = 0;
#pragma unroll
        for (int v = 0; v < V; ++v)
#pragma unroll
          for (int e = 0; e < E; ++e) acc = fmaf(key[r][v][e], q[v][e], acc);
        acc = group_sum<L>(acc);
        if constexpr (kMode == Mode::kChunk) {
          const int64_t i = first + group + static_cast<int64_t>(r) * S::kGroups;
          if (live[r] && lane == 0) p.score_out[i] = acc - row_max0;
        } else {
          if (live[r]) running = fmaxf(running, acc);
        }
      }
    } else {
      float best[R];
#pragma unroll
      for (int r = 0; r < R; ++r) best[r] = neg_inf();
      for (int c0 = 0; c0 < p.l_C; c0 += S::kSlice) {
        const int slice = min(S::kSlice, p.l_C - c0);
        if (!resident) {
          __syncthreads();
          for (int i = threadIdx.x; i < slice * kDc; i += blockDim.x) query_slice[i] = p.qc[static_cast<size_t>(c0) * kDc + i];
          __syncthreads();
        }
        const float* slice_base = resident ? query_slice + static_cast<size_t>(c0) * kDc : query_slice;
        for (int c = 0; c < slice; ++c) {
          const float* qc = slice_base + c * kDc;
          float s[R];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float acc = 0;
#pragma unroll
            for (int v = 0; v < V; ++v)
#pragma unroll
              for (int e = 0; e < E; ++e) acc = fmaf(key[r][v][e], qc[(v * L + lane) * E + e], acc);
            s[r] = group_sum<L>(acc);
          }
          if constexpr (kMode == Mode::kChunk) {
            const float shift = p.row_max ? p.row_max[c0 + c] : 0.0f;
#pragma unroll
            for (int r = 0; r < R; ++r) best[r] = fmaxf(best[r], s[r] - shift);
          } else {
            float m = neg_inf();
#pragma unroll
            for (int r = 0; r < R; ++r)
              if (live[r]) m = fmaxf(m, s[r]);
            m = warp_max(m);
            if (threadIdx.x % 32 == 0 && m != neg_inf()) atomic_max_float(block_max + c0 + c, m);
          }
        }
      }
      if constexpr (kMode == Mode::kChunk) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int64_t i = first + group + static_cast<int64_t>(r) * S::kGroups;
          if (live[r] && lane == 0) p.score_out[i] = best[r];
        }
      }
    }
  }
  if constexpr (kMode == Mode::kQueryMax) {
    if constexpr (kSingle) {
      __shared__ float warp_best[kThreads / 32];
      running = warp_max(running);
      if (threadIdx.x % 32 == 0) warp_best[threadIdx.x / 32] = running;
      __syncthreads();
      if (threadIdx.x == 0) {
        float m = warp_best[0];
        for (int w = 1; w < kThreads / 32; ++w) m = fmaxf(m, warp_best[w]);
        if (m != neg_inf()) atomic_max_float(p.query_max_out, m);
      }
    } else {
      __syncthreads();
      for (int c = threadIdx.x; c < p.l_C; c += blockDim.x)
        if (block_max[c] != neg_inf()) atomic_max_float(p.query_max_out + c, block_max[c]);
    }
  }
}

// ---- generic path: any d_c, any alignment (a warp per row, scalar loads) ----

__device__ __forceinline__ int64_t row_of(const ScoreParams& p, int64_t i) { return p.rows ? p.rows[i] : i; }

__device__ __forceinline__ float warp_score(const ScoreParams& p, int64_t row, const float* qc) {
  float acc = 0;
  const int64_t base = row * p.d_c;
  for (int e = threadIdx.x % 32; e < p.d_c; e += 32) acc = fmaf(load_as_float(p.kc, p.kc_dtype, base + e), qc[e], acc);
  return warp_sum(acc);
}

__global__ void generic_chunk_kernel(ScoreParams p) {
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

constexpr int kGenericWarps = 8, kGenericRowsPerWarp = 32;
__global__ void generic_query_max_kernel(ScoreParams p) {
  __shared__ float warp_best[kGenericWarps];
  const int warp = threadIdx.x / 32;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kGenericWarps + warp) * kGenericRowsPerWarp;
  const int64_t last = min(first + kGenericRowsPerWarp, p.n);
  for (int c = 0; c < p.l_C; ++c) {
    const float* qc = p.qc + static_cast<size_t>(c) * p.d_c;
    float best = neg_inf();
    for (int64_t i = first; i < last; ++i) best = fmaxf(best, warp_score(p, row_of(p, i), qc));
    if (threadIdx.x % 32 == 0) warp_best[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
      float block_best = warp_best[0];
      for (int w = 1; w < kGenericWarps; ++w) block_best = fmaxf(block_best, warp_best[w]);
      if (block_best != neg_inf()) atomic_max_float(p.query_max_out + c, block_best);
    }
    __syncthreads();
  }
}

__global__ void fill_kernel(float* out, int n, float value) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = value;
}

}  // namespace unshackle::cuda::score
