// ModelEngine (worker/engine) on a checkpoint written by make_model: capacity and reservation
// errors, forks equal to a fresh prefill, decode equal to generate(), usage across ranks.
// Ranks are threads with local communicators (the same Engine code mpirun runs).
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <numeric>

#include "unshackle/common/check.h"
#include "unshackle/engine/model_engine.h"
#include "unshackle/model/generate.h"
#include "unshackle/model/make_model.h"

namespace unshackle {
namespace {

class ModelEngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = (std::filesystem::temp_directory_path() / ("uns_engine_" + std::to_string(::getpid()))).string();
    MakeModelOptions m;
    m.layers = 2;
    m.hidden = 64;
    m.vocab = 320;
    m.seed = 5;
    make_model(m, dir_);
  }
  static void TearDownTestSuite() { std::filesystem::remove_all(dir_); }
  static ModelEngineOptions options() {
    ModelEngineOptions o;
    o.model_dir = dir_;
    o.max_context_tokens = 64;
    o.kv_capacity_tokens = 100;
    o.kv_block = 4;  // short contexts still spread over both ranks
    o.chunk = 16;
    return o;
  }
  static AttentionConfig topk() {
    AttentionConfig a;
    a.mode = AttentionMode::kExactTopk;
    a.top_k = 4;
    a.l_I = 2;
    a.l_L = 8;
    return a;
  }
  static inline std::string dir_;
};

ErrorKind kind_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.kind();
  }
  ADD_FAILURE() << "no error thrown";
  return ErrorKind::kInternal;
}

// Decodes up to `steps` tokens of context `id` into `out`, stopping after an end-of-sequence token.
void decode_into(ModelEngine& engine, ContextId id, const SamplingParams& sampling, int steps, std::vector<int32_t>& out) {
  for (int i = 0; i < steps; ++i) {
    const DecodeResult d = engine.decode(id, sampling);
    out.push_back(d.token);
    if (d.end_of_sequence) break;
  }
}

std::vector<int32_t> seeded_tokens(size_t n, uint32_t seed) {
  std::vector<int32_t> t(n);
  uint64_t x = seed;
  for (auto& v : t) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    v = static_cast<int32_t>(1 + (x >> 33) % 255);  // bytes, never a special
  }
  return t;
}

TEST_F(ModelEngineTest, ReservationsStayWithinCapacity) {
  auto comm = std::move(make_local_communicators(1).front());
  ModelEngine engine(options(), *comm);
  EXPECT_EQ(engine.info().max_context_tokens, 64);
  EXPECT_EQ(engine.info().kv_capacity_tokens, 100);
  EXPECT_EQ(engine.info().name, std::filesystem::path(dir_).filename().string());
  AttentionConfig full;
  full.mode = AttentionMode::kFull;
  engine.create_context(1, full, 64);
  EXPECT_EQ(kind_of([&] { engine.create_context(2, full, 65); }), ErrorKind::kCapacity);  // over one context's limit
  EXPECT_EQ(kind_of([&] { engine.create_context(2, full, 40); }), ErrorKind::kCapacity);  // 64 + 40 > 100
  EXPECT_EQ(kind_of([&] { engine.create_context(1, full, 4); }), ErrorKind::kInvalidArgument);  // id in use
  EXPECT_EQ(engine.reserved_tokens(), 64);
  engine.create_context(2, full, 36);
  EXPECT_EQ(engine.reserved_tokens(), 100);
  engine.release_context(1);
  engine.release_context(1);  // unknown ids are ignored
  EXPECT_EQ(engine.reserved_tokens(), 36);

  // A prefill past the reservation is refused before it runs: the context stays usable.
  const auto prompt = seeded_tokens(30, 1);
  engine.prefill(2, prompt);
  const auto more = seeded_tokens(7, 2);
  EXPECT_EQ(kind_of([&] { engine.prefill(2, more); }), ErrorKind::kCapacity);
  engine.prefill(2, std::span<const int32_t>(more).first(6));
  EXPECT_EQ(kind_of([&] { engine.decode(2, SamplingParams{}); }), ErrorKind::kCapacity);

  EXPECT_EQ(kind_of([&] { engine.decode(9, SamplingParams{}); }), ErrorKind::kNotFound);
  EXPECT_EQ(kind_of([&] { engine.fork_context(9, 10, 8); }), ErrorKind::kNotFound);
  const std::vector<int32_t> bad = {1, 320};
  EXPECT_EQ(kind_of([&] { engine.create_context(3, full, 8); engine.prefill(3, bad); }), ErrorKind::kInvalidArgument);
  EXPECT_EQ(kind_of([&] { engine.detokenize(bad); }), ErrorKind::kInvalidArgument);
  AttentionConfig esa;  // esa needs compression weights the engine was not given
  try {
    engine.create_context(4, esa, 8);
    ADD_FAILURE() << "esa without compression weights was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_EQ(std::string(e.what()).rfind("attention.mode: ", 0), 0u) << e.what();
  }
  EXPECT_EQ(kind_of([&] { ModelEngineOptions o = options(); o.backend = "tpu"; ModelEngine bad_engine(o, *comm); }),
            ErrorKind::kInvalidArgument);
  engine.health_step();
  EXPECT_EQ(engine.usage().contexts, 2);  // 2 and 3 (its refused prefill left it in place)
}

