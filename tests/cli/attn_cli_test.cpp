// The `unshackle` binary, run as a user runs it: make-case -> attn -> the output file equals
// reference_step on the same case bit for bit, for every mode and with eviction, from float32
// and half-precision files; --ranks P agrees with one rank; bad metadata and broken files
// exit 2 naming the file and the field, and write no output.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
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
      const CommandRun made =
          run(fmt::format("make-case --output {} --mode {} --p 700 --chunk 3 --heads 4 --kv-heads 2 --head-dim 16 "
                          "--rank 8 --top-k 40 --l-i 8 --l-l 96 --block 8 --lag 32 --lag-ratio {} --needles 4 --seed {}",
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
      // The planted needles align with the query: exact top-k must pick every one, and ESA's
      // compressed scores (wk consistent with wq) find them too.
      const std::string m = mode;
      if (std::string(ratio) == "0" && (m == "exact-topk" || m == "esa")) {
        for (int64_t t : SafetensorsFile::open(c)->to_i64("needles"))
          EXPECT_TRUE(std::binary_search(want.selected.begin(), want.selected.end(), t)) << mode << ": needle " << t;
        EXPECT_NE(attn.output.find("needles selected: 4 of 4"), std::string::npos) << attn.output;
      }
      EXPECT_EQ(got->metadata().at("mode"), mode);
      EXPECT_EQ(got->metadata().at("lag_ratio"), ratio);
      EXPECT_EQ(got->metadata().at("top_k"), "40");
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

// A case in a half-precision dtype runs, and equals the reference on the converted case.
TEST(AttnCli, HalfPrecisionInputsAreAccepted) {
  for (const DType dtype : {DType::kBF16, DType::kF16}) {
    const std::string name(dtype_name(dtype));
    const std::string c = temp("half_" + name + ".safetensors"), o = temp("half_" + name + "_out.safetensors");
    const auto to_half = [&](const std::vector<float>& x) {
      std::vector<uint16_t> out(x.size());
      for (size_t i = 0; i < x.size(); ++i) out[i] = dtype == DType::kBF16 ? float_to_bf16(x[i]) : float_to_fp16(x[i]);
      return out;
    };
    const auto bytes = [](const std::vector<uint16_t>& x) {
      return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(x.data()), x.size() * 2);
    };
    const auto q = to_half(testing::normal_vector(2 * 4 * 8, 1)), k = to_half(testing::normal_vector(50 * 2 * 8, 2)),
               v = to_half(testing::normal_vector(50 * 2 * 8, 3));
    SafetensorsWriter writer;
    writer.add("q", dtype, {2, 4, 8}, bytes(q));
    writer.add("k", dtype, {50, 2, 8}, bytes(k));
    writer.add("v", dtype, {50, 2, 8}, bytes(v));
    writer.set_metadata("mode", "exact-topk");
    writer.set_metadata("l_I", "4");
    writer.set_metadata("l_L", "16");
    writer.set_metadata("top_k", "5");
    writer.write(c);
    const CommandRun attn = run("attn --input " + c + " --output " + o);
    ASSERT_EQ(attn.status, 0) << name << ": " << attn.output;
    const StepCase step = read_case_file(c);
    EXPECT_EQ(step.k[3], dtype == DType::kBF16 ? bf16_to_float(k[3]) : fp16_to_float(k[3])) << name;
    const StepResult want = reference_step(step);
    const auto got = SafetensorsFile::open(o);
    EXPECT_EQ(got->info("o").dtype, DType::kF32);
    EXPECT_EQ(got->to_f32("o"), want.o) << name;
    EXPECT_EQ(got->to_i64("selected"), want.selected) << name;
    EXPECT_EQ(want.selected.size(), 5u) << name;
    EXPECT_EQ(got->info("evicted").shape, std::vector<int64_t>{0}) << name << ": empty tensors have shape [0]";
  }
}

// The parts of a small valid case; each bad case changes one thing.
struct CaseParts {
  std::vector<float> q = testing::normal_vector(1 * 4 * 8, 4), k = testing::normal_vector(40 * 2 * 8, 5),
                     v = testing::normal_vector(40 * 2 * 8, 6), wq = testing::normal_vector(6 * 32, 7),
                     wk = testing::normal_vector(6 * 16, 8);
  std::vector<int64_t> q_shape = {1, 4, 8}, k_shape = {40, 2, 8}, v_shape = {40, 2, 8}, wq_shape = {6, 32},
                       wk_shape = {6, 16};
  bool has_q = true, has_wq = true, has_wk = true;
  std::map<std::string, std::string> metadata = {{"mode", "esa"}, {"l_I", "4"}, {"l_L", "16"}, {"top_k", "8"}};

  void write(const std::string& path) const {
    SafetensorsWriter writer;
    if (has_q) writer.add_f32("q", q_shape, q);
    writer.add_f32("k", k_shape, k);
    writer.add_f32("v", v_shape, v);
    if (has_wq) writer.add_f32("wq", wq_shape, wq);
    if (has_wk) writer.add_f32("wk", wk_shape, wk);
    for (const auto& [key, value] : metadata) writer.set_metadata(key, value);
    writer.write(path);
  }
};

TEST(AttnCli, BadInputExitsTwoNamingTheField) {
  struct Bad {
    std::string name;
    std::function<void(CaseParts&)> change;
    std::string expected;  // substring of stderr
  };
  const std::vector<Bad> cases = {
      {"unknown mode", [](CaseParts& c) { c.metadata["mode"] = "foo"; }, "mode: unknown attention mode 'foo'"},
      {"top_k zero", [](CaseParts& c) { c.metadata["top_k"] = "0"; }, "top_k: must be > 0"},
      {"top_k not a number", [](CaseParts& c) { c.metadata["top_k"] = "x"; },
       "metadata 'top_k': expected an integer, got 'x'"},
      {"top_k trailing junk", [](CaseParts& c) { c.metadata["top_k"] = "12abc"; },
       "metadata 'top_k': expected an integer, got '12abc'"},
      {"top_k fractional", [](CaseParts& c) { c.metadata["top_k"] = "1.5"; }, "metadata 'top_k'"},
      {"lag_ratio not a number", [](CaseParts& c) { c.metadata["lag_ratio"] = "half"; },
       "metadata 'lag_ratio': expected a number, got 'half'"},
      {"lag_ratio nan", [](CaseParts& c) { c.metadata["lag_ratio"] = "nan"; }, "lag_ratio"},
      {"lag_ratio above one", [](CaseParts& c) { c.metadata["lag_ratio"] = "1.5"; }, "lag_ratio: must be in [0, 1]"},
      {"l_L below lag with eviction",
       [](CaseParts& c) {
         c.metadata["lag_ratio"] = "0.5";
         c.metadata["lag"] = "64";
         c.metadata["l_L"] = "32";
       },
       "l_L: must be >= lag"},
      {"rope_theta zero", [](CaseParts& c) { c.metadata["rope_theta"] = "0"; }, "rope_theta"},
      {"missing q", [](CaseParts& c) { c.has_q = false; }, "missing tensor 'q'"},
      {"wrong k shape", [](CaseParts& c) { c.k_shape = {40, 16}; }, "tensor 'k': expected 3 dims"},
      {"v unlike k", [](CaseParts& c) { c.v_shape = {20, 4, 8}; }, "tensor 'v'"},
      {"head dims differ", [](CaseParts& c) { c.k_shape = {20, 2, 16}; c.v_shape = {20, 2, 16}; }, "head dim"},
      {"H not a multiple of G",
       [](CaseParts& c) {
         c.q_shape = {1, 3, 8};
         c.q.resize(24);
         c.wq_shape = {8, 24};
       },
       "H: "},
      {"esa without wq, wk", [](CaseParts& c) { c.has_wq = c.has_wk = false; }, "wq"},
      {"wq without wk", [](CaseParts& c) { c.has_wk = false; }, "'wq': given without 'wk'"},
      {"wq of the wrong width", [](CaseParts& c) { c.wq_shape = {12, 16}; }, "tensor 'wq': expected [d', H*d = 32]"},
  };
  int index = 0;
  for (const Bad& bad : cases) {
    const std::string c = temp("bad" + std::to_string(index) + ".safetensors");
    const std::string o = temp("bad_out" + std::to_string(index++) + ".safetensors");
    CaseParts parts;
    bad.change(parts);
    parts.write(c);
    std::filesystem::remove(o);
    const CommandRun attn = run("attn --input " + c + " --output " + o);
    EXPECT_EQ(attn.status, 2) << bad.name << ": " << attn.output;
    EXPECT_EQ(attn.output.rfind("error: " + c + ": ", 0), 0u) << bad.name << ": names the file: " << attn.output;
    EXPECT_NE(attn.output.find(bad.expected), std::string::npos) << bad.name << ": " << attn.output;
    EXPECT_FALSE(std::filesystem::exists(o)) << bad.name << ": no output on error";
  }
  // The unchanged parts are a valid case, so each failure above is the change's doing.
  const std::string good = temp("good.safetensors"), good_out = temp("good_out.safetensors");
  CaseParts().write(good);
  const CommandRun ok = run("attn --input " + good + " --output " + good_out);
  EXPECT_EQ(ok.status, 0) << ok.output;
  EXPECT_EQ(SafetensorsFile::open(good_out)->to_i64("selected").size(), 8u);
  // Streaming needs no wq, wk.
  CaseParts streaming;
  streaming.has_wq = streaming.has_wk = false;
  streaming.metadata["mode"] = "streaming";
  streaming.write(good);
  const CommandRun plain = run("attn --input " + good + " --output " + good_out);
  EXPECT_EQ(plain.status, 0) << plain.output;
}

TEST(AttnCli, BrokenOrMissingFilesExitTwoWithoutOutput) {
  // A file that is not safetensors at all.
  const std::string junk = temp("junk.safetensors"), junk_out = temp("junk_out.safetensors");
  FILE* f = std::fopen(junk.c_str(), "wb");
  std::fputs("this is not a safetensors file", f);
  std::fclose(f);
  std::filesystem::remove(junk_out);
  const CommandRun attn = run("attn --input " + junk + " --output " + junk_out);
  EXPECT_EQ(attn.status, 2) << attn.output;
  EXPECT_NE(attn.output.find("error: " + junk + ": header length"), std::string::npos) << attn.output;
  EXPECT_FALSE(std::filesystem::exists(junk_out));

  // A real case cut short: the tensors run past the end.
  const std::string whole = temp("whole.safetensors"), cut = temp("cut.safetensors"), cut_out = temp("cut_out.st");
  ASSERT_EQ(run("make-case --output " + whole + " --mode full --p 100 --heads 2 --kv-heads 1 --head-dim 8").status, 0);
  std::filesystem::copy_file(whole, cut, std::filesystem::copy_options::overwrite_existing);
  std::filesystem::resize_file(cut, std::filesystem::file_size(whole) - 100);
  std::filesystem::remove(cut_out);
  const CommandRun truncated = run("attn --input " + cut + " --output " + cut_out);
  EXPECT_EQ(truncated.status, 2) << truncated.output;
  EXPECT_NE(truncated.output.find("beyond the"), std::string::npos) << truncated.output;
  EXPECT_FALSE(std::filesystem::exists(cut_out));

  const CommandRun missing = run("attn --input " + temp("no_such.safetensors") + " --output " + cut_out);
  EXPECT_EQ(missing.status, 2) << missing.output;
  EXPECT_NE(missing.output.find("no_such.safetensors: cannot open"), std::string::npos) << missing.output;

  // Writing where no directory exists is the system's failure, not the input's: exit 1.
  const CommandRun unwritable = run("attn --input " + whole + " --output " + temp("no/such/dir/out.safetensors"));
  EXPECT_EQ(unwritable.status, 1) << unwritable.output;
  EXPECT_NE(unwritable.output.find("no/such/dir/out.safetensors"), std::string::npos) << unwritable.output;

  // Usage errors are bad input too.
  EXPECT_EQ(run("attn --input " + whole).status, 2);
  EXPECT_EQ(run("no-such-command").status, 2);
  const CommandRun heads = run("make-case --output " + temp("x.safetensors") + " --heads 3 --kv-heads 2");
  EXPECT_EQ(heads.status, 2) << heads.output;
  EXPECT_NE(heads.output.find("--heads (3) must be a positive multiple of --kv-heads (2)"), std::string::npos)
      << heads.output;
  EXPECT_EQ(run("--help").status, 0);
}

// Same seed, same file; another seed, other data; q does not depend on --p (hashed streams).
TEST(AttnCli, MakeCaseIsSeeded) {
  const std::string a = temp("seed_a.st"), b = temp("seed_b.st"), c = temp("seed_c.st"), d = temp("seed_d.st");
  const std::string common = " --mode esa --heads 4 --kv-heads 2 --head-dim 8 --rank 4 --l-l 32 --needles 2";
  ASSERT_EQ(run("make-case --output " + a + common + " --p 300 --seed 5").status, 0);
  ASSERT_EQ(run("make-case --output " + b + common + " --p 300 --seed 5").status, 0);
  ASSERT_EQ(run("make-case --output " + c + common + " --p 300 --seed 6").status, 0);
  ASSERT_EQ(run("make-case --output " + d + common + " --p 400 --seed 5").status, 0);
  const auto fa = SafetensorsFile::open(a), fb = SafetensorsFile::open(b), fc = SafetensorsFile::open(c),
             fd = SafetensorsFile::open(d);
  for (const char* name : {"q", "k", "v", "wq", "wk"}) {
    EXPECT_EQ(fa->to_f32(name), fb->to_f32(name)) << name;
    EXPECT_NE(fa->to_f32(name), fc->to_f32(name)) << name;
  }
  EXPECT_EQ(fa->to_f32("q"), fd->to_f32("q"));
  EXPECT_EQ(fa->to_i64("needles"), fb->to_i64("needles"));
  const auto k = fa->to_f32("k");
  EXPECT_GT(testing::norm(k), 0.5 * std::sqrt(static_cast<double>(k.size())));
  EXPECT_EQ(std::count(k.begin(), k.end(), 0.0f), 0);
}

}  // namespace
}  // namespace unshackle
