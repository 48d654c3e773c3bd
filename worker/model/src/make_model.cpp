#include "unshackle/model/make_model.h"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "unshackle/common/check.h"
#include "unshackle/common/safetensors.h"
#include "unshackle/model/tokenizer.h"

namespace unshackle {

const char* const kTokenizerTrainingCorpus =
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs into the forest.\n"
    "In the beginning the context was short, and then it grew to a million tokens.\n"
    "Attention selects the tokens that matter: the initial tokens, the local window, and the top-k "
    "middle tokens chosen by compressed scores.\n"
    "def forward(self, hidden_states, position_ids):\n    return self.mlp(self.norm(hidden_states))\n\n"
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i] * y[i];\n}\n"
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1024 65536 3.14159 2026-11-22\n"
    "Whitespace   runs\t\tand\n\n\nnew lines    are   kept.\n"
    "Unicode: café, naïve, Größe, Ελληνικά, русский текст, 日本語のテキスト, 中文文本, 한국어, emoji 🙂🚀.\n"
    "She said: \"it's what they'll do, and we've seen it; I'm sure you'd agree.\"\n"
    "the the the and and and of of of to to to in in in is is is that that that it it it\n";

namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : s) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  return h;
}

// Standard normals from (seed, name, index).
std::vector<float> hashed_normals(uint64_t seed, const std::string& name, size_t n, float scale, float offset) {
  const uint64_t key = splitmix64(splitmix64(seed) ^ fnv1a(name));
  const auto uniform = [&](uint64_t i) {
    return (static_cast<double>(splitmix64(key ^ (i * 0x9e3779b97f4a7c15ull)) >> 11) + 0.5) / 9007199254740992.0;
  };
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    const double u1 = uniform(2 * i), u2 = uniform(2 * i + 1);
    out[i] = offset + scale * static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
  return out;
}

struct TokenizerPlan {
  std::string kind;
  std::string pattern;  // bpe: Split regex ("" = GPT-2 ByteLevel)
  std::vector<std::string> specials;
  bool add_bos = true;
  int bos = -1, eos = -1;  // indices into specials
};

TokenizerPlan tokenizer_plan(const MakeModelOptions& o) {
  TokenizerPlan t;
  t.kind = o.tokenizer.empty() ? (o.arch == "llama3" || o.arch == "qwen2" ? "bpe" : "bytes") : o.tokenizer;
  UNS_CHECK(t.kind == "bytes" || t.kind == "bpe", "--tokenizer: 'bytes' or 'bpe' (got '{}')", t.kind);
  if (o.arch == "llama3") {
    t.pattern = kLlama3SplitPattern;
    t.specials = {"<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"};
    t.bos = 0;
    t.eos = 1;
  } else if (o.arch == "qwen2") {
    t.pattern = kQwen2SplitPattern;
    t.specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    t.add_bos = false;
    t.eos = 0;
  } else {
    t.specials = {"<s>", "</s>", "<unk>"};
    t.bos = 0;
    t.eos = 1;
  }
  return t;
}

}  // namespace

