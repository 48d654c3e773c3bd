// One context's attention on one rank, across all layers (SPEC §7): the rank's KV shard
// (K, V, k' of the tokens it owns, plus the halo k'), and the distributed layer step that
// turns a chunk's q, k, v into the attention output. Every rank of a group holds one
// ContextAttention per context and calls it with identical (replicated) inputs.
//
//   request → coordinator → worker → [ContextAttention::forward]
//     → kernels (score, top-k, attend) → collectives (gather candidates, merge partials)
//     → o, identical on every rank.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "unshackle/cluster/communicator.h"
#include "unshackle/kernels/attention_config.h"
#include "unshackle/kernels/backend.h"
#include "unshackle/worker/kv_shard.h"

namespace unshackle {

// ESA compression weights for every layer (SPEC §6), host float32.
struct CompressionWeights {
  int d_c = 0;                           // d'
  std::vector<std::vector<float>> wq;    // [layers][d_c * H*d]
  std::vector<std::vector<float>> wk;    // [layers][d_c * G*d]
};

struct ContextAttentionOptions {
  AttentionConfig attention;
  int layers = 0, H = 0, G = 0, d = 0;
  DType kv_dtype = DType::kF32;            // storage of K, V and k'
  int64_t kv_block = 256;                  // SPEC §7 placement block (tokens)
  std::vector<float> inv_freq;             // [d/2] RoPE frequencies (with rope_scaling)
  const CompressionWeights* compression = nullptr;  // required by esa/block; may be null otherwise
  int64_t max_tokens = 0;                  // capacity of the context (0: unbounded); beyond it -> Error(kCapacity)
  int64_t reserve_tokens = 0;              // allocate the shard for this many tokens up front
  // LayerStepStats::selected holds the selected set (esa, exact-topk: read back from the
  // backend, one host wait per layer step). Off: only its size is kept, computed on the host
  // without waiting, and a decode step never waits for the device except in collectives and
  // LagKV's eviction steps. The service (ModelEngine) turns it off; tests and tools keep it.
  bool record_selection = true;
  // Optional: sees each layer step's q [l_C, H, d] and k [l_C, G, d] (pre-RoPE, backend
  // memory) before attention; `first` is the chunk's first token. `unshackle calibrate` uses it.
  std::function<void(int layer, const float* q, const float* k, int64_t l_C, int64_t first)> observer = {};
};

// Where a layer step's attention went: the softmax mass of each query on the initial tokens
// I, the selected middle tokens M_k and the local window L ∪ C, averaged over the chunk's
// queries and heads (the three sum to 1). Measured only on steps that ask for it
// (ContextAttention::measure_attention_share) and never in `full` mode.
struct AttentionShare {
  bool measured = false;
  double initial = 0, selected = 0, local = 0;
};

// What one layer step did, for tests, the case tool and metrics.
struct LayerStepStats {
  std::vector<int64_t> selected;    // global M_k, ascending (esa/exact-topk: only with record_selection)
  int64_t selected_count = 0;       // |M_k|, in every mode and setting
  std::vector<int64_t> evicted;     // tokens this step evicted (ascending)
  // Rows this rank attended (global + local part). esa/exact-topk without record_selection:
  // the entries of the global row list instead (owned I rows + k entries, the selected tokens
  // other ranks own being skipped entries), since which selected rows are owned is known on
  // the device only; equal to the rows attended at P = 1 once M holds k tokens.
  int64_t attended_local_rows = 0;
  double collective_seconds = 0;    // wall time inside communicator calls
  AttentionShare share;
};

class ContextAttention {
 public:
  ContextAttention(Backend& backend, Communicator& comm, ContextAttentionOptions options);
  ~ContextAttention();
  ContextAttention(const ContextAttention&) = delete;
  ContextAttention& operator=(const ContextAttention&) = delete;