// LagKV evicts during prefill and decode; a fork must carry the evicted rows and the partitions
// already scored (ContextAttention::copy_state_from), or its decode would part from a fresh one.
// The attention share is measured on a context's first decode step and every N-th after it
// (never in prefill), in every layer, the three parts summing to 1 per layer.
TEST_F(ModelEngineTest, AttentionShareIsSampledEveryNthDecodeStep) {
  auto comm = std::move(make_local_communicators(1).front());
  ModelEngineOptions o = options();
  o.attention_share_every = 3;
  ModelEngine engine(o, *comm);
  const int layers = engine.info().layers;
  engine.create_context(1, topk(), 64);
  EXPECT_EQ(engine.prefill(1, seeded_tokens(40, 3)).share_layers, 0);
  std::vector<int64_t> measured;
  for (int step = 0; step < 6; ++step) {
    const StepStats s = engine.decode(1, {.temperature = 0}).stats;
    if (s.share_layers > 0) {
      measured.push_back(step);
      EXPECT_EQ(s.share_layers, layers);
      EXPECT_NEAR(s.share_initial + s.share_selected + s.share_local, layers, 1e-5);
      EXPECT_GT(s.share_initial, 0.0);
      EXPECT_GT(s.share_selected, 0.0) << "exact-topk with |M| > k attends to selected tokens";
      EXPECT_GT(s.share_local, 0.0);
    }
  }
  EXPECT_EQ(measured, (std::vector<int64_t>{0, 3}));

  o.attention_share_every = 0;  // never
  ModelEngine quiet(o, *comm);
  quiet.create_context(1, topk(), 64);
  quiet.prefill(1, seeded_tokens(40, 3));
  for (int step = 0; step < 2; ++step) EXPECT_EQ(quiet.decode(1, {.temperature = 0}).stats.share_layers, 0);
}

TEST_F(ModelEngineTest, ForkCarriesLagKvEvictionState) {
  const auto prompt = seeded_tokens(40, 5);
  const std::span<const int32_t> first = std::span<const int32_t>(prompt).first(24), rest = std::span<const int32_t>(prompt).subspan(24);
  AttentionConfig lag = topk();
  lag.lag = 4;
  lag.lag_ratio = 0.5;
  SamplingParams sampling;
  sampling.temperature = 0.7;
  sampling.seed = 11;
  const int steps = 12;
  std::vector<std::vector<int32_t>> fresh(2), forked(2);
  std::vector<int64_t> fresh_rows(2), forked_rows(2);
  ModelEngineOptions o = options();
  o.kv_capacity_tokens = 200;
  o.chunk = 24;
  run_local_ranks(2, [&](int rank, Communicator& comm) {
    ModelEngine engine(o, comm);
    const auto r = static_cast<size_t>(rank);
    const auto decode_n = [&](ContextId id, std::vector<int32_t>& out) { decode_into(engine, id, sampling, steps, out); };
    engine.create_context(1, lag, 40);
    engine.prefill(1, first);
    engine.prefill(1, rest);
    engine.fork_context(1, 2, 40 + steps);
    engine.release_context(1);  // the fork owns its copy
    decode_n(2, forked[r]);
    forked_rows[r] = engine.usage().kv_tokens;
    engine.release_context(2);
    engine.create_context(3, lag, 40 + steps);
    engine.prefill(3, first);
    engine.prefill(3, rest);
    decode_n(3, fresh[r]);
    fresh_rows[r] = engine.usage().kv_tokens;
  });
  ASSERT_FALSE(fresh[0].empty());
  EXPECT_EQ(forked[0], fresh[0]);
  EXPECT_EQ(forked[1], fresh[1]);
  EXPECT_EQ(forked_rows, fresh_rows) << "the fork holds the rows a fresh prefill holds (evicted ones gone)";
  EXPECT_LT(fresh_rows[0] + fresh_rows[1], 40 + static_cast<int64_t>(fresh[0].size())) << "LagKV evicted nothing";
}

