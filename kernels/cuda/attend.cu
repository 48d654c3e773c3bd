// Attention launcher (kernel bodies: attend.cuh, and attend_mma.cuh for chunks): picks the
// split count, runs the split kernel, and combines the splits with the LSE merge (skipped when
// one split suffices).
#include <algorithm>

#include "attend.cuh"
#include "attend_mma.cuh"
#include "cuda_check.h"
#include "launchers.h"
#include "merge.cuh"

namespace unshackle::cuda {
namespace {

int multiprocessors() {
  int device = 0, sms = 0;
  UNS_CUDA_CHECK(cudaGetDevice(&device));
  UNS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Splits so that at most `per_sm` CTAs land on every SM, none shorter than `min_rows`.
int split_count(const AttendParams& p, int per_sm, int64_t min_rows) {
  const int64_t ctas = static_cast<int64_t>(p.l_C) * p.G;
  const int64_t max_splits = std::max<int64_t>(1, (p.n + min_rows - 1) / min_rows);
  return static_cast<int>(std::clamp<int64_t>(per_sm * multiprocessors() / ctas, 1,
                                              std::min<int64_t>(max_splits, 4096)));
}

template <typename T, int D, int GH>
void run_fast(const AttendParams& p, Workspace& workspace, cudaStream_t stream) {
  using S = attend::Shape<T, D, GH>;
  // One full wave: as many CTAs as fit on the SMs at once (4 per SM at 128 registers). A
  // second, partly filled wave of short CTAs costs another prologue/epilogue latency each;
  // ESA's 6272 rows took 51 us on H200 with 2 waves (bench_kernels, 2026-12-02).
  static const int resident = [] {
    int blocks = 0;
    UNS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, attend::attend_rows_kernel<T, D, GH>,
                                                                 attend::kThreads, 0));
    return std::max(blocks, 1);
  }();
  // Splits as short as one step: a decode token over a short context (64 rows, 8 KV heads) ran
  // 8 CTAs of 4 dependent steps each, 19.7 us a layer (ncu, H100, 2026-12-06), latency-bound
  // on a GPU of 132 SMs; long contexts reach the one-wave cap first and are unchanged.
  const int splits = split_count(p, resident, S::kRowsPerStep);
  const int64_t rows_per_split = std::max<int64_t>(1, (p.n + splits - 1) / splits);
  const size_t rows = static_cast<size_t>(p.l_C) * p.H;
  attend::Outputs out{p.o, p.lse, 1};
  if (splits > 1) {
    auto* parts = static_cast<float*>(workspace.reserve(rows * splits * (D + 1) * sizeof(float)));
    out = {parts, parts + rows * splits * D, splits};
  }
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(p.G), static_cast<unsigned>(p.l_C));
  attend::attend_rows_kernel<T, D, GH><<<grid, attend::kThreads, 0, stream>>>(p, rows_per_split, out);
  UNS_CUDA_CHECK_LAUNCH();
  if (splits > 1) {
    const merge::Shape shape = merge::merge_shape(D, splits);
    merge::merge_kernel<<<static_cast<unsigned>(rows), shape.threads, 0, stream>>>(out.o, out.lse, splits, 1, splits, D,
                                                                                    shape, p.o, p.lse);
    UNS_CUDA_CHECK_LAUNCH();
  }
}

template <typename T, int D>
bool dispatch_group(const AttendParams& p, Workspace& workspace, cudaStream_t stream) {
  switch (p.H / p.G) {
    case 1: run_fast<T, D, 1>(p, workspace, stream); return true;
    case 2: run_fast<T, D, 2>(p, workspace, stream); return true;
    case 4: run_fast<T, D, 4>(p, workspace, stream); return true;
    case 8: run_fast<T, D, 8>(p, workspace, stream); return true;
    default: return false;
  }
}

