// Proximity launcher (kernel body: proximity.cuh).
#include <algorithm>

#include "cuda_check.h"
#include "launchers.h"
#include "proximity.cuh"

namespace unshackle::cuda {

void launch_proximity(const ProximityParams& p, cudaStream_t stream) {
  p.check();
  if (p.n == 0) return;
  const unsigned grid = static_cast<unsigned>(std::clamp<int64_t>((p.n + 255) / 256, 1, 65535));
  proximity::proximity_kernel<<<grid, 256, 0, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

}  // namespace unshackle::cuda
