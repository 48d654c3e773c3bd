// Shared helpers of the model tests: scratch directories and small generated checkpoints.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "unshackle/model/make_model.h"

namespace unshackle::testing {

// n token ids in [0, vocab) from a 64-bit LCG seeded with `seed`: prompts that differ per seed
// and are the same on every run and rank.
inline std::vector<int32_t> seeded_tokens(size_t n, int64_t vocab, uint64_t seed) {
  std::vector<int32_t> t(n);
  uint64_t s = seed;
  for (auto& x : t) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = static_cast<int32_t>((s >> 33) % static_cast<uint64_t>(vocab));
  }
  return t;
}

// A fresh directory under the system temp dir, removed at scope end.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& tag) {
    static int counter = 0;
    path_ = std::filesystem::temp_directory_path() /
            ("uns_model_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() { std::filesystem::remove_all(path_); }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  std::string path() const { return path_.string(); }
  std::string sub(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

inline MakeModelOptions small_model(const std::string& arch, uint64_t seed = 7) {
  MakeModelOptions o;
  o.arch = arch;
  o.layers = 2;
  o.hidden = 48;
  o.heads = 4;
  o.kv_heads = 2;
  o.vocab = 300;
  o.seed = seed;
  return o;
}

}  // namespace unshackle::testing
