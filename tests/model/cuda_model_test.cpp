// The CUDA model against the CPU model (the oracle) on generated checkpoints of every
// architecture: all-position prompt logits within the dtype's tolerance, greedy tokens equal
// (for 16-bit weights up to a documented near tie), chunked prefill, biases (Qwen2), tied
// embeddings, sparse modes and two ranks on one GPU. Skips, saying why, without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <ostream>

#include "model_fixtures.h"
#include "tolerance.h"
#include "unshackle/cluster/communicator.h"
#include "unshackle/common/check.h"
#include "unshackle/model/cuda_model.h"
#include "unshackle/model/generate.h"

namespace unshackle::testing {
namespace {

double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += std::pow(static_cast<double>(got[i]) - want[i], 2);
    den += std::pow(static_cast<double>(want[i]), 2);
  }
  return std::sqrt(num / den);
}

GenerateResult run_cpu(const std::shared_ptr<const Model>& model, std::span<const int32_t> prompt,
                       const GenerateOptions& o, const AttentionConfig& attention, int ranks = 1) {
  std::vector<GenerateResult> results(static_cast<size_t>(ranks));
  run_local_ranks(ranks, [&](int rank, Communicator& comm) {
    auto backend = make_cpu_backend();
    ContextAttentionOptions options = model->attention_options(attention, nullptr);
    options.kv_block = 8;
    ContextAttention context(*backend, comm, options);
    results[static_cast<size_t>(rank)] = generate(*model, context, nullptr, prompt, o);
  });
  return results[0];
}

GenerateResult run_cuda(const std::shared_ptr<const Model>& model, std::span<const int32_t> prompt,
                        const GenerateOptions& o, const AttentionConfig& attention, int ranks = 1) {
  std::vector<GenerateResult> results(static_cast<size_t>(ranks));
  run_local_ranks(ranks, [&](int rank, Communicator& comm) {
    CudaModel cuda(model, 0, CudaModel::default_weight_dtype(model->config()));
    auto backend = make_cuda_backend(0);
    ContextAttentionOptions options = model->attention_options(attention, nullptr);
    options.kv_block = 8;
    ContextAttention context(*backend, comm, options);
    results[static_cast<size_t>(rank)] = generate(cuda, context, nullptr, prompt, o);
  });
  return results[0];
}

// Greedy tokens must agree; with 16-bit weights (activations rounded to bf16 on the GPU, not
// on the CPU) they may part at a near tie: there the CPU's logits of the two tokens must lie
// within `tie` of each other, and later steps are not compared (the contexts differ).
void expect_same_greedy(const GenerateResult& cpu, const GenerateResult& gpu, int64_t vocab, double tie) {
  ASSERT_EQ(cpu.tokens.size(), gpu.tokens.size());
  for (size_t i = 0; i < cpu.tokens.size(); ++i) {
    if (cpu.tokens[i] == gpu.tokens[i]) continue;
    const float* l = cpu.step_logits.data() + i * static_cast<size_t>(vocab);
    const double gap = l[cpu.tokens[i]] - l[gpu.tokens[i]];
    EXPECT_LT(gap, tie) << "step " << i << ": CPU took " << cpu.tokens[i] << ", CUDA " << gpu.tokens[i]
                        << ", not a near tie";
    return;
  }
}

struct Case {
  const char* arch;
  DType dtype;
  bool tied;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.arch << " " << dtype_name(c.dtype) << (c.tied ? " tied" : "");
}

class CudaVsCpu : public ::testing::TestWithParam<Case> {};

