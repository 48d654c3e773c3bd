#include "unshackle/worker/kv_shard.h"

#include <algorithm>

#include "unshackle/common/check.h"

namespace unshackle {
namespace {

unsigned char* byte_ptr(const BackendBuffer& buffer, size_t offset) {
  return static_cast<unsigned char*>(buffer.data()) + offset;
}

// Grows `buffer` to hold `new_bytes`, keeping its first `used_bytes`.
void grow(Backend& backend, BackendBuffer& buffer, size_t used_bytes, size_t new_bytes) {
  BackendBuffer bigger(backend, new_bytes);
  if (used_bytes) backend.copy_within(bigger.data(), buffer.data(), used_bytes);
  buffer = std::move(bigger);
}

int64_t grown_capacity(int64_t current, int64_t needed) {
  return std::max<int64_t>({needed, 2 * current, 256});
}

}  // namespace

KvShard::KvShard(Backend& backend, KvShardOptions options) : backend_(backend), options_(options) {
  UNS_CHECK(options_.layers > 0 && options_.G > 0 && options_.d > 0 && options_.d_c >= 0, "KvShard: bad shape");
  UNS_CHECK(options_.ranks > 0 && options_.rank >= 0 && options_.rank < options_.ranks, "KvShard: rank {} of {}",
            options_.rank, options_.ranks);
  UNS_CHECK(options_.kv_block > 0, "kv_block: must be > 0 (got {})", options_.kv_block);
  layers_.resize(static_cast<size_t>(options_.layers));
}

int KvShard::owner(int64_t token) const {
  return static_cast<int>((token / options_.kv_block) % options_.ranks);
}

bool KvShard::in_halo(int64_t token) const {
  if (owns(token)) return false;
  // Ownership repeats every ranks * kv_block tokens, so no larger distance needs checking.
  const int64_t reach = std::min<int64_t>(options_.eps, options_.ranks * options_.kv_block);
  for (int64_t e = 1; e <= reach; ++e) {
    if ((token - e >= 0 && owns(token - e)) || owns(token + e)) return true;
  }
  return false;
}

size_t KvShard::kv_row_bytes() const {
  return 2 * static_cast<size_t>(options_.G) * options_.d * dtype_size(options_.kv_dtype);
}

size_t KvShard::score_row_bytes() const { return static_cast<size_t>(options_.d_c) * dtype_size(options_.kv_dtype); }

void KvShard::reserve_kv(Layer& layer, int64_t rows) {
  if (rows <= layer.capacity) return;
  const int64_t capacity = grown_capacity(layer.capacity, rows);
  const size_t half_row = kv_row_bytes() / 2, used = layer.tokens.size();
  grow(backend_, layer.k, used * half_row, static_cast<size_t>(capacity) * half_row);
  grow(backend_, layer.v, used * half_row, static_cast<size_t>(capacity) * half_row);
  grow(backend_, layer.tokens_buf, used * sizeof(int64_t), static_cast<size_t>(capacity) * sizeof(int64_t));
  layer.capacity = capacity;
}

void KvShard::reserve_score(Layer& layer, int64_t rows) {
  if (rows <= layer.score_capacity) return;
  const int64_t capacity = grown_capacity(layer.score_capacity, rows);
  const size_t used = layer.score_tokens.size();
  grow(backend_, layer.kc, used * score_row_bytes(), static_cast<size_t>(capacity) * score_row_bytes());
  grow(backend_, layer.score_tokens_buf, used * sizeof(int64_t), static_cast<size_t>(capacity) * sizeof(int64_t));
  grow(backend_, layer.candidates_buf, used * sizeof(int64_t), static_cast<size_t>(capacity) * sizeof(int64_t));
  layer.score_capacity = capacity;
}

void KvShard::append(int layer_index, int64_t t0, int64_t n, const float* k, const float* v, const void* score_keys) {
  Layer& layer = layers_.at(static_cast<size_t>(layer_index));
  UNS_CHECK(layer.tokens.empty() || t0 > layer.tokens.back(), "KvShard::append: token {} after {}", t0,
            layer.tokens.back());
  UNS_CHECK(options_.d_c == 0 || score_keys, "KvShard::append: scoring keys required (d_c = {})", options_.d_c);
  const size_t head_row = static_cast<size_t>(options_.G) * options_.d;
  const size_t half_row = kv_row_bytes() / 2;
  // Owned tokens of [t0, t0+n) come in runs (blocks); copy each run with one conversion.
  for (int64_t t = t0; t < t0 + n;) {
    const int64_t run_end = std::min(t0 + n, (t / options_.kv_block + 1) * options_.kv_block);
    if (owns(t)) {
      const int64_t count = run_end - t;
      const auto row = static_cast<int64_t>(layer.tokens.size());
      reserve_kv(layer, row + count);
      const size_t src = static_cast<size_t>(t - t0) * head_row, dst = static_cast<size_t>(row) * half_row;
      backend_.convert_pair(k + src, byte_ptr(layer.k, dst), v + src, byte_ptr(layer.v, dst), DType::kF32,
                            options_.kv_dtype, static_cast<size_t>(count) * head_row);
      // The host list first, then its new tail to the device (queued by the CUDA backend).
      for (int64_t i = 0; i < count; ++i) layer.tokens.push_back(t + i);
      backend_.copy_to_backend(byte_ptr(layer.tokens_buf, static_cast<size_t>(row) * sizeof(int64_t)),
                               layer.tokens.data() + row, static_cast<size_t>(count) * sizeof(int64_t));
    }
    t = run_end;
  }
  if (options_.d_c == 0) return;
  // Scoring rows: owned or halo tokens, in runs of consecutive kept tokens (reused vectors).
  std::vector<int64_t>& kept = kept_;
  std::vector<int64_t>& candidates = candidates_;
  kept.clear();
  candidates.clear();
  for (int64_t t = t0; t < t0 + n; ++t) {
    if (owns(t) || in_halo(t)) {
      kept.push_back(t);
      candidates.push_back(owns(t) ? t : -1);
    }
  }
  const size_t first_row = layer.score_tokens.size(), row_bytes = score_row_bytes();
  reserve_score(layer, static_cast<int64_t>(first_row + kept.size()));
  for (size_t i = 0; i < kept.size();) {
    size_t end = i + 1;
    while (end < kept.size() && kept[end] == kept[end - 1] + 1) ++end;
    backend_.copy_within(byte_ptr(layer.kc, (first_row + i) * row_bytes),
                         static_cast<const unsigned char*>(score_keys) + static_cast<size_t>(kept[i] - t0) * row_bytes,
                         (end - i) * row_bytes);
    i = end;
  }
  backend_.copy_to_backend(byte_ptr(layer.score_tokens_buf, first_row * sizeof(int64_t)), kept.data(),
                           kept.size() * sizeof(int64_t));
  backend_.copy_to_backend(byte_ptr(layer.candidates_buf, first_row * sizeof(int64_t)), candidates.data(),
                           candidates.size() * sizeof(int64_t));
  layer.score_tokens.insert(layer.score_tokens.end(), kept.begin(), kept.end());
}

void KvShard::copy_from(const KvShard& source) {
  const KvShardOptions& a = options_;
  const KvShardOptions& b = source.options_;
  UNS_CHECK(a.layers == b.layers && a.G == b.G && a.d == b.d && a.d_c == b.d_c && a.kv_dtype == b.kv_dtype &&
                a.rank == b.rank && a.ranks == b.ranks && a.kv_block == b.kv_block && a.eps == b.eps,
            "KvShard::copy_from: the shards differ in shape, dtype or placement");
  const size_t half_row = kv_row_bytes() / 2, score_row = score_row_bytes();
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& to = layers_[l];
    const Layer& from = source.layers_[l];
    const auto rows = static_cast<int64_t>(from.tokens.size());
    const auto score_rows_n = static_cast<int64_t>(from.score_tokens.size());
    to.tokens.clear();  // nothing to keep: growth copies no rows
    to.score_tokens.clear();
    reserve_kv(to, rows);
    if (rows > 0) {
      backend_.copy_within(to.k.data(), from.k.data(), static_cast<size_t>(rows) * half_row);
      backend_.copy_within(to.v.data(), from.v.data(), static_cast<size_t>(rows) * half_row);
      backend_.copy_within(to.tokens_buf.data(), from.tokens_buf.data(), static_cast<size_t>(rows) * sizeof(int64_t));
    }
    to.tokens = from.tokens;
    if (options_.d_c == 0) continue;
    reserve_score(to, score_rows_n);
    if (score_rows_n > 0) {
      const auto n = static_cast<size_t>(score_rows_n);
      backend_.copy_within(to.kc.data(), from.kc.data(), n * score_row);
      backend_.copy_within(to.score_tokens_buf.data(), from.score_tokens_buf.data(), n * sizeof(int64_t));
      backend_.copy_within(to.candidates_buf.data(), from.candidates_buf.data(), n * sizeof(int64_t));
    }
    to.score_tokens = from.score_tokens;
  }
}

