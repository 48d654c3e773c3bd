// A decoder-only transformer (Llama / Mistral / Qwen2) on the CPU: Hugging Face checkpoint
// in, logits out, attention through ContextAttention (which applies RoPE and the mode).
//
//   tokens → embed → per layer: RMSNorm → q,k,v (+bias) → [ContextAttention::forward]
//     → o_proj → residual → RMSNorm → SwiGLU MLP → residual → final RMSNorm → LM head → logits
//
// Weights are read from the memory-mapped safetensors files and converted to float32 once,
// at load; the files are unmapped afterwards. A Model is immutable after load: several
// ranks (threads) may run forward() on one Model at the same time, each with its own
// ContextAttention. Matrix products go through OpenBLAS sgemm when the build has it.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "unshackle/model/config.h"
#include "unshackle/worker/context_attention.h"

namespace unshackle {

// One layer's weights, float32, row-major [out, in] as Hugging Face stores them.
// Bias vectors are empty when the architecture has none.
struct LayerWeights {
  std::vector<float> attn_norm;                  // [hidden]
  std::vector<float> wq, wk, wv, wo;             // [H*d, hidden], [G*d, hidden] x2, [hidden, H*d]
  std::vector<float> bq, bk, bv, bo;             // [H*d], [G*d], [G*d], [hidden]
  std::vector<float> mlp_norm;                   // [hidden]
  std::vector<float> w_gate, w_up, w_down;       // [inter, hidden] x2, [hidden, inter]
  std::vector<float> b_gate, b_up, b_down;       // mlp_bias only
};

struct ModelWeights {
  std::vector<float> embed;       // [vocab, hidden]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // [hidden]
  std::vector<float> lm_head;     // [vocab, hidden]; empty when tied to embed
};

class Model {
 public:
  // Loads DIR/config.json and the weights: DIR/model.safetensors.index.json (its weight_map
  // names the shards), else DIR/model.safetensors, else every DIR/*.safetensors. BF16, F16
  // and F32 tensors. Missing tensors are Error(kNotFound) naming the tensor and the
  // directory; a wrong shape is Error(kInvalidArgument) naming the tensor and both shapes.
  static std::shared_ptr<const Model> load(const std::string& model_dir);
  // From weights already in memory (checked the same way).
  static std::shared_ptr<const Model> from_weights(ModelConfig config, ModelWeights weights);

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }

  // The ContextAttention settings this model needs (shape, RoPE frequencies with the model's
  // rope_scaling); `compression` must outlive the ContextAttention.
  ContextAttentionOptions attention_options(const AttentionConfig& attention, const CompressionWeights* compression,
                                            int64_t reserve_tokens = 0) const;

  // Runs `tokens` as one chunk appended to `context` (positions context.length() ...),
  // through every layer, and commits the chunk. `logits` receives [1, vocab] for the last
  // token, or [n, vocab] for every token of the chunk when `all_positions`.
  // `context` must work on host memory (the CPU backend).
  void forward_chunk(ContextAttention& context, std::span<const int32_t> tokens, std::vector<float>& logits,
                     bool all_positions = false) const;
  // Chunked prefill: forward_chunk over pieces of at most `chunk` tokens. `logits` as
  // forward_chunk (all positions of the whole span when `all_positions`).
  void prefill(ContextAttention& context, std::span<const int32_t> tokens, int64_t chunk, std::vector<float>& logits,
               bool all_positions = false) const;

 private:
  Model(ModelConfig config, ModelWeights weights);
  ModelConfig config_;
  ModelWeights weights_;
};

// ESA compression weights (SPEC §6): safetensors with layers.{l}.wq [d', H*d] and
// layers.{l}.wk [d', G*d] for every layer of `config`. Errors name the file and the tensor.
CompressionWeights load_compression_weights(const std::string& path, const ModelConfig& config);

}  // namespace unshackle
