// The `unshackle` binary, run as a user runs it: make-case -> attn -> the output file equals
// reference_step on the same case bit for bit, for every mode and with eviction; --ranks P
// agrees with one rank; bad metadata and broken files exit 2 naming the field or file, and
// write no output.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <fmt/format.h>

#include "case_file.h"
#include "test_data.h"
#include "tolerance.h"
#include "unshackle/common/safetensors.h"

namespace unshackle {
namespace {

struct CommandRun {
  int status = -1;
  std::string output;
};

CommandRun run(const std::string& args) {
  CommandRun r;
  const std::string command = std::string(UNSHACKLE_BIN) + " " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe)) r.output.append(buffer, n);
  const int status = pclose(pipe);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string temp(const std::string& name) { return ::testing::TempDir() + "/" + name; }

TEST(AttnCli, EveryModeEqualsReferenceBitForBit) {
  int index = 0;
  for (const char* mode : {"full", "esa", "exact-topk", "streaming", "block"}) {
    for (const char* ratio : {"0", "0.5"}) {
      const std::string c = temp("case" + std::to_string(index) + ".safetensors");
      const std::string o = temp("out" + std::to_string(index) + ".safetensors");
      ++index;
      const CommandRun made = run(fmt::format("make-case --output {} --mode {} --p 700 --chunk 3 --heads 4 --kv-heads 2 "
                                       "--head-dim 16 --rank 8 --top-k 40 --l-i 8 --l-l 96 --block 8 --lag 32 "
                                       "--lag-ratio {} --needles 4 --seed {}",
                                       c, mode, ratio, index));
      ASSERT_EQ(made.status, 0) << made.output;
      const CommandRun attn = run("attn --input " + c + " --output " + o);
      ASSERT_EQ(attn.status, 0) << attn.output;
      const StepCase step = read_case_file(c);
      const StepResult want = reference_step(step);
      const auto got = SafetensorsFile::open(o);
      EXPECT_EQ(got->to_f32("o"), want.o) << mode;
      EXPECT_EQ(got->to_i64("selected"), want.selected) << mode;
      EXPECT_EQ(got->to_i64("evicted"), want.evicted) << mode;
      EXPECT_EQ(got->info("o").shape, (std::vector<int64_t>{3, 4, 16}));
      if (std::string(ratio) != "0") {
        EXPECT_FALSE(want.evicted.empty()) << mode;
      }
      // The distributed path over 3 in-process ranks writes the same sets and nearly the same o.
      const std::string o3 = o + ".p3";
      const CommandRun three = run("attn --ranks 3 --kv-block 16 --input " + c + " --output " + o3);
      ASSERT_EQ(three.status, 0) << three.output;
      const auto got3 = SafetensorsFile::open(o3);
      EXPECT_EQ(got3->to_i64("selected"), want.selected) << mode;
      EXPECT_EQ(got3->to_i64("evicted"), want.evicted) << mode;
      EXPECT_LT(testing::relative_error(got3->to_f32("o"), want.o), tolerance::kDistributed) << mode;
    }
  }
}

TEST(AttnCli, Bf16InputsAreAccepted) {
  const std::string c = temp("bf16.safetensors"), o = temp("bf16_out.safetensors");
  const auto q = testing::normal_vector(2 * 4 * 8, 1), k = testing::normal_vector(50 * 2 * 8, 2),
             v = testing::normal_vector(50 * 2 * 8, 3);
  const auto to_bf16 = [](const std::vector<float>& x) {
    std::vector<uint16_t> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = float_to_bf16(x[i]);
    return out;
  };
  SafetensorsWriter writer;
  const auto qb = to_bf16(q), kb = to_bf16(k), vb = to_bf16(v);
  writer.add("q", DType::kBF16, {2, 4, 8}, {reinterpret_cast<const uint8_t*>(qb.data()), qb.size() * 2});
  writer.add("k", DType::kBF16, {50, 2, 8}, {reinterpret_cast<const uint8_t*>(kb.data()), kb.size() * 2});
  writer.add("v", DType::kBF16, {50, 2, 8}, {reinterpret_cast<const uint8_t*>(vb.data()), vb.size() * 2});
  writer.set_metadata("mode", "exact-topk");
  writer.set_metadata("l_I", "4");
  writer.set_metadata("l_L", "16");
  writer.set_metadata("top_k", "5");
  writer.write(c);
  const CommandRun attn = run("attn --input " + c + " --output " + o);
  ASSERT_EQ(attn.status, 0) << attn.output;
  EXPECT_EQ(SafetensorsFile::open(o)->to_i64("selected").size(), 5u);
}

TEST(AttnCli, BadInputExitsTwoNamingTheField) {
  const auto q = testing::normal_vector(1 * 4 * 8, 4), k = testing::normal_vector(40 * 2 * 8, 5);
  const auto wq = testing::normal_vector(6 * 32, 6), wk = testing::normal_vector(6 * 16, 7);
  struct Bad {
    std::string name;
    std::map<std::string, std::string> metadata;
    bool drop_q = false, wrong_k = false, odd_heads = false;
    std::string expected;
  };
  const std::vector<Bad> cases = {
      {"unknown mode", {{"mode", "foo"}}, false, false, false, "mode"},
      {"top_k zero", {{"top_k", "0"}}, false, false, false, "top_k"},
      {"top_k not a number", {{"top_k", "x"}}, false, false, false, "top_k"},
      {"lag above window", {{"lag_ratio", "0.5"}, {"lag", "64"}, {"l_L", "32"}}, false, false, false, "l_L"},
      {"lag_ratio above one", {{"lag_ratio", "1.5"}}, false, false, false, "lag_ratio"},
      {"missing q", {}, true, false, false, "'q'"},
      {"wrong k shape", {}, false, true, false, "'k'"},
      {"H not a multiple of G", {}, false, false, true, "H"},
  };
  int index = 0;
  for (const Bad& bad : cases) {
    const std::string c = temp("bad" + std::to_string(index) + ".safetensors");
    const std::string o = temp("bad_out" + std::to_string(index++) + ".safetensors");
    SafetensorsWriter writer;
    const int H = bad.odd_heads ? 3 : 4;
    if (!bad.drop_q) writer.add_f32("q", {1, H, 8}, std::span<const float>(q).subspan(0, static_cast<size_t>(H) * 8));
    if (bad.wrong_k) {
      writer.add_f32("k", {40, 16}, k);
    } else {
      writer.add_f32("k", {40, 2, 8}, k);
    }
    writer.add_f32("v", {40, 2, 8}, k);
    writer.add_f32("wq", {6, H * 8}, std::span<const float>(wq).subspan(0, static_cast<size_t>(6 * H * 8)));
    writer.add_f32("wk", {6, 16}, wk);
    for (const auto& [key, value] : bad.metadata) writer.set_metadata(key, value);
    writer.write(c);
    std::filesystem::remove(o);
    const CommandRun attn = run("attn --input " + c + " --output " + o);
    EXPECT_EQ(attn.status, 2) << bad.name << ": " << attn.output;
    EXPECT_NE(attn.output.find("error:"), std::string::npos) << bad.name;
    EXPECT_NE(attn.output.find(bad.expected), std::string::npos) << bad.name << ": " << attn.output;
    EXPECT_FALSE(std::filesystem::exists(o)) << bad.name << ": no output on error";
  }
  // A file that is not safetensors at all.
  const std::string junk = temp("junk.safetensors");
  FILE* f = std::fopen(junk.c_str(), "wb");
  std::fputs("this is not a safetensors file", f);
  std::fclose(f);
  const CommandRun attn = run("attn --input " + junk + " --output " + temp("junk_out.safetensors"));
  EXPECT_EQ(attn.status, 2) << attn.output;
  EXPECT_NE(attn.output.find("junk.safetensors"), std::string::npos) << attn.output;
  EXPECT_FALSE(std::filesystem::exists(temp("junk_out.safetensors")));
}

}  // namespace
}  // namespace unshackle
