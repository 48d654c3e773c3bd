// The CUDA model against the CPU model (the oracle) on generated checkpoints of every
// architecture: all-position prompt logits within the dtype's tolerance, greedy tokens equal
// (for 16-bit weights or KV up to a documented near tie), chunked prefill, biases (Qwen2),
// tied embeddings, sparse modes, two ranks on one GPU, the KV in bf16 (the GPU default) and
// f32, head dims 32 (needle-llama's shape, and the trained needle-llama itself with ESA), 64,
// 96, 128 and 256. Skips, saying why, without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <ostream>

#include "model_fixtures.h"
#include "tolerance.h"
#include "unshackle/cluster/communicator.h"
#include "unshackle/common/check.h"
#include "unshackle/model/cuda_model.h"
#include "unshackle/model/generate.h"

namespace unshackle::testing {
namespace {

constexpr const char* kNoGpu = "no CUDA device (CPU-only machine or a build without CUDA)";

double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += std::pow(static_cast<double>(got[i]) - want[i], 2);
    den += std::pow(static_cast<double>(want[i]), 2);
  }
  return std::sqrt(num / den);
}

struct RunOptions {
  DType kv = DType::kF32;                        // ContextAttention's kv_dtype
  const CompressionWeights* compression = nullptr;  // esa / block
  int ranks = 1;
};

GenerateResult run_cpu(const std::shared_ptr<const Model>& model, std::span<const int32_t> prompt,
                       const GenerateOptions& o, const AttentionConfig& attention, const RunOptions& r = {}) {
  std::vector<GenerateResult> results(static_cast<size_t>(r.ranks));
  run_local_ranks(r.ranks, [&](int rank, Communicator& comm) {
    auto backend = make_cpu_backend();
    ContextAttentionOptions options = model->attention_options(attention, r.compression);
    options.kv_block = 8;
    options.kv_dtype = r.kv;
    ContextAttention context(*backend, comm, options);
    results[static_cast<size_t>(rank)] = generate(*model, context, nullptr, prompt, o);
  });
  return results[0];
}

