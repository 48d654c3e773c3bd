// The model's element-wise CUDA kernels: one params struct per kernel (shapes in comments,
// row-major), one launcher each. Launchers queue on `stream` and return the launch status
// (cudaGetLastError); the caller checks it. Bodies are in model_kernels.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "unshackle/common/dtype.h"

namespace unshackle::cuda_model {

// out[t, :] = float(table[ids[t], :]). Ids are checked on the host before the launch.
struct GatherParams {
  const int32_t* ids = nullptr;  // [n]
  const void* table = nullptr;   // [V, D], table_dtype (F32, BF16 or F16)
  float* out = nullptr;          // [n, D]
  int64_t n = 0, D = 0;
  DType table_dtype = DType::kF32;
};

// Hugging Face LlamaRMSNorm: out[r, :] = weight * (x[r, :] * rsqrt(mean(x[r, :]^2) + eps)),
// in float32, stored in out_dtype (the next GEMM's input type).
struct RmsNormParams {
  const float* x = nullptr;       // [n, D]
  const float* weight = nullptr;  // [D]
  void* out = nullptr;            // [n, D], out_dtype
  int64_t n = 0, D = 0;
  float eps = 1e-6f;
  DType out_dtype = DType::kF32;
};

// The fused q|k|v projection's rows split into the three tensors ContextAttention takes,
// with the Qwen2 biases added when given.
struct SplitQkvParams {
  const float* qkv = nullptr;  // [n, Wq + 2 Wkv]
  const float* bq = nullptr;   // [Wq] or null
  const float* bk = nullptr;   // [Wkv] or null
  const float* bv = nullptr;   // [Wkv] or null
  float* q = nullptr;          // [n, Wq]
  float* k = nullptr;          // [n, Wkv]
  float* v = nullptr;          // [n, Wkv]
  int64_t n = 0, Wq = 0, Wkv = 0;
};

// y[r, c] += bias[c] (o_proj and down_proj biases of Llama with attention_bias / mlp_bias).
struct BiasAddParams {
  float* y = nullptr;             // [n, width]
  const float* bias = nullptr;    // [width]
  int64_t n = 0, width = 0;
};

// SwiGLU of the fused gate|up projection: out[r, i] = silu(g + bg) * (u + bu) with
// g = gate_up[r, i], u = gate_up[r, I + i]; biases only with mlp_bias. Stored in out_dtype.
struct SwigluParams {
  const float* gate_up = nullptr;  // [n, 2I]
  const float* b_gate = nullptr;   // [I] or null
  const float* b_up = nullptr;     // [I] or null
  void* out = nullptr;             // [n, I], out_dtype
  int64_t n = 0, I = 0;
  DType out_dtype = DType::kF32;
};

// out[i] = in[i] rounded to out_dtype (the attention output before the o_proj GEMM).
struct CastParams {
  const float* in = nullptr;  // [count]
  void* out = nullptr;        // [count], out_dtype
  int64_t count = 0;
  DType out_dtype = DType::kBF16;
};

// Decode's matrix-vector product, one token: y[r] = sum_c W[r, c] * x[c] (+ y[r] when
// accumulate) (+ bias[r]), 16-bit W, float32 accumulate and y. x is 16-bit like W, or f32
// (x_f32: the attention output), rounded to W's dtype as it is read, so the product equals a
// cast kernel followed by the 16-bit GEMV bit for bit, without that kernel. One warp per row,
// 16-byte loads; for the n = 1 GEMMs that cuBLAS runs at 51-81% of bandwidth (split-K where it
// accumulates). gemv_supported says whether the shapes and pointers fit (else use the GEMM).
struct GemvParams {
  const void* W = nullptr;        // [rows, cols], dtype (BF16 or F16), rows 16-byte aligned
  const void* x = nullptr;        // [cols], dtype, or F32 when x_f32
  const float* bias = nullptr;    // [rows] or null: added after the sum (and the accumulate)
  float* y = nullptr;             // [rows]
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kBF16;
  bool x_f32 = false;
  bool accumulate = false;
};
bool gemv_supported(const GemvParams& p);

// Decode's gate/up projection with SwiGLU fused (one token): out[r] = silu(g + b_gate[r]) *
// (u + b_up[r]) with g = W[r, :] . x and u = W[I + r, :] . x, stored in dtype; each warp reads
// both rows against one load of x. The same float32 sums as the GEMV, so the result equals the
// GEMV into f32 followed by the SwiGLU kernel bit for bit, without the [2I] f32 round trip and
// that kernel.
struct GatedGemvParams {
  const void* W = nullptr;         // [2I, cols], dtype (BF16 or F16): the gate rows, then the up rows
  const void* x = nullptr;         // [cols], dtype
  const float* b_gate = nullptr;   // [I] or null
  const float* b_up = nullptr;     // [I] or null
  void* out = nullptr;             // [I], dtype
  int64_t I = 0, cols = 0;
  DType dtype = DType::kBF16;
};
bool gated_gemv_supported(const GatedGemvParams& p);

cudaError_t launch_gather(const GatherParams& p, cudaStream_t stream);
cudaError_t launch_gemv(const GemvParams& p, cudaStream_t stream);
cudaError_t launch_gated_gemv(const GatedGemvParams& p, cudaStream_t stream);
cudaError_t launch_rms_norm(const RmsNormParams& p, cudaStream_t stream);
cudaError_t launch_split_qkv(const SplitQkvParams& p, cudaStream_t stream);
cudaError_t launch_bias_add(const BiasAddParams& p, cudaStream_t stream);
cudaError_t launch_swiglu(const SwigluParams& p, cudaStream_t stream);
cudaError_t launch_cast(const CastParams& p, cudaStream_t stream);

}  // namespace unshackle::cuda_model
