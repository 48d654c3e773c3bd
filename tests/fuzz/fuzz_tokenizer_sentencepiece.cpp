// fuzz_tokenizer_sentencepiece: a tokenizer.model (SentencePiece) and a text, through
// SentencePieceTokenizer (libsentencepiece loads the model; our code splits the special
// tokens out of the text and maps ids). The input is
//   text \0 tokenizer.model
// written to a scratch file per input, since load() takes a path. An accepted model must
// encode to ids in [0, vocab_size()) and decode any ids >= 0.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "fuzz_check.h"
#include "unshackle/common/error.h"
#include "unshackle/model/tokenizer.h"

using namespace unshackle;

namespace {

// Never destroyed, so the exit handler that removes the file can still read it.
const std::string& scratch_path() {
  static const std::string* path = [] {
    auto* p = new std::string(
        (std::filesystem::temp_directory_path() / fmt::format("uns_fuzz_sp_{}.model", ::getpid())).string());
    std::atexit([] {
      std::error_code ignored;
      std::filesystem::remove(scratch_path(), ignored);
    });
    return p;
  }();
  return *path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  if (nul == std::string::npos) return 0;
  const std::string text = input.substr(0, nul);
  {
    std::ofstream out(scratch_path(), std::ios::binary | std::ios::trunc);
    out.write(input.data() + nul + 1, static_cast<std::streamsize>(size - nul - 1));
  }
  std::unique_ptr<SentencePieceTokenizer> t;
  try {
    // The text's first byte picks the BOS/EOS settings (tokenizer_config.json's).
    const unsigned flags = text.empty() ? 1u : static_cast<unsigned char>(text[0]);
    t = SentencePieceTokenizer::load(scratch_path(), flags & 1u, flags & 2u);
  } catch (const Error& e) {
    FUZZ_CHECK(e.kind() == ErrorKind::kInvalidArgument, "kind {}: {}", error_kind_name(e.kind()), e.what());
    return 0;
  }
  try {
    for (bool add_special : {true, false}) {
      const auto ids = t->encode(text, add_special);
      for (int32_t id : ids)
        FUZZ_CHECK(id >= 0 && id < t->vocab_size(), "encode gave id {} of a vocabulary of {}", id, t->vocab_size());
      t->decode(ids);
      t->decode(ids, true);
    }
  } catch (const Error& e) {
    FUZZ_CHECK(e.kind() == ErrorKind::kInvalidArgument, "kind {}: {}", error_kind_name(e.kind()), e.what());
  }
  std::vector<int32_t> ids;
  for (size_t i = 0; i + 4 <= text.size() && ids.size() < 64; i += 4) {
    int32_t id;
    std::memcpy(&id, text.data() + i, 4);
    ids.push_back(id & 0x7fffffff);
  }
  try {
    t->decode(ids);
    t->decode(ids, true);
  } catch (const Error& e) {
    FUZZ_CHECK(e.kind() == ErrorKind::kInvalidArgument, "kind {}: {}", error_kind_name(e.kind()), e.what());
  }
  for (int32_t id : ids) t->is_special(id);
  t->token_id(text);
  return 0;
}