// Also checks that the context stores K and V in r.kv on the GPU (2 G d elements a token).
GenerateResult run_cuda(const std::shared_ptr<const Model>& model, std::span<const int32_t> prompt,
                        const GenerateOptions& o, const AttentionConfig& attention, const RunOptions& r = {}) {
  std::vector<GenerateResult> results(static_cast<size_t>(r.ranks));
  run_local_ranks(r.ranks, [&](int rank, Communicator& comm) {
    CudaModel cuda(model, 0, CudaModel::default_weight_dtype(model->config()));
    auto backend = make_cuda_backend(0);
    ContextAttentionOptions options = model->attention_options(attention, r.compression);
    options.kv_block = 8;
    options.kv_dtype = r.kv;
    ContextAttention context(*backend, comm, options);
    results[static_cast<size_t>(rank)] = generate(cuda, context, nullptr, prompt, o);
    const ModelConfig& c = model->config();
    EXPECT_EQ(context.shard().kv_row_bytes(), 2 * static_cast<size_t>(c.kv_heads) * c.head_dim * dtype_size(r.kv));
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
  DType kv = DType::kF32;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.arch << " " << dtype_name(c.dtype) << (c.tied ? " tied" : "") << " kv " << dtype_name(c.kv);
}

class CudaVsCpu : public ::testing::TestWithParam<Case> {};

TEST_P(CudaVsCpu, LogitsAndGreedyTokens) {
  if (CudaModel::device_count() == 0) GTEST_SKIP() << kNoGpu;
  const Case c = GetParam();
  ScratchDir dir(std::string("cuda_") + c.arch);
  MakeModelOptions m = small_model(c.arch, 21);
  m.hidden = 128;   // head dim 64 here; the other head dims: CudaHeadDims below
  m.heads = 2;
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
  // bf16 KV: the CPU stores bf16 too (same rounding of K, V and k'), and the bound is bf16's.
  const bool half = c.dtype != DType::kF32 || c.kv != DType::kF32;
  const double bound = half ? tolerance::kBF16 : tolerance::kF32;
  const RunOptions run{.kv = c.kv};
  for (const AttentionConfig& attention :
       {AttentionConfig{.mode = AttentionMode::kFull},
        AttentionConfig{.mode = AttentionMode::kStreaming, .l_I = 4, .l_L = 16}}) {
    SCOPED_TRACE(std::string(mode_name(attention.mode)));
    const GenerateResult cpu = run_cpu(model, prompt, o, attention, run);
    const GenerateResult gpu = run_cuda(model, prompt, o, attention, run);
    ASSERT_EQ(gpu.prompt_logits.size(), cpu.prompt_logits.size());
    const double err = relative_error(gpu.prompt_logits, cpu.prompt_logits);
    EXPECT_LT(err, bound) << "prompt logits";
    std::printf("[ %s %s kv %s %s ] prompt logits relative error %.2e (bound %.0e)\n", c.arch,
                std::string(dtype_name(c.dtype)).c_str(), std::string(dtype_name(c.kv)).c_str(),
                std::string(mode_name(attention.mode)).c_str(), err, bound);
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
                                           Case{"qwen2", DType::kBF16, false}, Case{"mistral", DType::kF16, false},
                                           Case{"llama", DType::kF32, false, DType::kBF16},
                                           Case{"llama3", DType::kBF16, false, DType::kBF16},
                                           Case{"qwen2", DType::kBF16, true, DType::kBF16}),
                         [](const ::testing::TestParamInfo<Case>& p) {
                           return std::string(p.param.arch) + "_" + std::string(dtype_name(p.param.dtype)) +
                                  (p.param.tied ? "_tied" : "") + "_kv_" + std::string(dtype_name(p.param.kv));
                         });

// Head dims other than 64: needle-llama's shape (d = 32, 8 heads over 4 KV heads, bf16
// weights), 96 (the generic attention kernel only) and 256 (fast in bf16, generic in f32),
// with the KV in bf16 and in f32, in full, streaming and exact-topk attention. The CPU runs
// the same KV dtype; the bound is f32's only when weights and KV are both f32.
struct HeadDimCase {
  const char* name;
  const char* arch;
  int hidden, heads, kv_heads, head_dim, intermediate;
  DType weights, kv;
};

void PrintTo(const HeadDimCase& c, std::ostream* os) { *os << c.name; }

class CudaHeadDims : public ::testing::TestWithParam<HeadDimCase> {};

TEST_P(CudaHeadDims, EqualsCpuWithinDtypeTolerance) {
  if (CudaModel::device_count() == 0) GTEST_SKIP() << kNoGpu;
  const HeadDimCase c = GetParam();
  ScratchDir dir(std::string("cuda_hd_") + c.name);
  MakeModelOptions m = small_model(c.arch, 33);
  m.hidden = c.hidden;
  m.heads = c.heads;
  m.kv_heads = c.kv_heads;
  m.head_dim = c.head_dim;
  m.intermediate = c.intermediate;
  m.vocab = 259;
  m.dtype = c.weights;
  make_model(m, dir.path());
  const auto model = Model::load(dir.path());
  ASSERT_EQ(model->config().head_dim, c.head_dim);
  const auto prompt = seeded_tokens(70, model->config().vocab, 12);
  GenerateOptions o;
  o.max_tokens = 12;
  o.chunk = 32;  // three prefill chunks
  o.record_logits = true;
  const bool exact = c.weights == DType::kF32 && c.kv == DType::kF32;
  const double bound = exact ? tolerance::kF32 : tolerance::kBF16;
  for (const AttentionConfig& attention :
       {AttentionConfig{.mode = AttentionMode::kFull},
        AttentionConfig{.mode = AttentionMode::kStreaming, .l_I = 4, .l_L = 16},
        AttentionConfig{.mode = AttentionMode::kExactTopk, .l_I = 4, .l_L = 16, .top_k = 8}}) {
    SCOPED_TRACE(std::string(mode_name(attention.mode)));
    const GenerateResult cpu = run_cpu(model, prompt, o, attention, {.kv = c.kv});
    const GenerateResult gpu = run_cuda(model, prompt, o, attention, {.kv = c.kv});
    ASSERT_EQ(gpu.prompt_logits.size(), cpu.prompt_logits.size());
    const double err = relative_error(gpu.prompt_logits, cpu.prompt_logits);
    EXPECT_LT(err, bound) << "prompt logits";
    std::printf("[ %s %s ] prompt logits relative error %.2e (bound %.0e)\n", c.name,
                std::string(mode_name(attention.mode)).c_str(), err, bound);
    if (exact) {
      EXPECT_EQ(gpu.tokens, cpu.tokens);
      EXPECT_LT(relative_error(gpu.step_logits, cpu.step_logits), bound) << "step logits";
    } else {
      expect_same_greedy(cpu, gpu, model->config().vocab, 0.05);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Model, CudaHeadDims,
    ::testing::Values(HeadDimCase{"needle_shape_bf16_kv_bf16", "llama", 256, 8, 4, 32, 688, DType::kBF16, DType::kBF16},
                      HeadDimCase{"needle_shape_bf16_kv_f32", "llama", 256, 8, 4, 32, 688, DType::kBF16, DType::kF32},
                      HeadDimCase{"d32_f32_kv_f32", "llama", 256, 8, 4, 32, 0, DType::kF32, DType::kF32},
                      HeadDimCase{"d96_f32_kv_f32", "llama3", 192, 2, 1, 96, 0, DType::kF32, DType::kF32},
                      HeadDimCase{"d96_f32_kv_bf16", "llama3", 192, 2, 1, 96, 0, DType::kF32, DType::kBF16},
                      HeadDimCase{"d256_f32_kv_f32", "mistral", 256, 2, 1, 256, 0, DType::kF32, DType::kF32},
                      HeadDimCase{"d256_bf16_kv_bf16", "mistral", 256, 2, 1, 256, 0, DType::kBF16, DType::kBF16}),
    [](const ::testing::TestParamInfo<HeadDimCase>& p) { return std::string(p.param.name); });

// The trained needle-llama (models/needle-llama, head dim 32) with ESA and its compression
// weights, as the quickstart serves it: the GPU with the default bf16 KV, over 600 tokens (ESA
// selects from the middle) in chunks of 128, against the CPU with the same bf16 KV (same
// rounding of K, V and k'). The GPU's GEMMs also take bf16 activations where the CPU keeps f32;
// on this trained model that floor is larger than on the small random models above (ESA
// against the same-KV CPU measured 1.24e-2 on an H200, 2026-12-03), so the floor is measured
// here with full attention on the same prompt, and ESA on the GPU may add at most half of it
// again: a wrong selection or a kernel error moves the logits far more. Greedy tokens must
// agree with the CPU both with bf16 KV and with the CPU ranks' f32 KV.
TEST(CudaModel, NeedleLlamaEsaOnGpuEqualsCpu) {
  if (CudaModel::device_count() == 0) GTEST_SKIP() << kNoGpu;
  // The build's source tree, else the current directory's (a test binary carried to the GPU
  // machine runs from that checkout's root).
  std::string dir;
  for (const std::string& candidate : {std::string(UNS_NEEDLE_LLAMA_DIR), std::string("models/needle-llama")})
    if (dir.empty() && std::filesystem::exists(candidate + "/config.json")) dir = candidate;
  if (dir.empty()) GTEST_SKIP() << "no models/needle-llama (" << UNS_NEEDLE_LLAMA_DIR << " or ./models/needle-llama)";
  const auto model = Model::load(dir);
  ASSERT_EQ(model->config().head_dim, 32);
  const CompressionWeights compression = load_compression_weights(dir + "/compression.safetensors", model->config());
  const AttentionConfig esa{.mode = AttentionMode::kEsa, .l_I = 32, .l_L = 256, .top_k = 64};
  const auto prompt = seeded_tokens(600, model->config().vocab, 17);
  GenerateOptions o;
  o.max_tokens = 16;
  o.chunk = 128;
  o.record_logits = true;
  const DType gpu_kv = resolve_kv_dtype("auto", "cuda");
  EXPECT_EQ(gpu_kv, DType::kBF16);
  const AttentionConfig full{.mode = AttentionMode::kFull};
  const double full_err = relative_error(run_cuda(model, prompt, o, full, {.kv = gpu_kv}).prompt_logits,
                                         run_cpu(model, prompt, o, full, {.kv = gpu_kv}).prompt_logits);
  const GenerateResult cpu_same_kv = run_cpu(model, prompt, o, esa, {.kv = gpu_kv, .compression = &compression});
  const GenerateResult cpu_f32_kv = run_cpu(model, prompt, o, esa, {.kv = DType::kF32, .compression = &compression});
  const GenerateResult gpu = run_cuda(model, prompt, o, esa, {.kv = gpu_kv, .compression = &compression});
  const double err = relative_error(gpu.prompt_logits, cpu_same_kv.prompt_logits);
  const double bound = std::max(tolerance::kBF16, 1.5 * full_err);
  std::printf("[ needle-llama full, GPU vs CPU, kv bf16 ] prompt logits relative error %.2e (the bf16-compute floor)\n",
              full_err);
  std::printf("[ needle-llama esa, GPU vs CPU, kv bf16 ] prompt logits relative error %.2e (bound %.2e)\n", err, bound);
  std::printf("[ needle-llama esa, GPU kv bf16 vs CPU kv f32 ] prompt logits relative error %.2e (greedy tokens compared)\n",
              relative_error(gpu.prompt_logits, cpu_f32_kv.prompt_logits));
  EXPECT_LT(full_err, 3 * tolerance::kBF16) << "full attention on the GPU: beyond any bf16 floor";
  EXPECT_LT(err, bound);
  expect_same_greedy(cpu_same_kv, gpu, model->config().vocab, 0.05);
  expect_same_greedy(cpu_f32_kv, gpu, model->config().vocab, 0.05);
}

TEST(CudaModel, TwoRanksOnOneGpuEqualOneRankAndSparseModeRuns) {
  if (CudaModel::device_count() == 0) GTEST_SKIP() << kNoGpu;
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
  const GenerateResult one = run_cuda(model, prompt, o, topk, {.ranks = 1});
  const GenerateResult two = run_cuda(model, prompt, o, topk, {.ranks = 2});
  EXPECT_EQ(one.tokens.size(), 10u);
  EXPECT_EQ(two.tokens, one.tokens);
}

TEST(CudaModel, CpuContextIsRefused) {
  if (CudaModel::device_count() == 0) GTEST_SKIP() << kNoGpu;
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
