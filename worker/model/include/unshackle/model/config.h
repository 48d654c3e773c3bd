// A Hugging Face model's config.json, reduced to what the runtime needs.
//
// Architectures: LlamaForCausalLM (Llama 2, 3, 3.1 with rope_scaling llama3 or linear),
// MistralForCausalLM, Qwen2ForCausalLM (q/k/v bias). Anything else is
// Error(kUnsupported) naming the architecture; a missing or ill-typed field is
// Error(kInvalidArgument) naming the file and the field.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "unshackle/kernels/attention_config.h"

namespace unshackle {

enum class ModelArch : uint8_t { kLlama, kMistral, kQwen2 };
std::string_view arch_name(ModelArch arch);  // "LlamaForCausalLM", ...

struct ModelConfig {
  ModelArch arch = ModelArch::kLlama;
  int hidden = 0;          // hidden_size
  int intermediate = 0;    // intermediate_size (SwiGLU width)
  int layers = 0;          // num_hidden_layers
  int heads = 0;           // H
  int kv_heads = 0;        // G (num_key_value_heads; defaults to H)
  int head_dim = 0;        // d (head_dim; defaults to hidden / H)
  int64_t vocab = 0;
  double rms_eps = 1e-6;
  double rope_theta = 10000;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;   // Qwen2 always; Llama with attention_bias
  bool o_bias = false;     // Llama with attention_bias
  bool mlp_bias = false;   // Llama with mlp_bias
  int64_t sliding_window = 0;  // Mistral / Qwen2; 0 = none. Not applied: the attention mode governs.
  std::vector<int32_t> bos_token_ids, eos_token_ids;  // from config.json (and generation_config.json)
  std::string torch_dtype;  // as written; weights are converted to float32 at load anyway

  // Parses config.json text; `label` names the file in errors.
  static ModelConfig from_json(const std::string& text, const std::string& label = "config.json");
  // Reads DIR/config.json and merges eos/bos ids of DIR/generation_config.json when present.
  static ModelConfig load(const std::string& model_dir);
  // The config.json that from_json reads back (make-model writes it).
  std::string to_json() const;

  std::vector<float> inv_freq() const { return rope_inv_freq(head_dim, rope_theta, rope_scaling); }
};

}  // namespace unshackle
