// Merge launcher (kernel body: merge.cuh).
#include <algorithm>

#include "cuda_check.h"
#include "launchers.h"
#include "merge.cuh"

namespace unshackle::cuda {

void launch_merge(const MergeParams& p, cudaStream_t stream) {
  p.check();
  if (p.rows == 0) return;
  UNS_CUDA_REQUIRE(kInvalidArgument, p.rows < (int64_t{1} << 31), "merge: too many rows for one launch");
  UNS_CUDA_REQUIRE(kUnsupported, p.d <= merge::kColumns * merge::kMaxThreads, "merge: head dim above 4096");
  const merge::Shape shape = merge::merge_shape(p.d, p.n_parts);
  merge::merge_kernel<<<static_cast<unsigned>(p.rows), shape.threads, 0, stream>>>(p.o_parts, p.lse_parts, p.n_parts,
                                                                                    p.rows, 1, p.d, shape, p.o, p.lse);
  UNS_CUDA_CHECK_LAUNCH();
}

}  // namespace unshackle::cuda
