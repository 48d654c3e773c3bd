#include "unshackle/service/engine_ops.h"

#include <fmt/format.h>

#include <algorithm>

#include "unshackle/common/check.h"
#include "unshackle/service/wire.h"

namespace unshackle::wire {

using nlohmann::json;

json model_info_to_json(const ModelInfo& info) {
  return json{{"name", info.name},
              {"max_context_tokens", info.max_context_tokens},
              {"kv_capacity_tokens", info.kv_capacity_tokens},
              {"num_heads", info.num_heads},
              {"num_kv_heads", info.num_kv_heads},
              {"layers", info.layers},
              {"vocab_size", info.vocab_size}};
}

ModelInfo model_info_from_json(const json& o) {
  try {
    ModelInfo info;
    info.name = o.at("name").get<std::string>();
    info.max_context_tokens = o.at("max_context_tokens").get<int64_t>();
    info.kv_capacity_tokens = o.at("kv_capacity_tokens").get<int64_t>();
    info.num_heads = o.at("num_heads").get<int>();
    info.num_kv_heads = o.at("num_kv_heads").get<int>();
    info.layers = o.value("layers", 0);
    info.vocab_size = o.value("vocab_size", int64_t{0});
    UNS_CHECK_KIND(kComm, !info.name.empty() && info.max_context_tokens > 0 && info.kv_capacity_tokens > 0,
                   "model info needs a name and positive max_context_tokens and kv_capacity_tokens");
    return info;
  } catch (const json::exception& e) {
    fail(ErrorKind::kComm, fmt::format("malformed model info: {}", e.what()));
  }
}

json stats_to_json(const StepStats& s) {
  return json{{"context_tokens", s.context_tokens},
              {"collective_seconds", s.collective_seconds},
              {"selected_tokens", s.selected_tokens},
              {"middle_tokens", s.middle_tokens},
              {"share_layers", s.share_layers},
              {"share_initial", s.share_initial},
              {"share_selected", s.share_selected},
              {"share_local", s.share_local}};
}

StepStats stats_from_json(const json& o) {
  StepStats s;
  if (!o.is_object()) return s;
  s.context_tokens = o.value("context_tokens", int64_t{0});
  s.collective_seconds = o.value("collective_seconds", 0.0);
  s.selected_tokens = o.value("selected_tokens", int64_t{0});
  s.middle_tokens = o.value("middle_tokens", int64_t{0});
  s.share_layers = o.value("share_layers", int64_t{0});
  s.share_initial = o.value("share_initial", 0.0);
  s.share_selected = o.value("share_selected", 0.0);
  s.share_local = o.value("share_local", 0.0);
  return s;
}

json sampling_to_json(const SamplingParams& s) {
  return json{{"temperature", s.temperature}, {"top_p", s.top_p}, {"top_k", s.top_k}, {"seed", s.seed}};
}

size_t complete_utf8_prefix(const std::string& text) {
  size_t n = text.size();
  // A trailing replacement character stands for bytes still to come.
  static const std::string kReplacement = "\xEF\xBF\xBD";
  while (n >= 3 && text.compare(n - 3, 3, kReplacement) == 0) n -= 3;
  // Drop a trailing incomplete multi-byte sequence.
  size_t i = n, back = 0;
  while (i > 0 && back < 4 && (static_cast<unsigned char>(text[i - 1]) & 0xC0) == 0x80) {
    --i;
    ++back;
  }
  if (i > 0) {
    const auto lead = static_cast<unsigned char>(text[i - 1]);
    size_t need = 0;
    if ((lead & 0xE0) == 0xC0) need = 1;
    else if ((lead & 0xF0) == 0xE0) need = 2;
    else if ((lead & 0xF8) == 0xF0) need = 3;
    if (need > back) return i - 1;
  }
  return n;
}

namespace {
ContextId context_arg(const json& args, const char* name = "context") {
  UNS_CHECK(args.contains(name) && args[name].is_number_unsigned(), "call needs an unsigned integer '{}'", name);
  return args[name].get<ContextId>();
}
std::vector<int32_t> tokens_arg(const json& args) {
  UNS_CHECK(args.contains("tokens") && args["tokens"].is_array(), "call needs an array 'tokens'");
  return args["tokens"].get<std::vector<int32_t>>();
}
}  // namespace

json EngineOps::execute(const std::string& op, const json& args) {
  UNS_CHECK(args.is_object(), "call args must be an object");
  if (op == "info") return model_info_to_json(engine_.info());
  if (op == "tokenize") {
    UNS_CHECK(args.contains("text") && args["text"].is_string(), "tokenize needs a string 'text'");
    std::vector<int32_t> tokens = engine_.tokenize(args["text"].get<std::string>());
    if (args.value("continuation", false)) {
      // Text that continues a context: drop the specials (BOS) the tokenizer puts before any text.
      const std::vector<int32_t> prefix = engine_.tokenize("");
      if (tokens.size() >= prefix.size() && std::equal(prefix.begin(), prefix.end(), tokens.begin()))
        tokens.erase(tokens.begin(), tokens.begin() + static_cast<std::ptrdiff_t>(prefix.size()));
    }
    return json{{"tokens", std::move(tokens)}};
  }
  if (op == "detokenize") {
    const auto tokens = tokens_arg(args);
    return json{{"text", engine_.detokenize(tokens)}};
  }
  if (op == "create_context") {
    const ContextId id = context_arg(args);
    const AttentionConfig attention = attention_from_json(args.value("attention", json::object()), AttentionConfig{});
    engine_.create_context(id, attention, args.value("reserve", int64_t{0}));
    generated_[id] = {};
    return json::object();
  }
  if (op == "fork_context") {
    const ContextId id = context_arg(args);
    engine_.fork_context(context_arg(args, "source"), id, args.value("reserve", int64_t{0}));
    generated_[id] = {};
    return json::object();
  }
  if (op == "prefill") {
    const ContextId id = context_arg(args);
    return json{{"stats", stats_to_json(engine_.prefill(id, tokens_arg(args)))}};
  }
  if (op == "decode") {
    const ContextId id = context_arg(args);
    const json s = args.value("sampling", json::object());
    SamplingParams sampling;
    sampling.temperature = s.value("temperature", 1.0);
    sampling.top_p = s.value("top_p", 1.0);
    sampling.top_k = s.value("top_k", int64_t{0});
    sampling.seed = s.value("seed", uint64_t{0});
    const DecodeResult r = engine_.decode(id, sampling);
    json out{{"token", r.token}, {"eos", r.end_of_sequence}, {"text", ""}, {"stats", stats_to_json(r.stats)}};
    Generated& g = generated_[id];
    if (!r.end_of_sequence) {
      g.tokens.push_back(r.token);
      const std::string text = engine_.detokenize(g.tokens);
      const size_t complete = complete_utf8_prefix(text);
      if (complete > g.emitted) {
        out["text"] = text.substr(g.emitted, complete - g.emitted);
        g.emitted = complete;
      }
    }
    return out;
  }
  if (op == "release") {
    const ContextId id = context_arg(args);
    engine_.release_context(id);
    generated_.erase(id);
    return json::object();
  }
  if (op == "health") {
    engine_.health_step();
    return json::object();
  }
  fail(ErrorKind::kInvalidArgument, fmt::format("unknown op '{}'", op));
}

}  // namespace unshackle::wire
