#include "unshackle/model/config.h"

#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "unshackle/common/check.h"

namespace unshackle {
namespace {

using Json = nlohmann::json;

[[noreturn]] void bad(const std::string& label, const std::string& what) {
  fail(ErrorKind::kInvalidArgument, fmt::format("{}: {}", label, what));
}

template <typename T>
T required(const Json& j, const char* key, const std::string& label) {
  if (!j.contains(key) || j[key].is_null()) bad(label, fmt::format("missing field '{}'", key));
  try {
    return j[key].get<T>();
  } catch (const Json::exception&) {
    bad(label, fmt::format("field '{}' has the wrong type ({})", key, j[key].dump()));
  }
}

template <typename T>
T optional(const Json& j, const char* key, T fallback, const std::string& label) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  try {
    return j[key].get<T>();
  } catch (const Json::exception&) {
    bad(label, fmt::format("field '{}' has the wrong type ({})", key, j[key].dump()));
  }
}

// eos_token_id / bos_token_id: an int, a list of ints or null.
std::vector<int32_t> token_ids(const Json& j, const char* key, const std::string& label) {
  std::vector<int32_t> ids;
  if (!j.contains(key) || j[key].is_null()) return ids;
  const Json& v = j[key];
  if (v.is_number_integer()) return {v.get<int32_t>()};
  if (!v.is_array()) bad(label, fmt::format("field '{}' must be an integer or a list of integers", key));
  for (const Json& e : v) {
    if (!e.is_number_integer()) bad(label, fmt::format("field '{}' must be an integer or a list of integers", key));
    ids.push_back(e.get<int32_t>());
  }
  return ids;
}

// rope_scaling (transformers 4.x) or rope_parameters (transformers 5, which also holds rope_theta).
RopeScaling parse_rope_scaling(const Json& j, const std::string& label) {
  RopeScaling s;
  const char* key = j.contains("rope_parameters") && !j["rope_parameters"].is_null() ? "rope_parameters" : "rope_scaling";
  if (!j.contains(key) || j[key].is_null()) return s;
  const Json& r = j[key];
  if (!r.is_object()) bad(label, fmt::format("field '{}' must be an object or null", key));
  std::string type = optional<std::string>(r, "rope_type", "", label);
  if (type.empty()) type = optional<std::string>(r, "type", "default", label);
  const std::string where = label + " rope_scaling";
  if (type == "default") return s;
  if (type == "linear") {
    s.type = RopeScaling::Type::kLinear;
    s.factor = required<double>(r, "factor", where);
  } else if (type == "llama3") {
    s.type = RopeScaling::Type::kLlama3;
    s.factor = required<double>(r, "factor", where);
    s.low_freq_factor = required<double>(r, "low_freq_factor", where);
    s.high_freq_factor = required<double>(r, "high_freq_factor", where);
    s.original_max_position = required<double>(r, "original_max_position_embeddings", where);
    if (!(s.high_freq_factor > s.low_freq_factor)) bad(where, "high_freq_factor must exceed low_freq_factor");
  } else {
    fail(ErrorKind::kUnsupported,
         fmt::format("{}: rope_scaling type '{}' is not supported (supported: default, linear, llama3)", label, type));
  }
  if (!(s.factor > 0)) bad(where, fmt::format("factor must be > 0 (got {})", s.factor));
  return s;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    fail(std::filesystem::exists(path) ? ErrorKind::kIo : ErrorKind::kNotFound, fmt::format("{}: cannot open", path));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

std::string_view arch_name(ModelArch arch) {
  switch (arch) {
    case ModelArch::kLlama: return "LlamaForCausalLM";
    case ModelArch::kMistral: return "MistralForCausalLM";
    case ModelArch::kQwen2: return "Qwen2ForCausalLM";
  }
  return "?";
}

ModelConfig ModelConfig::from_json(const std::string& text, const std::string& label) {
  Json j;
  try {
    j = Json::parse(text);
  } catch (const Json::exception& e) {
    bad(label, fmt::format("not valid JSON: {}", e.what()));
  }
  if (!j.is_object()) bad(label, "top level must be an object");
  const auto archs = required<std::vector<std::string>>(j, "architectures", label);
  if (archs.size() != 1) bad(label, "field 'architectures' must name exactly one architecture");
  ModelConfig c;
  if (archs[0] == "LlamaForCausalLM") {
    c.arch = ModelArch::kLlama;
  } else if (archs[0] == "MistralForCausalLM") {
    c.arch = ModelArch::kMistral;
  } else if (archs[0] == "Qwen2ForCausalLM") {
    c.arch = ModelArch::kQwen2;
  } else {
    fail(ErrorKind::kUnsupported,
         fmt::format("{}: architecture '{}' is not supported (supported: LlamaForCausalLM, MistralForCausalLM, "
                     "Qwen2ForCausalLM)",
                     label, archs[0]));
  }
  c.hidden = required<int>(j, "hidden_size", label);
  c.intermediate = required<int>(j, "intermediate_size", label);
  c.layers = required<int>(j, "num_hidden_layers", label);
  c.heads = required<int>(j, "num_attention_heads", label);
  c.kv_heads = optional<int>(j, "num_key_value_heads", c.heads, label);
  c.vocab = required<int64_t>(j, "vocab_size", label);
  if (c.hidden <= 0 || c.intermediate <= 0 || c.layers <= 0 || c.heads <= 0 || c.kv_heads <= 0 || c.vocab <= 0) {
    bad(label, "hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads and "
               "vocab_size must be positive");
  }
  if (c.heads % c.kv_heads != 0) {
    bad(label, fmt::format("num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", c.heads,
                           c.kv_heads));
  }
  if (c.hidden % c.heads != 0 && !(j.contains("head_dim") && !j["head_dim"].is_null())) {
    bad(label, "hidden_size must be a multiple of num_attention_heads when head_dim is not given");
  }
  c.head_dim = optional<int>(j, "head_dim", c.hidden / c.heads, label);
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) bad(label, fmt::format("head_dim must be even and > 0 (got {})", c.head_dim));
  c.rms_eps = optional<double>(j, "rms_norm_eps", 1e-6, label);
  c.rope_theta = optional<double>(j, "rope_theta", 10000.0, label);
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    c.rope_theta = optional<double>(j["rope_parameters"], "rope_theta", c.rope_theta, label + " rope_parameters");
  }
  c.rope_scaling = parse_rope_scaling(j, label);
  c.max_position_embeddings = optional<int64_t>(j, "max_position_embeddings", 0, label);
  c.tie_word_embeddings = optional<bool>(j, "tie_word_embeddings", false, label);
  const std::string act = optional<std::string>(j, "hidden_act", "silu", label);
  if (act != "silu") fail(ErrorKind::kUnsupported, fmt::format("{}: hidden_act '{}' is not supported (silu only)", label, act));
  if (c.arch == ModelArch::kQwen2) {
    c.qkv_bias = true;
    if (optional<bool>(j, "use_sliding_window", false, label)) {
      c.sliding_window = optional<int64_t>(j, "sliding_window", 0, label);
    }
  } else {
    const bool attention_bias = optional<bool>(j, "attention_bias", false, label);
    c.qkv_bias = attention_bias;
    c.o_bias = attention_bias;
    c.mlp_bias = optional<bool>(j, "mlp_bias", false, label);
    if (c.arch == ModelArch::kMistral) c.sliding_window = optional<int64_t>(j, "sliding_window", 0, label);
  }
  c.bos_token_ids = token_ids(j, "bos_token_id", label);
  c.eos_token_ids = token_ids(j, "eos_token_id", label);
  c.torch_dtype = optional<std::string>(j, "torch_dtype", optional<std::string>(j, "dtype", "", label), label);
  return c;
}

