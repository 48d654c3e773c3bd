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

// The decode chain (RMSNorm, the GEMVs) is launched with programmatic dependent launch
// (common.cuh; launch_overlapped in model_kernels.cu): each kernel requests only its constant
// weights before wait_for_prerequisites(), then calls launch_dependents(), so the next kernel's
// blocks fill the SMs this one's last wave leaves idle with their first weight loads in
// flight. Every block calls both, even one without work (else a grid whose blocks all left
// early would let the next kernel start before the previous one ended).
using cuda::launch_dependents;
using cuda::wait_for_prerequisites;

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
// The first float4 of x and of the weight stay in registers across the reduction (its two
// barriers), so the output does not wait on a second round of loads (all of D = 4096).
constexpr int kRmsThreads = 1024;
__global__ void __launch_bounds__(kRmsThreads) rms_norm_kernel(RmsNormParams p) {
  __shared__ float partial[kRmsThreads / 32];
  const float* x = p.x + blockIdx.x * p.D;
  // float4 when every row starts 16-byte aligned (cudaMalloc'd base, D % 4 == 0).
  const bool vec = p.D % 4 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.weight) % 16 == 0;
  const int64_t step = vec ? 4 : 1, first = threadIdx.x * step;
  float x0[4] = {0, 0, 0, 0}, w0[4] = {0, 0, 0, 0};  // this thread's first `step` elements
  if (first < p.D) {  // the weight is constant: read before the previous kernel ends
    if (vec) {
      const float4 wv = *reinterpret_cast<const float4*>(p.weight + first);
      w0[0] = wv.x, w0[1] = wv.y, w0[2] = wv.z, w0[3] = wv.w;
    } else {
      w0[0] = p.weight[first];
    }
  }
  wait_for_prerequisites();
  launch_dependents();
  if (first < p.D) {
    if (vec) {
      const float4 xv = *reinterpret_cast<const float4*>(x + first);
      x0[0] = xv.x, x0[1] = xv.y, x0[2] = xv.z, x0[3] = xv.w;
    } else {
      x0[0] = x[first];
    }
  }
  float sum = x0[0] * x0[0] + x0[1] * x0[1] + x0[2] * x0[2] + x0[3] * x0[3];
  for (int64_t c = first + static_cast<int64_t>(blockDim.x) * step; c < p.D; c += static_cast<int64_t>(blockDim.x) * step) {
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
  if (first < p.D) {
    for (int64_t j = 0; j < step; ++j) store_from_float(p.out, p.out_dtype, row + first + j, w0[j] * (x0[j] * scale));
  }
  for (int64_t c = first + static_cast<int64_t>(blockDim.x) * step; c < p.D; c += static_cast<int64_t>(blockDim.x) * step) {
    for (int64_t j = c; j < c + step; ++j) store_from_float(p.out, p.out_dtype, row + j, p.weight[j] * (x[j] * scale));
  }
}

// One warp per row of W: each lane reads 8 values (16 bytes) of the row and of x per step,
// U steps in flight, float32 sums reduced across the warp. The sum's order (8 products, then
// the step's partial in step order, then the warp's xor tree) is the same for every kernel
// below whatever U, so the fused ones equal the plain GEMV bit for bit.
constexpr int kGemvThreads = 256;
// 8 steps (4 KB a warp) in flight for the plain GEMV, 4 (two rows a step) for the gated one.
// Against 4 steps, 8 measured no faster at bf16 x (q|k|v + down 65.7 vs 65.1 us a layer) and
// the f32-x o GEMV took 18.6 us with its cast fused against 15.5 + ~2.5 for the two (ncu,
// H100, 2026-12-06): 4 for both is the next thing to time.
constexpr int kGemvUnroll = 8, kGatedGemvUnroll = 4;

// x[8 v .. 8 v + 8) as floats: one 16-byte load of 16-bit x, or two of f32 x rounded to T (as
// the cast kernel before the GEMV rounded it).
template <typename T, bool kXF32>
__device__ __forceinline__ void load_x8(const void* x, int64_t v, float (&out)[8]) {
  if constexpr (kXF32) {
    const auto* p = reinterpret_cast<const float4*>(x) + 2 * v;
    const float4 lo = __ldg(p), hi = __ldg(p + 1);
    const float f[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = static_cast<float>(static_cast<T>(f[i]));
  } else {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x) + v);
    const auto* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = static_cast<float>(t[i]);
  }
}

