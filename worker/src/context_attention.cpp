// The distributed layer step of SPEC §7, top to bottom:
//   [1] append the chunk's K, V and scoring keys to their owners (and halos)
//   [2] LagKV: score partitions that just became evictable, evict, free rows
//   [3] select: score owned M rows, MAX all-reduce of per-query maxima (l_C > 1),
//       proximity, local top-k, all-gather candidates, the same global top-k on every rank
//   [4] attend: partial attention over owned rows of I ∪ M_k (global) and L ∪ C (local),
//       all-gather the (o, lse) partials, LSE merge: the same o on every rank.
// In esa and exact-topk, [3] and [4] stay on the backend: the selected tokens, their merge
// across ranks and their token -> row lookup never come to the host (rows_of_tokens), so a
// decode step waits for the device only in collectives, in LagKV's eviction steps and, with
// record_selection, to read M_k back for the statistics. Block mode and the attention share
// measurement keep host steps (they are not the decode hot path).
#include "unshackle/worker/context_attention.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "unshackle/common/check.h"

namespace unshackle {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum ScratchSlot : int {
  kScoreKeys, kQueryCompressed, kRowMax, kScores, kProximity, kCandidates, kGatheredCandidates, kUnion, kSelected,
  kGlobalRows, kGathered, kParts, kSend, kMergeParts, kLagExtrema, kLagStd, kStage, kSlotCount
};

const unsigned char* bytes_at(const BackendBuffer& buffer, size_t offset) {
  return static_cast<const unsigned char*>(buffer.data()) + offset;
}

// First position in [from, end) whose token is >= t: exponential search from `from`, then a
// binary search in the bracket (selected tokens are ~n/k apart, so this touches nearby
// memory instead of the whole list).
std::vector<int64_t>::const_iterator seek(std::vector<int64_t>::const_iterator from,
                                          std::vector<int64_t>::const_iterator end, int64_t t) {
  std::ptrdiff_t step = 1;
  while (end - from > step && *(from + step) < t) {
    from += step;
    step *= 2;
  }
  return std::lower_bound(from, from + std::min(step + 1, end - from), t);
}

class CollectiveTimer {
 public:
  explicit CollectiveTimer(double& total) : total_(total), start_(std::chrono::steady_clock::now()) {}
  ~CollectiveTimer() { total_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

 private:
  double& total_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace

ContextAttention::ContextAttention(Backend& backend, Communicator& comm, ContextAttentionOptions options)
    : backend_(backend), comm_(comm), options_(std::move(options)), host_ops_(make_cpu_backend()) {
  const AttentionConfig& cfg = options_.attention;
  cfg.validate(options_.H, options_.G);
  UNS_CHECK(options_.layers > 0 && options_.d > 0 && options_.d % 2 == 0, "ContextAttention: bad model shape");
  UNS_CHECK(static_cast<int>(options_.inv_freq.size()) == options_.d / 2, "inv_freq: expected {} values, got {}",
            options_.d / 2, options_.inv_freq.size());
  UNS_CHECK(!(comm_.memory_space() == MemorySpace::kDevice && backend_.memory_space() == MemorySpace::kHost),
            "communicator '{}' needs device buffers but backend '{}' works on host memory", comm_.name(),
            backend_.name());
  int d_c = 0;
  if (cfg.mode == AttentionMode::kExactTopk) {
    d_c = options_.G * options_.d;
  } else if (cfg.needs_compression()) {
    const CompressionWeights* cw = options_.compression;
    UNS_CHECK(cw != nullptr, "mode {} needs ESA compression weights (SPEC §6 file); none were given",
              mode_name(cfg.mode));
    UNS_CHECK(cw->d_c > 0 && static_cast<int>(cw->wq.size()) == options_.layers &&
                  static_cast<int>(cw->wk.size()) == options_.layers,
              "compression weights: expected {} layers with d' > 0", options_.layers);
    d_c = cw->d_c;
    const size_t wq_size = static_cast<size_t>(d_c) * options_.H * options_.d;
    const size_t wk_size = static_cast<size_t>(d_c) * options_.G * options_.d;
    for (int l = 0; l < options_.layers; ++l) {
      UNS_CHECK(cw->wq[static_cast<size_t>(l)].size() == wq_size && cw->wk[static_cast<size_t>(l)].size() == wk_size,
                "compression weights of layer {}: wq must be [{}, {}] and wk [{}, {}]", l, d_c, options_.H * options_.d,
                d_c, options_.G * options_.d);
      wq_.emplace_back(backend_, wq_size * sizeof(float));
      wk_.emplace_back(backend_, wk_size * sizeof(float));
      backend_.copy_to_backend(wq_.back().data(), cw->wq[static_cast<size_t>(l)].data(), wq_size * sizeof(float));
      backend_.copy_to_backend(wk_.back().data(), cw->wk[static_cast<size_t>(l)].data(), wk_size * sizeof(float));
    }
  }
  shard_ = std::make_unique<KvShard>(
      backend_, KvShardOptions{.layers = options_.layers, .G = options_.G, .d = options_.d, .d_c = d_c,
                               .kv_dtype = options_.kv_dtype, .rank = comm_.rank(), .ranks = comm_.size(),
                               .kv_block = options_.kv_block, .eps = cfg.eps});
  if (options_.reserve_tokens > 0) shard_->reserve_context(options_.reserve_tokens);
  inv_freq_ = BackendBuffer(backend_, options_.inv_freq.size() * sizeof(float));
  backend_.copy_to_backend(inv_freq_.data(), options_.inv_freq.data(), options_.inv_freq.size() * sizeof(float));
  const auto layers = static_cast<size_t>(options_.layers);
  stats_.resize(layers);
  layer_length_.assign(layers, 0);
  lag_done_.assign(layers, 0);
  evicted_count_.assign(layers, 0);
  scratch_.resize(kSlotCount);
}

ContextAttention::~ContextAttention() = default;

BackendBuffer& ContextAttention::scratch(int slot, size_t bytes) {
  BackendBuffer& buffer = scratch_.at(static_cast<size_t>(slot));
  if (buffer.bytes() < bytes) buffer = BackendBuffer(backend_, std::max(bytes, 2 * buffer.bytes()));
  return buffer;
}

// ---------------------------------------------------------------------------------------
// Collectives (stage through host memory when backend and communicator memory differ)

void ContextAttention::all_reduce(void* data, size_t count, DType dtype, ReduceOp op, LayerStepStats& stats) {
  if (comm_.size() == 1) return;  // one rank: the reduction is the data itself (no host synchronisation)
  backend_.synchronize();  // the communicator's stream must see what the backend's stream wrote
  CollectiveTimer timer(stats.collective_seconds);
  if (comm_.memory_space() == backend_.memory_space()) return comm_.all_reduce(data, data, count, dtype, op);
  std::vector<unsigned char> host(count * dtype_size(dtype));
  backend_.copy_to_host(host.data(), data, host.size());
  comm_.all_reduce(host.data(), host.data(), count, dtype, op);
  backend_.copy_to_backend(data, host.data(), host.size());
}

void ContextAttention::all_gather(const void* send, void* recv, size_t bytes_per_rank, LayerStepStats& stats) {
  if (comm_.size() == 1) return backend_.copy_within(recv, send, bytes_per_rank);  // queued on the backend's stream
  backend_.synchronize();
  CollectiveTimer timer(stats.collective_seconds);
  if (comm_.memory_space() == backend_.memory_space()) return comm_.all_gather(send, recv, bytes_per_rank);
  std::vector<unsigned char> host_send(bytes_per_rank), host_recv(bytes_per_rank * static_cast<size_t>(comm_.size()));
  backend_.copy_to_host(host_send.data(), send, bytes_per_rank);
  comm_.all_gather(host_send.data(), host_recv.data(), bytes_per_rank);
  backend_.copy_to_backend(recv, host_recv.data(), host_recv.size());
}

void ContextAttention::all_reduce_host(void* data, size_t count, DType dtype, ReduceOp op, LayerStepStats& stats) {
  if (comm_.memory_space() == MemorySpace::kHost) {
    CollectiveTimer timer(stats.collective_seconds);
    return comm_.all_reduce(data, data, count, dtype, op);
  }
  const size_t bytes = count * dtype_size(dtype);
  BackendBuffer& stage = scratch(kStage, bytes);
  backend_.copy_to_backend(stage.data(), data, bytes);
  all_reduce(stage.data(), count, dtype, op, stats);
  backend_.copy_to_host(data, stage.data(), bytes);
}

void ContextAttention::all_gather_host(const void* send, void* recv, size_t bytes_per_rank, LayerStepStats& stats) {
  if (comm_.memory_space() == MemorySpace::kHost) {
    CollectiveTimer timer(stats.collective_seconds);
    return comm_.all_gather(send, recv, bytes_per_rank);
  }
  const size_t total = bytes_per_rank * static_cast<size_t>(comm_.size());
  BackendBuffer& stage = scratch(kStage, bytes_per_rank + total);
  backend_.copy_to_backend(stage.data(), send, bytes_per_rank);
  all_gather(stage.data(), stage.as<unsigned char>() + bytes_per_rank, bytes_per_rank, stats);
  backend_.copy_to_host(recv, stage.as<unsigned char>() + bytes_per_rank, total);
}

// ---------------------------------------------------------------------------------------
// [1] append

void ContextAttention::append_chunk(int layer, int64_t l_C, const float* k, const float* v) {
  UNS_CHECK(layer >= 0 && layer < options_.layers, "layer {} out of range [0, {})", layer, options_.layers);
  UNS_CHECK(layer_length_[static_cast<size_t>(layer)] == length_,
            "layer {} already holds the current chunk (commit_chunk was not called)", layer);
  if (options_.max_tokens > 0)
    UNS_CHECK_KIND(kCapacity, length_ + l_C <= options_.max_tokens,
                   "context of {} tokens exceeds this context's capacity of {} tokens", length_ + l_C,
                   options_.max_tokens);
  const int d_c = shard_->options().d_c;
  const void* score_keys = nullptr;
  if (d_c > 0) {
    const size_t count = static_cast<size_t>(l_C) * d_c;
    BackendBuffer& keys = scratch(kScoreKeys, count * dtype_size(options_.kv_dtype));
    if (options_.attention.mode == AttentionMode::kExactTopk) {  // s = f: the key itself
      backend_.convert(k, DType::kF32, keys.data(), options_.kv_dtype, count);
    } else {
      backend_.compress_keys({.k = k, .k_dtype = DType::kF32, .wk = wk_[static_cast<size_t>(layer)].as<float>(),
                              .kc_out = keys.data(), .kc_dtype = options_.kv_dtype, .n = l_C, .G = options_.G,
                              .d = options_.d, .d_c = d_c});
    }
    score_keys = keys.data();
  }
  shard_->append(layer, length_, l_C, k, v, score_keys);
  layer_length_[static_cast<size_t>(layer)] = length_ + l_C;
}

void ContextAttention::load_kv(int layer, const float* k, const float* v, int64_t n) {
  UNS_CHECK(n >= 0, "load_kv: n = {}", n);
  if (n > 0) append_chunk(layer, n, k, v);
}

void ContextAttention::copy_state_from(const ContextAttention& source) {
  UNS_CHECK(&source != this, "ContextAttention::copy_state_from: a context cannot copy itself");
  UNS_CHECK(source.comm_.rank() == comm_.rank() && source.comm_.size() == comm_.size(),
            "ContextAttention::copy_state_from: the source runs on rank {} of {}, this context on rank {} of {}",
            source.comm_.rank(), source.comm_.size(), comm_.rank(), comm_.size());
  UNS_CHECK(options_.max_tokens <= 0 || source.length_ <= options_.max_tokens,
            "ContextAttention::copy_state_from: the source holds {} tokens, this context takes at most {}", source.length_,
            options_.max_tokens);
  for (size_t l = 0; l < layer_length_.size(); ++l)
    UNS_CHECK(source.layer_length_.at(l) == source.length_,
              "ContextAttention::copy_state_from: the source is inside a chunk (layer {} holds {} tokens of {})", l,
              source.layer_length_.at(l), source.length_);
  shard_->copy_from(*source.shard_);
  layer_length_ = source.layer_length_;
  lag_done_ = source.lag_done_;
  evicted_count_ = source.evicted_count_;
  length_ = source.length_;
}

void ContextAttention::commit_chunk(int64_t l_C) {
  for (int l = 0; l < options_.layers; ++l)
    UNS_CHECK(layer_length_[static_cast<size_t>(l)] == length_ + l_C,
              "commit_chunk({}): layer {} holds {} tokens, expected {}", l_C, l, layer_length_[static_cast<size_t>(l)],
              length_ + l_C);
  length_ += l_C;
}

// ---------------------------------------------------------------------------------------
// [2] LagKV eviction (SPEC §5), exact across ranks: the reference extrema combine by a MAX
// all-reduce, and each token's std comes from its owner (others contribute 0) by a SUM.

void ContextAttention::evict_due(int layer, const Segments& seg, LayerStepStats& stats) {
  const AttentionConfig& cfg = options_.attention;
  const auto l = static_cast<size_t>(layer);
  const int64_t due = lag_evictable_partitions(seg, cfg);
  const int64_t first = lag_done_[l];
  if (due <= first) return;
  const int64_t parts = due - first;
  const int width = options_.G * options_.d;
  const KvShard::Layer& store = shard_->layer(layer);
  const size_t half_row = shard_->kv_row_bytes() / 2;

  BackendBuffer& extrema = scratch(kLagExtrema, static_cast<size_t>(parts) * 4 * width * sizeof(float));
  for (int64_t i = 0; i < parts; ++i) {
    const int64_t begin = cfg.l_I + (first + i) * cfg.lag;
    const auto [r0, r1] = shard_->owned_rows(layer, begin + cfg.lag, begin + 2 * cfg.lag);
    backend_.lag_reference_extrema({.k = bytes_at(store.k, static_cast<size_t>(r0) * half_row),
                                    .v = bytes_at(store.v, static_cast<size_t>(r0) * half_row),
                                    .kv_dtype = options_.kv_dtype, .n = r1 - r0, .G = options_.G, .d = options_.d,
                                    .extrema = extrema.as<float>() + i * 4 * width});
  }
  all_reduce(extrema.data(), static_cast<size_t>(parts) * 4 * width, DType::kF32, ReduceOp::kMax, stats);

  const size_t table_size = static_cast<size_t>(cfg.lag) * 2 * options_.G;
  std::vector<float> table(static_cast<size_t>(parts) * table_size, 0.0f), mine(table_size);
  BackendBuffer& token_std = scratch(kLagStd, table_size * sizeof(float));
  for (int64_t i = 0; i < parts; ++i) {
    const int64_t begin = cfg.l_I + (first + i) * cfg.lag;
    const auto [r0, r1] = shard_->owned_rows(layer, begin, begin + cfg.lag);
    if (r1 == r0) continue;
    backend_.lag_token_std({.k = bytes_at(store.k, static_cast<size_t>(r0) * half_row),
                            .v = bytes_at(store.v, static_cast<size_t>(r0) * half_row), .kv_dtype = options_.kv_dtype,
                            .n = r1 - r0, .G = options_.G, .d = options_.d,
                            .extrema = extrema.as<float>() + i * 4 * width, .token_std = token_std.as<float>()});
    const size_t row_values = 2 * static_cast<size_t>(options_.G);
    backend_.copy_to_host(mine.data(), token_std.data(), static_cast<size_t>(r1 - r0) * row_values * sizeof(float));
    for (int64_t r = r0; r < r1; ++r) {
      const auto slot = static_cast<size_t>(store.tokens[static_cast<size_t>(r)] - begin);
      std::memcpy(table.data() + static_cast<size_t>(i) * table_size + slot * row_values,
                  mine.data() + static_cast<size_t>(r - r0) * row_values, row_values * sizeof(float));
    }
  }
  all_reduce_host(table.data(), table.size(), DType::kF32, ReduceOp::kSum, stats);

  const int64_t keep = lag_keep_count(cfg);
  std::vector<float> score(static_cast<size_t>(cfg.lag)), top_values(static_cast<size_t>(cfg.lag));
  std::vector<int64_t> tokens(static_cast<size_t>(cfg.lag)), top_tokens(static_cast<size_t>(cfg.lag));
  std::vector<int64_t> evicted;
  for (int64_t i = 0; i < parts; ++i) {
    const int64_t begin = cfg.l_I + (first + i) * cfg.lag;
    host_ops_->lag_partition_scores({.token_std = table.data() + static_cast<size_t>(i) * table_size, .lag = cfg.lag,
                                     .G = options_.G, .score = score.data()});
    for (int64_t j = 0; j < cfg.lag; ++j) tokens[static_cast<size_t>(j)] = begin + j;
    int64_t count = 0;
    host_ops_->top_k({.values = score.data(), .tokens = tokens.data(), .n = cfg.lag, .k = keep,
                      .out_values = top_values.data(), .out_tokens = top_tokens.data(), .out_count = &count});
    std::vector<bool> kept(static_cast<size_t>(cfg.lag), false);
    for (int64_t j = 0; j < count; ++j) kept[static_cast<size_t>(top_tokens[static_cast<size_t>(j)] - begin)] = true;
    for (int64_t j = 0; j < cfg.lag; ++j)
      if (!kept[static_cast<size_t>(j)]) evicted.push_back(begin + j);
  }
  shard_->evict(layer, evicted);
  evicted_count_[l] += static_cast<int64_t>(evicted.size());
  lag_done_[l] = due;
  stats.evicted = std::move(evicted);
}

// ---------------------------------------------------------------------------------------
// [3] selection (SPEC §3 and block mode of §5)

ContextAttention::Selection ContextAttention::select_tokens(int layer, const Segments& seg, const float* q,
                                                           LayerStepStats& stats) {
  const AttentionConfig& cfg = options_.attention;
  const int d_c = shard_->options().d_c;
  const int l_C = static_cast<int>(seg.l_C);
  const bool exact = cfg.mode == AttentionMode::kExactTopk;
  const KvShard::Layer& store = shard_->layer(layer);

  BackendBuffer& qc = scratch(kQueryCompressed, static_cast<size_t>(l_C) * d_c * sizeof(float));
  backend_.compress_query({.q = q, .wq = exact ? nullptr : wq_[static_cast<size_t>(layer)].as<float>(),
                           .inv_freq = inv_freq_.as<float>(), .position = cfg.global_query_position(),
                           .q_out = qc.as<float>(), .l_C = l_C, .H = options_.H, .G = options_.G, .d = options_.d,
                           .d_c = d_c});
  const auto [s_begin, s_end] = shard_->score_rows(layer, seg.m_begin, seg.m_end);
  const int64_t n_s = s_end - s_begin;
  ScoreParams score{.qc = qc.as<float>(), .kc = bytes_at(store.kc, static_cast<size_t>(s_begin) * shard_->score_row_bytes()),
                    .kc_dtype = options_.kv_dtype, .n = n_s, .l_C = l_C, .d_c = d_c};
  if (l_C > 1) {  // per-query maxima over all of M: one MAX all-reduce
    BackendBuffer& row_max = scratch(kRowMax, static_cast<size_t>(l_C) * sizeof(float));
    score.query_max_out = row_max.as<float>();
    backend_.score_query_max(score);
    all_reduce(row_max.data(), static_cast<size_t>(l_C), DType::kF32, ReduceOp::kMax, stats);
    score.row_max = row_max.as<float>();
  }
  BackendBuffer& F = scratch(kScores, static_cast<size_t>(std::max<int64_t>(n_s, 1)) * sizeof(float));
  score.score_out = F.as<float>();
  backend_.score_chunk(score);
  if (cfg.mode == AttentionMode::kBlock) return select_blocks(layer, seg, F.as<float>(), s_begin, n_s, stats);

  // Proximity over owned + halo rows, then the local top-k over owned rows only.
  BackendBuffer& F_prox = scratch(kProximity, static_cast<size_t>(std::max<int64_t>(n_s, 1)) * sizeof(float));
  const auto* score_tokens = reinterpret_cast<const int64_t*>(bytes_at(store.score_tokens_buf, 0)) + s_begin;
  const auto* candidates = reinterpret_cast<const int64_t*>(bytes_at(store.candidates_buf, 0)) + s_begin;
  backend_.proximity({.score = F.as<float>(), .tokens = score_tokens, .n = n_s, .eps = cfg.eps, .out = F_prox.as<float>()});
  // Candidate block per rank: [k values (f32, padded to an even count)][k tokens (i64)].
  const int64_t k = cfg.top_k;
  const auto ku = static_cast<size_t>(k);
  const size_t values_bytes = (ku + 1) / 2 * 2 * sizeof(float);
  const size_t block_bytes = values_bytes + ku * sizeof(int64_t);
  BackendBuffer& cand = scratch(kCandidates, block_bytes);
  // No out_count anywhere below: every op stays queued (no host wait); padding tokens are -1.
  backend_.top_k({.values = F_prox.as<float>(), .tokens = candidates, .n = n_s, .k = k, .out_values = cand.as<float>(),
                  .out_tokens = reinterpret_cast<int64_t*>(cand.as<unsigned char>() + values_bytes),
                  .out_count = nullptr});
  Selection selection;
  selection.tokens = reinterpret_cast<const int64_t*>(cand.as<unsigned char>() + values_bytes);
  selection.k = k;
  if (comm_.size() > 1) {
    // The global top-k of the union of local top-ks, on the backend: the same input and tie
    // rule on every rank, so the same M_k. The gathered blocks are laid out as P*k values then
    // P*k tokens, the shape top_k reads.
    const auto P = static_cast<size_t>(comm_.size());
    BackendBuffer& gathered = scratch(kGatheredCandidates, block_bytes * P);
    all_gather(cand.data(), gathered.data(), block_bytes, stats);
    const size_t union_values_bytes = (P * ku + 1) / 2 * 2 * sizeof(float);
    BackendBuffer& all = scratch(kUnion, union_values_bytes + P * ku * sizeof(int64_t));
    auto* all_values = all.as<float>();
    auto* all_tokens = reinterpret_cast<int64_t*>(all.as<unsigned char>() + union_values_bytes);
    for (size_t r = 0; r < P; ++r) {
      backend_.copy_within(all_values + r * ku, bytes_at(gathered, r * block_bytes), ku * sizeof(float));
      backend_.copy_within(all_tokens + r * ku, bytes_at(gathered, r * block_bytes + values_bytes), ku * sizeof(int64_t));
    }
    BackendBuffer& top = scratch(kSelected, block_bytes);
    backend_.top_k({.values = all_values, .tokens = all_tokens, .n = static_cast<int64_t>(P * ku), .k = k,
                    .out_values = top.as<float>(),
                    .out_tokens = reinterpret_cast<int64_t*>(top.as<unsigned char>() + values_bytes), .out_count = nullptr});
    selection.tokens = reinterpret_cast<const int64_t*>(top.as<unsigned char>() + values_bytes);
  }
  record_selection(layer, seg, selection, stats);
  return selection;
}

// The selection's statistics: the set itself (one read-back) with record_selection, else its
// size, min(k, tokens of M still held): every held token of M is some rank's candidate, and
// the local and global top-ks keep min(k, candidates) entries (padding aside).
void ContextAttention::record_selection(int layer, const Segments& seg, const Selection& selection,
                                        LayerStepStats& stats) {
  if (!options_.record_selection) {
    const int64_t held = seg.m_size() - evicted_count_[static_cast<size_t>(layer)];  // evicted tokens all lie in M
    stats.selected_count = std::min(selection.k, held);
    return;
  }
  std::vector<int64_t>& selected = stats.selected;
  selected.resize(static_cast<size_t>(selection.k));
  backend_.copy_to_host(selected.data(), selection.tokens, selected.size() * sizeof(int64_t));
  selected.erase(std::find(selected.begin(), selected.end(), int64_t{-1}), selected.end());  // padding comes last
  std::sort(selected.begin(), selected.end());
  stats.selected_count = static_cast<int64_t>(selected.size());
}

ContextAttention::Selection ContextAttention::select_blocks(int layer, const Segments& seg, const float* F,
                                                           int64_t s_begin, int64_t n_s, LayerStepStats& stats) {
  const AttentionConfig& cfg = options_.attention;
  const KvShard::Layer& store = shard_->layer(layer);
  std::vector<float> scores(static_cast<size_t>(n_s));
  std::vector<int64_t> candidates(static_cast<size_t>(n_s));
  backend_.copy_to_host(scores.data(), F, scores.size() * sizeof(float));
  backend_.copy_to_host(candidates.data(), bytes_at(store.candidates_buf, static_cast<size_t>(s_begin) * sizeof(int64_t)),
                        candidates.size() * sizeof(int64_t));
  const int64_t n_blocks = (seg.m_size() + cfg.block - 1) / cfg.block;
  std::vector<float> block_score(static_cast<size_t>(n_blocks), kNegInf);
  for (int64_t i = 0; i < n_s; ++i) {
    const int64_t t = candidates[static_cast<size_t>(i)];
    if (t < 0) continue;  // halo row: its owner counts it
    auto& best = block_score[static_cast<size_t>((t - seg.m_begin) / cfg.block)];
    best = std::max(best, scores[static_cast<size_t>(i)]);
  }
  all_reduce_host(block_score.data(), block_score.size(), DType::kF32, ReduceOp::kMax, stats);

  // SPEC §5: the floor(k / block) best blocks, also when M would fit in k (blocks whose
  // tokens were all evicted score -inf and are no candidates).
  std::vector<bool> chosen(static_cast<size_t>(n_blocks), false);
  {
    std::vector<int64_t> ids(static_cast<size_t>(n_blocks));
    for (int64_t b = 0; b < n_blocks; ++b) ids[static_cast<size_t>(b)] = block_score[static_cast<size_t>(b)] == kNegInf ? -1 : b;
    const int64_t want = cfg.top_k / cfg.block;
    std::vector<float> top_values(static_cast<size_t>(want));
    std::vector<int64_t> top_blocks(static_cast<size_t>(want));
    int64_t count = 0;
    host_ops_->top_k({.values = block_score.data(), .tokens = ids.data(), .n = n_blocks, .k = want,
                      .out_values = top_values.data(), .out_tokens = top_blocks.data(), .out_count = &count});
    for (int64_t j = 0; j < count; ++j) chosen[static_cast<size_t>(top_blocks[static_cast<size_t>(j)])] = true;
  }
  std::vector<int64_t> mine;
  const auto [r0, r1] = shard_->owned_rows(layer, seg.m_begin, seg.m_end);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = store.tokens[static_cast<size_t>(r)];
    if (chosen[static_cast<size_t>((t - seg.m_begin) / cfg.block)]) mine.push_back(t);
  }
  // The global selected set, for stats: at most top_k tokens per rank, gathered with counts.
  const int64_t cap = cfg.top_k;
  std::vector<int64_t> block(static_cast<size_t>(cap + 1), -1), all(static_cast<size_t>((cap + 1) * comm_.size()));
  block[0] = static_cast<int64_t>(mine.size());
  std::copy(mine.begin(), mine.end(), block.begin() + 1);
  all_gather_host(block.data(), all.data(), block.size() * sizeof(int64_t), stats);
  for (int r = 0; r < comm_.size(); ++r) {
    const int64_t* part = all.data() + static_cast<size_t>(r) * static_cast<size_t>(cap + 1);
    stats.selected.insert(stats.selected.end(), part + 1, part + 1 + part[0]);
  }
  std::sort(stats.selected.begin(), stats.selected.end());
  stats.selected_count = static_cast<int64_t>(stats.selected.size());
  return {.on_host = true, .mine = std::move(mine)};
}

// ---------------------------------------------------------------------------------------
// [4] partial attention and the LSE merge (SPEC §4, §7)

void ContextAttention::attend_and_merge(int layer, const Segments& seg, const float* q, const Selection& selection,
                                        float* o, LayerStepStats& stats) {
  const AttentionConfig& cfg = options_.attention;
  const KvShard::Layer& store = shard_->layer(layer);
  const size_t half_row = shard_->kv_row_bytes() / 2;
  const int64_t out_rows = seg.l_C * options_.H;
  const size_t o_count = static_cast<size_t>(out_rows) * options_.d;
  const size_t part_floats = o_count + static_cast<size_t>(out_rows);  // [o | lse]
  // Measuring the share splits the global part into I and M_k and sends each rank's three
  // partial lse after its [o | lse]: [o | lse | lse_I | lse_M | lse_L].
  const bool share = measure_share_ && cfg.mode != AttentionMode::kFull;
  const int n_parts = share ? 3 : 2;
  const size_t send_floats = part_floats + (share ? 3 * static_cast<size_t>(out_rows) : 0);
  const auto* tokens = reinterpret_cast<const int64_t*>(store.tokens_buf.data());

  AttendParams attend{.q = q, .q_token0 = seg.p, .k = store.k.data(), .v = store.v.data(), .kv_dtype = options_.kv_dtype,
                      .key_tokens = tokens, .l_C = static_cast<int>(seg.l_C), .H = options_.H, .G = options_.G,
                      .d = options_.d, .inv_freq = inv_freq_.as<float>(),
                      .scale = 1.0f / std::sqrt(static_cast<float>(options_.d))};
  const auto contiguous = [&](int64_t r0, int64_t r1) {  // rows [r0, r1) by pointer offset
    attend.k = bytes_at(store.k, static_cast<size_t>(r0) * half_row);
    attend.v = bytes_at(store.v, static_cast<size_t>(r0) * half_row);
    attend.key_tokens = tokens + r0;
    attend.rows = nullptr;
    attend.n = r1 - r0;
  };

  BackendBuffer& send = scratch(kSend, send_floats * sizeof(float));
  // One rank: its o is the answer, written straight to `o` (a one-part merge is an exact copy);
  // the lse still goes to send, where record_share reads it.
  const int P = comm_.size();
  float* const rank_o = P == 1 ? o : send.as<float>();
  if (cfg.mode == AttentionMode::kFull) {  // causal over everything, absolute positions
    const auto [r0, r1] = shard_->owned_rows(layer, 0, seg.c_end);
    contiguous(r0, r1);
    attend.causal = true;
    attend.positions = PositionScheme::kRelative;
    attend.origin = 0;
    attend.o = rank_o;
    attend.lse = send.as<float>() + o_count;
    backend_.attend(attend);
    stats.attended_local_rows = r1 - r0;
  } else {
    BackendBuffer& parts = scratch(kParts, static_cast<size_t>(n_parts) * part_floats * sizeof(float));
    float* o_parts = parts.as<float>();
    float* lse_parts = o_parts + static_cast<size_t>(n_parts) * o_count;
    // Global part: owned rows of I ∪ M_k; keys unrotated, queries at w, non-causal.
    const auto [i0, i1] = shard_->owned_rows(layer, 0, seg.i_end);
    const int64_t n_initial = i1 - i0;
    int64_t n_global = 0;      // entries of the row list
    int64_t global_rows = 0;   // rows among them, where the host knows it
    BackendBuffer* row_buffer = nullptr;
    if (!selection.on_host) {
      // esa / exact-topk (and no selection): the row list is built on the backend from the
      // selection there, I rows first, then M_k's k entries in token order (-1: not here).
      const int64_t k = selection.tokens ? selection.k : 0;
      const auto [m0, m1] = shard_->owned_rows(layer, seg.m_begin, seg.m_end);
      n_global = n_initial + k;
      row_buffer = &scratch(kGlobalRows, static_cast<size_t>(std::max<int64_t>(n_global, 1)) * sizeof(int32_t));
      backend_.rows_of_tokens({.selected = selection.tokens, .k = k, .tokens = tokens, .search_begin = m0,
                               .search_end = m1, .initial_begin = i0, .initial_end = i1,
                               .rows_out = row_buffer->as<int32_t>()});
      global_rows = n_global;
      if (options_.record_selection) {
        global_rows = n_initial;
        for (int64_t t : stats.selected) global_rows += shard_->owns(t) ? 1 : 0;
      }
    } else {
      // Block mode: this rank's tokens are on the host; their rows by one forward walk over
      // the owned tokens (ascending), uploaded through the backend's pinned staging (no wait).
      std::vector<int32_t>& rows = rows_;
      rows.clear();
      for (int64_t r = i0; r < i1; ++r) rows.push_back(static_cast<int32_t>(r));
      auto from = store.tokens.cbegin();
      for (int64_t t : selection.mine) {
        from = seek(from, store.tokens.cend(), t);
        UNS_CHECK(from != store.tokens.end() && *from == t, "selected token {} has no row on this rank", t);
        rows.push_back(static_cast<int32_t>(from - store.tokens.cbegin()));
      }
      n_global = global_rows = static_cast<int64_t>(rows.size());
      row_buffer = &scratch(kGlobalRows, std::max<size_t>(rows.size(), 1) * sizeof(int32_t));
      backend_.copy_to_backend(row_buffer->data(), rows.data(), rows.size() * sizeof(int32_t));
    }
    attend.rows = row_buffer->as<int32_t>();
    attend.n = n_global;
    attend.causal = false;
    attend.positions = PositionScheme::kGlobal;
    attend.query_position = cfg.global_query_position();
    attend.o = o_parts;
    attend.lse = lse_parts;
    if (share) {  // I alone into part 0, M_k alone into part 1 (the same keys, split in two)
      attend.n = n_initial;
      backend_.attend(attend);
      attend.rows = row_buffer->as<int32_t>() + n_initial;
      attend.n = n_global - n_initial;
      attend.o = o_parts + o_count;
      attend.lse = lse_parts + out_rows;
    }
    backend_.attend(attend);
    // Local part (the last): owned rows of L ∪ C; positions from s0, causal inside C.
    const auto [l0, l1] = shard_->owned_rows(layer, seg.s0(), seg.c_end);
    contiguous(l0, l1);
    attend.causal = true;
    attend.positions = PositionScheme::kRelative;
    attend.origin = seg.s0();
    attend.o = o_parts + static_cast<size_t>(n_parts - 1) * o_count;
    attend.lse = lse_parts + static_cast<size_t>(n_parts - 1) * static_cast<size_t>(out_rows);
    backend_.attend(attend);
    backend_.merge({.o_parts = o_parts, .lse_parts = lse_parts, .n_parts = n_parts, .rows = out_rows,
                    .d = options_.d, .o = rank_o, .lse = send.as<float>() + o_count});
    if (share)
      backend_.copy_within(send.as<float>() + part_floats, lse_parts, 3 * static_cast<size_t>(out_rows) * sizeof(float));
    stats.attended_local_rows = global_rows + (l1 - l0);
  }

  // Merge across ranks: gather every rank's [o | lse], lay them out as parts, LSE-merge.
  if (P == 1) {  // o is written: no gather, no merge
    if (share) record_share(send.as<float>(), 1, send_floats, o_count, out_rows, stats);
    return;
  }
  BackendBuffer& gathered = scratch(kGathered, send_floats * static_cast<size_t>(P) * sizeof(float));
  all_gather(send.data(), gathered.data(), send_floats * sizeof(float), stats);
  if (share) record_share(gathered.as<float>(), P, send_floats, o_count, out_rows, stats);
  BackendBuffer& merge_parts = scratch(kMergeParts, part_floats * static_cast<size_t>(P) * sizeof(float));
  float* o_all = merge_parts.as<float>();
  float* lse_all = o_all + o_count * static_cast<size_t>(P);
  for (int r = 0; r < P; ++r) {
    const float* part = gathered.as<float>() + send_floats * static_cast<size_t>(r);
    backend_.copy_within(o_all + o_count * static_cast<size_t>(r), part, o_count * sizeof(float));
    backend_.copy_within(lse_all + static_cast<size_t>(out_rows) * r, part + o_count, static_cast<size_t>(out_rows) * sizeof(float));
  }
  backend_.merge({.o_parts = o_all, .lse_parts = lse_all, .n_parts = P, .rows = out_rows, .d = options_.d, .o = o});
}

// The softmax mass on I, M_k and L ∪ C from every rank's payload [o | lse | lse_I | lse_M |
// lse_L] (`ranks` payloads of `stride` floats, backend memory): per query row the mass of a
// part is sum over ranks of exp(lse_part - lse_total), lse_total the log-sum-exp of the
// ranks' merged lse; the stat is the mean over rows. Identical on every rank.
void ContextAttention::record_share(const float* payloads, int ranks, size_t stride, size_t o_count, int64_t out_rows,
                                    LayerStepStats& stats) {
  const auto rows = static_cast<size_t>(out_rows);
  std::vector<float> lse(static_cast<size_t>(ranks) * 4 * rows);  // per rank [lse | lse_I | lse_M | lse_L]
  for (int r = 0; r < ranks; ++r)
    backend_.copy_to_host(lse.data() + static_cast<size_t>(r) * 4 * rows, payloads + static_cast<size_t>(r) * stride + o_count,
                          4 * rows * sizeof(float));
  double mass[3] = {0, 0, 0};
  int64_t counted = 0;
  for (size_t i = 0; i < rows; ++i) {
    double top = -std::numeric_limits<double>::infinity();
    for (int r = 0; r < ranks; ++r) top = std::max(top, static_cast<double>(lse[static_cast<size_t>(r) * 4 * rows + i]));
    if (std::isinf(top)) continue;  // no visible key (cannot happen: a query sees itself)
    double z = 0;
    for (int r = 0; r < ranks; ++r) z += std::exp(static_cast<double>(lse[static_cast<size_t>(r) * 4 * rows + i]) - top);
    const double total = top + std::log(z);
    for (int part = 0; part < 3; ++part)
      for (int r = 0; r < ranks; ++r)
        mass[part] += std::exp(static_cast<double>(lse[(static_cast<size_t>(r) * 4 + 1 + static_cast<size_t>(part)) * rows + i]) - total);
    ++counted;
  }
  if (counted == 0) return;
  const auto n = static_cast<double>(counted);
  stats.share = {.measured = true, .initial = mass[0] / n, .selected = mass[1] / n, .local = mass[2] / n};
}

// ---------------------------------------------------------------------------------------

void ContextAttention::forward(int layer, const float* q, const float* k, const float* v, int64_t l_C, float* o) {
  UNS_CHECK(l_C > 0, "forward: empty chunk");
  const AttentionConfig& cfg = options_.attention;
  const Segments seg = compute_segments(length_, l_C, cfg.l_I, cfg.l_L);
  LayerStepStats& stats = stats_.at(static_cast<size_t>(layer));
  stats = {};
  if (options_.observer) options_.observer(layer, q, k, l_C, length_);
  append_chunk(layer, l_C, k, v);                                   // [1]
  if (cfg.evicts()) evict_due(layer, seg, stats);                   // [2]
  Selection selection;
  if (cfg.selects() && seg.m_size() > 0) selection = select_tokens(layer, seg, q, stats);  // [3]
  attend_and_merge(layer, seg, q, selection, o, stats);             // [4]
}

}  // namespace unshackle
