// Kernel bodies of model_kernels.h. Element-wise kernels use a grid-stride loop over the
// flattened [n, width] index; RMSNorm uses one block per row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"  // kernels/cuda: load_as_float, store_from_float
#include "model_kernels.h"

namespace unshackle::cuda_model {

// Element loads and stores by dtype: the kernels' own helpers (kernels/cuda/common.cuh).
using cuda::load_as_float;
using cuda::store_from_float;

__device__ __forceinline__ int64_t grid_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

__global__ void gather_kernel(GatherParams p) {
  for (int64_t i = grid_index(); i < p.n * p.D; i += grid_stride()) {
    const int64_t t = i / p.D, c = i % p.D;
    p.out[i] = load_as_float(p.table, p.table_dtype, static_cast<int64_t>(p.ids[t]) * p.D + c);
  }
}

// blockDim.x == kRmsThreads; one block per row.
constexpr int kRmsThreads = 256;
__global__ void rms_norm_kernel(RmsNormParams p) {
  __shared__ float partial[kRmsThreads / 32];
  const float* x = p.x + blockIdx.x * p.D;
  float sum = 0;
  for (int64_t c = threadIdx.x; c < p.D; c += blockDim.x) sum += x[c] * x[c];
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x < 32) {
    sum = threadIdx.x < kRmsThreads / 32 ? partial[threadIdx.x] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (threadIdx.x == 0) partial[0] = sum;
  }
  __syncthreads();
  // rsqrtf is ~2 ulp; 1/sqrtf keeps the fp32 path within the 1e-4 parity bound with margin.
  const float scale = 1.0f / sqrtf(partial[0] / static_cast<float>(p.D) + p.eps);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * p.D;
  for (int64_t c = threadIdx.x; c < p.D; c += blockDim.x) store_from_float(p.out, p.out_dtype, row + c, p.weight[c] * (x[c] * scale));
}

__global__ void split_qkv_kernel(SplitQkvParams p) {
  const int64_t width = p.Wq + 2 * p.Wkv;
  for (int64_t i = grid_index(); i < p.n * width; i += grid_stride()) {
    const int64_t r = i / width, c = i % width;
    const float value = p.qkv[i];
    if (c < p.Wq) {
      p.q[r * p.Wq + c] = value + (p.bq ? p.bq[c] : 0.0f);
    } else if (c < p.Wq + p.Wkv) {
      const int64_t j = c - p.Wq;
      p.k[r * p.Wkv + j] = value + (p.bk ? p.bk[j] : 0.0f);
    } else {
      const int64_t j = c - p.Wq - p.Wkv;
      p.v[r * p.Wkv + j] = value + (p.bv ? p.bv[j] : 0.0f);
    }
  }
}

__global__ void bias_add_kernel(BiasAddParams p) {
  for (int64_t i = grid_index(); i < p.n * p.width; i += grid_stride()) p.y[i] += p.bias[i % p.width];
}

__global__ void swiglu_kernel(SwigluParams p) {
  for (int64_t i = grid_index(); i < p.n * p.I; i += grid_stride()) {
    const int64_t r = i / p.I, c = i % p.I;
    const float g = p.gate_up[r * 2 * p.I + c] + (p.b_gate ? p.b_gate[c] : 0.0f);
    const float u = p.gate_up[r * 2 * p.I + p.I + c] + (p.b_up ? p.b_up[c] : 0.0f);
    // expf, not __expf: silu's fp32 rounding matches the CPU's std::exp to ~1 ulp.
    store_from_float(p.out, p.out_dtype, i, g / (1.0f + expf(-g)) * u);
  }
}

__global__ void cast_kernel(CastParams p) {
  for (int64_t i = grid_index(); i < p.count; i += grid_stride()) store_from_float(p.out, p.out_dtype, i, p.in[i]);
}

}  // namespace unshackle::cuda_model
