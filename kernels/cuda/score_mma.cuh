// Tensor-core chunk scoring (launcher: score.cu): the two ops of score.cuh for a prefill chunk
// over bf16 k', on mma.sync m16n8k16 (bf16 in, fp32 accumulate; sm_80 and later):
//   kChunk:    score[m]     = max_c (s(m, c) - shift[c])    shift[c] = row_max[c], or 0
//   kQueryMax: query_max[c] = max_m s(m, c)                 (output pre-filled with -inf)
// s(m, c) = q'_c . k'_m; the [n x l_C] matrix exists only as register tiles.
//
// Numerics. q' is fp32 and the MMA takes bf16, so prep_queries_kernel splits each query once
// per call into hi = bf16(q) and lo = bf16(q - hi) (|q - hi - lo| <= 2^-18 |q|), and every
// tile runs two MMAs into one fp32 accumulator, k.hi + k.lo. k' is bf16 already, so every
// product is exact; what is left is the split's 2^-18 and the accumulator's fp32 rounding
// (docs/kernels_notes.md has the bound; tests/support/tolerance.h kSplitBF16Score).
//
// Work. A persistent CTA takes key tiles of kBM rows (blockIdx.x, + gridDim.x, ...). For each
// tile it loops over the chunk's queries in tiles of kBN = 64, each in k-pieces of 64 channels:
// one *item* = (key tile, query tile, piece), d_c / 64 items per query tile. 8 warps, 4 over
// rows x 2 over queries, each holding a (kMT * 16) x 32 block of s. kChunk keeps each row's max
// over c in registers for the whole key tile; kQueryMax folds every query tile's column maxima
// into a shared [J * kBN] array, then one global atomic max per column per CTA at the end.
//
// Pipeline (cp.async, one commit group per item). Item x's queries are issued kStages - 1
// items ahead. The next key tile goes to the other key buffer in pieces during the first
// items of the current one: every piece lands in a group that the next tile's first item
// waits for anyway (when a tile has fewer than kStages - 1 items, the tile is issued at once
// and each tile's first item waits for everything). With a rows list, the row indices of tile
// t + 2 are read into a register at tile t's first item and stored at its last, so no load
// waits on them.
//
// Shared memory; every tile is [rows][64 channels] bf16 in 128-byte rows whose 16-byte chunks
// are XOR-swizzled by (row & 7), so ldmatrix's 8 row addresses hit 8 different bank groups:
//   keys     [2][d_c / 64][kBM][64] bf16       this key tile and the next
//   queries  [kStages][2 (hi, lo)][kBN][64]    one item each (written swizzled by the prep)
//   rows     [2][kBM] int32                    row indices of the next tiles (rows list)
//   red      [2][kBM] f32                      kChunk: the two query-warp halves of a row's max
//   colmax   [J * kBN] f32                     kQueryMax
#pragma once

#include "common.cuh"
#include "score.cuh"

