// ModelEngine: the Engine a worker group serves (worker/include/unshackle/worker/engine.h)
// over the model runtime (worker/model): one Model per process, one ContextAttention per
// context, sampling with sample_token, the checkpoint's tokenizer.
//
//   unshackle-worker rank r ─► ModelEngine ─► Model::forward_chunk ─► ContextAttention
//     ─► (KV shard of rank r, collectives over the group's Communicator)
//
// Hidden states are replicated on every rank; only attention is sharded (SPEC §7), so every
// rank computes the same logits and samples the same token.
//
// Capacity: every context reserves its most tokens up front (create/fork); the reservations of
// all contexts together stay within kv_capacity_tokens, one context within max_context_tokens.
// Past either is Error(kCapacity) and nothing changes.
//
// fork_context copies the source's KV shard on every rank (ContextAttention::copy_state_from:
// rows, scoring keys, LagKV progress; device to device on a GPU) and its last logits, so a
// stored context is prefilled once and each completion on it starts from the copy: the cost of
// a fork is a memory copy of this rank's shard, not a prefill.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "unshackle/cluster/communicator.h"
#include "unshackle/kernels/backend.h"
#include "unshackle/model/cuda_model.h"
#include "unshackle/model/model.h"
#include "unshackle/model/tokenizer.h"
#include "unshackle/worker/engine.h"

namespace unshackle {

struct ModelEngineOptions {
  std::string model_dir;
  std::string name;                 // served model name; "" = the directory's last component
  int64_t max_context_tokens = 0;   // 0: the model's max_position_embeddings
  int64_t kv_capacity_tokens = 0;   // 0: 4 x max_context_tokens
  int64_t kv_block = 256;           // SPEC §7 placement block across ranks
  int64_t chunk = 512;              // longest forward pass inside one prefill call
  std::string compression;          // ESA compression weights (needed by esa and block contexts)
  std::string backend = "cpu";      // "cpu" (Model, host memory) or "cuda" (CudaModel on device
                                    // device_index % visible devices, KV on that GPU)
  int device_index = 0;             // with "cuda": usually the rank's node-local index
  std::string kv_dtype = "auto";    // K, V and k' storage: auto (bf16 on cuda, f32 on cpu), bf16 or f32
  // Measure where attention went (StepStats::share_*) on a context's first decode step and
  // every N-th after it; 0: never. A measured step costs one more small partial attention
  // per layer and, on a GPU, a wait for each layer step.
  int64_t attention_share_every = 16;
};

class ModelEngine final : public Engine {
 public:
  // Loads the checkpoint and tokenizer; errors name the file or the option. comm must outlive
  // the engine; every rank of the group constructs its engine with the same options.
  ModelEngine(const ModelEngineOptions& options, Communicator& comm);
  ~ModelEngine() override;

  ModelInfo info() const override { return info_; }
  DType kv_dtype() const { return kv_dtype_; }  // the KV storage in use (--kv-dtype resolved)
  std::vector<int32_t> tokenize(std::string_view text) override;
  std::string detokenize(std::span<const int32_t> tokens) override;
  void create_context(ContextId id, const AttentionConfig& attention, int64_t reserve_tokens) override;
  void fork_context(ContextId source, ContextId id, int64_t reserve_tokens) override;
  StepStats prefill(ContextId id, std::span<const int32_t> tokens) override;
  DecodeResult decode(ContextId id, const SamplingParams& sampling) override;
  void release_context(ContextId id) override;
  void health_step() override;
  EngineUsage usage() const override;

  const Model& model() const { return *model_; }
  int64_t reserved_tokens() const { return reserved_; }

 private:
  struct Context {
    AttentionConfig attention;
    int64_t reserve = 0;
    std::unique_ptr<ContextAttention> kv;
    std::vector<int32_t> tokens;  // every token in the context, in order
    std::vector<int64_t> chunks;  // lengths of the forward passes that appended them
    std::vector<float> logits;    // [vocab] of the last token; empty before the first prefill
    bool broken = false;          // a step failed half-way: only release is allowed
    int64_t decodes = 0;          // decode steps run (for attention_share_every)
  };

  Context& find(ContextId id);
  std::unique_ptr<Context> make_context(const AttentionConfig& attention, int64_t reserve_tokens);
  void check_room(ContextId id, int64_t reserve_tokens) const;
  // forward_chunk over `tokens` in pieces of at most options_.chunk, summing the step stats.
  StepStats run_tokens(Context& context, std::span<const int32_t> tokens, bool measure_share);

  ModelEngineOptions options_;
  Communicator& comm_;
  std::shared_ptr<const Model> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<CudaModel> cuda_model_;  // set with backend "cuda": the forward pass runs there
  std::unique_ptr<Backend> backend_;
  CompressionWeights compression_;
  bool have_compression_ = false;
  ModelInfo info_;
  DType kv_dtype_ = DType::kF32;  // options_.kv_dtype resolved for the backend
  std::map<ContextId, std::unique_ptr<Context>> contexts_;
  int64_t reserved_ = 0;  // sum of the contexts' reservations

  // One forward pass through whichever model runs this rank.
  void forward(ContextAttention& kv, std::span<const int32_t> tokens, std::vector<float>& logits);
};

}  // namespace unshackle
