// Generation: determinism, sampling, stops, attention modes through the model (exact-topk
// against esa with s = f), multi-rank generation, and the generate / make-model commands.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cmath>
#include <map>

#include "model_commands.h"
#include "model_fixtures.h"
#include "unshackle/common/check.h"
#include "unshackle/common/safetensors.h"

namespace unshackle::testing {
namespace {

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

GenerateResult run(const Model& model, std::span<const int32_t> prompt, const GenerateOptions& options,
                   AttentionConfig attention = {.mode = AttentionMode::kFull},
                   const CompressionWeights* compression = nullptr, const Tokenizer* tokenizer = nullptr) {
  GenerateResult result;
  run_local_ranks(1, [&](int, Communicator& comm) {
    auto backend = make_cpu_backend();
    ContextAttention context(*backend, comm, model.attention_options(attention, compression));
    result = generate(model, context, tokenizer, prompt, options);
  });
  return result;
}

class GenerateEveryArch : public ::testing::TestWithParam<std::string> {};

TEST_P(GenerateEveryArch, GreedyAndSeededSamplingAreDeterministic) {
  ScratchDir dir(GetParam());
  make_model(small_model(GetParam()), dir.path());
  const auto model = Model::load(dir.path());
  const auto prompt = seeded_tokens(20, model->config().vocab, 3);
  GenerateOptions o;
  o.max_tokens = 16;
  o.chunk = 7;
  const GenerateResult a = run(*model, prompt, o), b = run(*model, prompt, o);
  ASSERT_EQ(a.tokens.size(), 16u);
  EXPECT_EQ(a.tokens, b.tokens);
  std::map<int32_t, int> distinct;
  for (int32_t t : a.tokens) ++distinct[t];
  EXPECT_GT(distinct.size(), 1u) << "a model that repeats one token cannot show much";
  // Sampling: a seed fixes the draw, another seed changes it, the chunk size does not matter.
  o.sampling = {.temperature = 1.0, .top_p = 0.95, .top_k = 50, .seed = 42};
  const GenerateResult s1 = run(*model, prompt, o);
  o.chunk = 64;
  const GenerateResult s2 = run(*model, prompt, o);
  o.sampling.seed = 43;
  const GenerateResult s3 = run(*model, prompt, o);
  EXPECT_EQ(s1.tokens, s2.tokens);
  EXPECT_NE(s1.tokens, s3.tokens);
  EXPECT_NE(s1.tokens, a.tokens);
  // Sampling among the top 1 is greedy.
  o.sampling = {.temperature = 0.7, .top_p = 1.0, .top_k = 1, .seed = 5};
  EXPECT_EQ(run(*model, prompt, o).tokens, a.tokens);
}

INSTANTIATE_TEST_SUITE_P(Model, GenerateEveryArch, ::testing::Values("llama", "llama3", "mistral", "qwen2"));

TEST(Sampling, GreedyTiesGoToTheLowerIdAndDrawsFollowTheSoftmax) {
  const std::vector<float> tied = {0.5f, 2.0f, 1.0f, 2.0f};
  EXPECT_EQ(sample_token(tied, {}, 0), 1);
  const std::vector<float> logits = {1.0f, 0.0f, 2.0f, -1.0f, 0.5f};
  // top_p below the largest probability keeps the argmax only.
  for (int64_t pos = 0; pos < 20; ++pos) EXPECT_EQ(sample_token(logits, {.temperature = 1, .top_p = 0.1}, pos), 2);
  // top_k = 2 only ever draws the two best.
  std::vector<int> counts(logits.size(), 0);
  for (int64_t pos = 0; pos < 4000; ++pos) ++counts[static_cast<size_t>(sample_token(logits, {.temperature = 1, .top_k = 2, .seed = 9}, pos))];
  EXPECT_EQ(counts[1] + counts[3] + counts[4], 0);
  // Frequencies of the top-2 draw: p(2) = e^2 / (e^2 + e^1) = 0.731.
  EXPECT_NEAR(counts[2] / 4000.0, std::exp(2.0) / (std::exp(2.0) + std::exp(1.0)), 0.03);
  // Full softmax at temperature 2.
  std::fill(counts.begin(), counts.end(), 0);
  for (int64_t pos = 0; pos < 20000; ++pos) ++counts[static_cast<size_t>(sample_token(logits, {.temperature = 2, .seed = 1}, pos))];
  double total = 0;
  for (float l : logits) total += std::exp(l / 2.0);
  for (size_t i = 0; i < logits.size(); ++i) EXPECT_NEAR(counts[i] / 20000.0, std::exp(logits[i] / 2.0) / total, 0.015) << i;
  EXPECT_THROW(sample_token(logits, {.temperature = 1, .top_p = 0}, 0), Error);
}

TEST(Generate, StopTokenStopStringAndMaxTokens) {
  ScratchDir dir("stops");
  make_model(small_model("llama"), dir.path());  // byte tokenizer: text is exactly the bytes
  const auto model = Model::load(dir.path());
  const auto tokenizer = load_tokenizer(dir.path());
  const auto prompt = tokenizer->encode("The quick brown fox");
  GenerateOptions o;
  o.max_tokens = 24;
  const GenerateResult all = run(*model, prompt, o, {.mode = AttentionMode::kFull}, nullptr, tokenizer.get());
  ASSERT_EQ(all.tokens.size(), 24u);
  EXPECT_EQ(all.finish, FinishReason::kLength);
  // Stop at the id of the 7th token: 7 tokens, the last one the stop token, not in the text.
  o.stop_ids = {all.tokens[6]};
  const size_t first = static_cast<size_t>(std::find(all.tokens.begin(), all.tokens.end(), all.tokens[6]) - all.tokens.begin());
  const GenerateResult stopped = run(*model, prompt, o, {.mode = AttentionMode::kFull}, nullptr, tokenizer.get());
  EXPECT_EQ(stopped.finish, FinishReason::kStopToken);
  EXPECT_EQ(stopped.tokens, std::vector<int32_t>(all.tokens.begin(), all.tokens.begin() + static_cast<std::ptrdiff_t>(first) + 1));
  EXPECT_EQ(stopped.text, tokenizer->decode(std::span<const int32_t>(all.tokens.data(), first)));
  // A stop string made of the text of tokens 10..12.
  o.stop_ids.clear();
  const std::string stop = tokenizer->decode(std::span<const int32_t>(all.tokens.data() + 10, 3));
  o.stop_strings = {stop};
  const GenerateResult by_string = run(*model, prompt, o, {.mode = AttentionMode::kFull}, nullptr, tokenizer.get());
  const size_t cut = all.text.find(stop);
  ASSERT_NE(cut, std::string::npos);
  EXPECT_EQ(by_string.finish, FinishReason::kStopString);
  EXPECT_EQ(by_string.text, all.text.substr(0, cut));
  EXPECT_LE(by_string.tokens.size(), 13u);
}

// d' = G*d, wk = identity, wq sums the heads of each KV group: s(m, c) = f(m, c) exactly.
CompressionWeights exact_compression(const ModelConfig& c) {
  const size_t H = static_cast<size_t>(c.heads), G = static_cast<size_t>(c.kv_heads), d = static_cast<size_t>(c.head_dim);
  CompressionWeights cw;
  cw.d_c = static_cast<int>(G * d);
  for (int l = 0; l < c.layers; ++l) {
    std::vector<float> wq(G * d * H * d, 0.0f), wk(G * d * G * d, 0.0f);
    for (size_t g = 0; g < G; ++g)
      for (size_t i = 0; i < d; ++i) {
        wk[(g * d + i) * G * d + g * d + i] = 1.0f;
        for (size_t h = g * (H / G); h < (g + 1) * (H / G); ++h) wq[(g * d + i) * H * d + h * d + i] = 1.0f;
      }
    cw.wq.push_back(std::move(wq));
    cw.wk.push_back(std::move(wk));
  }
  return cw;
}

TEST(Modes, ExactTopkEqualsEsaWithExactCompressionAndSelectsAllOfM) {
  ScratchDir dir("modes");
  make_model(small_model("llama3"), dir.path());
  const auto model = Model::load(dir.path());
  const ModelConfig& c = model->config();
  const auto prompt = seeded_tokens(70, c.vocab, 8);
  const CompressionWeights exact = exact_compression(c);
  GenerateOptions o;
  o.max_tokens = 10;
  o.chunk = 16;
  o.record_logits = true;
  for (int64_t top_k : {6, 1000}) {
    SCOPED_TRACE(top_k);
    const AttentionConfig topk{.mode = AttentionMode::kExactTopk, .l_I = 4, .l_L = 16, .top_k = top_k};
    AttentionConfig esa = topk;
    esa.mode = AttentionMode::kEsa;
    const GenerateResult a = run(*model, prompt, o, topk), b = run(*model, prompt, o, esa, &exact);
    EXPECT_EQ(a.tokens, b.tokens);
    double num = 0, den = 0;
    for (size_t i = 0; i < a.prompt_logits.size(); ++i) {
      num += std::pow(a.prompt_logits[i] - b.prompt_logits[i], 2);
      den += std::pow(b.prompt_logits[i], 2);
    }
    EXPECT_LT(std::sqrt(num / den), 1e-5);
  }
  // With top_k >= |M| the selection is all of M = [l_I, p - l_L) in every layer.
  run_local_ranks(1, [&](int, Communicator& comm) {
    auto backend = make_cpu_backend();
    const AttentionConfig topk{.mode = AttentionMode::kExactTopk, .l_I = 4, .l_L = 16, .top_k = 1000};
    ContextAttention context(*backend, comm, model->attention_options(topk, nullptr));
    std::vector<float> logits;
    model->prefill(context, prompt, 16, logits);
    const std::vector<int32_t> next = {1};
    model->forward_chunk(context, next, logits);
    std::vector<int64_t> all_m;
    for (int64_t t = 4; t < 70 - 16; ++t) all_m.push_back(t);
    for (int l = 0; l < c.layers; ++l) EXPECT_EQ(context.last_stats(l).selected, all_m) << "layer " << l;
  });
  // The mode reaches the model: streaming (no M) differs from full on a context longer than l_I + l_L.
  o.record_logits = true;
  const GenerateResult full = run(*model, prompt, o);
  const GenerateResult streaming = run(*model, prompt, o, {.mode = AttentionMode::kStreaming, .l_I = 4, .l_L = 16});
  EXPECT_NE(full.step_logits, streaming.step_logits);
}

TEST(Modes, EsaAndBlockRefuseWithoutCompressionFile) {
  ScratchDir dir("refuse");
  make_model(small_model("llama"), dir.path());
  for (AttentionMode mode : {AttentionMode::kEsa, AttentionMode::kBlock}) {
    GenerateCommandOptions g;
    g.model_dir = dir.path();
    g.prompt = "hello";
    g.attention.mode = mode;
    const Error e = expect_error([&] { run_generate_command(g); });
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("--compression"), std::string::npos) << e.what();
  }
}

TEST(Modes, CompressionFileIsLoadedAndChecked) {
  ScratchDir dir("cfile");
  make_model(small_model("mistral"), dir.path());
  const auto model = Model::load(dir.path());
  const CompressionWeights exact = exact_compression(model->config());
  SafetensorsWriter w;
  const int64_t dc = exact.d_c, dh = int64_t{model->config().heads} * model->config().head_dim;
  for (size_t l = 0; l < exact.wq.size(); ++l) {
    w.add_f32(fmt::format("layers.{}.wq", l), {dc, dh}, exact.wq[l]);
    w.add_f32(fmt::format("layers.{}.wk", l), {dc, dc}, exact.wk[l]);
  }
  w.write(dir.sub("esa.safetensors"));
  const CompressionWeights loaded = load_compression_weights(dir.sub("esa.safetensors"), model->config());
  EXPECT_EQ(loaded.d_c, exact.d_c);
  EXPECT_EQ(loaded.wq, exact.wq);
  EXPECT_EQ(loaded.wk, exact.wk);
  GenerateCommandOptions g;
  g.model_dir = dir.path();
  g.prompt = "The quick brown fox jumps over the lazy dog, again and again and again.";
  g.attention = {.mode = AttentionMode::kEsa, .l_I = 4, .l_L = 16, .top_k = 8};
  g.compression = dir.sub("esa.safetensors");
  g.generate.max_tokens = 6;
  g.ignore_eos = true;
  const auto esa = run_generate_command(g);
  g.attention.mode = AttentionMode::kExactTopk;
  g.compression.clear();
  EXPECT_EQ(run_generate_command(g).result.tokens, esa.result.tokens);
  // A file for another model shape is refused, naming the tensor.
  ModelConfig wider = model->config();
  wider.heads *= 2;
  const Error e = expect_error([&] { load_compression_weights(dir.sub("esa.safetensors"), wider); });
  EXPECT_NE(std::string(e.what()).find("layers.0.wq"), std::string::npos) << e.what();
}

class MultiRank : public ::testing::TestWithParam<std::tuple<int, AttentionMode>> {};

TEST_P(MultiRank, SameTokensAsOneRank) {
  const auto [ranks, mode] = GetParam();
  static ScratchDir dir("ranks");
  static bool made = false;
  if (!made) {
    make_model(small_model("qwen2"), dir.path());
    made = true;
  }
  GenerateCommandOptions g;
  g.model_dir = dir.path();
  g.prompt = "Attention selects the tokens that matter: the initial tokens, the local window, and the top-k. "
             "In the beginning the context was short, and then it grew to a million tokens.";
  g.attention = {.mode = mode, .l_I = 4, .l_L = 16, .top_k = 8};
  g.generate.max_tokens = 12;
  g.generate.chunk = 16;
  g.generate.sampling = {.temperature = 0.8, .seed = 3};
  g.ignore_eos = true;
  g.kv_block = 8;  // many blocks: every rank owns part of I, M and L
  const auto one = run_generate_command(g);
  g.ranks = ranks;
  const auto many = run_generate_command(g);
  EXPECT_GT(one.prompt.size(), 60u);
  EXPECT_EQ(many.result.tokens, one.result.tokens);
  EXPECT_EQ(many.result.tokens.size(), 12u);
}

INSTANTIATE_TEST_SUITE_P(Model, MultiRank,
                         ::testing::Combine(::testing::Values(2, 3, 4),
                                            ::testing::Values(AttentionMode::kFull, AttentionMode::kExactTopk,
                                                              AttentionMode::kStreaming)));

TEST(Commands, MakeModelAndGenerateThroughTheCli) {
  ScratchDir dir("cli");
  {
    CLI::App app;
    add_model_commands(app);
    const std::vector<std::string> args = {"make-model", "--arch", "llama3", "--layers", "2", "--hidden", "32",
                                           "--heads", "4", "--kv-heads", "1", "--vocab", "400", "--dtype", "bf16",
                                           "--shards", "2", "--seed", "5", "--output", dir.path()};
    std::vector<const char*> argv = {"unshackle"};
    for (const auto& a : args) argv.push_back(a.c_str());
    app.parse(static_cast<int>(argv.size()), argv.data());
  }
  const ModelConfig c = ModelConfig::load(dir.path());
  EXPECT_EQ(c.kv_heads, 1);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  const auto tokenizer = load_tokenizer(dir.path());
  EXPECT_EQ(tokenizer->kind(), "bpe");
  EXPECT_EQ(c.bos_token_ids, std::vector<int32_t>{tokenizer->token_id("<|begin_of_text|>")});
  GenerateCommandOptions g;
  g.model_dir = dir.path();
  g.prompt = "Whitespace   runs and unicode: café 日本語";
  g.generate.max_tokens = 5;
  g.ignore_eos = true;
  const auto r = run_generate_command(g);
  EXPECT_EQ(r.prompt.front(), c.bos_token_ids[0]);
  EXPECT_EQ(tokenizer->decode(r.prompt, true), g.prompt);
  EXPECT_EQ(r.result.tokens.size(), 5u);
  // The same prompt as ids gives the same tokens.
  GenerateCommandOptions ids = g;
  ids.prompt.clear();
  for (size_t i = 0; i < r.prompt.size(); ++i) ids.prompt_ids += (i ? "," : "") + std::to_string(r.prompt[i]);
  EXPECT_EQ(run_generate_command(ids).result.tokens, r.result.tokens);
}

}  // namespace
}  // namespace unshackle::testing
