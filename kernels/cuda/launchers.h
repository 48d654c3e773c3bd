// The CUDA launchers, one per operation (DeepEP's single api header idea): raw params, an
// explicit stream, no allocation except through the workspace the caller passes.
#pragma once

#include <cuda_runtime.h>

#include "unshackle/kernels/params.h"

namespace unshackle::cuda {

// Grows on demand; owned by the backend (a launcher never calls cudaMalloc itself).
struct Workspace {
  void* data = nullptr;
  size_t bytes = 0;
  void* reserve(size_t wanted);  // may free and reallocate (synchronises the device first)
  void* pinned();                // 64 bytes of pinned host memory (results copied to the host)
  ~Workspace();
  void* host = nullptr;
};

void launch_convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t count, cudaStream_t stream);
void launch_convert_pair(const void* src_a, void* dst_a, const void* src_b, void* dst_b, DType src_dtype,
                         DType dst_dtype, size_t count, cudaStream_t stream);
void launch_compress_query(const CompressQueryParams& p, cudaStream_t stream);
void launch_compress_keys(const CompressKeysParams& p, cudaStream_t stream);
// A chunk over bf16 k' may take the tensor cores, which split q' into bf16 hi/lo parts in
// `workspace` (l_C * d_c * 4 bytes, rounded up to 64-query tiles); stream-ordered reuse.
void launch_score_query_max(const ScoreParams& p, Workspace& workspace, cudaStream_t stream);
void launch_score_chunk(const ScoreParams& p, Workspace& workspace, cudaStream_t stream);
// Which kernel those launchers pick for p (benchmarks print it): "tensor cores ...", "fp32 FMA
// ..." or "generic ...".
const char* score_kernel_name(const ScoreParams& p, bool query_max);
void launch_proximity(const ProximityParams& p, cudaStream_t stream);
// Synchronises `stream` to fill the host out_count when it is not null.
void launch_top_k(const TopKParams& p, Workspace& workspace, cudaStream_t stream);
void launch_attend(const AttendParams& p, Workspace& workspace, cudaStream_t stream);
void launch_merge(const MergeParams& p, cudaStream_t stream);
void launch_rows_of_tokens(const RowsOfTokensParams& p, cudaStream_t stream);
void launch_lag_reference_extrema(const LagExtremaParams& p, cudaStream_t stream);
void launch_lag_token_std(const LagStdParams& p, cudaStream_t stream);
void launch_lag_partition_scores(const LagScoreParams& p, cudaStream_t stream);

}  // namespace unshackle::cuda