void KvShard::reserve_context(int64_t tokens) {
  // This rank's share of whole blocks, plus one block for a partial one.
  const int64_t blocks = (tokens + options_.kv_block - 1) / options_.kv_block;
  const int64_t owned = ((blocks + options_.ranks - 1) / options_.ranks) * options_.kv_block;
  const int64_t halo = 2 * std::min(options_.eps, options_.kv_block) * ((blocks + options_.ranks - 1) / options_.ranks + 1);
  for (Layer& layer : layers_) {
    reserve_kv(layer, std::min(owned, tokens));
    if (options_.d_c > 0) reserve_score(layer, std::min(owned + halo, tokens));
  }
}

namespace {

// Compacts rows of `buffers` (each row `row_bytes[i]` wide) and `tokens`, dropping tokens in
// `remove` (ascending). Returns the first row that changed, or tokens.size() if none did.
size_t compact(Backend& backend, std::vector<int64_t>& tokens, const std::vector<int64_t>& remove,
               const std::vector<std::pair<BackendBuffer*, size_t>>& buffers) {
  size_t read = 0, write = 0, r = 0;
  // Skip the untouched prefix.
  while (read < tokens.size()) {
    while (r < remove.size() && remove[r] < tokens[read]) ++r;
    if (r < remove.size() && remove[r] == tokens[read]) break;
    ++read;
  }
  const size_t first_changed = read;
  write = read;
  while (read < tokens.size()) {
    while (r < remove.size() && remove[r] < tokens[read]) ++r;
    if (r < remove.size() && remove[r] == tokens[read]) {
      ++read;
      continue;
    }
    // A run of survivors [read, run_end) moves to `write`.
    size_t run_end = read + 1;
    while (run_end < tokens.size()) {
      while (r < remove.size() && remove[r] < tokens[run_end]) ++r;
      if (r < remove.size() && remove[r] == tokens[run_end]) break;
      ++run_end;
    }
    const size_t count = run_end - read;
    if (write != read) {
      for (const auto& [buffer, row_bytes] : buffers)
        backend.copy_within(byte_ptr(*buffer, write * row_bytes), byte_ptr(*buffer, read * row_bytes), count * row_bytes);
      std::copy(tokens.begin() + static_cast<std::ptrdiff_t>(read), tokens.begin() + static_cast<std::ptrdiff_t>(run_end),
                tokens.begin() + static_cast<std::ptrdiff_t>(write));
    }
    write += count;
    read = run_end;
  }
  tokens.resize(write);
  return first_changed;
}

}  // namespace

