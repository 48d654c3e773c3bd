// Scoring launchers (kernel bodies: score.cuh): dispatch on dtype, compressed width, decode
// (l_C = 1) or chunk, and alignment; anything the fast path does not cover takes the generic
// kernels, so every width and layout the params allow runs.
#include <algorithm>
#include <limits>

#include "cuda_check.h"
#include "launchers.h"
#include "score.cuh"

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

unsigned grid_for(int64_t items, int per_block) {
  return static_cast<unsigned>(std::clamp<int64_t>((items + per_block - 1) / per_block, 1, 65535));
}

}  // namespace

void launch_score_query_max(const ScoreParams& p, cudaStream_t stream) {
  p.check();
  UNS_CUDA_REQUIRE(kInvalidArgument, p.query_max_out, "score_query_max: null output");
  score::fill_kernel<<<grid_for(p.l_C, 256), 256, 0, stream>>>(p.query_max_out, p.l_C, -std::numeric_limits<float>::infinity());
  UNS_CUDA_CHECK_LAUNCH();
  if (p.n == 0) return;
  if (try_fast<score::Mode::kQueryMax>(p, stream)) return;
  const int64_t rows_per_block = score::kGenericWarps * score::kGenericRowsPerWarp;
  const int64_t blocks = (p.n + rows_per_block - 1) / rows_per_block;
  UNS_CUDA_REQUIRE(kInvalidArgument, blocks < (int64_t{1} << 31), "score_query_max: too many rows");
  score::generic_query_max_kernel<<<static_cast<unsigned>(blocks), score::kGenericWarps * 32, 0, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

void launch_score_chunk(const ScoreParams& p, cudaStream_t stream) {
  p.check();
  UNS_CUDA_REQUIRE(kInvalidArgument, p.score_out, "score_chunk: null output");
  if (p.n == 0) return;
  if (try_fast<score::Mode::kChunk>(p, stream)) return;
  score::generic_chunk_kernel<<<grid_for(p.n * 32, 256), 256, 0, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

}  // namespace unshackle::cuda
