// Launchers of model_kernels.h: grid sizes and the launch; bodies in model_kernels.cuh.
#include <algorithm>

#include "model_kernels.cuh"

namespace unshackle::cuda_model {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the GPU for large tensors; the grid-stride loop covers the rest.
unsigned blocks_for(int64_t elements) {
  const int64_t blocks = (elements + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, 65535));
}

}  // namespace

bool gemv_supported(const GemvParams& p) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return (p.dtype == DType::kBF16 || p.dtype == DType::kF16) && p.cols > 0 && p.cols % 8 == 0 && aligned(p.W) &&
         aligned(p.x) && p.rows > 0 && p.rows <= INT32_MAX;
}

cudaError_t launch_gemv(const GemvParams& p, cudaStream_t stream) {
  if (!gemv_supported(p)) return cudaErrorInvalidValue;
  const auto blocks = static_cast<unsigned>((p.rows + kGemvThreads / 32 - 1) / (kGemvThreads / 32));
  if (p.dtype == DType::kBF16) {
    gemv_kernel<__nv_bfloat16><<<blocks, kGemvThreads, 0, stream>>>(p);
  } else {
    gemv_kernel<__half><<<blocks, kGemvThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_gather(const GatherParams& p, cudaStream_t stream) {
  if (p.n * p.D == 0) return cudaSuccess;
  gather_kernel<<<blocks_for(p.n * p.D), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  rms_norm_kernel<<<static_cast<unsigned>(p.n), kRmsThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_split_qkv(const SplitQkvParams& p, cudaStream_t stream) {
  const int64_t elements = p.n * (p.Wq + 2 * p.Wkv);
  if (elements == 0) return cudaSuccess;
  split_qkv_kernel<<<blocks_for(elements), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_bias_add(const BiasAddParams& p, cudaStream_t stream) {
  if (p.n * p.width == 0) return cudaSuccess;
  bias_add_kernel<<<blocks_for(p.n * p.width), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_swiglu(const SwigluParams& p, cudaStream_t stream) {
  if (p.n * p.I == 0) return cudaSuccess;
  swiglu_kernel<<<blocks_for(p.n * p.I), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_cast(const CastParams& p, cudaStream_t stream) {
  if (p.count == 0) return cudaSuccess;
  cast_kernel<<<blocks_for(p.count), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace unshackle::cuda_model