namespace unshackle::cuda::score_mma {

using score::Mode;

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarpsM = 4, kWarpsN = 2;
constexpr int kBN = 64;        // queries per query tile (kWarpsN x 32)
constexpr int kPiece = 64;     // channels per item
constexpr int kStages = 3;     // query items resident
constexpr int kRowBytes = kPiece * 2;                // one row of a piece: 8 chunks of 16 bytes
constexpr int kStageBytes = 2 * kBN * kRowBytes;     // hi + lo of one item: 16 KB
constexpr int kMinQueries = 16;                      // below: score.cuh's FMA kernels
constexpr int kMaxQueryMaxColumns = 8192;            // kQueryMax's shared column maxima (32 KB)

template <int kDc>
struct Tile {
  static_assert(kDc % kPiece == 0 && kDc <= 256, "d_c: a multiple of 64, at most 256");
  static constexpr int kMT = kDc <= 128 ? 4 : 2;     // m16 tiles per warp (d_c = 256: smaller, to fit two key tiles)
  static constexpr int kBM = kWarpsM * kMT * 16;     // key rows per tile: 256, or 128 at d_c = 256
  static constexpr int kPieces = kDc / kPiece;
  static constexpr int kKeyBytes = kBM * kDc * 2;    // one key tile
  static constexpr int kKeyChunks = kKeyBytes / 16;
  static constexpr int kRowChunks = kDc / 8;         // 16-byte chunks of one key row
};

struct Args {
  const void* kc = nullptr;          // [n_store, d_c] bf16, 16-byte aligned
  const int32_t* rows = nullptr;     // [n] rows of kc, or nullptr -> [0, n)
  int64_t n = 0;
  int l_C = 0;
  int query_tiles = 0;               // J = ceil(l_C / kBN)
  const uint4* q_split = nullptr;    // [J][d_c / 64][2][kBN][64] bf16 from prep_queries_kernel
  const float* shift = nullptr;      // [J * kBN] kChunk: row_max[c] (or 0), +inf past l_C
  float* query_max_out = nullptr;    // [l_C] kQueryMax, pre-filled with -inf
  float* score_out = nullptr;        // [n] kChunk
};

template <int kDc, Mode kMode>
size_t shared_bytes(int query_tiles) {
  using T = Tile<kDc>;
  return 2 * size_t{T::kKeyBytes} + size_t{kStages} * kStageBytes + 2 * T::kBM * sizeof(int32_t) +
         2 * T::kBM * sizeof(float) + (kMode == Mode::kQueryMax ? size_t(query_tiles) * kBN * sizeof(float) : 0);
}

// Byte offset of logical 16-byte chunk `chunk` (0..7) of `row` in a swizzled [rows][128 B] tile.
__host__ __device__ constexpr uint32_t swizzle(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; fill = false writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool fill) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(fill ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// d += a (16x16, row) * b (16x8, col), bf16 in, fp32 accumulate.
// Not volatile: a function of its registers only, so the compiler may schedule it freely.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// q_split, 16-byte chunk o = ((item * 2 + h) * kBN + n) * 8 + phys, item = j * (d_c / 64) + piece:
// the 8 channels piece * 64 + (phys ^ (n & 7)) * 8 .. + 7 of part h (0: hi, 1: lo) of query
// j * kBN + n (zeros past l_C), i.e. each item's 16 KB already in its shared-memory layout.
// shift[c] = row_max[c] (0 when null) for c < l_C, +inf for the padding columns.
template <int kDc>
__global__ void prep_queries_kernel(const float* qc, const float* row_max, int l_C, int query_tiles, uint4* q_split,
                                    float* shift) {
  constexpr int kPieces = kDc / kPiece;
  const int chunks = query_tiles * kPieces * 2 * kBN * 8;
  const int stride = gridDim.x * blockDim.x;
  for (int o = blockIdx.x * blockDim.x + threadIdx.x; o < chunks; o += stride) {
    const int phys = o % 8, n = (o / 8) % kBN, h = (o / (8 * kBN)) % 2, item = o / (16 * kBN);
    const int c = (item / kPieces) * kBN + n, k0 = (item % kPieces) * kPiece + (phys ^ (n & 7)) * 8;
    __align__(16) __nv_bfloat16 part[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float q = c < l_C ? qc[static_cast<size_t>(c) * kDc + k0 + e] : 0.0f;
      const __nv_bfloat16 hi = __float2bfloat16_rn(q);
      part[e] = h == 0 ? hi : __float2bfloat16_rn(q - __bfloat162float(hi));  // q - hi is exact in fp32
    }
    q_split[o] = *reinterpret_cast<const uint4*>(part);
  }
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < query_tiles * kBN; c += stride)
    shift[c] = c < l_C ? (row_max ? row_max[c] : 0.0f) : __int_as_float(0x7f800000);
}

template <int kDc, Mode kMode>
__global__ void __launch_bounds__(kThreads, 1) score_mma_kernel(const Args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 mma.sync needs sm_80; the launcher never sends older devices here
#else
  using T = Tile<kDc>;
  constexpr int kMT = T::kMT, kBM = T::kBM, kPieces = T::kPieces;
  extern __shared__ uint4 shared_raw[];
  unsigned char* const keys = reinterpret_cast<unsigned char*>(shared_raw);
  unsigned char* const queries = keys + 2 * T::kKeyBytes;
  int32_t* const rows_buf = reinterpret_cast<int32_t*>(queries + kStages * kStageBytes);
  float* const red = reinterpret_cast<float*>(rows_buf + 2 * kBM);
  float* const colmax = red + 2 * kBM;
  const uint32_t keys_s = shared_address(keys), queries_s = shared_address(queries);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  const int64_t tiles = (a.n + kBM - 1) / kBM;  // the grid is at most this
  const int my_tiles = static_cast<int>((tiles - blockIdx.x + gridDim.x - 1) / gridDim.x);
  const int per_tile = a.query_tiles * kPieces;  // items of one key tile
  const int items = my_tiles * per_tile;
  // The next tile's keys go out over this tile's first key_pieces items, so the last piece
  // is in the group that the next tile's first item waits for; <= 0: all at item 0.
  const int key_pieces = per_tile - kStages + 2;
  const auto first_row = [&](int local) { return (static_cast<int64_t>(local) * gridDim.x + blockIdx.x) * kBM; };

  // Chunks [begin, end) of key tile `local` (chunk = row * d_c / 8 + 16-byte column).
  const auto load_keys = [&](int local, int begin, int end) {
    const int64_t row0 = first_row(local);
    const uint32_t base = keys_s + (local % 2) * T::kKeyBytes;
    const int32_t* tile_rows = rows_buf + (local % 2) * kBM;
    for (int c = begin + tid; c < end; c += kThreads) {
      const int r = c / T::kRowChunks, column = c % T::kRowChunks;
      const int64_t i = row0 + r;
      const bool live = i < a.n;
      const int64_t row = !live ? 0 : a.rows ? static_cast<int64_t>(tile_rows[r]) : i;
      const uint4* src = static_cast<const uint4*>(a.kc) + row * T::kRowChunks + column;
      cp_async16(base + (column / 8) * (kBM * kRowBytes) + swizzle(r, column % 8), src, live);
    }
  };
  const auto load_queries = [&](int x) {
    const uint4* src = a.q_split + static_cast<size_t>(x % per_tile) * (kStageBytes / 16);
    const uint32_t dst = queries_s + (x % kStages) * kStageBytes;
#pragma unroll
    for (int c = tid; c < kStageBytes / 16; c += kThreads) cp_async16(dst + c * 16, src + c, true);
  };

  if constexpr (kMode == Mode::kQueryMax) {
    for (int c = tid; c < a.query_tiles * kBN; c += kThreads) colmax[c] = neg_inf();
  }
  if (a.rows) {  // row indices of the first two tiles; later ones arrive two tiles ahead
    for (int r = tid; r < 2 * kBM; r += kThreads) {
      const int64_t i = first_row(r / kBM) + r % kBM;
      rows_buf[r] = r / kBM < my_tiles && i < a.n ? a.rows[i] : 0;
    }
  }
  __syncthreads();
  load_keys(0, 0, T::kKeyChunks);
  load_queries(0);
  cp_async_commit();
#pragma unroll
  for (int x = 1; x < kStages - 1; ++x) {
    if (x < items) load_queries(x);
    cp_async_commit();
  }

  float acc[kMT][4][4];  // [m16 tile][n8 tile][fragment]: rows lane/4 (+8), columns 2*(lane%4) (+1)
  float best[kMT][2];    // kChunk: rows lane/4 and lane/4 + 8 of each m16 tile
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) best[mt][0] = best[mt][1] = neg_inf();
  int32_t rows_ahead = 0;