ModelConfig ModelConfig::load(const std::string& model_dir) {
  const std::string path = (std::filesystem::path(model_dir) / "config.json").string();
  ModelConfig c = from_json(read_text(path), path);
  const std::string gen_path = (std::filesystem::path(model_dir) / "generation_config.json").string();
  if (std::filesystem::exists(gen_path)) {
    Json g;
    try {
      g = Json::parse(read_text(gen_path));
    } catch (const Json::exception& e) {
      bad(gen_path, fmt::format("not valid JSON: {}", e.what()));
    }
    // generation_config.json's eos list (e.g. Llama-3-Instruct's <|eot_id|>) wins.
    if (auto eos = token_ids(g, "eos_token_id", gen_path); !eos.empty()) c.eos_token_ids = eos;
    if (auto bos = token_ids(g, "bos_token_id", gen_path); !bos.empty()) c.bos_token_ids = bos;
  }
  return c;
}

std::string ModelConfig::to_json() const {
  Json j;
  j["architectures"] = {std::string(arch_name(arch))};
  j["model_type"] = arch == ModelArch::kLlama ? "llama" : arch == ModelArch::kMistral ? "mistral" : "qwen2";
  j["hidden_size"] = hidden;
  j["intermediate_size"] = intermediate;
  j["num_hidden_layers"] = layers;
  j["num_attention_heads"] = heads;
  j["num_key_value_heads"] = kv_heads;
  j["head_dim"] = head_dim;
  j["vocab_size"] = vocab;
  j["rms_norm_eps"] = rms_eps;
  j["rope_theta"] = rope_theta;
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = max_position_embeddings;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["initializer_range"] = 0.02;
  j["attention_dropout"] = 0.0;
  j["use_cache"] = true;
  switch (rope_scaling.type) {
    case RopeScaling::Type::kNone: j["rope_scaling"] = nullptr; break;
    case RopeScaling::Type::kLinear: j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", rope_scaling.factor}}; break;
    case RopeScaling::Type::kLlama3:
      j["rope_scaling"] = {{"rope_type", "llama3"},
                           {"factor", rope_scaling.factor},
                           {"low_freq_factor", rope_scaling.low_freq_factor},
                           {"high_freq_factor", rope_scaling.high_freq_factor},
                           {"original_max_position_embeddings", static_cast<int64_t>(rope_scaling.original_max_position)}};
      break;
  }
  if (arch == ModelArch::kQwen2) {
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
    j["max_window_layers"] = layers;
  } else {
    j["attention_bias"] = qkv_bias;
    j["mlp_bias"] = mlp_bias;
    if (arch == ModelArch::kMistral) j["sliding_window"] = nullptr;
  }
  const auto ids = [](const std::vector<int32_t>& v) -> Json {
    if (v.empty()) return nullptr;
    if (v.size() == 1) return v[0];
    return v;
  };
  j["bos_token_id"] = ids(bos_token_ids);
  j["eos_token_id"] = ids(eos_token_ids);
  if (!torch_dtype.empty()) j["torch_dtype"] = torch_dtype;
  return j.dump(2) + "\n";
}

}  // namespace unshackle
