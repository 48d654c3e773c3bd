// Compressed queries and keys (SPEC §3) and dtype conversion.
#include <algorithm>

#include "common.cuh"
#include "cuda_check.h"
#include "launchers.h"

namespace unshackle::cuda {
namespace {

__global__ void convert_kernel(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t count) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    store_from_float(dst, dst_dtype, static_cast<int64_t>(i), load_as_float(src, src_dtype, static_cast<int64_t>(i)));
}

// blockIdx.y picks the pair's member; the grid-stride loop covers `count`.
__global__ void convert_pair_kernel(const void* src_a, void* dst_a, const void* src_b, void* dst_b, DType src_dtype,
                                    DType dst_dtype, size_t count) {
  const void* src = blockIdx.y == 0 ? src_a : src_b;
  void* dst = blockIdx.y == 0 ? dst_a : dst_b;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    store_from_float(dst, dst_dtype, static_cast<int64_t>(i), load_as_float(src, src_dtype, static_cast<int64_t>(i)));
}

// Block (c, y): rotate every head of query token c at position w into shared memory, then
// one warp per output j = y * warps + warp (coalesced reads of a row of Wq), or (y = 0) the
// GQA fold. Spreading the d' rows of Wq over d' / 8 blocks per token reads the 2 MB of Wq
// from many SMs at once (one block per token took 56 us on H100 for one decode token).
__global__ void compress_query_kernel(CompressQueryParams p) {
  extern __shared__ float rotated[];  // [H*d]
  const int dH = p.H * p.d, half = p.d / 2;
  const float* q = p.q + static_cast<size_t>(blockIdx.x) * dH;
  for (int idx = threadIdx.x; idx < p.H * half; idx += blockDim.x) {
    const int h = idx / half, i = idx % half;
    float s, c;
    rope_sincos(p.position, p.inv_freq[i], &s, &c);
    const float x1 = q[h * p.d + i], x2 = q[h * p.d + i + half];
    rotated[h * p.d + i] = x1 * c - x2 * s;
    rotated[h * p.d + i + half] = x2 * c + x1 * s;
  }
  __syncthreads();
  float* out = p.q_out + static_cast<size_t>(blockIdx.x) * p.d_c;
  if (p.wq) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int j = blockIdx.y * warps + warp;
    if (j < p.d_c) {
      const float* row = p.wq + static_cast<size_t>(j) * dH;
      float acc = 0;
#pragma unroll 8
      for (int i = lane; i < dH; i += 32) acc = fmaf(row[i], rotated[i], acc);
      acc = warp_sum(acc);
      if (lane == 0) out[j] = acc;
    }
  } else {
    const int group = p.H / p.G;
    for (int idx = threadIdx.x; idx < p.G * p.d; idx += blockDim.x) {
      const int g = idx / p.d, i = idx % p.d;
      float acc = 0;
      for (int r = 0; r < group; ++r) acc += rotated[(g * group + r) * p.d + i];
      out[idx] = acc;
    }
  }
}

// One block per key token: the key row in shared memory, one warp per output.
__global__ void compress_keys_kernel(CompressKeysParams p) {
  extern __shared__ float key[];  // [G*d]
  const int width = p.G * p.d;
  const int64_t m = blockIdx.x;
  for (int i = threadIdx.x; i < width; i += blockDim.x) key[i] = load_as_float(p.k, p.k_dtype, m * width + i);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int j = warp; j < p.d_c; j += warps) {
    const float* row = p.wk + static_cast<size_t>(j) * width;
    float acc = 0;
    for (int i = lane; i < width; i += 32) acc = fmaf(row[i], key[i], acc);
    acc = warp_sum(acc);
    if (lane == 0) store_from_float(p.kc_out, p.kc_dtype, m * p.d_c + j, acc);
  }
}

}  // namespace

void launch_convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t count, cudaStream_t stream) {
  if (count == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<size_t>((count + 255) / 256, 65535));
  convert_kernel<<<blocks, 256, 0, stream>>>(src, src_dtype, dst, dst_dtype, count);
  UNS_CUDA_CHECK_LAUNCH();
}

void launch_convert_pair(const void* src_a, void* dst_a, const void* src_b, void* dst_b, DType src_dtype,
                         DType dst_dtype, size_t count, cudaStream_t stream) {
  if (count == 0) return;
  const dim3 grid(static_cast<unsigned>(std::min<size_t>((count + 255) / 256, 65535)), 2);
  convert_pair_kernel<<<grid, 256, 0, stream>>>(src_a, dst_a, src_b, dst_b, src_dtype, dst_dtype, count);
  UNS_CUDA_CHECK_LAUNCH();
}

void launch_compress_query(const CompressQueryParams& p, cudaStream_t stream) {
  p.check();
  if (p.l_C == 0) return;
  const size_t shared = static_cast<size_t>(p.H) * p.d * sizeof(float);
  UNS_CUDA_CHECK(cudaFuncSetAttribute(compress_query_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(shared)));
  constexpr int kThreads = 256;  // 8 warps: 8 outputs per block
  const dim3 grid(static_cast<unsigned>(p.l_C), p.wq ? static_cast<unsigned>((p.d_c + kThreads / 32 - 1) / (kThreads / 32)) : 1u);
  compress_query_kernel<<<grid, kThreads, shared, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

void launch_compress_keys(const CompressKeysParams& p, cudaStream_t stream) {
  p.check();
  if (p.n == 0) return;
  UNS_CUDA_REQUIRE(kInvalidArgument, p.n < (int64_t{1} << 31), "compress_keys: " + std::to_string(p.n) + " rows in one launch");
  const size_t shared = static_cast<size_t>(p.G) * p.d * sizeof(float);
  compress_keys_kernel<<<static_cast<unsigned>(p.n), 256, shared, stream>>>(p);
  UNS_CUDA_CHECK_LAUNCH();
}

}  // namespace unshackle::cuda
