// Host-side kernel launch with a launch attribute (cudaLaunchKernelEx), apart from common.cuh:
// cudaLaunchConfig_t's gridDim / blockDim members cannot compile where the CPU emulation of
// the kernels (tests/kernels/emulated) defines those names as macros.
#pragma once

#include <cuda_runtime.h>

namespace unshackle::cuda {

enum class Launch { kPlain, kDependent, kCooperative };

// cudaLaunchKernelEx on a 1-D grid; returns its status (callers check it). kDependent:
// programmatic dependent launch (common.cuh says what the kernel must do); kCooperative: every block resident at once (a
// grid barrier needs it).
template <typename... Args, typename... Actual>
cudaError_t launch_kernel(Launch how, void (*kernel)(Args...), unsigned grid, unsigned block, cudaStream_t stream,
                          Actual&&... args) {
  cudaLaunchAttribute attribute{};
  if (how == Launch::kDependent) {
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
  } else {
    attribute.id = cudaLaunchAttributeCooperative;
    attribute.val.cooperative = 1;
  }
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(block);
  config.stream = stream;
  config.attrs = how == Launch::kPlain ? nullptr : &attribute;
  config.numAttrs = how == Launch::kPlain ? 0 : 1;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Actual&&>(args)...);
}

}  // namespace unshackle::cuda