ModelConfig make_model_config(const MakeModelOptions& o) {
  ModelConfig c;
  if (o.arch == "llama" || o.arch == "llama3") {
    c.arch = ModelArch::kLlama;
  } else if (o.arch == "mistral") {
    c.arch = ModelArch::kMistral;
  } else if (o.arch == "qwen2") {
    c.arch = ModelArch::kQwen2;
    c.qkv_bias = true;
  } else {
    fail(ErrorKind::kUnsupported, fmt::format("--arch: '{}' is not one of llama, llama3, mistral, qwen2", o.arch));
  }
  UNS_CHECK(o.layers > 0 && o.hidden > 0 && o.heads > 0 && o.kv_heads > 0 && o.heads % o.kv_heads == 0,
            "make-model: layers, hidden, heads > 0 and heads a multiple of kv-heads (got {}, {}, {}, {})", o.layers,
            o.hidden, o.heads, o.kv_heads);
  UNS_CHECK(o.dtype == DType::kF32 || o.dtype == DType::kBF16 || o.dtype == DType::kF16,
            "--dtype: f32, bf16 or f16");
  c.layers = o.layers;
  c.hidden = o.hidden;
  c.heads = o.heads;
  c.kv_heads = o.kv_heads;
  c.head_dim = o.head_dim > 0 ? o.head_dim : o.hidden / o.heads;
  UNS_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0, "make-model: head dim must be even (got {})", c.head_dim);
  c.intermediate = o.intermediate > 0 ? o.intermediate : (8 * o.hidden / 3 + 7) / 8 * 8;
  c.vocab = o.vocab;
  c.rms_eps = c.arch == ModelArch::kLlama && o.arch == "llama" ? 1e-6 : 1e-5;
  c.rope_theta = o.rope_theta > 0           ? o.rope_theta
                 : o.arch == "llama3"       ? 500000.0
                 : c.arch == ModelArch::kQwen2 ? 1000000.0
                                            : 10000.0;
  if (o.arch == "llama3") {
    c.rope_scaling.type = RopeScaling::Type::kLlama3;
    c.rope_scaling.factor = 8;
    c.rope_scaling.low_freq_factor = 1;
    c.rope_scaling.high_freq_factor = 4;
    c.rope_scaling.original_max_position = 8192;
  }
  if (o.rope_linear > 0) {
    UNS_CHECK(o.arch != "llama3", "--rope-linear: llama3 already has its rope_scaling");
    c.rope_scaling.type = RopeScaling::Type::kLinear;
    c.rope_scaling.factor = o.rope_linear;
  }
  c.max_position_embeddings = o.max_position;
  c.tie_word_embeddings = o.tie_embeddings;
  c.torch_dtype = o.dtype == DType::kF32 ? "float32" : o.dtype == DType::kBF16 ? "bfloat16" : "float16";
  const TokenizerPlan t = tokenizer_plan(o);
  const int64_t first_special = t.kind == "bytes" ? 256 : -1;  // bpe: filled by make_model
  if (first_special >= 0) {
    UNS_CHECK(o.vocab >= 256 + static_cast<int64_t>(t.specials.size()),
              "--vocab: the byte tokenizer needs at least {} ids (got {})", 256 + t.specials.size(), o.vocab);
    if (t.bos >= 0) c.bos_token_ids = {static_cast<int32_t>(first_special + t.bos)};
    if (t.eos >= 0) c.eos_token_ids = {static_cast<int32_t>(first_special + t.eos)};
  }
  return c;
}

