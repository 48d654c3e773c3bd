// Small random-weight checkpoints in Hugging Face format, so tests need no download:
// config.json, generation_config.json, model.safetensors (or shards with
// model.safetensors.index.json) and a tokenizer (byte-level, or a BPE tokenizer.json trained
// on a built-in corpus). Weights are hashed normals from (seed, tensor name, index): the same
// seed gives the same checkpoint whatever the dtype or sharding.
#pragma once

#include <cstdint>
#include <string>

#include "unshackle/common/dtype.h"
#include "unshackle/model/config.h"

namespace unshackle {

struct MakeModelOptions {
  std::string arch = "llama";  // llama (Llama-2 style), llama3 (rope_scaling llama3), mistral, qwen2
  int layers = 2, hidden = 64, intermediate = 0, heads = 4, kv_heads = 2, head_dim = 0;  // 0: derived
  int64_t vocab = 512;
  uint64_t seed = 1;
  DType dtype = DType::kF32;   // F32, BF16 or F16
  std::string tokenizer;       // "bytes" or "bpe"; "" = bytes for llama/mistral, bpe for llama3/qwen2
  int shards = 1;              // > 1 writes model-0000i-of-0000n.safetensors and the index
  double rope_theta = 0;       // 0: the architecture's usual value
  double rope_linear = 0;      // > 0: rope_scaling {linear, factor} (llama/mistral/qwen2)
  bool tie_embeddings = false;
  int64_t max_position = 32768;
};

// The config.json that make_model writes (vocab, bos/eos set from the tokenizer).
ModelConfig make_model_config(const MakeModelOptions& options);
// Writes the checkpoint into `dir` (created if needed); returns its config.
ModelConfig make_model(const MakeModelOptions& options, const std::string& dir);

// The text make-model trains its BPE tokenizer on (English, code, whitespace runs, unicode).
extern const char* const kTokenizerTrainingCorpus;

}  // namespace unshackle