  for (int w = 0; w < items; ++w) {
    const int local = w / per_tile, item = w % per_tile, j = item / kPieces, piece = item % kPieces;
    if (key_pieces <= 0 && item == 0) cp_async_wait<0>();
    else cp_async_wait<kStages - 2>();
    __syncthreads();  // item w's copies are visible, and nobody still reads the buffers refilled next

    if (w + kStages - 1 < items) load_queries(w + kStages - 1);
    if (local + 1 < my_tiles) {
      if (key_pieces > 0) {
        if (item < key_pieces)
          load_keys(local + 1, item * T::kKeyChunks / key_pieces, (item + 1) * T::kKeyChunks / key_pieces);
      } else if (item == 0) {
        load_keys(local + 1, 0, T::kKeyChunks);
      }
    }
    cp_async_commit();
    if (a.rows && item == 0 && tid < kBM && local + 2 < my_tiles) {
      const int64_t i = first_row(local + 2) + tid;
      rows_ahead = i < a.n ? a.rows[i] : 0;
    }

    if (piece == 0) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int f = 0; f < 4; ++f) acc[mt][nt][f] = 0.0f;
    }
    const uint32_t key_base = keys_s + (local % 2) * T::kKeyBytes + piece * (kBM * kRowBytes);
    const uint32_t query_base = queries_s + (w % kStages) * kStageBytes;
