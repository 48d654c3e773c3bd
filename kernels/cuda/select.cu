// rows_of_tokens launcher (kernel body: select.cuh): one launch, no host wait.
#include <algorithm>

#include "cuda_check.h"
#include "launchers.h"
#include "select.cuh"

namespace unshackle::cuda {

void launch_rows_of_tokens(const RowsOfTokensParams& p, cudaStream_t stream) {
  p.check();
  const int64_t n_initial = p.initial_end - p.initial_begin;
  // One CTA per kEntries selected entries; at least enough threads for the initial rows in one
  // pass when there is no selection (streaming mode, or M still empty).
  const int64_t blocks = std::max<int64_t>({(p.k + select::kEntries - 1) / select::kEntries,
                                            std::min<int64_t>((n_initial + select::kThreads - 1) / select::kThreads, 1024),
                                            1});
  UNS_CUDA_REQUIRE(kInvalidArgument, blocks <= INT32_MAX, "rows_of_tokens: " + std::to_string(p.k) + " entries exceed one launch");
  if (p.k == 0 && n_initial == 0) return;
  select::rows_of_tokens_kernel<<<static_cast<unsigned>(blocks), select::kThreads, 0, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

}  // namespace unshackle::cuda
