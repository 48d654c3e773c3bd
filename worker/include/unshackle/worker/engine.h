// What a worker group does for the coordinator: the model behind one interface.
//
//   coordinator ─► (TCP, worker/service) ─► rank 0 ─► relays the call to every rank
//     ─► [Engine] on every rank, in lockstep ─► rank 0's result goes back.
//
// Every rank of a group holds one Engine and is called with the same methods, in the same
// order, with the same arguments (rank 0 broadcasts each call); the collectives inside the
// model keep the ranks together. Results must be identical on every rank.
//
// info() and usage() are local to the rank (not collective); every other method is collective.
//
// Errors: methods throw unshackle::Error. kInvalidArgument for a bad argument (unknown
// context id is kNotFound), kCapacity when a context would exceed its reservation or the
// group's KV capacity, kComm / kTimeout when a collective failed (the group is then broken
// and the worker process reports it and exits). A failed prefill or decode leaves the
// context unusable; the caller releases it.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "unshackle/kernels/attention_config.h"

namespace unshackle {

using ContextId = uint64_t;

struct ModelInfo {
  std::string name;                 // served model name (/v1/models id)
  int64_t max_context_tokens = 0;   // one context's limit: prompt + generated tokens
  int64_t kv_capacity_tokens = 0;   // all contexts of the group together (KV memory of the group)
  int num_heads = 0;                // H
  int num_kv_heads = 0;             // G (AttentionConfig::validate needs H and G)
  int layers = 0;
  int64_t vocab_size = 0;
};

// Sampling of one decode step. temperature 0 is greedy (argmax, ties to the lower id).
// Reproducibility: the draw for the token at context position n uses a generator seeded
// from (seed, n) only, so a context reused from a stored prefill samples the same tokens
// as a fresh prefill of the same prompt.
struct SamplingParams {
  double temperature = 1.0;  // >= 0
  double top_p = 1.0;        // (0, 1]
  int64_t top_k = 0;         // 0: no top-k cut
  uint64_t seed = 0;
};

// What one prefill chunk or decode step did (rank 0's view), for metrics.
struct StepStats {
  int64_t context_tokens = 0;     // context length after the step
  double collective_seconds = 0;  // wall time inside communicator calls, summed over layers
  int64_t selected_tokens = 0;    // |M_k| summed over layers (selection modes), else 0
  int64_t middle_tokens = 0;      // |M| summed over layers, for the selection ratio
  // Where attention went (LayerStepStats::share), summed over the layer steps that measured
  // it (share_layers of them; 0 when none did): divide by share_layers for the step's mean.
  int64_t share_layers = 0;
  double share_initial = 0, share_selected = 0, share_local = 0;
};

struct DecodeResult {
  int32_t token = 0;
  bool end_of_sequence = false;  // token is an end-of-sequence token (not part of the text)
  StepStats stats;
};

// KV held by this rank (for the per-rank gauges).
struct EngineUsage {
  int64_t kv_bytes = 0;
  int64_t kv_tokens = 0;  // rows this rank stores, summed over contexts (owned, not halo)
  int64_t contexts = 0;
};

class Engine {
 public:
  virtual ~Engine() = default;

  virtual ModelInfo info() const = 0;

  // Text to token ids as the model's tokenizer does it (with BOS where the model adds one).
  virtual std::vector<int32_t> tokenize(std::string_view text) = 0;
  // Token ids to text; ids outside the vocabulary are kInvalidArgument.
  virtual std::string detokenize(std::span<const int32_t> tokens) = 0;

  // A new, empty context. reserve_tokens: the most tokens it will hold (prompt + generation);
  // the engine reserves KV memory for them or throws kCapacity.
  virtual void create_context(ContextId id, const AttentionConfig& attention, int64_t reserve_tokens) = 0;
  // A copy of `source` (its KV, attention settings and last-token logits) under a new id, which may grow to
  // reserve_tokens. The source is left unchanged (stored contexts are forked per completion).
  virtual void fork_context(ContextId source, ContextId id, int64_t reserve_tokens) = 0;
  // Runs `tokens` (one chunk) through the model and appends them to the context; afterwards
  // the logits of the last token are ready for decode().
  virtual StepStats prefill(ContextId id, std::span<const int32_t> tokens) = 0;
  // Samples the next token from the logits of the context's last token, then runs it through
  // the model and appends it (so the next decode() samples the token after it).
  virtual DecodeResult decode(ContextId id, const SamplingParams& sampling) = 0;
  // Frees the context's KV on every rank. Unknown ids are ignored.
  virtual void release_context(ContextId id) = 0;

  // A cheap step that exercises the whole group (one token through every layer and every
  // collective) without touching any context: the readiness probe.
  virtual void health_step() = 0;

  virtual EngineUsage usage() const = 0;
};

}  // namespace unshackle
