// Sampling and the generation loop: token ids in, token ids (and text) out.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "unshackle/model/cuda_model.h"
#include "unshackle/model/model.h"
#include "unshackle/model/tokenizer.h"

namespace unshackle {

// temperature 0 is greedy (argmax, ties to the lower id). Otherwise: logits / temperature,
// softmax (double), keep the top_k most likely (0: all; ties to the lower id), then the
// smallest prefix whose probability reaches top_p, renormalise and draw.
// Reproducibility: the draw for the token at context position n uses a std::mt19937_64
// seeded from (seed, n) only, so it does not depend on how the prompt was chunked or on
// what was sampled before.
struct SamplingOptions {
  double temperature = 0;
  double top_p = 1.0;
  int64_t top_k = 0;
  uint64_t seed = 0;
  void validate() const;  // Error(kInvalidArgument) naming the field
};

int32_t sample_token(std::span<const float> logits, const SamplingOptions& options, int64_t position);

struct GenerateOptions {
  int64_t max_tokens = 64;             // generated tokens at most (a stop token counts)
  SamplingOptions sampling;
  std::vector<int32_t> stop_ids;       // e.g. the model's eos_token_ids
  std::vector<std::string> stop_strings;  // need a tokenizer
  int64_t chunk = 512;                 // prefill chunk
  bool record_logits = false;          // fill prompt_logits and step_logits (parity checks)
};

enum class FinishReason : uint8_t { kLength, kStopToken, kStopString };
std::string_view finish_reason_name(FinishReason reason);  // "length", "stop_token", "stop_string"

struct GenerateResult {
  std::vector<int32_t> tokens;      // generated ids, a final stop token included
  std::string text;                 // decoded without the stop token, cut before a stop string
  FinishReason finish = FinishReason::kLength;
  std::vector<float> prompt_logits;  // [prompt, vocab] when record_logits
  std::vector<float> step_logits;    // [tokens, vocab]: what each generated token was drawn from
};

// Prefills `prompt` into `context` (which must be empty or hold the tokens before it) in
// chunks, then decodes one token at a time. `tokenizer` may be null when there are no stop
// strings (text is then empty). on_token, when set, sees each generated id as it comes.
GenerateResult generate(const Model& model, ContextAttention& context, const Tokenizer* tokenizer,
                        std::span<const int32_t> prompt, const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token = {});
// The same on the GPU: `context` runs on a CUDA backend of model.device().
GenerateResult generate(CudaModel& model, ContextAttention& context, const Tokenizer* tokenizer,
                        std::span<const int32_t> prompt, const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token = {});

// The loop itself, for any forward pass with Model::forward_chunk's contract:
// forward(tokens, logits, all_positions) runs one chunk on `context` and commits it.
using ForwardChunkFn = std::function<void(std::span<const int32_t>, std::vector<float>&, bool)>;
GenerateResult generate(const ForwardChunkFn& forward, int64_t vocab, ContextAttention& context,
                        const Tokenizer* tokenizer, std::span<const int32_t> prompt, const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token = {});

}  // namespace unshackle
