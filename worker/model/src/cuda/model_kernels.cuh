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

// blockDim.x == kRmsThreads; one block per row. 1024 threads and float4 loads: at decode
// (n = 1) one block is the whole kernel, and with 256 threads looping over D = 4096 each
// thread waited on 16 dependent loads (14 us per norm on an H200, 2 a layer; ncu, 2026-12-04).
constexpr int kRmsThreads = 1024;
__global__ void __launch_bounds__(kRmsThreads) rms_norm_kernel(RmsNormParams p) {
  __shared__ float partial[kRmsThreads / 32];
  const float* x = p.x + blockIdx.x * p.D;
  // float4 when every row starts 16-byte aligned (cudaMalloc'd base, D % 4 == 0).
  const bool vec = p.D % 4 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.weight) % 16 == 0;
  const int64_t step = vec ? 4 : 1;
  float sum = 0;
  for (int64_t c = threadIdx.x * step; c < p.D; c += static_cast<int64_t>(blockDim.x) * step) {
    if (vec) {
      const float4 v = *reinterpret_cast<const float4*>(x + c);
      sum += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    } else {
      sum += x[c] * x[c];
    }
  }
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
  for (int64_t c = threadIdx.x * step; c < p.D; c += static_cast<int64_t>(blockDim.x) * step) {
    for (int64_t j = c; j < c + step; ++j) store_from_float(p.out, p.out_dtype, row + j, p.weight[j] * (x[j] * scale));
  }
}

// One warp per row of W: each lane reads 8 values (16 bytes) of the row and of x per step,
// four steps in flight, float32 sums reduced across the warp.
constexpr int kGemvThreads = 256;
constexpr int kGemvUnroll = 4;
template <typename T>
__device__ __forceinline__ float dot8(const uint4& w, const uint4& x) {
  const auto* wp = reinterpret_cast<const T*>(&w);
  const auto* xp = reinterpret_cast<const T*>(&x);
  float sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) sum += static_cast<float>(wp[i]) * static_cast<float>(xp[i]);
  return sum;
}
template <typename T>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(GemvParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kGemvThreads / 32) + threadIdx.x / 32;
  if (row >= p.rows) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t vecs = p.cols / 8;  // 16-byte vectors per row
  const auto* w = reinterpret_cast<const uint4*>(static_cast<const T*>(p.W) + row * p.cols);
  const auto* x = reinterpret_cast<const uint4*>(p.x);
  float sum = 0;
  int64_t v = lane;
  for (; v + 32 * (kGemvUnroll - 1) < vecs; v += 32 * kGemvUnroll) {
    uint4 wv[kGemvUnroll], xv[kGemvUnroll];
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      wv[u] = __ldcs(w + v + 32 * u);  // streamed once: keep it out of L1/L2's way
      xv[u] = __ldg(x + v + 32 * u);
    }
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) sum += dot8<T>(wv[u], xv[u]);
  }
  for (; v < vecs; v += 32) sum += dot8<T>(__ldcs(w + v), __ldg(x + v));
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) p.y[row] = p.accumulate ? p.y[row] + sum : sum;
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