ModelConfig make_model(const MakeModelOptions& o, const std::string& dir) {
  UNS_CHECK(o.shards >= 1, "--shards: must be >= 1 (got {})", o.shards);
  ModelConfig c = make_model_config(o);
  const TokenizerPlan t = tokenizer_plan(o);
  fs::create_directories(dir);
  const fs::path root(dir);

  // Tokenizer (and the bos/eos ids it fixes).
  if (t.kind == "bytes") {
    ByteTokenizer(t.specials, t.add_bos ? t.bos : -1).save((root / "unshackle_tokenizer.json").string());
  } else {
    const std::string json = train_bpe_tokenizer_json(kTokenizerTrainingCorpus, o.vocab, t.pattern, t.specials, t.add_bos);
    const auto tok = BpeTokenizer::parse(json, "<make-model>");
    UNS_CHECK(tok->vocab_size() <= o.vocab, "make-model: tokenizer has {} ids, vocab is {}", tok->vocab_size(), o.vocab);
    if (t.bos >= 0) c.bos_token_ids = {tok->token_id(t.specials[static_cast<size_t>(t.bos)])};
    if (t.eos >= 0) c.eos_token_ids = {tok->token_id(t.specials[static_cast<size_t>(t.eos)])};
    if (o.arch == "qwen2") c.bos_token_ids = c.eos_token_ids;  // as Qwen2's config.json
    std::ofstream out(root / "tokenizer.json", std::ios::binary);
    out << json;
    UNS_CHECK_KIND(kIo, out.good(), "{}: write failed", (root / "tokenizer.json").string());
  }
  {
    std::ofstream out(root / "config.json", std::ios::binary);
    out << c.to_json();
    UNS_CHECK_KIND(kIo, out.good(), "{}: write failed", (root / "config.json").string());
    Json gen = {{"_from_model_config", true}, {"do_sample", false}};
    if (!c.bos_token_ids.empty()) gen["bos_token_id"] = c.bos_token_ids[0];
    if (!c.eos_token_ids.empty()) gen["eos_token_id"] = c.eos_token_ids[0];
    std::ofstream g(root / "generation_config.json", std::ios::binary);
    g << gen.dump(2) << "\n";
    UNS_CHECK_KIND(kIo, g.good(), "{}: write failed", (root / "generation_config.json").string());
  }

  // Weights, in Hugging Face names. Scales keep activations O(1): projections 1/sqrt(fan_in),
  // norms around 1, embeddings unit normal, biases small.
  const int64_t D = c.hidden, I = c.intermediate, V = c.vocab;
  const int64_t q = int64_t{c.heads} * c.head_dim, kv = int64_t{c.kv_heads} * c.head_dim;
  struct Tensor { std::string name; std::vector<int64_t> shape; float scale, offset; };
  std::vector<Tensor> tensors;
  const auto inv_sqrt = [](int64_t n) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(n))); };
  tensors.push_back({"model.embed_tokens.weight", {V, D}, 1.0f, 0.0f});
  for (int l = 0; l < c.layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    tensors.push_back({p + "input_layernorm.weight", {D}, 0.1f, 1.0f});
    tensors.push_back({p + "self_attn.q_proj.weight", {q, D}, inv_sqrt(D), 0.0f});
    tensors.push_back({p + "self_attn.k_proj.weight", {kv, D}, inv_sqrt(D), 0.0f});
    tensors.push_back({p + "self_attn.v_proj.weight", {kv, D}, inv_sqrt(D), 0.0f});
    if (c.qkv_bias) {
      tensors.push_back({p + "self_attn.q_proj.bias", {q}, 0.1f, 0.0f});
      tensors.push_back({p + "self_attn.k_proj.bias", {kv}, 0.1f, 0.0f});
      tensors.push_back({p + "self_attn.v_proj.bias", {kv}, 0.1f, 0.0f});
    }
    tensors.push_back({p + "self_attn.o_proj.weight", {D, q}, inv_sqrt(q), 0.0f});
    tensors.push_back({p + "post_attention_layernorm.weight", {D}, 0.1f, 1.0f});
    tensors.push_back({p + "mlp.gate_proj.weight", {I, D}, inv_sqrt(D), 0.0f});
    tensors.push_back({p + "mlp.up_proj.weight", {I, D}, inv_sqrt(D), 0.0f});
    tensors.push_back({p + "mlp.down_proj.weight", {D, I}, inv_sqrt(I), 0.0f});
  }
  tensors.push_back({"model.norm.weight", {D}, 0.1f, 1.0f});
  if (!c.tie_word_embeddings) tensors.push_back({"lm_head.weight", {V, D}, inv_sqrt(D), 0.0f});

  std::vector<SafetensorsWriter> writers(static_cast<size_t>(o.shards));
  Json weight_map = Json::object();
  size_t total_bytes = 0;
  const auto shard_name = [&](int s) {
    return o.shards == 1 ? std::string("model.safetensors")
                         : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, o.shards);
  };
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& tensor = tensors[i];
    size_t n = 1;
    for (int64_t s : tensor.shape) n *= static_cast<size_t>(s);
    const std::vector<float> values = hashed_normals(o.seed, tensor.name, n, tensor.scale, tensor.offset);
    std::vector<uint8_t> bytes(n * dtype_size(o.dtype));
    convert_from_f32(values.data(), o.dtype, bytes.data(), n);
    const int shard = static_cast<int>(i * static_cast<size_t>(o.shards) / tensors.size());
    SafetensorsWriter& w = writers[static_cast<size_t>(shard)];
    w.set_metadata("format", "pt");
    w.add(tensor.name, o.dtype, tensor.shape, bytes);
    weight_map[tensor.name] = shard_name(shard);
    total_bytes += bytes.size();
  }
  for (int s = 0; s < o.shards; ++s) writers[static_cast<size_t>(s)].write((root / shard_name(s)).string());
  if (o.shards > 1) {
    const Json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
    std::ofstream out(root / "model.safetensors.index.json", std::ios::binary);
    out << index.dump(2) << "\n";
    UNS_CHECK_KIND(kIo, out.good(), "{}: write failed", (root / "model.safetensors.index.json").string());
  }
  return c;
}

}  // namespace unshackle
