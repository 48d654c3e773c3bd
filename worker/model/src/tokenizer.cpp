// The byte-level and SentencePiece tokenizers, and the loader that picks one.
#include "unshackle/model/tokenizer.h"

#include <fmt/format.h>
#include <sentencepiece_processor.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "unshackle/common/check.h"

namespace unshackle {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(fs::exists(path) ? ErrorKind::kIo : ErrorKind::kNotFound, fmt::format("{}: cannot open", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Bytes

ByteTokenizer::ByteTokenizer(std::vector<std::string> specials, int bos_index)
    : specials_(std::move(specials)), bos_index_(bos_index) {
  UNS_CHECK(bos_index_ >= -1 && bos_index_ < static_cast<int>(specials_.size()), "byte tokenizer: bos index {} of {}",
            bos_index_, specials_.size());
  for (const std::string& s : specials_) UNS_CHECK(!s.empty(), "byte tokenizer: empty special token");
}

std::unique_ptr<ByteTokenizer> ByteTokenizer::load(const std::string& path) {
  try {
    const Json j = Json::parse(read_file(path));
    UNS_CHECK_KIND(kInvalidArgument, j.value("type", "") == "bytes", "{}: 'type' must be \"bytes\"", path);
    return std::make_unique<ByteTokenizer>(j.at("specials").get<std::vector<std::string>>(),
                                           j.value("bos_index", -1));
  } catch (const Json::exception& e) {
    fail(ErrorKind::kInvalidArgument, fmt::format("{}: not a valid byte tokenizer file: {}", path, e.what()));
  }
}

void ByteTokenizer::save(const std::string& path) const {
  const Json j = {{"type", "bytes"}, {"specials", specials_}, {"bos_index", bos_index_}};
  std::ofstream out(path, std::ios::binary);
  out << j.dump(2) << "\n";
  UNS_CHECK_KIND(kIo, out.good(), "{}: write failed", path);
}

std::vector<int32_t> ByteTokenizer::encode(std::string_view text, bool add_special) const {
  std::vector<int32_t> out;
  if (add_special && bos_index_ >= 0) out.push_back(256 + bos_index_);
  for (size_t at = 0; at < text.size();) {
    int32_t hit = -1;
    size_t hit_len = 0;
    for (size_t s = 0; s < specials_.size(); ++s) {
      if (specials_[s].size() > hit_len && text.compare(at, specials_[s].size(), specials_[s]) == 0) {
        hit = 256 + static_cast<int32_t>(s);
        hit_len = specials_[s].size();
      }
    }
    if (hit >= 0) {
      out.push_back(hit);
      at += hit_len;
    } else {
      out.push_back(static_cast<unsigned char>(text[at++]));
    }
  }
  return out;
}

std::string ByteTokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) {
    UNS_CHECK_KIND(kInvalidArgument, id >= 0, "decode: negative token id {}", id);
    if (id >= vocab_size()) continue;  // a padded model vocabulary: no text
    if (id < 256) {
      out += static_cast<char>(id);
    } else if (!skip_special) {
      out += specials_[static_cast<size_t>(id - 256)];
    }
  }
  return out;
}

int32_t ByteTokenizer::token_id(std::string_view text) const {
  for (size_t s = 0; s < specials_.size(); ++s)
    if (specials_[s] == text) return 256 + static_cast<int32_t>(s);
  if (text.size() == 1) return static_cast<unsigned char>(text[0]);
  return -1;
}

// ---------------------------------------------------------------------------------------
// SentencePiece

struct SentencePieceTokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  std::vector<std::pair<std::string, int32_t>> specials;  // control pieces and <unk>, longest first
  bool add_bos = true, add_eos = false;
};

