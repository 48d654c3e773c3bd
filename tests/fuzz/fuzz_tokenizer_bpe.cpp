// fuzz_tokenizer_bpe: a Hugging Face tokenizer.json (byte-level BPE) and a text. The input is
//   tokenizer.json \0 text
// (JSON has no raw NUL, so the first one splits them). An accepted file must encode valid
// UTF-8 text to ids in [0, vocab_size()) (the contract of Tokenizer) or refuse with an
// Error, refuse invalid UTF-8, and decode any ids >= 0 (also the text's bytes as ids).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_check.h"
#include "unshackle/common/error.h"
#include "unshackle/model/tokenizer.h"

using namespace unshackle;

namespace {

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    i += len;
  }
  return true;
}

void check_ids(const Tokenizer& t, const std::vector<int32_t>& ids) {
  for (int32_t id : ids) FUZZ_CHECK(id >= 0 && id < t.vocab_size(), "encode gave id {} of a vocabulary of {}", id, t.vocab_size());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string json_text = input.substr(0, nul);
  const std::string text = nul == std::string::npos ? std::string() : input.substr(nul + 1);
  std::unique_ptr<BpeTokenizer> t;
  try {
    t = BpeTokenizer::parse(json_text, "fuzz/tokenizer.json");
  } catch (const Error& e) {
    FUZZ_CHECK(e.kind() == ErrorKind::kInvalidArgument || e.kind() == ErrorKind::kUnsupported, "kind {}: {}",
               error_kind_name(e.kind()), e.what());
    return 0;
  }
  if (!valid_utf8(text)) {
    try {
      t->encode(text);
      FUZZ_CHECK(false, "invalid UTF-8 was encoded");
    } catch (const Error& e) {
      FUZZ_CHECK(e.kind() == ErrorKind::kInvalidArgument, "kind {}: {}", error_kind_name(e.kind()), e.what());
    }
  } else {
    try {
      for (bool add_special : {true, false}) {
        const auto ids = t->encode(text, add_special);
        check_ids(*t, ids);
        t->decode(ids);
        t->decode(ids, true);
      }
      t->pretokenize(text);  // what make-model trains on
    } catch (const Error&) {
      // A vocabulary without some byte-level symbol, a regex past PCRE2's match limit: refused.
    }
  }
  // Any ids >= 0 decode (unknown ones to nothing).
  std::vector<int32_t> ids;
  for (size_t i = 0; i + 4 <= text.size() && ids.size() < 64; i += 4) {
    int32_t id;
    std::memcpy(&id, text.data() + i, 4);
    ids.push_back(id & 0x7fffffff);
  }
  t->decode(ids);
  t->decode(ids, true);
  for (int32_t id : ids) t->is_special(id);
  t->token_id(text);
  return 0;
}
