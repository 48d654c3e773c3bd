// Checkpoints of every architecture: load, forward against a naive float64 transcription of
// transformers' modelling code (full causal attention, rotate-half RoPE with the model's
// rope_scaling), chunking, dtypes, sharding, tying, and the errors a broken checkpoint gives.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numbers>

#include "model_fixtures.h"
#include "unshackle/common/check.h"
#include "unshackle/common/safetensors.h"
#include "unshackle/model/model.h"

namespace unshackle::testing {
namespace {

// ---- the oracle: plain loops in double, written from transformers' LlamaModel/Qwen2Model ----

std::vector<double> oracle_inv_freq(const ModelConfig& c) {
  std::vector<double> inv(static_cast<size_t>(c.head_dim / 2));
  for (size_t i = 0; i < inv.size(); ++i) {
    double f = 1.0 / std::pow(c.rope_theta, static_cast<double>(2 * i) / c.head_dim);
    const RopeScaling& s = c.rope_scaling;
    if (s.type == RopeScaling::Type::kLinear) f /= s.factor;
    if (s.type == RopeScaling::Type::kLlama3) {
      const double wavelen = 2 * std::numbers::pi / f;
      const double low = s.original_max_position / s.low_freq_factor, high = s.original_max_position / s.high_freq_factor;
      if (wavelen > low) {
        f /= s.factor;
      } else if (wavelen >= high) {
        const double smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = (1 - smooth) * f / s.factor + smooth * f;
      }
    }
    inv[i] = f;
  }
  return inv;
}

std::vector<double> oracle_linear(const std::vector<double>& x, size_t n, size_t in, const std::vector<float>& W,
                                  size_t out, const std::vector<float>& bias) {
  std::vector<double> y(n * out);
  for (size_t r = 0; r < n; ++r)
    for (size_t o = 0; o < out; ++o) {
      double acc = bias.empty() ? 0.0 : bias[o];
      for (size_t i = 0; i < in; ++i) acc += x[r * in + i] * W[o * in + i];
      y[r * out + o] = acc;
    }
  return y;
}

std::vector<double> oracle_norm(const std::vector<double>& x, size_t n, size_t D, const std::vector<float>& w, double eps) {
  std::vector<double> y(x.size());
  for (size_t r = 0; r < n; ++r) {
    double ss = 0;
    for (size_t i = 0; i < D; ++i) ss += x[r * D + i] * x[r * D + i];
    const double scale = 1.0 / std::sqrt(ss / static_cast<double>(D) + eps);
    for (size_t i = 0; i < D; ++i) y[r * D + i] = w[i] * x[r * D + i] * scale;
  }
  return y;
}

// Logits [n, vocab] of every position of `tokens` with full causal attention.
std::vector<double> oracle_logits(const Model& model, const std::vector<int32_t>& tokens) {
  const ModelConfig& c = model.config();
  const ModelWeights& w = model.weights();
  const size_t n = tokens.size(), D = static_cast<size_t>(c.hidden), I = static_cast<size_t>(c.intermediate);
  const size_t H = static_cast<size_t>(c.heads), G = static_cast<size_t>(c.kv_heads), d = static_cast<size_t>(c.head_dim);
  const std::vector<double> inv = oracle_inv_freq(c);
  std::vector<double> x(n * D);
  for (size_t t = 0; t < n; ++t)
    for (size_t i = 0; i < D; ++i) x[t * D + i] = w.embed[static_cast<size_t>(tokens[t]) * D + i];
  const auto rope = [&](double* v, size_t pos) {
    for (size_t i = 0; i < d / 2; ++i) {
      const double a = static_cast<double>(pos) * inv[i], x1 = v[i], x2 = v[i + d / 2];
      v[i] = x1 * std::cos(a) - x2 * std::sin(a);
      v[i + d / 2] = x2 * std::cos(a) + x1 * std::sin(a);
    }
  };
  for (const LayerWeights& L : w.layers) {
    const auto h = oracle_norm(x, n, D, L.attn_norm, c.rms_eps);
    auto q = oracle_linear(h, n, D, L.wq, H * d, L.bq);
    auto k = oracle_linear(h, n, D, L.wk, G * d, L.bk);
    const auto v = oracle_linear(h, n, D, L.wv, G * d, L.bv);
    for (size_t t = 0; t < n; ++t) {
      for (size_t hh = 0; hh < H; ++hh) rope(&q[(t * H + hh) * d], t);
      for (size_t g = 0; g < G; ++g) rope(&k[(t * G + g) * d], t);
    }
    std::vector<double> o(n * H * d, 0.0);
    for (size_t t = 0; t < n; ++t)
      for (size_t hh = 0; hh < H; ++hh) {
        const size_t g = hh / (H / G);
        std::vector<double> logit(t + 1);
        double mx = -1e300;
        for (size_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (size_t i = 0; i < d; ++i) dot += q[(t * H + hh) * d + i] * k[(j * G + g) * d + i];
          logit[j] = dot / std::sqrt(static_cast<double>(d));
          mx = std::max(mx, logit[j]);
        }
        double total = 0;
        for (double& l : logit) total += (l = std::exp(l - mx));
        for (size_t j = 0; j <= t; ++j)
          for (size_t i = 0; i < d; ++i) o[(t * H + hh) * d + i] += logit[j] / total * v[(j * G + g) * d + i];
      }
    const auto attn = oracle_linear(o, n, H * d, L.wo, D, L.bo);
    for (size_t i = 0; i < x.size(); ++i) x[i] += attn[i];
    const auto h2 = oracle_norm(x, n, D, L.mlp_norm, c.rms_eps);
    const auto gate = oracle_linear(h2, n, D, L.w_gate, I, L.b_gate);
    const auto up = oracle_linear(h2, n, D, L.w_up, I, L.b_up);
    std::vector<double> act(gate.size());
    for (size_t i = 0; i < act.size(); ++i) act[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
    const auto down = oracle_linear(act, n, I, L.w_down, D, L.b_down);
    for (size_t i = 0; i < x.size(); ++i) x[i] += down[i];
  }
  const auto h = oracle_norm(x, n, D, w.final_norm, c.rms_eps);
  return oracle_linear(h, n, D, c.tie_word_embeddings ? w.embed : w.lm_head, static_cast<size_t>(c.vocab), {});
}

template <typename A, typename B>
double rel_error(const std::vector<A>& got, const std::vector<B>& want) {
  EXPECT_EQ(got.size(), want.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    if (std::isnan(static_cast<double>(got[i]))) return INFINITY;
    num += std::pow(static_cast<double>(got[i]) - static_cast<double>(want[i]), 2);
    den += std::pow(static_cast<double>(want[i]), 2);
  }
  return std::sqrt(num / den);
}

// Logits of every position of `tokens`, run in chunks, full attention on one local rank.
std::vector<float> run_logits(const Model& model, const std::vector<int32_t>& tokens, int64_t chunk,
                              AttentionConfig attention = {.mode = AttentionMode::kFull},
                              const CompressionWeights* compression = nullptr) {
  std::vector<float> logits;
  run_local_ranks(1, [&](int, Communicator& comm) {
    auto backend = make_cpu_backend();
    ContextAttention context(*backend, comm, model.attention_options(attention, compression));
    model.prefill(context, tokens, chunk, logits, true);
  });
  return logits;
}

class EveryArch : public ::testing::TestWithParam<std::string> {};

TEST_P(EveryArch, ForwardMatchesFloat64Oracle) {
  ScratchDir dir(GetParam());
  MakeModelOptions o = small_model(GetParam());
  if (GetParam() == "mistral") o.rope_linear = 2.0;  // exercise linear rope_scaling too
  make_model(o, dir.path());
  const auto model = Model::load(dir.path());
  const ModelConfig& c = model->config();
  EXPECT_EQ(c.qkv_bias, GetParam() == "qwen2");
  EXPECT_EQ(c.rope_scaling.type == RopeScaling::Type::kLlama3, GetParam() == "llama3");
  const auto tokens = seeded_tokens(37, c.vocab, 11);
  const auto want = oracle_logits(*model, tokens);
  const auto got = run_logits(*model, tokens, 16);
  const double err = rel_error(got, want);
  EXPECT_LT(err, 1e-5) << GetParam();
  // Not degenerate: logits spread and differ between positions.
  double spread = 0;
  for (size_t i = 0; i < static_cast<size_t>(c.vocab); ++i) spread += std::abs(want[i] - want[static_cast<size_t>(c.vocab) + i]);
  EXPECT_GT(spread / static_cast<double>(c.vocab), 0.1);
}

TEST_P(EveryArch, ChunkingDoesNotChangeLogits) {
  ScratchDir dir(GetParam());
  make_model(small_model(GetParam()), dir.path());
  const auto model = Model::load(dir.path());
  const auto tokens = seeded_tokens(29, model->config().vocab, 5);
  const auto whole = run_logits(*model, tokens, 64);
  for (int64_t chunk : {1, 3, 8}) EXPECT_LT(rel_error(run_logits(*model, tokens, chunk), whole), 1e-5) << chunk;
}

TEST_P(EveryArch, SameSeedSameCheckpointOtherSeedOther) {
  ScratchDir a("a"), b("b"), other("o");
  make_model(small_model(GetParam(), 3), a.path());
  make_model(small_model(GetParam(), 3), b.path());
  make_model(small_model(GetParam(), 4), other.path());
  const auto ma = Model::load(a.path()), mb = Model::load(b.path()), mo = Model::load(other.path());
  EXPECT_EQ(ma->weights().embed, mb->weights().embed);
  EXPECT_EQ(ma->weights().layers[1].w_down, mb->weights().layers[1].w_down);
  EXPECT_NE(ma->weights().layers[1].w_down, mo->weights().layers[1].w_down);
}

INSTANTIATE_TEST_SUITE_P(Model, EveryArch, ::testing::Values("llama", "llama3", "mistral", "qwen2"));

TEST(ModelLoad, Bf16AndF16WeightsAreTheRoundedF32Ones) {
  ScratchDir f32("f32"), bf16("bf16"), f16("f16");
  MakeModelOptions o = small_model("llama3");
  make_model(o, f32.path());
  o.dtype = DType::kBF16;
  make_model(o, bf16.path());
  o.dtype = DType::kF16;
  make_model(o, f16.path());
  const auto m32 = Model::load(f32.path()), m16b = Model::load(bf16.path()), m16 = Model::load(f16.path());
  const auto& w32 = m32->weights().layers[0].wq;
  const auto& wb = m16b->weights().layers[0].wq;
  const auto& wh = m16->weights().layers[0].wq;
  ASSERT_EQ(w32.size(), wb.size());
  size_t differ = 0;
  for (size_t i = 0; i < w32.size(); ++i) {
    EXPECT_EQ(wb[i], bf16_to_float(float_to_bf16(w32[i])));
    EXPECT_EQ(wh[i], fp16_to_float(float_to_fp16(w32[i])));
    differ += wb[i] != w32[i];
  }
  EXPECT_GT(differ, w32.size() / 2);  // the dtype was really applied
  const auto tokens = seeded_tokens(12, m32->config().vocab, 2);
  const double err = rel_error(run_logits(*m16b, tokens, 4), run_logits(*m32, tokens, 4));
  EXPECT_GT(err, 0.0);
  EXPECT_LT(err, 5e-2);
}

TEST(ModelLoad, ShardedCheckpointWithIndexEqualsOneFile) {
  ScratchDir one("one"), three("three");
  MakeModelOptions o = small_model("qwen2");
  make_model(o, one.path());
  o.shards = 3;
  make_model(o, three.path());
  ASSERT_TRUE(std::filesystem::exists(three.sub("model.safetensors.index.json")));
  ASSERT_TRUE(std::filesystem::exists(three.sub("model-00003-of-00003.safetensors")));
  ASSERT_FALSE(std::filesystem::exists(three.sub("model.safetensors")));
  const auto a = Model::load(one.path()), b = Model::load(three.path());
  const auto tokens = seeded_tokens(10, a->config().vocab, 9);
  EXPECT_EQ(run_logits(*a, tokens, 4), run_logits(*b, tokens, 4));
}

TEST(ModelLoad, TiedEmbeddingsNeedNoLmHead) {
  ScratchDir dir("tied");
  MakeModelOptions o = small_model("qwen2");
  o.tie_embeddings = true;
  make_model(o, dir.path());
  EXPECT_FALSE(SafetensorsFile::open(dir.sub("model.safetensors"))->contains("lm_head.weight"));
  const auto model = Model::load(dir.path());
  EXPECT_TRUE(model->config().tie_word_embeddings);
  const auto tokens = seeded_tokens(9, model->config().vocab, 4);
  EXPECT_LT(rel_error(run_logits(*model, tokens, 4), oracle_logits(*model, tokens)), 1e-5);
}

// Rewrites DIR/model.safetensors without `drop` (and with `reshape` given a wrong shape).
void rewrite_checkpoint(const std::string& dir, const std::string& drop, const std::string& reshape = "") {
  const std::string path = dir + "/model.safetensors";
  SafetensorsWriter w;
  {
    const auto f = SafetensorsFile::open(path);
    for (const TensorInfo& t : f->tensors()) {
      if (t.name == drop) continue;
      std::vector<int64_t> shape = t.shape;
      if (t.name == reshape) shape = {t.shape[1], t.shape[0]};
      const auto bytes = f->data(t.name);
      w.add(t.name, t.dtype, shape, bytes);
    }
  }
  w.write(path);
}

template <typename Fn>
Error expect_error(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "no Error thrown";
  return Error(ErrorKind::kInternal, "");
}

TEST(ModelLoad, MissingTensorIsNamed) {
  ScratchDir dir("missing");
  make_model(small_model("qwen2"), dir.path());
  rewrite_checkpoint(dir.path(), "model.layers.1.self_attn.k_proj.bias");
  const Error e = expect_error([&] { Model::load(dir.path()); });
  EXPECT_EQ(e.kind(), ErrorKind::kNotFound);
  EXPECT_NE(std::string(e.what()).find("model.layers.1.self_attn.k_proj.bias"), std::string::npos) << e.what();
}

TEST(ModelLoad, WrongShapeIsNamed) {
  ScratchDir dir("shape");
  make_model(small_model("llama"), dir.path());
  rewrite_checkpoint(dir.path(), "", "model.layers.0.mlp.up_proj.weight");
  const Error e = expect_error([&] { Model::load(dir.path()); });
  EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
  EXPECT_NE(std::string(e.what()).find("model.layers.0.mlp.up_proj.weight"), std::string::npos) << e.what();
}

TEST(ModelLoad, UnknownArchitectureIsNamed) {
  ScratchDir dir("arch");
  make_model(small_model("llama"), dir.path());
  nlohmann::json j;
  {
    std::ifstream in(dir.sub("config.json"));
    j = nlohmann::json::parse(in);
  }
  j["architectures"] = {"GPT2LMHeadModel"};
  std::ofstream(dir.sub("config.json")) << j.dump();
  const Error e = expect_error([&] { Model::load(dir.path()); });
  EXPECT_EQ(e.kind(), ErrorKind::kUnsupported);
  EXPECT_NE(std::string(e.what()).find("GPT2LMHeadModel"), std::string::npos) << e.what();
}

TEST(ModelConfig, ParsesHuggingFaceSpellings) {
  // Llama-3.1-8B's config.json (abridged): rope_scaling llama3, eos as a list.
  const ModelConfig c = ModelConfig::from_json(R"({
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": false, "torch_dtype": "bfloat16", "hidden_act": "silu"})");
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.kv_heads, 8);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(c.rope_scaling.original_max_position, 8192);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
  EXPECT_EQ(c.bos_token_ids, (std::vector<int32_t>{128000}));
  // Llama-2 style linear scaling spelled with "type".
  const ModelConfig l2 = ModelConfig::from_json(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
    "rope_scaling": {"type": "linear", "factor": 4.0}})");
  EXPECT_EQ(l2.rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_EQ(l2.kv_heads, 4);
  // transformers 5 spelling: rope_parameters holds theta and the scaling.
  const ModelConfig v5 = ModelConfig::from_json(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10, "dtype": "bfloat16",
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})");
  EXPECT_EQ(v5.rope_theta, 500000.0);
  EXPECT_EQ(v5.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(v5.torch_dtype, "bfloat16");
  const Error yarn = expect_error([] {
    ModelConfig::from_json(R"({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10, "rope_scaling": {"type": "yarn", "factor": 4.0}})");
  });
  EXPECT_EQ(yarn.kind(), ErrorKind::kUnsupported);
  EXPECT_NE(std::string(yarn.what()).find("yarn"), std::string::npos);
  const Error missing = expect_error([] {
    ModelConfig::from_json(R"({"architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1,
      "num_attention_heads": 4, "vocab_size": 10})");
  });
  EXPECT_NE(std::string(missing.what()).find("intermediate_size"), std::string::npos);
  // What make-model writes reads back the same.
  const ModelConfig back = ModelConfig::from_json(c.to_json());
  EXPECT_EQ(back.to_json(), c.to_json());
}

}  // namespace
}  // namespace unshackle::testing
