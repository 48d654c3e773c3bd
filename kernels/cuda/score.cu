// Scoring launchers (kernel bodies: score.cuh, score_mma.cuh): dispatch on dtype, compressed
// width, decode (l_C = 1) or chunk, and alignment. A chunk of >= 16 queries over bf16 k' of
// width 64, 128 or 256 takes the tensor cores (score_mma.cuh); decode and other chunks take the
// FMA fast path; anything neither covers takes the generic kernels, so every width and layout
// the params allow runs.
#include <algorithm>
#include <limits>

#include "cuda_check.h"
#include "launchers.h"
#include "score.cuh"
#include "score_mma.cuh"

namespace unshackle::cuda {
namespace {

int multiprocessors() {
  int device = 0, sms = 0;
  UNS_CUDA_CHECK(cudaGetDevice(&device));
  UNS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <typename T, int kDc, score::Mode kMode>
void run_fast(const ScoreParams& p, cudaStream_t stream) {
  using S = score::Shape<T, kDc>;
  const bool single = p.l_C == 1;
  size_t shared = single ? 0 : S::kSlice * kDc * sizeof(float);
  if (kMode == score::Mode::kQueryMax && !single) shared += static_cast<size_t>(p.l_C) * sizeof(float);
  // Enough resident blocks to keep ~64 KB of loads in flight per SM; a grid-stride loop
  // covers the rest.
  const int64_t iterations = (p.n + S::kRowsPerIteration - 1) / S::kRowsPerIteration;
  const unsigned grid = static_cast<unsigned>(std::clamp<int64_t>(iterations, 1, 8 * static_cast<int64_t>(multiprocessors())));
  const auto kernel = single ? score::score_rows_kernel<T, kDc, kMode, true> : score::score_rows_kernel<T, kDc, kMode, false>;
  if (shared > 48 * 1024)
    UNS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  kernel<<<grid, score::kThreads, shared, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

template <score::Mode kMode, typename T>
bool dispatch_width(const ScoreParams& p, cudaStream_t stream) {
  switch (p.d_c) {
    case 64: run_fast<T, 64, kMode>(p, stream); return true;
    case 128: run_fast<T, 128, kMode>(p, stream); return true;
    case 256: run_fast<T, 256, kMode>(p, stream); return true;
    case 512: run_fast<T, 512, kMode>(p, stream); return true;
    case 1024: run_fast<T, 1024, kMode>(p, stream); return true;
    default: return false;
  }
}

// The fast kernels need 16-byte aligned rows and a slice of queries in 16 KB.
template <score::Mode kMode>
bool try_fast(const ScoreParams& p, cudaStream_t stream) {
  if (reinterpret_cast<uintptr_t>(p.kc) % 16 != 0) return false;
  if (kMode == score::Mode::kQueryMax && p.l_C > 8192) return false;
  if (p.kc_dtype == DType::kBF16) return dispatch_width<kMode, __nv_bfloat16>(p, stream);
  if (p.kc_dtype == DType::kF32) return dispatch_width<kMode, float>(p, stream);
  return false;
}

// ---- tensor-core path (score_mma.cuh) ----

template <int kDc, score::Mode kMode>
void run_mma(const ScoreParams& p, size_t shared, Workspace& workspace, cudaStream_t stream) {
  using T = score_mma::Tile<kDc>;
  const int query_tiles = (p.l_C + score_mma::kBN - 1) / score_mma::kBN;
  const size_t split_bytes = static_cast<size_t>(query_tiles) * T::kPieces * score_mma::kStageBytes;
  auto* scratch = static_cast<unsigned char*>(workspace.reserve(split_bytes + static_cast<size_t>(query_tiles) * score_mma::kBN * sizeof(float)));
  score_mma::Args a{.kc = p.kc, .rows = p.rows, .n = p.n, .l_C = p.l_C, .query_tiles = query_tiles,
                    .q_split = reinterpret_cast<const uint4*>(scratch), .shift = reinterpret_cast<const float*>(scratch + split_bytes),
                    .query_max_out = p.query_max_out, .score_out = p.score_out};
  const int prep_blocks = static_cast<int>(std::min<size_t>((split_bytes / 16 + 255) / 256, 1024));
  score_mma::prep_queries_kernel<kDc><<<prep_blocks, 256, 0, stream>>>(
      p.qc, kMode == score::Mode::kChunk ? p.row_max : nullptr, p.l_C, query_tiles,
      reinterpret_cast<uint4*>(scratch), reinterpret_cast<float*>(scratch + split_bytes));
  UNS_CUDA_CHECK_LAUNCH();
  const auto kernel = score_mma::score_mma_kernel<kDc, kMode>;
  UNS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  int per_sm = 0;
  UNS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, score_mma::kThreads, shared));
  // Persistent: one wave of CTAs, each walking key tiles blockIdx.x, + gridDim.x, ...
  const int64_t tiles = (p.n + T::kBM - 1) / T::kBM;
  const auto grid = static_cast<unsigned>(std::clamp<int64_t>(tiles, 1, std::max(per_sm, 1) * static_cast<int64_t>(multiprocessors())));
  kernel<<<grid, score_mma::kThreads, shared, stream>>>(a);
  UNS_CUDA_CHECK_LAUNCH();
}

// The tensor cores take: bf16 k' of width 64/128/256 at 16-byte alignment, >= kMinQueries
// queries (below that the FMA kernels are near the memory floor already while a 64-query tile
// would be mostly padding), an sm_80+ device with the shared memory the config needs (H100/H200:
// 227 KB per block; an A100's 163 KB fits d_c = 64 only), and for kQueryMax at most 8192
// column maxima in shared memory. Returns the dynamic shared memory, 0 where not taken.
template <score::Mode kMode, int kDc>
size_t mma_shared_width(const ScoreParams& p) {
  const int query_tiles = (p.l_C + score_mma::kBN - 1) / score_mma::kBN;
  const size_t shared = score_mma::shared_bytes<kDc, kMode>(query_tiles);
  int device = 0, major = 0, optin = 0;
  UNS_CUDA_CHECK(cudaGetDevice(&device));
  UNS_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  UNS_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (major < 8 || shared > static_cast<size_t>(optin)) return 0;
  const int64_t tiles = (p.n + score_mma::Tile<kDc>::kBM - 1) / score_mma::Tile<kDc>::kBM;
  if (tiles * query_tiles * score_mma::Tile<kDc>::kPieces >= (int64_t{1} << 31)) return 0;  // int item counter
  return shared;
}

template <score::Mode kMode>
size_t mma_shared(const ScoreParams& p) {
  if (p.kc_dtype != DType::kBF16 || p.l_C < score_mma::kMinQueries || p.n == 0) return 0;
  if (reinterpret_cast<uintptr_t>(p.kc) % 16 != 0) return 0;
  if (kMode == score::Mode::kQueryMax && p.l_C > score_mma::kMaxQueryMaxColumns) return 0;
  switch (p.d_c) {
    case 64: return mma_shared_width<kMode, 64>(p);
    case 128: return mma_shared_width<kMode, 128>(p);
    case 256: return mma_shared_width<kMode, 256>(p);
    default: return 0;
  }
}

template <score::Mode kMode>
bool try_mma(const ScoreParams& p, Workspace& workspace, cudaStream_t stream) {
  const size_t shared = mma_shared<kMode>(p);
  if (shared == 0) return false;
  switch (p.d_c) {
    case 64: run_mma<64, kMode>(p, shared, workspace, stream); return true;
    case 128: run_mma<128, kMode>(p, shared, workspace, stream); return true;
    default: run_mma<256, kMode>(p, shared, workspace, stream); return true;
  }
}

unsigned grid_for(int64_t items, int per_block) {
  return static_cast<unsigned>(std::clamp<int64_t>((items + per_block - 1) / per_block, 1, 65535));
}

}  // namespace

const char* score_kernel_name(const ScoreParams& p, bool query_max) {
  const bool mma = query_max ? mma_shared<score::Mode::kQueryMax>(p) > 0 : mma_shared<score::Mode::kChunk>(p) > 0;
  if (mma) return "tensor cores (score_mma.cuh)";
  const bool widths = p.d_c == 64 || p.d_c == 128 || p.d_c == 256 || p.d_c == 512 || p.d_c == 1024;
  const bool fast = reinterpret_cast<uintptr_t>(p.kc) % 16 == 0 && (p.kc_dtype == DType::kBF16 || p.kc_dtype == DType::kF32) &&
                    widths && !(query_max && p.l_C > 8192);
  return fast ? "fp32 FMA (score.cuh)" : "generic (score.cuh)";
}

void launch_score_query_max(const ScoreParams& p, Workspace& workspace, cudaStream_t stream) {
  p.check();
  UNS_CUDA_REQUIRE(kInvalidArgument, p.query_max_out, "score_query_max: null output");
  score::fill_kernel<<<grid_for(p.l_C, 256), 256, 0, stream>>>(p.query_max_out, p.l_C, -std::numeric_limits<float>::infinity());
  UNS_CUDA_CHECK_LAUNCH();
  if (p.n == 0) return;
  if (try_mma<score::Mode::kQueryMax>(p, workspace, stream)) return;
  if (try_fast<score::Mode::kQueryMax>(p, stream)) return;
  const int64_t rows_per_block = score::kGenericWarps * score::kGenericRowsPerWarp;
  const int64_t blocks = (p.n + rows_per_block - 1) / rows_per_block;
  UNS_CUDA_REQUIRE(kInvalidArgument, blocks < (int64_t{1} << 31), "score_query_max: too many rows");
  score::generic_query_max_kernel<<<static_cast<unsigned>(blocks), score::kGenericWarps * 32, 0, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

void launch_score_chunk(const ScoreParams& p, Workspace& workspace, cudaStream_t stream) {
  p.check();
  UNS_CUDA_REQUIRE(kInvalidArgument, p.score_out, "score_chunk: null output");
  if (p.n == 0) return;
  if (try_mma<score::Mode::kChunk>(p, workspace, stream)) return;
  if (try_fast<score::Mode::kChunk>(p, stream)) return;
  score::generic_chunk_kernel<<<grid_for(p.n * 32, 256), 256, 0, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

}  // namespace unshackle::cuda
