// Chunk attention on tensor cores (launcher: attend.cu, for chunks of l_C >= kMinChunk query
// tokens with bf16 K/V): the FlashAttention-2 scheme over the stored rows of AttendParams.
//
// One CTA = (query tile, KV head g, split). The M dimension is the chunk's query tokens times
// g's GQA group, row m = c * group + h (token c, head g * group + h), so one K/V tile in shared
// memory serves every head of the group at once; N = the split's key rows (`rows` or
// contiguous), in tiles of kN. Each warp owns 16 * kAtoms query rows and keeps their online
// softmax (max, sum in log2 units) and the output accumulators in registers.
//   S = Q K^T    mma.sync m16n8k16 bf16 -> fp32, Q fragments by ldmatrix, K by ldmatrix
//   P = 2^(S * scale * log2 e - max), rounded to bf16 straight from the S registers
//   O += P V     the same mma, V fragments by ldmatrix.trans
// K/V tiles (and their row ids and tokens) arrive by cp.async one tile ahead of the compute;
// shared rows are XOR-swizzled in 16-byte chunks so that ldmatrix is conflict-free.
//
// Positions (SPEC §4): the queries are rotated once per call by prepare_queries_kernel into
// bf16 [G][l_C * group][d] (the Workspace); kRelative keys are rotated once per tile in shared
// memory (key_sincos: the angle reduced in float, the hardware sine/cosine as attend.cuh uses
// for keys). A key row < 0 in `rows` is padding: masked like a causally hidden key. A query
// row that sees no key gets o = 0 and lse = -inf.
//
// Numerics: Q, the rotated K and P are rounded to bf16 for the MMAs (V is stored bf16); every
// sum (QK^T, PV, the softmax denominator) is fp32. The denominator sums the bf16-rounded P,
// so o stays a convex combination of the value rows. tests/support/tolerance.h kBF16Mma
// states the resulting bound.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace unshackle::cuda::attend_mma {

constexpr int kMinChunk = 16;  // attend.cu dispatches l_C >= kMinChunk here (docs/kernels_notes.md)
constexpr int kN = 64;         // key rows per tile

// kWarps warps of 16 * kAtoms query rows each. d = 64: 4 warps x 32 rows (each K/V fragment
// from shared memory feeds two MMAs); d = 128: 8 warps x 16 rows (the 32-row variant's
// accumulators do not fit 255 registers with the Q fragments).
template <int D>
struct Config {
  static constexpr int kWarps = D == 64 ? 4 : 8;
  static constexpr int kAtoms = D == 64 ? 2 : 1;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kM = kWarps * 16 * kAtoms;  // query rows per CTA
  static constexpr int kChunks = D / 8;            // 16-byte chunks per row
  static constexpr bool kQInRegisters = kAtoms == 1;
  // Shared memory (16-byte chunks): Q [kM][D], K and V [2][kN][D]; then tokens [2][kN],
  // row ids [2][kN], inverse frequencies [D / 2].
  static constexpr size_t kQChunks = static_cast<size_t>(kM) * kChunks;
  static constexpr size_t kTileChunks = static_cast<size_t>(kN) * kChunks;
  static constexpr size_t kSmemBytes = (kQChunks + 4 * kTileChunks) * 16 + 2 * kN * 8 + 2 * kN * 4 + D / 2 * 4;
};

// The launch of one call: (query_tiles, G, splits) CTAs, split s over key indices
// [s * rows_per_split, +rows_per_split). `slots` = CTAs resident at once (occupancy x SMs);
// the keys are split only when query tiles x G leave slots empty, >= kMinSplitTiles tiles each.
struct Plan {
  int64_t query_tiles;
  int64_t rows_per_split;
  int splits;
};
constexpr int64_t kMinSplitTiles = 4;
template <int D>
inline Plan plan(const AttendParams& p, int64_t slots) {
  const int64_t M = static_cast<int64_t>(p.l_C) * (p.H / p.G);
  const int64_t query_tiles = (M + Config<D>::kM - 1) / Config<D>::kM;
  const int64_t key_tiles = (p.n + kN - 1) / kN;
  const int64_t wanted = std::clamp<int64_t>(slots / (query_tiles * p.G), 1, 4096);
  const int64_t tiles_per_split = std::max<int64_t>(kMinSplitTiles, (key_tiles + wanted - 1) / wanted);
  return {query_tiles, tiles_per_split * kN,
          static_cast<int>(std::max<int64_t>(1, (key_tiles + tiles_per_split - 1) / tiles_per_split))};
}

