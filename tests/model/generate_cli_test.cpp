// The `unshackle` binary, run as a user runs it: make-model writes a checkpoint, generate
// reads it. Seeded sampling is deterministic; --ranks P (2..4) and `mpirun -np 2/3` give the
// tokens of one rank; esa without --compression exits 2 naming the flag; esa with top_k
// >= |M| equals exact-topk (the selection is all of M whatever the compression scores);
// --backend cuda refuses clearly where there is no GPU, and equals the CPU where there is;
// --kv-dtype takes bf16 and f32 and refuses anything else.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "model_fixtures.h"
#include "tolerance.h"
#include "unshackle/common/safetensors.h"
#include "unshackle/model/cuda_model.h"

namespace unshackle::testing {
namespace {

struct CommandRun {
  int status = -1;
  std::string output;  // stdout and stderr
};

CommandRun run_command(const std::string& command) {
  CommandRun r;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return r;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe)) r.output.append(buffer, n);
  const int status = pclose(pipe);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

CommandRun unshackle(const std::string& args) { return run_command(std::string(UNSHACKLE_BIN) + " " + args); }

// The JSON line `generate --json` prints (the last line of the output).
nlohmann::json generated(const CommandRun& r) {
  EXPECT_EQ(r.status, 0) << r.output;
  const size_t start = r.output.rfind('{');
  if (r.status != 0 || start == std::string::npos) return nlohmann::json::object();
  return nlohmann::json::parse(r.output.substr(start));
}

std::vector<int32_t> tokens_of(const CommandRun& r) {
  const auto j = generated(r);
  return j.contains("tokens") ? j["tokens"].get<std::vector<int32_t>>() : std::vector<int32_t>{};
}

const char* const kPrompt =
    "Attention selects the tokens that matter: the initial tokens, the local window, and the top-k. "
    "In the beginning the context was short, and then it grew to a million tokens.";

class GenerateCli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new ScratchDir("cli_bin");
    const CommandRun made = unshackle(fmt::format(
        "make-model --arch qwen2 --layers 2 --hidden 48 --heads 4 --kv-heads 2 --vocab 300 --seed 11 --output {}",
        dir_->path()));
    ASSERT_EQ(made.status, 0) << made.output;
    ASSERT_NE(made.output.find("Qwen2ForCausalLM"), std::string::npos) << made.output;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  // generate with the shared prompt; `extra` adds or overrides flags.
  static std::string args(const std::string& extra) {
    const char* chunk = extra.find("--chunk") == std::string::npos ? "--chunk 16" : "";
    return fmt::format("generate --model {} --prompt '{}' --max-tokens 12 --ignore-eos --json {} {}", dir_->path(),
                       kPrompt, chunk, extra);
  }
  static ScratchDir* dir_;
};
ScratchDir* GenerateCli::dir_ = nullptr;

TEST_F(GenerateCli, SeededSamplingIsDeterministic) {
  const auto a = tokens_of(unshackle(args("--temperature 0.9 --seed 5")));
  const auto b = tokens_of(unshackle(args("--temperature 0.9 --seed 5")));
  const auto c = tokens_of(unshackle(args("--temperature 0.9 --seed 6")));
  const auto chunked = tokens_of(unshackle(args("--temperature 0.9 --seed 5 --chunk 5")));
  ASSERT_EQ(a.size(), 12u);
  EXPECT_EQ(a, b);
  EXPECT_EQ(a, chunked) << "the chunk size must not change the draw";
  EXPECT_NE(a, c) << "another seed should draw other tokens";
  const auto greedy = generated(unshackle(args("")));
  EXPECT_EQ(greedy["finish_reason"], "length");
  EXPECT_GT(greedy["prompt_tokens"].size(), 60u);
}