// On 2 ranks: a fork continues exactly as a fresh prefill of the same chunks, decode draws the
// tokens generate() draws, the source is unchanged by its fork, and usage adds up across ranks.
TEST_F(ModelEngineTest, ForkAndDecodeMatchAFreshPrefillAndGenerate) {
  const auto prompt = seeded_tokens(40, 3);
  const std::span<const int32_t> first = std::span<const int32_t>(prompt).first(24), rest = std::span<const int32_t>(prompt).subspan(24);
  SamplingParams sampling;
  sampling.temperature = 0.8;
  sampling.seed = 9;
  const int steps = 10;
  std::vector<std::vector<int32_t>> fresh(2), forked(2), source(2), reference(2);
  std::vector<EngineUsage> usage(2);
  ModelEngineOptions o = options();
  o.kv_capacity_tokens = 200;
  o.chunk = 24;  // the engine splits longer prefills; selection is per chunk, so keep 24 + 16 whole
  run_local_ranks(2, [&](int rank, Communicator& comm) {
    ModelEngine engine(o, comm);
    const auto r = static_cast<size_t>(rank);
    const auto decode_n = [&](ContextId id, std::vector<int32_t>& out) { decode_into(engine, id, sampling, steps, out); };
    engine.create_context(1, topk(), 40);
    engine.prefill(1, first);
    engine.prefill(1, rest);
    engine.fork_context(1, 2, 40 + steps);
    decode_n(2, forked[r]);
    engine.create_context(3, topk(), 40 + steps);
    engine.prefill(3, first);
    engine.prefill(3, rest);
    usage[r] = engine.usage();
    decode_n(3, fresh[r]);
    engine.release_context(2);
    engine.release_context(3);
    // The source was not changed by its fork: it samples the same tokens (room for steps - 1 more).
    engine.fork_context(1, 4, 40 + steps);
    decode_n(4, source[r]);

    // generate() on the model runtime with the same chunks and sampling.
    ContextAttentionOptions ao = engine.model().attention_options(topk(), nullptr, 40 + steps);
    ao.kv_block = 4;
    auto backend = make_cpu_backend();
    ContextAttention context(*backend, comm, ao);
    GenerateOptions g;
    g.max_tokens = steps;
    g.chunk = 24;  // 24 then 16: the chunks above
    g.sampling = {sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed};
    g.stop_ids = engine.model().config().eos_token_ids;
    reference[r] = generate(engine.model(), context, nullptr, prompt, g).tokens;
  });
  ASSERT_FALSE(fresh[0].empty());
  EXPECT_EQ(forked[0], fresh[0]);
  EXPECT_EQ(source[0], fresh[0]);
  EXPECT_EQ(reference[0], fresh[0]);
  EXPECT_EQ(fresh[1], fresh[0]) << "every rank samples the same token";
  // Contexts 1 and 3 hold 40 tokens each, the fork 2 40 + what it decoded, split over the ranks
  // (blocks of 4 alternate).
  EXPECT_EQ(usage[0].contexts, 3);
  // Decoded tokens are appended unless they end the sequence.
  int64_t fork_decoded = 0;
  const ModelConfig config = ModelConfig::load(dir_);
  for (int32_t t : forked[0])
    if (std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), t) == config.eos_token_ids.end()) ++fork_decoded;
  EXPECT_EQ(usage[0].kv_tokens + usage[1].kv_tokens, 40 + 40 + 40 + fork_decoded);
  EXPECT_GT(usage[1].kv_tokens, 0);
  EXPECT_GT(usage[0].kv_bytes, 0);
}

}  // namespace
}  // namespace unshackle