// Per-split (o, lse) like attend.cuh: row (c * H + h) * splits + split, or the output itself.
struct Outputs {
  float* o;    // [l_C * H * splits, D]
  float* lse;  // [l_C * H * splits]
  int splits;
};

// ---- PTX wrappers (sm_80+); tests/kernels/emulated/ptx_emulated.h defines the same functions
// for the host emulation of this kernel (kernels_mma_emulated_test) ----
#ifndef UNS_ATTEND_MMA_EMULATED

// The dynamic shared memory of the launch (Config<D>::kSmemBytes).
__device__ __forceinline__ unsigned char* dynamic_shared() {
  extern __shared__ __align__(128) unsigned char smem[];
  return smem;
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i. Lane l receives
// elements (l / 4, 2 (l % 4) .. +1) of each matrix (.trans: (2 (l % 4) .. +1, l / 4)).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// d += a (16x16, row) * b (16x8, col), bf16 in, fp32 accumulate.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared, L2 only; zero-fills the destination when !valid (src unread).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(shared_address(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(shared_address(dst)), "l"(src));
}
// Waits for every cp.async this thread issued (visible to others after __syncthreads()).
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

#endif  // UNS_ATTEND_MMA_EMULATED
// ---- end of PTX wrappers ----

// Two bf16 in one MMA operand word: the lower column in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return static_cast<uint32_t>(__bfloat16_as_ushort(v.x)) | static_cast<uint32_t>(__bfloat16_as_ushort(v.y)) << 16;
}
__device__ __forceinline__ float2 unpack_bf16(uint32_t bits) {
  return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
}

// sin and cos of a key's RoPE angle position * inv_freq, with the reduction to [-pi, pi] in
// float where |position| < 2^24 (x = float(position) exact): the product is split exactly into
// hi + lo by an fma, and 2 pi is subtracted in two float parts (Cody-Waite; the third part
// times |turns| < 2^22 is < 2e-8), so the reduced angle is within ~4e-7 of the exact one, as
// close as common.cuh's double reduction after its float rounding (~2e-7) and below
// __sincosf's own error (2^-21.4). The double path needs four conversions to or from 64-bit
// types per angle, at 16 per clock per SM against 128 fp32 operations (CUDA programming guide,
// compute capability 8.x/9.0): for the keys of every tile of every query tile, that mattered.
__device__ __forceinline__ void key_sincos(int64_t position, float x, bool exact, float inv_freq, float* s, float* c) {
  if (!exact) return rope_sincos_fast(position, inv_freq, s, c);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: x + kRound - kRound rounds x to an integer
  const float hi = x * inv_freq, lo = __fmaf_rn(x, inv_freq, -hi);
  const float turns = __fsub_rn(__fmaf_rn(hi, 0.15915493667125702f, kRound), kRound);
  float r = __fmaf_rn(-turns, 6.2831854820251465f, hi);  // float(2 pi)
  r = __fmaf_rn(-turns, -1.7484555314695172e-07f, r);    // 2 pi - float(2 pi)
  __sincosf(__fadd_rn(r, lo), s, c);
}

// Chunk `chunk` of shared row `row` (rows of D / 8 chunks): XOR of the low 3 chunk bits with
// the row, so the 8 rows one ldmatrix phase reads (same logical chunk) hit 8 distinct chunks.
template <int D>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * (D / 8) + (chunk ^ (row & 7));
}

