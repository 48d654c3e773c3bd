// Shared helpers of the model tests: scratch directories and small generated checkpoints.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <string>

#include "unshackle/model/make_model.h"

namespace unshackle::testing {

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