TEST_F(GenerateCli, RanksEqualOneRank) {
  for (const char* mode : {"full", "exact-topk --top-k 8 --l-i 4 --l-l 16"}) {
    SCOPED_TRACE(mode);
    const std::string common = fmt::format("--temperature 0.8 --seed 3 --kv-block 8 --mode {}", mode);
    const auto one = tokens_of(unshackle(args(common)));
    ASSERT_EQ(one.size(), 12u);
    for (int ranks = 2; ranks <= 4; ++ranks) {
      EXPECT_EQ(tokens_of(unshackle(args(common + fmt::format(" --ranks {}", ranks)))), one) << ranks << " ranks";
    }
  }
}

TEST_F(GenerateCli, MpirunEqualsOneRank) {
#ifndef UNS_MPIEXEC
  GTEST_SKIP() << "built without MPI (UNS_HAVE_MPI=0): no mpirun to launch";
#else
  const std::string common = "--temperature 0.8 --seed 3 --kv-block 8 --mode exact-topk --top-k 8 --l-i 4 --l-l 16";
  const auto one = tokens_of(unshackle(args(common)));
  ASSERT_EQ(one.size(), 12u);
  for (int np : {2, 3}) {
    const CommandRun r = run_command(fmt::format(
        "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 {} --oversubscribe -np {} {} {}", UNS_MPIEXEC, np,
        UNSHACKLE_BIN, args(common)));
    // Only rank 0 prints: exactly one JSON line.
    size_t lines = 0;
    for (size_t at = r.output.find("\"tokens\""); at != std::string::npos; at = r.output.find("\"tokens\"", at + 1)) {
      ++lines;
    }
    EXPECT_EQ(lines, 1u) << r.output;
    EXPECT_EQ(tokens_of(r), one) << "mpirun -np " << np << ": " << r.output;
  }
#endif
}

TEST_F(GenerateCli, EsaWithoutCompressionRefusesNamingTheFlag) {
  const CommandRun r = unshackle(args("--mode esa --top-k 8"));
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("--compression"), std::string::npos) << r.output;
  const CommandRun missing = unshackle(args(fmt::format("--mode esa --compression {}", dir_->sub("absent.safetensors"))));
  EXPECT_EQ(missing.status, 2) << missing.output;
  EXPECT_NE(missing.output.find("absent.safetensors"), std::string::npos) << missing.output;
  const CommandRun no_model = unshackle(fmt::format("generate --model {} --prompt hi", dir_->sub("nowhere")));
  EXPECT_EQ(no_model.status, 2) << no_model.output;
  EXPECT_NE(no_model.output.find("nowhere"), std::string::npos) << no_model.output;
}

TEST_F(GenerateCli, EsaSelectingAllOfMEqualsExactTopk) {
  // Seeded random compression weights (d' = 8): with top_k >= |M| every token of M is
  // selected whatever the scores, so esa must equal exact-topk.
  const int layers = 2, dc = 8, qw = 4 * 12, kw = 2 * 12;
  SafetensorsWriter w;
  uint64_t s = 99;
  const auto next = [&] {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<float>(static_cast<double>(s >> 40) / 16777216.0 - 0.5);
  };
  for (int l = 0; l < layers; ++l) {
    std::vector<float> wq(static_cast<size_t>(dc * qw)), wk(static_cast<size_t>(dc * kw));
    for (auto& x : wq) x = next();
    for (auto& x : wk) x = next();
    w.add_f32(fmt::format("layers.{}.wq", l), {dc, qw}, wq);
    w.add_f32(fmt::format("layers.{}.wk", l), {dc, kw}, wk);
  }
  w.write(dir_->sub("esa.safetensors"));
  const std::string window = "--l-i 4 --l-l 16 --top-k 1000";
  const CommandRun esa = unshackle(args(fmt::format("--mode esa {} --compression {} --logits-out {}", window,
                                                    dir_->sub("esa.safetensors"), dir_->sub("esa_logits.safetensors"))));
  const CommandRun topk =
      unshackle(args(fmt::format("--mode exact-topk {} --logits-out {}", window, dir_->sub("topk_logits.safetensors"))));
  EXPECT_EQ(tokens_of(esa), tokens_of(topk));
  EXPECT_EQ(tokens_of(esa).size(), 12u);
  const auto a = SafetensorsFile::open(dir_->sub("esa_logits.safetensors"));
  const auto b = SafetensorsFile::open(dir_->sub("topk_logits.safetensors"));
  // Same selection, same attention: equal to float rounding (the esa path may sum in another order).
  for (const char* name : {"prompt_logits", "step_logits"}) {
    const std::vector<float> x = a->to_f32(name), y = b->to_f32(name);
    ASSERT_EQ(x.size(), y.size());
    double num = 0, den = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      num += std::pow(static_cast<double>(x[i]) - y[i], 2);
      den += std::pow(static_cast<double>(y[i]), 2);
    }
    EXPECT_LT(std::sqrt(num / den), tolerance::kF32) << name;
  }
  // A small top_k makes the compression matter: esa then runs (and may differ).
  const CommandRun small = unshackle(
      args(fmt::format("--mode esa --l-i 4 --l-l 16 --top-k 4 --compression {}", dir_->sub("esa.safetensors"))));
  EXPECT_EQ(tokens_of(small).size(), 12u);
}