// The fast kernel's head dims: a row's lanes (d / elements per 16 bytes) must be a power of
// two within a warp, so f32 d = 256 (64 lanes) and d = 96 (12 or 24 lanes) stay generic.
bool try_fast(const AttendParams& p, Workspace& workspace, cudaStream_t stream) {
  if (reinterpret_cast<uintptr_t>(p.k) % 16 != 0 || reinterpret_cast<uintptr_t>(p.v) % 16 != 0) return false;
  if (p.kv_dtype == DType::kBF16) {
    switch (p.d) {
      case 32: return dispatch_group<__nv_bfloat16, 32>(p, workspace, stream);
      case 64: return dispatch_group<__nv_bfloat16, 64>(p, workspace, stream);
      case 128: return dispatch_group<__nv_bfloat16, 128>(p, workspace, stream);
      case 256: return dispatch_group<__nv_bfloat16, 256>(p, workspace, stream);
      default: return false;
    }
  }
  if (p.kv_dtype == DType::kF32) {
    switch (p.d) {
      case 32: return dispatch_group<float, 32>(p, workspace, stream);
      case 64: return dispatch_group<float, 64>(p, workspace, stream);
      case 128: return dispatch_group<float, 128>(p, workspace, stream);
      default: return false;
    }
  }
  return false;
}

// Chunks (l_C >= attend_mma::kMinChunk, bf16 K/V): queries rotated into bf16 in the
// workspace, then the tensor-core kernel over (query tiles, G, splits) (attend_mma::plan), the
// splits combined by the LSE merge.
template <int D>
void run_mma(const AttendParams& p, Workspace& workspace, cudaStream_t stream) {
  using C = attend_mma::Config<D>;
  // Per call: the attribute belongs to the current device (ranks may each drive another GPU).
  UNS_CUDA_CHECK(cudaFuncSetAttribute(attend_mma::attend_mma_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(C::kSmemBytes)));
  static const int resident = [] {
    int blocks = 0;
    UNS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, attend_mma::attend_mma_kernel<D>, C::kThreads,
                                                                 C::kSmemBytes));
    return std::max(blocks, 1);
  }();
  const attend_mma::Plan plan = attend_mma::plan<D>(p, static_cast<int64_t>(resident) * multiprocessors());
  UNS_CUDA_REQUIRE(kInvalidArgument, plan.query_tiles <= 0x7fffffff, "attend: chunk too large for one launch");
  const int splits = plan.splits;
  const int64_t M = static_cast<int64_t>(p.l_C) * (p.H / p.G);
  const size_t rows = static_cast<size_t>(p.l_C) * p.H;
  const size_t q_bytes = (static_cast<size_t>(p.G) * M * D * sizeof(__nv_bfloat16) + 255) / 256 * 256;
  const size_t part_bytes = splits > 1 ? rows * splits * (D + 1) * sizeof(float) : 0;
  auto* base = static_cast<unsigned char*>(workspace.reserve(q_bytes + part_bytes));
  auto* q_rot = reinterpret_cast<__nv_bfloat16*>(base);
  attend_mma::Outputs out{p.o, p.lse, 1};
  if (splits > 1) {
    auto* parts = reinterpret_cast<float*>(base + q_bytes);
    out = {parts, parts + rows * splits * D, splits};
  }
  const int64_t pairs = static_cast<int64_t>(rows) * (D / 2);
  attend_mma::prepare_queries_kernel<<<static_cast<unsigned>(std::min<int64_t>((pairs + 255) / 256, 4096)), 256, 0, stream>>>(
      p, q_rot);
  UNS_CUDA_CHECK_LAUNCH();
  const dim3 grid(static_cast<unsigned>(plan.query_tiles), static_cast<unsigned>(p.G), static_cast<unsigned>(splits));
  attend_mma::attend_mma_kernel<D><<<grid, C::kThreads, C::kSmemBytes, stream>>>(p, q_rot, plan.rows_per_split, out);
  UNS_CUDA_CHECK_LAUNCH();
  if (splits > 1) {
    const merge::Shape shape = merge::merge_shape(D, splits);
    merge::merge_kernel<<<static_cast<unsigned>(rows), shape.threads, 0, stream>>>(out.o, out.lse, splits, 1, splits, D,
                                                                                    shape, p.o, p.lse);
    UNS_CUDA_CHECK_LAUNCH();
  }
}