// q_rot[g][c * group + h][D] = bf16(RoPE(q[c][g * group + h], position of query c)).
// static: one copy per translation unit that includes this header (as merge_kernel).
static __global__ void prepare_queries_kernel(AttendParams p, __nv_bfloat16* q_rot) {
  const int half = p.d / 2, group = p.H / p.G;
  const int64_t pairs = static_cast<int64_t>(p.l_C) * p.H * half, M = static_cast<int64_t>(p.l_C) * group;
  const bool relative = p.positions == PositionScheme::kRelative;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < pairs;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int64_t head_row = idx / half;  // c * H + head
    const int c = static_cast<int>(head_row / p.H), head = static_cast<int>(head_row % p.H);
    const int64_t position = relative ? p.q_token0 + c - p.origin : p.query_position;
    float s, co;
    rope_sincos(position, p.inv_freq[i], &s, &co);
    const float* src = p.q + head_row * p.d;
    const float x1 = src[i], x2 = src[i + half];
    __nv_bfloat16* dst = q_rot + ((head / group) * M + static_cast<int64_t>(c) * group + head % group) * p.d;
    dst[i] = __float2bfloat16_rn(x1 * co - x2 * s);
    dst[i + half] = __float2bfloat16_rn(x2 * co + x1 * s);
  }
}

// grid (query tiles, G, splits), Config<D>::kThreads threads, Config<D>::kSmemBytes dynamic
// shared memory. Split s covers key indices [s * rows_per_split, +rows_per_split) of [0, n).
template <int D>
__global__ void __launch_bounds__(Config<D>::kThreads)
    attend_mma_kernel(AttendParams p, const __nv_bfloat16* q_rot, int64_t rows_per_split, Outputs out) {
  using C = Config<D>;
  constexpr int kAtoms = C::kAtoms, kChunks = C::kChunks, kThreads = C::kThreads;
  constexpr int64_t kHidden = INT64_MAX;  // token of a padding key: above every query's limit
  uint4* shared_q = reinterpret_cast<uint4*>(dynamic_shared());
  uint4* shared_k = shared_q + C::kQChunks;          // [2][kN * kChunks]
  uint4* shared_v = shared_k + 2 * C::kTileChunks;   // [2][kN * kChunks]
  auto* shared_token = reinterpret_cast<int64_t*>(shared_v + 2 * C::kTileChunks);  // [2][kN]
  auto* shared_row = reinterpret_cast<int32_t*>(shared_token + 2 * kN);             // [2][kN]
  auto* shared_freq = reinterpret_cast<float*>(shared_row + 2 * kN);                // [D / 2]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = p.H / p.G, g = blockIdx.y, split = blockIdx.z;
  const int64_t M = static_cast<int64_t>(p.l_C) * group, m0 = static_cast<int64_t>(blockIdx.x) * C::kM;
  const int64_t begin = split * rows_per_split;
  const int64_t end = min(p.n, begin + rows_per_split);
  const int tiles = end > begin ? static_cast<int>((end - begin + kN - 1) / kN) : 0;
  const bool relative = p.positions == PositionScheme::kRelative;
  const bool need_tokens = relative || p.causal;
  const auto* keys = static_cast<const uint4*>(p.k);
  const auto* values = static_cast<const uint4*>(p.v);

  // Row ids of tile t into shared_row[t & 1] (-1: past the split's end, or padding in `rows`).
  const auto load_row_ids = [&](int t) {
    if (tid >= kN || t >= tiles) return;
    const int64_t i = begin + static_cast<int64_t>(t) * kN + tid;
    int32_t* dst = shared_row + (t & 1) * kN + tid;
    if (i >= end) *dst = -1;
    else if (p.rows) cp_async_4(dst, p.rows + i);
    else *dst = static_cast<int32_t>(i);
  };
  // K, V (and tokens) of tile t into buffer t & 1, from the row ids already in shared memory.
  const auto load_tile = [&](int t) {
    if (t >= tiles) return;
    const int b = t & 1;
    const int32_t* row_ids = shared_row + b * kN;
#pragma unroll
    for (int idx = tid; idx < kN * kChunks; idx += kThreads) {
      const int j = idx / kChunks, chunk = idx % kChunks;
      const int32_t row = row_ids[j];
      const int64_t at = (static_cast<int64_t>(row < 0 ? 0 : row) * p.G + g) * kChunks + chunk;
      const int slot = b * static_cast<int>(C::kTileChunks) + swizzle<D>(j, chunk);
      cp_async_16(shared_k + slot, keys + at, row >= 0);
      cp_async_16(shared_v + slot, values + at, row >= 0);
    }
    if (tid < kN) {
      const int32_t row = row_ids[tid];
      int64_t* dst = shared_token + b * kN + tid;
      if (row < 0) *dst = kHidden;
      else if (need_tokens) cp_async_8(dst, p.key_tokens + row);
      else *dst = 0;  // unrotated, non-causal: any value below the query limit
    }
  };

  // Prologue: Q tile, inverse frequencies, row ids of tiles 0 and 1; then tile 0 itself.
  const __nv_bfloat16* q_tile = q_rot + (g * M + m0) * D;
  for (int idx = tid; idx < C::kM * kChunks; idx += kThreads) {
    const int r = idx / kChunks, chunk = idx % kChunks;
    const bool inside = m0 + r < M;
    cp_async_16(shared_q + swizzle<D>(r, chunk), inside ? q_tile + static_cast<int64_t>(r) * D + chunk * 8 : q_rot, inside);
  }
  for (int i = tid; i < D / 2; i += kThreads) shared_freq[i] = p.inv_freq[i];
  load_row_ids(0);
  load_row_ids(1);
  cp_async_wait_all();
  __syncthreads();
  load_tile(0);

  // This thread's rows of each atom: r0 = lane / 4 and r0 + 8; their tokens' visibility limit.
  const int quad = lane / 4, pair = lane % 4;
  int64_t limit[kAtoms][2];
#pragma unroll
  for (int a = 0; a < kAtoms; ++a)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t m = m0 + warp * 16 * kAtoms + a * 16 + quad + 8 * r;
      limit[a][r] = p.causal ? p.q_token0 + m / group : kHidden - 1;
    }
  uint32_t q_frag[C::kQInRegisters ? D / 16 : 1][4];
  const auto q_row = [&](int a) { return warp * 16 * kAtoms + a * 16 + (lane & 7) + ((lane >> 3) & 1) * 8; };
  if constexpr (C::kQInRegisters) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) ldmatrix_x4(q_frag[ks], shared_q + swizzle<D>(q_row(0), 2 * ks + (lane >> 4)));
  }

  float acc[kAtoms][D / 8][4];
  float row_max[kAtoms][2], row_sum[kAtoms][2];