TEST_F(GenerateCli, CudaBackendRefusesWithoutAGpuOrEqualsTheCpu) {
  const CommandRun cpu = unshackle(args("--backend cpu"));
  const CommandRun cuda = unshackle(args("--backend cuda --kv-dtype f32"));
  const CommandRun bad = unshackle(args("--backend tpu"));
  EXPECT_EQ(bad.status, 2) << bad.output;
  EXPECT_NE(bad.output.find("--backend"), std::string::npos) << bad.output;
  if (CudaModel::device_count() == 0) {
    EXPECT_EQ(cuda.status, 2) << cuda.output;
    EXPECT_NE(cuda.output.find("--backend cuda"), std::string::npos) << cuda.output;
    GTEST_SKIP() << "no CUDA device: checked the clear refusal only";
  }
  // f32 weights and KV: the CPU's tokens. The default bf16 KV runs too (its numerics against
  // the CPU are model_cuda_test's: bf16 bounds and the near-tie rule).
  EXPECT_EQ(tokens_of(cuda), tokens_of(cpu));
  EXPECT_EQ(tokens_of(unshackle(args("--backend cuda"))).size(), 12u);
}

// --kv-dtype: auto on the CPU is f32 (the same logits, bit for bit), bf16 storage runs on the
// CPU too (the CPU backend reads it) and moves the logits by bf16 rounding only, and anything
// else exits 2 naming the flag.
TEST_F(GenerateCli, KvDtypeFlag) {
  const auto logits = [&](const std::string& flags, const std::string& name) {
    const std::string path = dir_->sub("kv_" + name + ".safetensors");
    EXPECT_EQ(tokens_of(unshackle(args(flags + " --logits-out " + path))).size(), 12u) << flags;
    return SafetensorsFile::open(path)->to_f32("prompt_logits");
  };
  const std::vector<float> f32 = logits("--kv-dtype f32", "f32"), automatic = logits("", "auto"),
                           bf16 = logits("--kv-dtype bf16", "bf16");
  EXPECT_EQ(automatic, f32) << "auto on the CPU is f32";
  ASSERT_EQ(bf16.size(), f32.size());
  EXPECT_NE(bf16, f32) << "bf16 storage should round K and V";
  double num = 0, den = 0;
  for (size_t i = 0; i < f32.size(); ++i) {
    num += std::pow(static_cast<double>(bf16[i]) - f32[i], 2);
    den += std::pow(static_cast<double>(f32[i]), 2);
  }
  EXPECT_LT(std::sqrt(num / den), tolerance::kBF16);
  const CommandRun bad = unshackle(args("--kv-dtype f16"));
  EXPECT_EQ(bad.status, 2) << bad.output;
  EXPECT_NE(bad.output.find("--kv-dtype: auto, bf16 or f32 (got 'f16')"), std::string::npos) << bad.output;
}

}  // namespace
}  // namespace unshackle::testing