  // One layer of the current chunk: appends the chunk's k, v (pre-RoPE) to this rank's
  // shard, applies LagKV eviction due at this step, selects, attends and merges across ranks.
  // q [l_C, H, d], k and v [l_C, G, d], o [l_C, H, d]: float32 in the backend's memory space.
  // Tokens of the chunk are [length(), length() + l_C).
  void forward(int layer, const float* q, const float* k, const float* v, int64_t l_C, float* o);
  // Appends n tokens of K, V (pre-RoPE, [n, G, d] float32, backend memory) for `layer`
  // without attending: a context whose KV was computed elsewhere (the case file's prefix).
  void load_kv(int layer, const float* k, const float* v, int64_t n);
  // After every layer has run (or loaded) the chunk: the chunk becomes part of the context.
  void commit_chunk(int64_t l_C);

  // Makes this context hold what `source` holds (its KV shard, length and LagKV progress), as
  // if it had run the same chunks: a stored context forked without recomputing it. Both must
  // have the same settings on the same rank (max_tokens may differ: it must cover the source).
  void copy_state_from(const ContextAttention& source);

  // Steps from now on (until turned off) also measure where the attention mass went
  // (LayerStepStats::share). It costs one more partial attention over I, a few more bytes
  // in the partials' all-gather and, on a GPU, a wait for the step. Every rank of the group
  // must make the same choice for the same step (the gathered payload's size depends on it).
  void measure_attention_share(bool on) { measure_share_ = on; }

  int64_t length() const { return length_; }
  const LayerStepStats& last_stats(int layer) const { return stats_.at(static_cast<size_t>(layer)); }
  const KvShard& shard() const { return *shard_; }
  const ContextAttentionOptions& options() const { return options_; }
  // The backend the layer steps run on (the model runtime checks its memory space and waits on it).
  Backend& backend() const { return backend_; }

 private:
  // What selection [3] hands to attention [4]: esa and exact-topk leave the global M_k in
  // backend memory (`tokens`, k entries padded with -1, any order), block mode gives this
  // rank's selected tokens on the host (`mine`, ascending); no selection: neither.
  struct Selection {
    const int64_t* tokens = nullptr;
    int64_t k = 0;
    bool on_host = false;
    std::vector<int64_t> mine;
  };

  void append_chunk(int layer, int64_t l_C, const float* k, const float* v);
  void evict_due(int layer, const Segments& seg, LayerStepStats& stats);
  Selection select_tokens(int layer, const Segments& seg, const float* q, LayerStepStats& stats);
  void record_selection(int layer, const Segments& seg, const Selection& selection, LayerStepStats& stats);
  Selection select_blocks(int layer, const Segments& seg, const float* F, int64_t s_begin, int64_t n_s,
                          LayerStepStats& stats);
  void attend_and_merge(int layer, const Segments& seg, const float* q, const Selection& selection, float* o,
                        LayerStepStats& stats);
  void record_share(const float* payloads, int ranks, size_t stride, size_t o_count, int64_t out_rows,
                    LayerStepStats& stats);
  // Collectives on buffers in backend memory (staged through the communicator's memory when it differs).
  void all_reduce(void* data, size_t count, DType dtype, ReduceOp op, LayerStepStats& stats);
  void all_gather(const void* send, void* recv, size_t bytes_per_rank, LayerStepStats& stats);
  // The same on host buffers.
  void all_reduce_host(void* data, size_t count, DType dtype, ReduceOp op, LayerStepStats& stats);
  void all_gather_host(const void* send, void* recv, size_t bytes_per_rank, LayerStepStats& stats);
  BackendBuffer& scratch(int slot, size_t bytes);

  Backend& backend_;
  Communicator& comm_;
  ContextAttentionOptions options_;
  std::unique_ptr<KvShard> shard_;
  std::vector<BackendBuffer> wq_, wk_;  // per layer, backend memory
  BackendBuffer inv_freq_;
  std::unique_ptr<Backend> host_ops_;     // CPU ops on small host arrays, identical on every rank
  std::vector<LayerStepStats> stats_;
  std::vector<BackendBuffer> scratch_;
  std::vector<int64_t> layer_length_;     // tokens appended per layer
  std::vector<int64_t> lag_done_;         // LagKV partitions already scored, per layer
  std::vector<int64_t> evicted_count_;    // tokens evicted so far, per layer (all lie in M)
  std::vector<int32_t> rows_;             // block mode's global row list, reused every step
  int64_t length_ = 0;
  bool measure_share_ = false;
};

}  // namespace unshackle