SentencePieceTokenizer::SentencePieceTokenizer() : impl_(std::make_unique<Impl>()) {}
SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::load(const std::string& path, bool add_bos,
                                                                     bool add_eos) {
  if (!fs::exists(path)) fail(ErrorKind::kNotFound, fmt::format("{}: no such file", path));
  std::unique_ptr<SentencePieceTokenizer> t(new SentencePieceTokenizer());
  Impl& m = *t->impl_;
  // libsentencepiece throws its own exceptions on some malformed models (a zero-length piece:
  // darts' "zero-length key"); they become the Error every loader throws, naming the file.
  const auto status = [&] {
    try {
      return m.sp.Load(path);
    } catch (const std::exception& e) {
      fail(ErrorKind::kInvalidArgument, fmt::format("{}: not a SentencePiece model: {}", path, e.what()));
    }
  }();
  UNS_CHECK_KIND(kInvalidArgument, status.ok(), "{}: not a SentencePiece model: {}", path, status.ToString());
  m.add_bos = add_bos;
  m.add_eos = add_eos;
  for (int id = 0; id < m.sp.GetPieceSize(); ++id) {
    if (m.sp.IsControl(id) || m.sp.IsUnknown(id)) m.specials.emplace_back(m.sp.IdToPiece(id), id);
  }
  std::stable_sort(m.specials.begin(), m.specials.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  return t;
}

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text, bool add_special) const {
  const Impl& m = *impl_;
  std::vector<int32_t> out;
  if (add_special && m.add_bos && m.sp.bos_id() >= 0) out.push_back(m.sp.bos_id());
  const auto encode_plain = [&](std::string_view piece) {
    if (piece.empty()) return;
    std::vector<int> ids;
    const auto status = m.sp.Encode(std::string(piece), &ids);
    UNS_CHECK_KIND(kInvalidArgument, status.ok(), "encode: {}", status.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
  };
  // Special tokens written in the text are split out first (transformers' LlamaTokenizer).
  size_t plain_begin = 0;
  for (size_t at = 0; at < text.size();) {
    int32_t hit = -1;
    size_t hit_len = 0;
    for (const auto& [piece, id] : m.specials) {
      if (!piece.empty() && text.compare(at, piece.size(), piece) == 0) {
        hit = id;
        hit_len = piece.size();
        break;
      }
    }
    if (hit < 0) {
      ++at;
      continue;
    }
    encode_plain(text.substr(plain_begin, at - plain_begin));
    out.push_back(hit);
    at += hit_len;
    plain_begin = at;
  }
  encode_plain(text.substr(plain_begin));
  if (add_special && m.add_eos && m.sp.eos_id() >= 0) out.push_back(m.sp.eos_id());
  return out;
}

std::string SentencePieceTokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  const Impl& m = *impl_;
  std::string out;
  std::vector<int> run;
  const auto flush = [&] {
    if (run.empty()) return;
    std::string text;
    const auto status = m.sp.Decode(run, &text);
    UNS_CHECK_KIND(kInvalidArgument, status.ok(), "decode: {}", status.ToString());
    out += text;
    run.clear();
  };
  for (int32_t id : ids) {
    UNS_CHECK_KIND(kInvalidArgument, id >= 0, "decode: negative token id {}", id);
    if (id >= m.sp.GetPieceSize()) continue;  // a padded model vocabulary: no text
    if (is_special(id)) {
      flush();
      if (!skip_special) out += m.sp.IdToPiece(id);
    } else {
      run.push_back(id);
    }
  }
  flush();
  return out;
}

int64_t SentencePieceTokenizer::vocab_size() const { return impl_->sp.GetPieceSize(); }

int32_t SentencePieceTokenizer::token_id(std::string_view text) const {
  const int id = impl_->sp.PieceToId(std::string(text));
  if (id == impl_->sp.unk_id() && text != impl_->sp.IdToPiece(id)) return -1;
  return id;
}

bool SentencePieceTokenizer::is_special(int32_t id) const {
  return id >= 0 && id < impl_->sp.GetPieceSize() && (impl_->sp.IsControl(id) || impl_->sp.IsUnknown(id));
}

// ---------------------------------------------------------------------------------------

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& model_dir) {
  const fs::path dir(model_dir);
  if (fs::exists(dir / "unshackle_tokenizer.json")) return ByteTokenizer::load((dir / "unshackle_tokenizer.json").string());
  if (fs::exists(dir / "tokenizer.json")) return BpeTokenizer::load((dir / "tokenizer.json").string());
  if (fs::exists(dir / "tokenizer.model")) {
    // tokenizer_config.json's add_bos_token / add_eos_token when present (Llama-2: BOS only).
    bool add_bos = true, add_eos = false;
    if (fs::exists(dir / "tokenizer_config.json")) {
      try {
        const Json j = Json::parse(read_file((dir / "tokenizer_config.json").string()));
        if (j.contains("add_bos_token") && j["add_bos_token"].is_boolean()) add_bos = j["add_bos_token"].get<bool>();
        if (j.contains("add_eos_token") && j["add_eos_token"].is_boolean()) add_eos = j["add_eos_token"].get<bool>();
      } catch (const Json::exception& e) {
        fail(ErrorKind::kInvalidArgument,
             fmt::format("{}: not valid JSON: {}", (dir / "tokenizer_config.json").string(), e.what()));
      }
    }
    return SentencePieceTokenizer::load((dir / "tokenizer.model").string(), add_bos, add_eos);
  }
  fail(ErrorKind::kNotFound,
       fmt::format("model '{}': no tokenizer (unshackle_tokenizer.json, tokenizer.json or tokenizer.model)", model_dir));
}

}  // namespace unshackle
