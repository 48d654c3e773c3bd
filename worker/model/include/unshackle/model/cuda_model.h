// The model's forward pass on one CUDA device: the CPU Model's weights uploaded once, every
// projection, the MLP and the LM head through cuBLAS, the element-wise steps (embedding
// gather, RMSNorm, bias, SwiGLU) as small kernels (src/cuda_model_kernels.cu), attention
// through ContextAttention on the project's CUDA Backend.
//
//   tokens → gather → per layer: RMSNorm → [q|k|v] GEMM → split (+bias) → ContextAttention
//     → o GEMM (+= residual) → RMSNorm → [gate|up] GEMM → SwiGLU → down GEMM (+= residual)
//     → final RMSNorm → LM head GEMM → logits (host)
//
// Weights are stored in the checkpoint's dtype (bf16 or f16 as 16-bit, f32 as f32); the
// residual stream, norms, biases and GEMM accumulation are float32 (CUBLAS_COMPUTE_32F, no
// TF32). With 16-bit weights a GEMM's input activations are rounded to the weight dtype, as
// transformers does when it runs a bf16 model. q/k/v and the attention output are float32,
// which ContextAttention takes; the context stores K, V and the scoring keys k' in its
// kv_dtype, bf16 by default on the GPU (resolve_kv_dtype): half the bytes of f32 per token,
// read by the attention kernels as bf16 and accumulated in f32. Head dims: every one the CUDA
// backend's attention takes (32, 64, 96, 128, 256); the model's own kernels have no limit.
//
// Not thread-safe (one set of scratch buffers): one CudaModel per rank, each on its device.
#pragma once

#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "unshackle/common/check.h"
#include "unshackle/common/dtype.h"
#include "unshackle/model/model.h"

namespace unshackle {

// The KV cache's storage dtype (K, V and k') for the flag --kv-dtype TEXT on `backend`:
// "auto" is bf16 on "cuda" and f32 on "cpu" (the oracle path, and what CI runs); "bf16" and
// "f32" as given, on either backend (the CPU backend reads bf16 storage too).
inline DType resolve_kv_dtype(std::string_view text, std::string_view backend) {
  if (text == "bf16") return DType::kBF16;
  if (text == "f32") return DType::kF32;
  UNS_CHECK(text == "auto", "--kv-dtype: auto, bf16 or f32 (got '{}')", text);
  return backend == "cuda" ? DType::kBF16 : DType::kF32;
}

class CudaModel {
 public:
  // The dtype a checkpoint's weights are kept in on the GPU: BF16 / F16 as written in
  // config.json's torch_dtype, else F32.
  static DType default_weight_dtype(const ModelConfig& config);
  // CUDA devices visible (0 in a build without CUDA).
  static int device_count();

  // Uploads `model`'s weights to `device` in `weight_dtype` (kF32, kBF16 or kF16).
  // Error(kUnsupported) without CUDA or without that device.
  CudaModel(std::shared_ptr<const Model> model, int device, DType weight_dtype);
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const Model& model() const { return *model_; }
  const ModelConfig& config() const { return model_->config(); }
  DType weight_dtype() const { return weight_dtype_; }
  int device() const { return device_; }
  size_t weight_bytes() const;  // device memory the weights take

  // As Model::forward_chunk; `context` must run on a CUDA backend of this device.
  // `logits` is host memory.
  void forward_chunk(ContextAttention& context, std::span<const int32_t> tokens, std::vector<float>& logits,
                     bool all_positions = false);
  // As Model::prefill.
  void prefill(ContextAttention& context, std::span<const int32_t> tokens, int64_t chunk, std::vector<float>& logits,
               bool all_positions = false);

  struct Impl;

 private:
  std::shared_ptr<const Model> model_;
  int device_ = 0;
  DType weight_dtype_ = DType::kF32;
  std::unique_ptr<Impl> impl_;
};

}  // namespace unshackle
