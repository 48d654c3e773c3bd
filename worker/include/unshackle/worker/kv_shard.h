// One rank's share of one context's KV cache (SPEC §7), for every layer:
//  - owned rows: the tokens this rank owns (blocks of kv_block tokens, block b on rank b mod P),
//    ascending, with K and V [rows, G, d] pre-RoPE in the storage dtype;
//  - scoring rows: owned tokens plus the halo (other ranks' tokens within eps of an owned
//    one), ascending, with the scoring keys (k' [rows, d_c], or K itself for exact-topk), so
//    that proximity influence is exact at block edges. Halo entries are never candidates.
// LagKV eviction removes rows and so frees room: arrays are compacted from the first removed
// row, which is near the end (evictable partitions end l_L tokens before the chunk).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "unshackle/kernels/backend.h"

namespace unshackle {

struct KvShardOptions {
  int layers = 0, G = 0, d = 0;
  int d_c = 0;                    // scoring width: d' (esa/block), G*d (exact-topk), 0 (no selection)
  DType kv_dtype = DType::kF32;   // storage of K, V and the scoring keys
  int rank = 0, ranks = 1;
  int64_t kv_block = 256;
  int64_t eps = 0;
};

class KvShard {
 public:
  struct Layer {
    std::vector<int64_t> tokens;        // owned tokens, ascending
    BackendBuffer tokens_buf;           // the same, int64, backend memory
    BackendBuffer k, v;                 // [capacity, G, d]
    int64_t capacity = 0;
    std::vector<int64_t> score_tokens;  // owned ∪ halo, ascending
    BackendBuffer score_tokens_buf;     // int64, backend memory
    BackendBuffer candidates_buf;       // int64: token if owned, -1 for halo
    BackendBuffer kc;                   // [score_capacity, d_c]
    int64_t score_capacity = 0;
  };

  KvShard(Backend& backend, KvShardOptions options);

  const KvShardOptions& options() const { return options_; }
  int owner(int64_t token) const;
  bool owns(int64_t token) const { return owner(token) == options_.rank; }
  bool in_halo(int64_t token) const;

  // Appends tokens [t0, t0 + n): rows this rank owns get K and V; rows it owns or holds as
  // halo get their scoring key. k, v [n, G, d] float32; score_keys [n, d_c] in kv_dtype (may
  // be null when d_c == 0). All pointers in backend memory. Tokens must come in order.
  void append(int layer, int64_t t0, int64_t n, const float* k, const float* v, const void* score_keys);
  // Allocates room for a context of `tokens` tokens up front (growth would copy, and briefly
  // hold both the old and the new arrays).
  void reserve_context(int64_t tokens);
  // Makes this shard hold exactly what `source` holds (every layer's rows, tokens and keys),
  // growing its arrays as needed; copies stay in backend memory (device to device on a GPU).
  // The shards must have the same options (shape, dtype, rank, placement).
  void copy_from(const KvShard& source);
  // Removes `tokens` (ascending) from owned and scoring rows of `layer`; absent ones are ignored.
  void evict(int layer, const std::vector<int64_t>& tokens);

  const Layer& layer(int index) const { return layers_.at(static_cast<size_t>(index)); }
  // Rows of owned tokens in [begin, end): a contiguous row range.
  std::pair<int64_t, int64_t> owned_rows(int layer, int64_t begin, int64_t end) const;
  // Scoring rows whose token lies in [begin, end).
  std::pair<int64_t, int64_t> score_rows(int layer, int64_t begin, int64_t end) const;
  // Row of an owned token, or -1.
  int64_t row_of(int layer, int64_t token) const;

  size_t kv_row_bytes() const;     // K + V of one token
  size_t score_row_bytes() const;  // scoring key of one token
  // Exact bytes of K, V, scoring keys and token indices for the rows held now.
  size_t bytes_held() const;
  // Bytes allocated (capacity).
  size_t bytes_reserved() const;
  int64_t tokens_held() const;  // owned rows summed over layers

 private:
  void reserve_kv(Layer& layer, int64_t rows);
  void reserve_score(Layer& layer, int64_t rows);

  Backend& backend_;
  KvShardOptions options_;
  std::vector<Layer> layers_;
  std::vector<int64_t> kept_, candidates_;  // append's scoring rows, reused across calls
};

}  // namespace unshackle