TEST_P(CudaVsCpu, LogitsAndGreedyTokens) {
  if (CudaModel::device_count() == 0) GTEST_SKIP() << "no CUDA device (CPU-only machine or a build without CUDA)";
  const Case c = GetParam();
  ScratchDir dir(std::string("cuda_") + c.arch);
  MakeModelOptions m = small_model(c.arch, 21);
  m.hidden = 128;   // head dim 32 x 4 heads: the CUDA attention kernel takes d = 64 or 128,
  m.heads = 2;      // so d = 64 here
  m.kv_heads = 1;
  m.dtype = c.dtype;
  m.tie_embeddings = c.tied;
  make_model(m, dir.path());
  const auto model = Model::load(dir.path());
  ASSERT_EQ(model->config().head_dim, 64);
  EXPECT_EQ(CudaModel::default_weight_dtype(model->config()), c.dtype);
  const auto prompt = seeded_tokens(45, model->config().vocab, 4);
  GenerateOptions o;
  o.max_tokens = 16;
  o.chunk = 16;  // three prefill chunks
  o.record_logits = true;
  const bool half = c.dtype != DType::kF32;
  const double bound = half ? tolerance::kBF16 : tolerance::kF32;
  for (const AttentionConfig& attention :
       {AttentionConfig{.mode = AttentionMode::kFull},
        AttentionConfig{.mode = AttentionMode::kStreaming, .l_I = 4, .l_L = 16}}) {
    SCOPED_TRACE(std::string(mode_name(attention.mode)));
    const GenerateResult cpu = run_cpu(model, prompt, o, attention);
    const GenerateResult gpu = run_cuda(model, prompt, o, attention);
    ASSERT_EQ(gpu.prompt_logits.size(), cpu.prompt_logits.size());
    const double err = relative_error(gpu.prompt_logits, cpu.prompt_logits);
    EXPECT_LT(err, bound) << "prompt logits";
    std::printf("[ %s %s %s ] prompt logits relative error %.2e (bound %.0e)\n", c.arch,
                std::string(dtype_name(c.dtype)).c_str(), std::string(mode_name(attention.mode)).c_str(), err, bound);
    if (half) {
      expect_same_greedy(cpu, gpu, model->config().vocab, 0.05);
    } else {
      EXPECT_EQ(gpu.tokens, cpu.tokens);
      EXPECT_LT(relative_error(gpu.step_logits, cpu.step_logits), bound) << "step logits";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Model, CudaVsCpu,
                         ::testing::Values(Case{"llama", DType::kF32, false}, Case{"llama3", DType::kF32, false},
                                           Case{"mistral", DType::kF32, false}, Case{"qwen2", DType::kF32, false},
                                           Case{"qwen2", DType::kF32, true}, Case{"llama3", DType::kBF16, false},
                                           Case{"qwen2", DType::kBF16, false}, Case{"mistral", DType::kF16, false}),
                         [](const ::testing::TestParamInfo<Case>& p) {
                           return std::string(p.param.arch) + "_" + std::string(dtype_name(p.param.dtype)) +
                                  (p.param.tied ? "_tied" : "");
                         });

TEST(CudaModel, TwoRanksOnOneGpuEqualOneRankAndSparseModeRuns) {
  if (CudaModel::device_count() == 0) GTEST_SKIP() << "no CUDA device (CPU-only machine or a build without CUDA)";
  ScratchDir dir("cuda_ranks");
  MakeModelOptions m = small_model("llama3", 5);
  m.hidden = 256;
  m.heads = 4;
  m.kv_heads = 2;
  make_model(m, dir.path());
  const auto model = Model::load(dir.path());
  const auto prompt = seeded_tokens(80, model->config().vocab, 9);
  GenerateOptions o;
  o.max_tokens = 10;
  o.chunk = 32;
  o.sampling = {.temperature = 0.8, .seed = 4};
  const AttentionConfig topk{.mode = AttentionMode::kExactTopk, .l_I = 4, .l_L = 16, .top_k = 8};
  const GenerateResult one = run_cuda(model, prompt, o, topk, 1);
  const GenerateResult two = run_cuda(model, prompt, o, topk, 2);
  EXPECT_EQ(one.tokens.size(), 10u);
  EXPECT_EQ(two.tokens, one.tokens);
}

TEST(CudaModel, CpuContextIsRefused) {
  if (CudaModel::device_count() == 0) GTEST_SKIP() << "no CUDA device (CPU-only machine or a build without CUDA)";
  ScratchDir dir("cuda_refuse");
  make_model(small_model("llama"), dir.path());
  const auto model = Model::load(dir.path());
  CudaModel cuda(model, 0, DType::kF32);
  run_local_ranks(1, [&](int, Communicator& comm) {
    auto backend = make_cpu_backend();
    ContextAttention context(*backend, comm, model->attention_options({.mode = AttentionMode::kFull}, nullptr));
    std::vector<float> logits;
    const std::vector<int32_t> tokens = {1, 2, 3};
    EXPECT_THROW(cuda.forward_chunk(context, tokens, logits), Error);
  });
}

TEST(CudaModel, WithoutCudaTheErrorIsClear) {
  if (CudaModel::device_count() > 0) GTEST_SKIP() << "a CUDA device is present: the refusal path does not apply";
  ScratchDir dir("cuda_none");
  make_model(small_model("llama"), dir.path());
  const auto model = Model::load(dir.path());
  try {
    CudaModel cuda(model, 0, DType::kF32);
    ADD_FAILURE() << "no error without a GPU";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUnsupported);
    EXPECT_NE(std::string(e.what()).find("--backend cuda"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace unshackle::testing
