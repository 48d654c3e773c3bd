#include "unshackle/model/generate.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "unshackle/common/check.h"

namespace unshackle {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

int32_t argmax(std::span<const float> logits) {
  size_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[best]) best = i;  // strict: ties keep the lower id
  return static_cast<int32_t>(best);
}

}  // namespace

void SamplingOptions::validate() const {
  UNS_CHECK(temperature >= 0 && std::isfinite(temperature), "temperature: must be >= 0 (got {})", temperature);
  UNS_CHECK(top_p > 0 && top_p <= 1, "top_p: must be in (0, 1] (got {})", top_p);
  UNS_CHECK(top_k >= 0, "top_k: must be >= 0 (got {})", top_k);
}

int32_t sample_token(std::span<const float> logits, const SamplingOptions& options, int64_t position) {
  options.validate();
  UNS_CHECK(!logits.empty(), "sample_token: no logits");
  for (float x : logits) UNS_CHECK_KIND(kInternal, !std::isnan(x), "sample_token: NaN logit at position {}", position);
  if (options.temperature == 0) return argmax(logits);
  // Candidates by logit, descending; ties to the lower id.
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  const auto by_logit = [&](int32_t a, int32_t b) {
    const float la = logits[static_cast<size_t>(a)], lb = logits[static_cast<size_t>(b)];
    return la != lb ? la > lb : a < b;
  };
  size_t keep = order.size();
  if (options.top_k > 0 && static_cast<size_t>(options.top_k) < keep) keep = static_cast<size_t>(options.top_k);
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(keep), order.end(), by_logit);
  order.resize(keep);
  std::vector<double> p(keep);
  const double top = logits[static_cast<size_t>(order[0])];
  double total = 0;
  for (size_t i = 0; i < keep; ++i) {
    p[i] = std::exp((logits[static_cast<size_t>(order[i])] - top) / options.temperature);
    total += p[i];
  }
  if (options.top_p < 1) {
    double cumulative = 0;
    size_t n = 0;
    while (n < keep) {
      cumulative += p[n++] / total;
      if (cumulative >= options.top_p) break;
    }
    keep = n;
    total = std::accumulate(p.begin(), p.begin() + static_cast<std::ptrdiff_t>(keep), 0.0);
  }
  std::mt19937_64 rng(splitmix64(options.seed ^ splitmix64(static_cast<uint64_t>(position))));
  // 53 random bits -> [0, 1): the same on every standard library (unlike uniform_real_distribution).
  const double u = static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0) * total;
  double cumulative = 0;
  for (size_t i = 0; i < keep; ++i) {
    cumulative += p[i];
    if (u < cumulative) return order[i];
  }
  return order[keep - 1];
}

std::string_view finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return "length";
    case FinishReason::kStopToken: return "stop_token";
    case FinishReason::kStopString: return "stop_string";
  }
  return "?";
}

GenerateResult generate(const Model& model, ContextAttention& context, const Tokenizer* tokenizer,
                        std::span<const int32_t> prompt, const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token) {
  const ForwardChunkFn forward = [&](std::span<const int32_t> tokens, std::vector<float>& logits, bool all) {
    model.forward_chunk(context, tokens, logits, all);
  };
  return generate(forward, model.config().vocab, context, tokenizer, prompt, options, on_token);
}

GenerateResult generate(CudaModel& model, ContextAttention& context, const Tokenizer* tokenizer,
                        std::span<const int32_t> prompt, const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token) {
  const ForwardChunkFn forward = [&](std::span<const int32_t> tokens, std::vector<float>& logits, bool all) {
    model.forward_chunk(context, tokens, logits, all);
  };
  return generate(forward, model.config().vocab, context, tokenizer, prompt, options, on_token);
}

GenerateResult generate(const ForwardChunkFn& forward, int64_t vocab, ContextAttention& context,
                        const Tokenizer* tokenizer, std::span<const int32_t> prompt, const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token) {
  options.sampling.validate();
  UNS_CHECK(options.max_tokens >= 0, "max_tokens: must be >= 0 (got {})", options.max_tokens);
  UNS_CHECK(options.chunk > 0, "chunk: must be > 0 (got {})", options.chunk);
  UNS_CHECK(!prompt.empty(), "generate: the prompt has no tokens");
  UNS_CHECK(options.stop_strings.empty() || tokenizer != nullptr, "generate: stop strings need a tokenizer");
  const auto V = static_cast<size_t>(vocab);
  GenerateResult result;
  std::vector<float> logits, piece;
  // Chunked prefill (Model::prefill's loop): all positions' logits only when recorded.
  for (size_t begin = 0; begin < prompt.size(); begin += static_cast<size_t>(options.chunk)) {
    const size_t count = std::min(static_cast<size_t>(options.chunk), prompt.size() - begin);
    forward(prompt.subspan(begin, count), piece, options.record_logits);
    if (options.record_logits) {
      logits.insert(logits.end(), piece.begin(), piece.end());
    } else {
      logits.swap(piece);
    }
  }
  if (options.record_logits) {
    result.prompt_logits = logits;
    logits.erase(logits.begin(), logits.end() - static_cast<std::ptrdiff_t>(V));
  }
  size_t text_tokens = 0;  // tokens that make up result.text
  while (static_cast<int64_t>(result.tokens.size()) < options.max_tokens) {
    if (options.record_logits) result.step_logits.insert(result.step_logits.end(), logits.begin(), logits.end());
    const int32_t token = sample_token(logits, options.sampling, context.length());
    result.tokens.push_back(token);
    if (on_token) on_token(token);
    if (std::find(options.stop_ids.begin(), options.stop_ids.end(), token) != options.stop_ids.end()) {
      result.finish = FinishReason::kStopToken;
      break;
    }
    text_tokens = result.tokens.size();
    if (!options.stop_strings.empty()) {
      const std::string text = tokenizer->decode(result.tokens);
      size_t cut = std::string::npos;
      for (const std::string& stop : options.stop_strings) {
        if (!stop.empty()) cut = std::min(cut, text.find(stop));
      }
      if (cut != std::string::npos) {
        result.text = text.substr(0, cut);
        result.finish = FinishReason::kStopString;
        return result;
      }
    }
    if (static_cast<int64_t>(result.tokens.size()) == options.max_tokens) break;
    forward(std::span<const int32_t>(&result.tokens.back(), 1), logits, false);
  }
  if (tokenizer != nullptr) {
    result.text = tokenizer->decode(std::span<const int32_t>(result.tokens.data(), text_tokens));
  }
  return result;
}

}  // namespace unshackle
