#include "unshackle/engine/model_engine.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>

#include "unshackle/common/check.h"
#include "unshackle/model/generate.h"

namespace unshackle {

ModelEngine::ModelEngine(const ModelEngineOptions& options, Communicator& comm) : options_(options), comm_(comm) {
  UNS_CHECK(options_.backend == "cpu" || options_.backend == "cuda", "--backend: 'cpu' or 'cuda' (got '{}')",
            options_.backend);
  UNS_CHECK(options_.chunk > 0, "chunk: must be > 0 (got {})", options_.chunk);
  UNS_CHECK(options_.attention_share_every >= 0, "attention_share_every: must be >= 0 (got {})",
            options_.attention_share_every);
  UNS_CHECK(options_.kv_block > 0, "--kv-block: must be > 0 (got {})", options_.kv_block);
  UNS_CHECK(options_.max_context_tokens >= 0, "--max-context-tokens: must be >= 0 (got {})", options_.max_context_tokens);
  UNS_CHECK(options_.kv_capacity_tokens >= 0, "--kv-capacity-tokens: must be >= 0 (got {})", options_.kv_capacity_tokens);
  kv_dtype_ = resolve_kv_dtype(options_.kv_dtype, options_.backend);
  model_ = Model::load(options_.model_dir);
  tokenizer_ = load_tokenizer(options_.model_dir);
  const ModelConfig& c = model_->config();
  if (options_.backend == "cuda") {
    // As `unshackle generate --backend cuda`: this rank's own copy of the weights on its GPU
    // (hidden states are replicated, SPEC §7), attention on the CUDA backend of that device.
    const int devices = CudaModel::device_count();
    UNS_CHECK_KIND(kUnsupported, devices > 0, "--backend cuda: no CUDA device is visible to rank {} (use --backend cpu)",
                   comm_.rank());
    const int device = options_.device_index % devices;
    cuda_model_ = std::make_unique<CudaModel>(model_, device, CudaModel::default_weight_dtype(c));
    backend_ = make_cuda_backend(device);
    UNS_CHECK_KIND(kUnsupported, backend_->supports(Op::kAttend, kv_dtype_, c.head_dim),
                   "--backend cuda: the CUDA attention kernels do not take head dim {} (model '{}'; they take 32, 64, 96, 128 "
                   "and 256); use --backend cpu",
                   c.head_dim, options_.model_dir);
  } else {
    backend_ = make_cpu_backend();
  }
  if (!options_.compression.empty()) {
    compression_ = load_compression_weights(options_.compression, c);
    have_compression_ = true;
  }
  info_.name = options_.name;
  if (info_.name.empty()) {
    std::filesystem::path dir(options_.model_dir);
    if (dir.filename().empty()) dir = dir.parent_path();
    info_.name = dir.filename().string();
  }
  info_.max_context_tokens = options_.max_context_tokens > 0 ? options_.max_context_tokens : c.max_position_embeddings;
  UNS_CHECK(info_.max_context_tokens > 0,
            "--max-context-tokens: the model's config.json has no max_position_embeddings; give the limit");
  info_.kv_capacity_tokens = options_.kv_capacity_tokens > 0 ? options_.kv_capacity_tokens : 4 * info_.max_context_tokens;
  info_.num_heads = c.heads;
  info_.num_kv_heads = c.kv_heads;
  info_.layers = c.layers;
  info_.vocab_size = c.vocab;
}

ModelEngine::~ModelEngine() = default;

void ModelEngine::forward(ContextAttention& kv, std::span<const int32_t> tokens, std::vector<float>& logits) {
  if (cuda_model_) return cuda_model_->forward_chunk(kv, tokens, logits);
  model_->forward_chunk(kv, tokens, logits);
}

std::vector<int32_t> ModelEngine::tokenize(std::string_view text) { return tokenizer_->encode(text, true); }

std::string ModelEngine::detokenize(std::span<const int32_t> tokens) {
  for (int32_t t : tokens)
    UNS_CHECK(t >= 0 && t < info_.vocab_size, "tokens: id {} outside the vocabulary [0, {})", t, info_.vocab_size);
  return tokenizer_->decode(tokens, true);
}

ModelEngine::Context& ModelEngine::find(ContextId id) {
  auto it = contexts_.find(id);
  UNS_CHECK_KIND(kNotFound, it != contexts_.end(), "context {} does not exist on this worker group", id);
  return *it->second;
}

void ModelEngine::check_room(ContextId id, int64_t reserve_tokens) const {
  UNS_CHECK(!contexts_.count(id), "context {} already exists", id);
  UNS_CHECK(reserve_tokens > 0, "reserve: must be > 0 (got {})", reserve_tokens);
  UNS_CHECK_KIND(kCapacity, reserve_tokens <= info_.max_context_tokens,
                 "a context of {} tokens exceeds the model's limit of {} tokens", reserve_tokens, info_.max_context_tokens);
  UNS_CHECK_KIND(kCapacity, reserved_ + reserve_tokens <= info_.kv_capacity_tokens,
                 "no KV room for {} tokens: {} of {} tokens are reserved", reserve_tokens, reserved_,
                 info_.kv_capacity_tokens);
}

std::unique_ptr<ModelEngine::Context> ModelEngine::make_context(const AttentionConfig& attention, int64_t reserve_tokens) {
  attention.validate(info_.num_heads, info_.num_kv_heads);
  UNS_CHECK(!attention.needs_compression() || have_compression_,
            "attention.mode: {} scores with compressed keys and needs ESA compression weights; this worker group was "
            "started without --compression (full, exact-topk and streaming need none)",
            mode_name(attention.mode));
  auto context = std::make_unique<Context>();
  context->attention = attention;
  context->reserve = reserve_tokens;
  ContextAttentionOptions o = model_->attention_options(attention, have_compression_ ? &compression_ : nullptr, reserve_tokens);
  o.kv_block = options_.kv_block;
  o.kv_dtype = kv_dtype_;
  o.max_tokens = reserve_tokens;
  o.record_selection = false;  // the metrics need |M_k| only: the decode step never reads M_k back
  context->kv = std::make_unique<ContextAttention>(*backend_, comm_, std::move(o));
  return context;
}

void ModelEngine::create_context(ContextId id, const AttentionConfig& attention, int64_t reserve_tokens) {
  check_room(id, reserve_tokens);
  auto context = make_context(attention, reserve_tokens);
  contexts_[id] = std::move(context);
  reserved_ += reserve_tokens;
}

void ModelEngine::fork_context(ContextId source, ContextId id, int64_t reserve_tokens) {
  Context& from = find(source);
  UNS_CHECK(!from.broken, "context {} failed in an earlier step and can only be released", source);
  check_room(id, reserve_tokens);
  UNS_CHECK_KIND(kCapacity, reserve_tokens >= static_cast<int64_t>(from.tokens.size()),
                 "reserve: {} tokens is less than the {} tokens of context {}", reserve_tokens, from.tokens.size(), source);
  auto context = make_context(from.attention, reserve_tokens);
  // A copy of the source's KV shard on this rank (device to device on a GPU): no recompute.
  context->kv->copy_state_from(*from.kv);
  context->tokens = from.tokens;
  context->chunks = from.chunks;
  context->logits = from.logits;
  context->decodes = from.decodes;
  contexts_[id] = std::move(context);
  reserved_ += reserve_tokens;
}

StepStats ModelEngine::run_tokens(Context& context, std::span<const int32_t> tokens, bool measure_share) {
  const int L = info_.layers;
  StepStats stats;
  for (size_t begin = 0; begin < tokens.size();) {
    const size_t n = std::min(tokens.size() - begin, static_cast<size_t>(options_.chunk));
    const int64_t p = context.kv->length();
    context.kv->measure_attention_share(measure_share);
    forward(*context.kv, tokens.subspan(begin, n), context.logits);
    context.chunks.push_back(static_cast<int64_t>(n));
    context.tokens.insert(context.tokens.end(), tokens.begin() + static_cast<std::ptrdiff_t>(begin),
                          tokens.begin() + static_cast<std::ptrdiff_t>(begin + n));
    const Segments seg = compute_segments(p, static_cast<int64_t>(n), context.attention.l_I, context.attention.l_L);
    for (int l = 0; l < L; ++l) {
      const LayerStepStats& s = context.kv->last_stats(l);
      stats.collective_seconds += s.collective_seconds;
      if (context.attention.selects()) {
        stats.selected_tokens += s.selected_count;
        stats.middle_tokens += seg.m_size();
      }
      if (s.share.measured) {
        ++stats.share_layers;
        stats.share_initial += s.share.initial;
        stats.share_selected += s.share.selected;
        stats.share_local += s.share.local;
      }
    }
    begin += n;
  }
  stats.context_tokens = context.kv->length();
  return stats;
}

StepStats ModelEngine::prefill(ContextId id, std::span<const int32_t> tokens) {
  Context& context = find(id);
  UNS_CHECK(!context.broken, "context {} failed in an earlier step and can only be released", id);
  UNS_CHECK(!tokens.empty(), "tokens: a prefill needs at least one token");
  for (int32_t t : tokens)
    UNS_CHECK(t >= 0 && t < info_.vocab_size, "prompt: token id {} outside the vocabulary [0, {})", t, info_.vocab_size);
  const auto after = static_cast<int64_t>(context.tokens.size() + tokens.size());
  UNS_CHECK_KIND(kCapacity, after <= context.reserve, "context {}: {} tokens exceed its reservation of {}", id, after,
                 context.reserve);
  try {
    return run_tokens(context, tokens, false);
  } catch (...) {
    context.broken = true;
    throw;
  }
}

DecodeResult ModelEngine::decode(ContextId id, const SamplingParams& sampling) {
  Context& context = find(id);
  UNS_CHECK(!context.broken, "context {} failed in an earlier step and can only be released", id);
  UNS_CHECK(!context.logits.empty(), "context {} is empty: prefill it before decoding", id);
  SamplingOptions options;
  options.temperature = sampling.temperature;
  options.top_p = sampling.top_p;
  options.top_k = sampling.top_k;
  options.seed = sampling.seed;
  options.validate();
  DecodeResult result;
  // The draw for the token at position n is seeded from (seed, n): generate() does the same.
  result.token = sample_token(context.logits, options, static_cast<int64_t>(context.tokens.size()));
  const auto& eos = model_->config().eos_token_ids;
  result.end_of_sequence = std::find(eos.begin(), eos.end(), result.token) != eos.end();
  // An end-of-sequence token ends the generation: it is not run (nothing samples after it).
  if (result.end_of_sequence) {
    result.stats.context_tokens = static_cast<int64_t>(context.tokens.size());
    return result;
  }
  UNS_CHECK_KIND(kCapacity, static_cast<int64_t>(context.tokens.size()) + 1 <= context.reserve,
                 "context {}: {} tokens exceed its reservation of {}", id, context.tokens.size() + 1, context.reserve);
  try {
    // Where the generated token's attention went, on the first decode step and every N-th
    // after it (a decision every rank makes alike: the same steps reach every rank).
    const int64_t every = options_.attention_share_every;
    const bool measure = every > 0 && context.decodes % every == 0;
    ++context.decodes;
    result.stats = run_tokens(context, std::span<const int32_t>(&result.token, 1), measure);
  } catch (...) {
    context.broken = true;
    throw;
  }
  return result;
}

void ModelEngine::release_context(ContextId id) {
  auto it = contexts_.find(id);
  if (it == contexts_.end()) return;
  reserved_ -= it->second->reserve;
  contexts_.erase(it);
}

void ModelEngine::health_step() {
  // One token through every layer and every collective, in a throwaway full-attention context.
  AttentionConfig attention;
  attention.mode = AttentionMode::kFull;
  attention.l_I = 0;
  attention.l_L = 1;
  ContextAttentionOptions o = model_->attention_options(attention, nullptr, 1);
  o.kv_block = options_.kv_block;
  o.kv_dtype = kv_dtype_;
  o.max_tokens = 1;
  ContextAttention kv(*backend_, comm_, std::move(o));
  const auto& bos = model_->config().bos_token_ids;
  const int32_t token = bos.empty() ? 0 : bos.front();
  std::vector<float> logits;
  forward(kv, std::span<const int32_t>(&token, 1), logits);
  UNS_CHECK_KIND(kInternal, static_cast<int64_t>(logits.size()) == info_.vocab_size, "health step: {} logits for a vocabulary of {}",
                 logits.size(), info_.vocab_size);
}

EngineUsage ModelEngine::usage() const {
  EngineUsage u;
  for (const auto& [id, context] : contexts_) {
    u.kv_bytes += static_cast<int64_t>(context->kv->shard().bytes_reserved());
    u.kv_tokens += context->kv->shard().tokens_held();  // summed over layers: one row per token per layer
  }
  if (info_.layers > 0) u.kv_tokens /= info_.layers;
  u.contexts = static_cast<int64_t>(contexts_.size());
  return u;
}

}  // namespace unshackle