#pragma unroll
    for (int s = 0; s < kPiece / 16; ++s) {
      // A (keys, 16x16 per m16 tile): lanes 0-15 address rows 0-15 of channels 16s..16s+7,
      // lanes 16-31 the same rows at 16s+8..: registers = (rows 0-7 | 8-15) x (k lo | k hi).
      uint32_t a_frag[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
        ldmatrix_x4(a_frag[mt], key_base + swizzle((warp_m * kMT + mt) * 16 + lane % 16, 2 * s + lane / 16));
      // B (queries, 16x8 per n8 tile, stored [n][k]): one x4 = two n8 tiles x (k lo, k hi).
      uint32_t b_hi[4][2], b_lo[4][2];
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        const uint32_t offset = swizzle(warp_n * 32 + np * 16 + lane % 8 + (lane / 16) * 8, 2 * s + (lane / 8) % 2);
        uint32_t r[4];
        ldmatrix_x4(r, query_base + offset);
        b_hi[2 * np][0] = r[0], b_hi[2 * np][1] = r[1], b_hi[2 * np + 1][0] = r[2], b_hi[2 * np + 1][1] = r[3];
        ldmatrix_x4(r, query_base + kBN * kRowBytes + offset);
        b_lo[2 * np][0] = r[0], b_lo[2 * np][1] = r[1], b_lo[2 * np + 1][0] = r[2], b_lo[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          mma_bf16(acc[mt][nt], a_frag[mt], b_hi[nt]);
          mma_bf16(acc[mt][nt], a_frag[mt], b_lo[nt]);
        }
    }

    if (piece == kPieces - 1) {  // the query tile is complete: fold it
      const int col0 = j * kBN + warp_n * 32 + 2 * (lane % 4);
      if constexpr (kMode == Mode::kChunk) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const float2 shift = __ldg(reinterpret_cast<const float2*>(a.shift + col0 + nt * 8));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
              best[mt][h] = fmaxf(best[mt][h], fmaxf(acc[mt][nt][2 * h] - shift.x, acc[mt][nt][2 * h + 1] - shift.y));
        }
      } else {
        const int64_t row0 = first_row(local) + warp_m * kMT * 16 + lane / 4;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float v = neg_inf();
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
              for (int h = 0; h < 2; ++h)
                if (row0 + mt * 16 + 8 * h < a.n) v = fmaxf(v, acc[mt][nt][2 * h + e]);
            // Lanes with equal lane % 4 hold the same columns.
            v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
            v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
            v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
            if (lane < 4 && v != neg_inf()) atomic_max_float(colmax + col0 + nt * 8 + e, v);
          }
      }
    }

    if (item == per_tile - 1) {  // the key tile is complete
      if (a.rows && tid < kBM && local + 2 < my_tiles) rows_buf[(local % 2) * kBM + tid] = rows_ahead;
      if constexpr (kMode == Mode::kChunk) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float v = best[mt][h];  // lanes 4g .. 4g + 3 hold the same row
            v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
            v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
            if (lane % 4 == 0) red[warp_n * kBM + (warp_m * kMT + mt) * 16 + lane / 4 + 8 * h] = v;
            best[mt][h] = neg_inf();
          }
        __syncthreads();
        const int64_t row0 = first_row(local);
        for (int r = tid; r < kBM; r += kThreads)
          if (row0 + r < a.n) a.score_out[row0 + r] = fmaxf(red[r], red[kBM + r]);
      }
    }
  }

  if constexpr (kMode == Mode::kQueryMax) {
    __syncthreads();
    for (int c = tid; c < a.l_C; c += kThreads)
      if (colmax[c] != neg_inf()) atomic_max_float(a.query_max_out + c, colmax[c]);
  }
  cp_async_wait<0>();  // the trailing groups are empty; nothing in flight outlives the block
#endif
}

}  // namespace unshackle::cuda::score_mma