void KvShard::evict(int layer_index, const std::vector<int64_t>& remove) {
  if (remove.empty()) return;
  Layer& layer = layers_.at(static_cast<size_t>(layer_index));
  const size_t half_row = kv_row_bytes() / 2;
  const size_t first = compact(backend_, layer.tokens, remove, {{&layer.k, half_row}, {&layer.v, half_row}});
  if (first < layer.tokens.size())
    backend_.copy_to_backend(byte_ptr(layer.tokens_buf, first * sizeof(int64_t)), layer.tokens.data() + first,
                             (layer.tokens.size() - first) * sizeof(int64_t));
  if (options_.d_c == 0) return;
  const size_t first_score = compact(backend_, layer.score_tokens, remove, {{&layer.kc, score_row_bytes()}});
  if (first_score < layer.score_tokens.size()) {
    std::vector<int64_t> candidates;
    for (size_t i = first_score; i < layer.score_tokens.size(); ++i)
      candidates.push_back(owns(layer.score_tokens[i]) ? layer.score_tokens[i] : -1);
    backend_.copy_to_backend(byte_ptr(layer.score_tokens_buf, first_score * sizeof(int64_t)),
                             layer.score_tokens.data() + first_score, candidates.size() * sizeof(int64_t));
    backend_.copy_to_backend(byte_ptr(layer.candidates_buf, first_score * sizeof(int64_t)), candidates.data(),
                             candidates.size() * sizeof(int64_t));
  }
}

std::pair<int64_t, int64_t> KvShard::owned_rows(int layer_index, int64_t begin, int64_t end) const {
  const auto& tokens = layer(layer_index).tokens;
  const auto lo = std::lower_bound(tokens.begin(), tokens.end(), begin) - tokens.begin();
  const auto hi = std::lower_bound(tokens.begin(), tokens.end(), std::max(begin, end)) - tokens.begin();
  return {lo, hi};
}

std::pair<int64_t, int64_t> KvShard::score_rows(int layer_index, int64_t begin, int64_t end) const {
  const auto& tokens = layer(layer_index).score_tokens;
  const auto lo = std::lower_bound(tokens.begin(), tokens.end(), begin) - tokens.begin();
  const auto hi = std::lower_bound(tokens.begin(), tokens.end(), std::max(begin, end)) - tokens.begin();
  return {lo, hi};
}

int64_t KvShard::row_of(int layer_index, int64_t token) const {
  const auto& tokens = layer(layer_index).tokens;
  const auto it = std::lower_bound(tokens.begin(), tokens.end(), token);
  return it != tokens.end() && *it == token ? it - tokens.begin() : -1;
}

size_t KvShard::bytes_held() const {
  size_t bytes = 0;
  for (const Layer& l : layers_)
    bytes += l.tokens.size() * (kv_row_bytes() + sizeof(int64_t)) +
             l.score_tokens.size() * (score_row_bytes() + 2 * sizeof(int64_t));
  return bytes;
}

size_t KvShard::bytes_reserved() const {
  size_t bytes = 0;
  for (const Layer& l : layers_)
    bytes += l.k.bytes() + l.v.bytes() + l.tokens_buf.bytes() + l.kc.bytes() + l.score_tokens_buf.bytes() +
             l.candidates_buf.bytes();
  return bytes;
}

int64_t KvShard::tokens_held() const {
  int64_t total = 0;
  for (const Layer& l : layers_) total += static_cast<int64_t>(l.tokens.size());
  return total;
}

}  // namespace unshackle