template <typename T>
__device__ __forceinline__ float dot8(const uint4& w, const float (&x)[8]) {
  const auto* wp = reinterpret_cast<const T*>(&w);
  float sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) sum += static_cast<float>(wp[i]) * x[i];
  return sum;
}

// The warp's dot products of R rows (16-byte vectors w[r][0 .. vecs)) with x; every lane ends
// with the full sums. The first step's weights are requested before wait_for_prerequisites
// (x is the previous kernel's output; the weights are constant), then each step's next.
template <typename T, bool kXF32, int R, int U>
__device__ __forceinline__ void warp_row_dots(const uint4* const (&w)[R], const void* x, int64_t vecs, int lane,
                                              float (&sum)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) sum[r] = 0;
  int64_t v = lane;
  uint4 wv[R][U];
  const auto load_weights = [&](int64_t at) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int r = 0; r < R; ++r) wv[r][u] = __ldcs(w[r] + at + 32 * u);  // streamed once: keep it out of L1/L2's way
    }
  };
  bool full_step = v + 32 * (U - 1) < vecs;
  if (full_step) load_weights(v);
  wait_for_prerequisites();
  launch_dependents();
  while (full_step) {
    float xv[U][8];
#pragma unroll
    for (int u = 0; u < U; ++u) load_x8<T, kXF32>(x, v + 32 * u, xv[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int r = 0; r < R; ++r) sum[r] += dot8<T>(wv[r][u], xv[u]);
    }
    v += 32 * U;
    full_step = v + 32 * (U - 1) < vecs;
    if (full_step) load_weights(v);
  }
  for (; v < vecs; v += 32) {
    float xv[8];
    load_x8<T, kXF32>(x, v, xv);
#pragma unroll
    for (int r = 0; r < R; ++r) sum[r] += dot8<T>(__ldcs(w[r] + v), xv);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    for (int offset = 16; offset > 0; offset >>= 1) sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], offset);
  }
}

template <typename T, bool kXF32>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(GemvParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kGemvThreads / 32) + threadIdx.x / 32;
  if (row >= p.rows) {  // a warp past the last row (the block's other warps have rows)
    wait_for_prerequisites();
    launch_dependents();
    return;
  }
  const int lane = static_cast<int>(threadIdx.x % 32);
  const uint4* const w[1] = {reinterpret_cast<const uint4*>(static_cast<const T*>(p.W) + row * p.cols)};
  float sum[1];
  warp_row_dots<T, kXF32, 1, kGemvUnroll>(w, p.x, p.cols / 8, lane, sum);
  if (lane == 0) {
    float y = p.accumulate ? p.y[row] + sum[0] : sum[0];
    if (p.bias) y += p.bias[row];
    p.y[row] = y;
  }
}

template <typename T>
__global__ void __launch_bounds__(kGemvThreads) gated_gemv_kernel(GatedGemvParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kGemvThreads / 32) + threadIdx.x / 32;
  if (row >= p.I) {
    wait_for_prerequisites();
    launch_dependents();
    return;
  }
  const int lane = static_cast<int>(threadIdx.x % 32);
  const T* W = static_cast<const T*>(p.W);
  const uint4* const w[2] = {reinterpret_cast<const uint4*>(W + row * p.cols),
                             reinterpret_cast<const uint4*>(W + (p.I + row) * p.cols)};
  float sum[2];
  warp_row_dots<T, false, 2, kGatedGemvUnroll>(w, p.x, p.cols / 8, lane, sum);
  if (lane == 0) {
    const float g = sum[0] + (p.b_gate ? p.b_gate[row] : 0.0f);
    const float u = sum[1] + (p.b_up ? p.b_up[row] : 0.0f);
    store_from_float(p.out, p.dtype, row, g / (1.0f + expf(-g)) * u);  // as swiglu_kernel
  }
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