#pragma unroll
  for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][dt][e] = 0;
    row_max[a][0] = row_max[a][1] = neg_inf();
    row_sum[a][0] = row_sum[a][1] = 0;
  }
  const float scale_log2 = p.scale * 1.4426950408889634f;

  for (int t = 0; t < tiles; ++t) {
    cp_async_wait_all();
    __syncthreads();  // tile t and the row ids of t + 1 landed; every warp is done with tile t - 1
    load_tile(t + 1);
    load_row_ids(t + 2);  // into the slot tile t's ids used (read above, before the barrier)
    const int b = t & 1;
    uint4* tile_k = shared_k + b * C::kTileChunks;
    const uint4* tile_v = shared_v + b * C::kTileChunks;
    const int64_t* tile_token = shared_token + b * kN;

    if (relative) {  // rotate the tile's keys in place: element i with i + D/2, 8 pairs per step
      for (int idx = tid; idx < kN * (kChunks / 2); idx += kThreads) {
        const int j = idx / (kChunks / 2), chunk = idx % (kChunks / 2);
        const int64_t token = tile_token[j];
        if (token == kHidden) continue;
        const int64_t position = token - p.origin;
        const bool exact = position > -(int64_t{1} << 24) && position < (int64_t{1} << 24);
        const float position_f = static_cast<float>(exact ? position : 0);
        uint4* lo = tile_k + swizzle<D>(j, chunk);
        uint4* hi = tile_k + swizzle<D>(j, chunk + kChunks / 2);
        uint32_t x[4] = {lo->x, lo->y, lo->z, lo->w}, y[4] = {hi->x, hi->y, hi->z, hi->w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 x1 = unpack_bf16(x[e]), x2 = unpack_bf16(y[e]);
          float s0, c0, s1, c1;
          key_sincos(position, position_f, exact, shared_freq[chunk * 8 + 2 * e], &s0, &c0);
          key_sincos(position, position_f, exact, shared_freq[chunk * 8 + 2 * e + 1], &s1, &c1);
          x[e] = pack_bf16(x1.x * c0 - x2.x * s0, x1.y * c1 - x2.y * s1);
          y[e] = pack_bf16(x2.x * c0 + x1.x * s0, x2.y * c1 + x1.y * s1);
        }
        *lo = make_uint4(x[0], x[1], x[2], x[3]);
        *hi = make_uint4(y[0], y[1], y[2], y[3]);
      }
      __syncthreads();
    }

    // S = Q K^T: s[a][nt] is the 16x8 block of atom a and keys nt*8 .. nt*8+7.
    float s[kAtoms][kN / 8][4];
#pragma unroll
    for (int a = 0; a < kAtoms; ++a)
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[a][nt][e] = 0;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t qa[kAtoms][4];
#pragma unroll
      for (int a = 0; a < kAtoms; ++a) {
        if constexpr (C::kQInRegisters) {
#pragma unroll
          for (int e = 0; e < 4; ++e) qa[a][e] = q_frag[ks][e];
        } else {
          ldmatrix_x4(qa[a], shared_q + swizzle<D>(q_row(a), 2 * ks + (lane >> 4)));
        }
      }
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t kb[4];  // keys np*16 + 0..7 (kb 0, 1) and + 8..15 (kb 2, 3), d of step ks
        ldmatrix_x4(kb, tile_k + swizzle<D>(np * 16 + ((lane >> 4) << 3) + (lane & 7), 2 * ks + ((lane >> 3) & 1)));
#pragma unroll
        for (int a = 0; a < kAtoms; ++a) {
          mma_bf16(s[a][2 * np], qa[a], kb[0], kb[1]);
          mma_bf16(s[a][2 * np + 1], qa[a], kb[2], kb[3]);
        }
      }
    }

    // Mask, online softmax in log2 units, P to bf16 A fragments (row r0: e = 0, 1; r0 + 8: e = 2, 3).
    uint32_t pa[kAtoms][kN / 16][4];
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) {
      float tile_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t token = tile_token[nt * 8 + 2 * pair + (e & 1)];
          const float x = token > limit[a][e >> 1] ? neg_inf() : s[a][nt][e] * scale_log2;
          s[a][nt][e] = x;
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
        }
      }
      float base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        const float m_new = fmaxf(row_max[a][r], tile_max[r]);
        // Nothing visible yet: base 0 keeps every exp2 at exp2(-inf) = 0 (acc and sum stay 0).
        base[r] = m_new == neg_inf() ? 0.0f : m_new;
        const float correction = exp2f(row_max[a][r] - base[r]);
        row_max[a][r] = m_new;
        row_sum[a][r] *= correction;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          acc[a][dt][2 * r] *= correction;
          acc[a][dt][2 * r + 1] *= correction;
        }
      }
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint32_t packed = pack_bf16(exp2f(s[a][nt][2 * r] - base[r]), exp2f(s[a][nt][2 * r + 1] - base[r]));
          const float2 rounded = unpack_bf16(packed);
          row_sum[a][r] += rounded.x + rounded.y;
          pa[a][nt / 2][(nt & 1) * 2 + r] = packed;
        }
      }
    }

    // O += P V: k = keys kk*16 .. +15, n = d columns.
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];  // d columns dp*16 + 0..7 (vb 0, 1) and + 8..15 (vb 2, 3)
        ldmatrix_x4_trans(vb, tile_v + swizzle<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * dp + (lane >> 4)));
#pragma unroll
        for (int a = 0; a < kAtoms; ++a) {
          mma_bf16(acc[a][2 * dp], pa[a][kk], vb[0], vb[1]);
          mma_bf16(acc[a][2 * dp + 1], pa[a][kk], vb[2], vb[3]);
        }
      }
    }
  }

  // Epilogue: finish the row sums over the quad, normalise, write (o, lse) of rows < M.
#pragma unroll
  for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[a][r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int64_t m = m0 + warp * 16 * kAtoms + a * 16 + quad + 8 * r;
      if (m >= M) continue;
      const int64_t c = m / group, head = static_cast<int64_t>(g) * group + m % group;
      const int64_t at = (c * p.H + head) * out.splits + split;
      const float inv = sum > 0 ? 1.0f / sum : 0.0f;
      float* dst = out.o + at * D + 2 * pair;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(acc[a][dt][2 * r] * inv, acc[a][dt][2 * r + 1] * inv);
      if (pair == 0) out.lse[at] = sum > 0 ? row_max[a][r] * 0.6931471805599453f + logf(sum) : neg_inf();
    }
  }
}

}  // namespace unshackle::cuda::attend_mma
