// Small device helpers shared by the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "unshackle/common/dtype.h"
#include "unshackle/kernels/params.h"

namespace unshackle::cuda {

// Programmatic dependent launch (sm_90+; launch.cuh's launch_kernel with Launch::kDependent): a
// kernel so launched may start while the previous kernel of its stream still runs. It calls
// wait_for_prerequisites() before it touches anything that kernel writes or reads (constant
// data may be read before), and launch_dependents() to let the next kernel's blocks start.
// No-ops below sm_90 or without the launch attribute (the stream orders the kernels as usual).
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}



__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Loads element i of a store array of dtype kF32 / kBF16 / kF16 as float.
__device__ __forceinline__ float load_as_float(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case DType::kF16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* base, DType dtype, int64_t i, float value) {
  switch (dtype) {
    case DType::kBF16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(value); break;
    case DType::kF16: static_cast<__half*>(base)[i] = __float2half_rn(value); break;
    default: static_cast<float*>(base)[i] = value; break;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Float max via integer atomics (the buffer starts at -inf; NaN is ignored).
__device__ __forceinline__ void atomic_max_float(float* address, float value) {
  if (value != value) return;
  if (value >= 0.0f) atomicMax(reinterpret_cast<int*>(address), __float_as_int(value));
  else atomicMin(reinterpret_cast<unsigned int*>(address), __float_as_uint(value));
}

// RoPE: the angle position * inv_freq and its reduction to [-pi, pi] in double (positions up to
// millions stay exact), the sine and cosine in float (~1 ulp): the CPU reference's values to
// float rounding, at a fraction of a double sincos's cost.
// The reduction multiplies by 1/(2 pi) (a double division costs ~10x more): the quotient's
// rounding only moves the reduced angle by a whole turn or not at all.
__device__ __forceinline__ float rope_reduced_angle(int64_t position, float inv_freq) {
  const double angle = static_cast<double>(position) * static_cast<double>(inv_freq);  // exact: 20 x 24 bits
  const double two_pi = 6.283185307179586476925286766559, inv_two_pi = 0.15915494309189533576888376337251;
  return static_cast<float>(fma(-rint(angle * inv_two_pi), two_pi, angle));
}

__device__ __forceinline__ void rope_sincos(int64_t position, float inv_freq, float* s, float* c) {
  sincosf(rope_reduced_angle(position, inv_freq), s, c);
}

// The same with the hardware sine/cosine (absolute error below 2^-21.4 on [-pi, pi], against
// ~2^-24 for sincosf): for rotating every key row, where sincosf's cost would dominate.
__device__ __forceinline__ void rope_sincos_fast(int64_t position, float inv_freq, float* s, float* c) {
  __sincosf(rope_reduced_angle(position, inv_freq), s, c);
}

}  // namespace unshackle::cuda