// The tensor-core path takes bf16 K/V with 16-byte aligned rows and an 8-byte aligned o (its
// stores are float2). Below kMinChunk query tokens the row kernels stay: a group of 1 would
// leave most of a 16-row MMA tile empty, and decode (l_C = 1) is bandwidth-bound; at 16 the
// row kernels would read every K/V row 16 times (bench_kernels times l_C = 15 and 16).
bool try_mma(const AttendParams& p, Workspace& workspace, cudaStream_t stream) {
  if (p.l_C < attend_mma::kMinChunk || p.kv_dtype != DType::kBF16) return false;
  if (reinterpret_cast<uintptr_t>(p.k) % 16 != 0 || reinterpret_cast<uintptr_t>(p.v) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(p.o) % 8 != 0)
    return false;
  if (p.d == 64) run_mma<64>(p, workspace, stream);
  else if (p.d == 128) run_mma<128>(p, workspace, stream);
  else return false;
  return true;
}

template <int D>
void run_generic(const AttendParams& p, Workspace& workspace, cudaStream_t stream) {
  static_assert(D % 32 == 0, "the generic kernel gives each lane D / 32 output columns");
  const int splits = split_count(p, 16, 2 * attend::kTile);
  const int64_t rows_per_split = std::max<int64_t>(1, (p.n + splits - 1) / splits);
  const size_t rows = static_cast<size_t>(p.l_C) * p.H;
  auto* parts = static_cast<float*>(workspace.reserve(rows * splits * (D + 1) * sizeof(float)));
  float* part_lse = parts + rows * splits * D;
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(p.G), static_cast<unsigned>(p.l_C));
  attend::generic_attend_kernel<D><<<grid, (p.H / p.G) * 32, 0, stream>>>(p, rows_per_split, splits, parts, part_lse);
  UNS_CUDA_CHECK_LAUNCH();
  const merge::Shape shape = merge::merge_shape(D, splits);
  merge::merge_kernel<<<static_cast<unsigned>(rows), shape.threads, 0, stream>>>(parts, part_lse, splits, 1, splits, D,
                                                                                  shape, p.o, p.lse);
  UNS_CUDA_CHECK_LAUNCH();
}

// The head dims launch_attend takes (CudaBackend::supports lists the same).
bool attend_head_dim_supported(int d) { return d == 32 || d == 64 || d == 96 || d == 128 || d == 256; }

}  // namespace

void launch_attend(const AttendParams& p, Workspace& workspace, cudaStream_t stream) {
  p.check();
  UNS_CUDA_REQUIRE(kInvalidArgument, p.l_C <= 65535 && p.G <= 65535, "attend: chunk of " + std::to_string(p.l_C) + " exceeds one launch");
  UNS_CUDA_REQUIRE(kUnsupported, attend_head_dim_supported(p.d),
                   "attend: head dim " + std::to_string(p.d) + " unsupported on CUDA (32, 64, 96, 128 or 256)");
  if (try_mma(p, workspace, stream) || try_fast(p, workspace, stream)) return;
  UNS_CUDA_REQUIRE(kUnsupported, (p.H / p.G) <= attend::kMaxGroup,
                   "attend: at most 16 query heads per KV head on CUDA (got " + std::to_string(p.H / p.G) + ")");
  switch (p.d) {
    case 32: return run_generic<32>(p, workspace, stream);
    case 64: return run_generic<64>(p, workspace, stream);
    case 96: return run_generic<96>(p, workspace, stream);
    case 128: return run_generic<128>(p, workspace, stream);
    default: return run_generic<256>(p, workspace, stream);
  }
}

}  // namespace unshackle::cuda
