// One plain parameter struct per operation (FlashMLA/TRT-LLM style): shapes in comments,
// nullability stated, and a check() that validates before any backend runs it.
// Pointers live in the backend's memory space (host for CPU, device for CUDA).
//
// Store convention: a rank's KV store keeps rows; row r holds token key_tokens[r] (global,
// ascending), K and V as [rows, G, d] pre-RoPE, and compressed keys k' as [rows, d_c].
// An op that reads a subset of rows takes `rows` (int32 row ids) or nullptr for [0, n).
// Row ids fit int32 (a rank's store holds < 2^31 rows).
#pragma once

#include <cstdint>

#include "unshackle/common/dtype.h"

namespace unshackle {

// q' = Wq · concat_h RoPE(q_{h,c}, w)     (ESA, d_c = d')
// or, with wq == nullptr, the exact fold  q'[g*d+i] = sum_{h: g(h)=g} RoPE(q_{h,c}, w)[i]
// (d_c = G*d), so that q' · k_m = f(m, c) with k_m the concatenated pre-RoPE key heads.
struct CompressQueryParams {
  const float* q = nullptr;         // [l_C, H, d] pre-RoPE
  const float* wq = nullptr;        // [d_c, H*d] row-major; nullptr -> exact fold
  const float* inv_freq = nullptr;  // [d/2]
  int64_t position = 0;             // w
  float* q_out = nullptr;           // [l_C, d_c]
  int l_C = 0, H = 0, G = 0, d = 0, d_c = 0;
  void check() const;
};

// k'_m = Wk · k_m for n tokens (k_m = concat of the G pre-RoPE key heads).
struct CompressKeysParams {
  const void* k = nullptr;   // [n, G, d] in k_dtype
  DType k_dtype = DType::kF32;
  const float* wk = nullptr; // [d_c, G*d] row-major
  void* kc_out = nullptr;    // [n, d_c] in kc_dtype
  DType kc_dtype = DType::kF32;
  int64_t n = 0;
  int G = 0, d = 0, d_c = 0;
  void check() const;
};

// Scores of compressed queries against stored compressed keys (SPEC §3):
//   s(m, c)          = q'_c · k'_m
//   query_max[c]     = max_m s(m, c)                      (score_query_max; -inf when n == 0)
//   score[m]         = max_c (s(m, c) - row_max[c])       (score_chunk)
// With row_max == nullptr, score[m] = max_c s(m, c): decode (l_C = 1) ranks by s directly,
// since subtracting one per-query maximum is a monotone shift (docs/spec_notes.md).
struct ScoreParams {
  const float* qc = nullptr;       // [l_C, d_c]
  const void* kc = nullptr;        // [n_store, d_c] in kc_dtype
  DType kc_dtype = DType::kF32;
  const int32_t* rows = nullptr;   // [n] rows of kc; nullptr -> [0, n)
  int64_t n = 0;
  int l_C = 0, d_c = 0;
  const float* row_max = nullptr;  // [l_C] or nullptr
  float* query_max_out = nullptr;  // [l_C] (score_query_max)
  float* score_out = nullptr;      // [n]   (score_chunk)
  void check() const;
};

// Proximity influence F'(j) = max { F(i) : |tok_i - tok_j| <= eps } over the given entries,
// tokens strictly ascending (evicted tokens are simply absent).
struct ProximityParams {
  const float* score = nullptr;     // [n]
  const int64_t* tokens = nullptr;  // [n] ascending
  int64_t n = 0;
  int64_t eps = 0;
  float* out = nullptr;             // [n] (may not alias score)
  void check() const;
};

// Top-k by (value descending, token ascending): the SPEC tie rule. Entries with token < 0
// are padding and never selected. NaN ranks below every number.
struct TopKParams {
  const float* values = nullptr;    // [n]
  const int64_t* tokens = nullptr;  // [n]
  int64_t n = 0;
  int64_t k = 0;
  float* out_values = nullptr;      // [k] in rank order; padded with (-inf, -1)
  int64_t* out_tokens = nullptr;    // [k]
  int64_t* out_count = nullptr;     // [1] how many real entries were written (host pointer)
  void check() const;
};

// The global part's row list of a layer step (SPEC §7), built where the selection lives (on
// the backend): rows_out = the rows [initial_begin, initial_end) as they are (this rank's
// owned I rows), then one entry per selected entry in ascending token order: the row in
// [search_begin, search_end) whose token it is, or -1 where there is none (another rank owns
// the token, or it was evicted). Padding entries (token < 0) come last, as -1. There are
// always k such entries, whoever owns what, so the caller sizes the attention without reading
// the selection back (AttendParams skips rows < 0); ascending tokens are ascending rows, so
// K/V reads go in memory order.
struct RowsOfTokensParams {
  const int64_t* selected = nullptr;  // [k] global tokens in any order, distinct; < 0 = padding
  int64_t k = 0;
  const int64_t* tokens = nullptr;    // [n_store] the store's tokens (key_tokens), ascending
  int64_t search_begin = 0, search_end = 0;    // rows searched for the selected tokens
  int64_t initial_begin = 0, initial_end = 0;  // rows written first
  int32_t* rows_out = nullptr;        // [initial_end - initial_begin + k]
  void check() const;
};

// How attention positions are assigned (SPEC §4).
enum class PositionScheme : uint8_t {
  kGlobal,    // keys unrotated (position 0), queries at `query_position` (w)
  kRelative,  // key at key_token - origin, query at its token - origin
};

// Partial attention of a chunk's queries over a set of stored rows, giving (o, lse).
// GQA: query head h reads KV head h / (H / G). lse is the natural log-sum-exp of the scaled
// logits; a query that sees no key gets lse = -inf and o = 0 (never NaN).
struct AttendParams {
  const float* q = nullptr;          // [l_C, H, d] pre-RoPE
  int64_t q_token0 = 0;              // global token of the chunk's first query (p)
  const void* k = nullptr;           // [n_store, G, d] pre-RoPE, kv_dtype
  const void* v = nullptr;           // [n_store, G, d]
  DType kv_dtype = DType::kF32;
  const int64_t* key_tokens = nullptr;  // [n_store] global token of each store row
  const int32_t* rows = nullptr;     // [n] rows to attend; nullptr -> [0, n); an entry < 0 is
                                     // no row: skipped, it contributes nothing (rows_of_tokens)
  int64_t n = 0;
  int l_C = 0, H = 0, G = 0, d = 0;
  bool causal = false;               // key visible iff key_token <= query token
  PositionScheme positions = PositionScheme::kRelative;
  int64_t origin = 0;                // kRelative
  int64_t query_position = 0;        // kGlobal
  const float* inv_freq = nullptr;   // [d/2]
  float scale = 0;                   // usually 1/sqrt(d)
  float* o = nullptr;                // [l_C, H, d]
  float* lse = nullptr;              // [l_C, H]
  void check() const;
};

// Log-sum-exp merge of n_parts partial results: parts laid out [n_parts, rows, d] and
// [n_parts, rows]; any empty part (lse = -inf) contributes nothing.
struct MergeParams {
  const float* o_parts = nullptr;    // [n_parts, rows, d]
  const float* lse_parts = nullptr;  // [n_parts, rows]
  int n_parts = 0;
  int64_t rows = 0;                  // l_C * H
  int d = 0;
  float* o = nullptr;                // [rows, d]
  float* lse = nullptr;              // [rows] (may be nullptr)
  void check() const;
};

// LagKV (SPEC §5), in three stages so that a partition split across ranks scores exactly:
//  1. lag_reference_extrema: per (K|V, kv head, channel) max and -min over the reference
//     rows, as [2][2][G*d] = {K max, K -min, V max, V -min}: a MAX all-reduce combines ranks.
//  2. lag_token_std: for each partition row, the unbiased std over channels of
//     (x - min) / max(max - min, 1e-6), per (K|V, kv head): out [n][2][G].
//  3. lag_partition_scores: softmax over the partition's tokens of each (K|V, head) column,
//     mean of K and V, mean over heads: score [lag].
struct LagExtremaParams {
  const void* k = nullptr;          // [n_store, G, d]
  const void* v = nullptr;
  DType kv_dtype = DType::kF32;
  const int32_t* rows = nullptr;    // [n] reference rows (nullptr -> [0, n))
  int64_t n = 0;
  int G = 0, d = 0;
  float* extrema = nullptr;         // [4, G*d], initialised to -inf by the op
  void check() const;
};

struct LagStdParams {
  const void* k = nullptr;
  const void* v = nullptr;
  DType kv_dtype = DType::kF32;
  const int32_t* rows = nullptr;    // [n] partition rows (nullptr -> [0, n))
  int64_t n = 0;
  int G = 0, d = 0;
  const float* extrema = nullptr;   // [4, G*d] combined over ranks
  float* token_std = nullptr;       // [n, 2, G]
  void check() const;
};

struct LagScoreParams {
  const float* token_std = nullptr;  // [lag, 2, G] the whole partition, token order
  int64_t lag = 0;
  int G = 0;
  float* score = nullptr;            // [lag]
  void check() const;
};

}  // namespace unshackle
