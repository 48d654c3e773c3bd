// Launchers of model_kernels.h: grid sizes and the launch; bodies in model_kernels.cuh.
#include <algorithm>
#include <cstdlib>

#include "launch.cuh"  // kernels/cuda
#include "model_kernels.cuh"

namespace unshackle::cuda_model {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the GPU for large tensors; the grid-stride loop covers the rest.
unsigned blocks_for(int64_t elements) {
  const int64_t blocks = (elements + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, 65535));
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Programmatic dependent launch for the decode chain's kernels (RMSNorm and the GEMVs; see
// model_kernels.cuh): on GPUs of compute capability 9.0 and up, unless the environment
// sets UNS_CUDA_NO_PDL (plain stream order, for A/B timing and for ruling it out).
bool overlap_launches() {
  static const bool disabled = std::getenv("UNS_CUDA_NO_PDL") != nullptr;
  int device = 0, major = 0;
  if (disabled || cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return false;
  return major >= 9;
}

template <typename Params>
cudaError_t launch_overlapped(void (*kernel)(Params), unsigned blocks, unsigned threads, cudaStream_t stream,
                              const Params& p) {
  return cuda::launch_kernel(overlap_launches() ? cuda::Launch::kDependent : cuda::Launch::kPlain, kernel, blocks,
                             threads, stream, p);
}

unsigned gemv_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kGemvThreads / 32 - 1) / (kGemvThreads / 32));
}
}  // namespace

bool gemv_supported(const GemvParams& p) {
  return (p.dtype == DType::kBF16 || p.dtype == DType::kF16) && p.cols > 0 && p.cols % 8 == 0 && aligned16(p.W) &&
         aligned16(p.x) && p.rows > 0 && p.rows <= INT32_MAX;
}

bool gated_gemv_supported(const GatedGemvParams& p) {
  return (p.dtype == DType::kBF16 || p.dtype == DType::kF16) && p.cols > 0 && p.cols % 8 == 0 && aligned16(p.W) &&
         aligned16(p.x) && p.I > 0 && p.I <= INT32_MAX;
}

cudaError_t launch_gemv(const GemvParams& p, cudaStream_t stream) {
  if (!gemv_supported(p)) return cudaErrorInvalidValue;
  const unsigned blocks = gemv_blocks(p.rows);
  const auto kernel = p.dtype == DType::kBF16 ? (p.x_f32 ? gemv_kernel<__nv_bfloat16, true> : gemv_kernel<__nv_bfloat16, false>)
                                              : (p.x_f32 ? gemv_kernel<__half, true> : gemv_kernel<__half, false>);
  return launch_overlapped(kernel, blocks, kGemvThreads, stream, p);
}

cudaError_t launch_gated_gemv(const GatedGemvParams& p, cudaStream_t stream) {
  if (!gated_gemv_supported(p)) return cudaErrorInvalidValue;
  const auto kernel = p.dtype == DType::kBF16 ? gated_gemv_kernel<__nv_bfloat16> : gated_gemv_kernel<__half>;
  return launch_overlapped(kernel, gemv_blocks(p.I), kGemvThreads, stream, p);
}

cudaError_t launch_gather(const GatherParams& p, cudaStream_t stream) {
  if (p.n * p.D == 0) return cudaSuccess;
  gather_kernel<<<blocks_for(p.n * p.D), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return launch_overlapped(rms_norm_kernel, static_cast<unsigned>(p.n), kRmsThreads, stream, p);
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
