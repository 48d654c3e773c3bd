// Hugging Face tokenizer.json, byte-level BPE (see tokenizer.h for what is supported).
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <fmt/format.h>

#include <algorithm>
#include <climits>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "unshackle/common/check.h"
#include "unshackle/model/tokenizer.h"

namespace unshackle {

const char* const kLlama3SplitPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* const kQwen2SplitPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

namespace {

using Json = nlohmann::json;
// The regex of the ByteLevel pre-tokenizer with use_regex (GPT-2).
const char* const kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

[[noreturn]] void bad(const std::string& label, const std::string& what) {
  fail(ErrorKind::kInvalidArgument, fmt::format("{}: {}", label, what));
}

// A token id from the file: an integer in [0, kMaxTokenIds). json's get<int32_t> would convert
// a float out of int's range (undefined behaviour: fuzz_tokenizer_bpe found a vocab id 3.3e48)
// and wrap a large integer. The bound keeps the id -> token table small: it is sized by the
// largest id, and one id of 2^31 - 1 asked for 2^31 strings (64 GiB; found by the fuzzer as an
// out-of-memory). 2^22 is 16x the largest vocabulary in use (262,144 ids).
constexpr int64_t kMaxTokenIds = int64_t{1} << 22;
int32_t parse_token_id(const Json& v, const std::string& label, std::string_view where) {
  const bool in_range = v.is_number_unsigned()  ? v.get<uint64_t>() < static_cast<uint64_t>(kMaxTokenIds)
                        : v.is_number_integer() ? v.get<int64_t>() >= 0 && v.get<int64_t>() < kMaxTokenIds
                                                : false;
  if (!in_range) {
    bad(label, fmt::format("{}: a token id must be an integer in [0, {}), got {}", where, kMaxTokenIds, v.dump()));
  }
  return static_cast<int32_t>(v.get<int64_t>());
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Splits valid UTF-8 into code points; returns false on invalid input.
bool decode_utf8(std::string_view s, std::vector<uint32_t>& cps) {
  cps.clear();
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + static_cast<size_t>(len) > s.size()) return false;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1Fu) : len == 3 ? (c & 0x0Fu) : (c & 0x07u);
    for (int k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + static_cast<size_t>(k)]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3Fu);
    }
    cps.push_back(cp);
    i += static_cast<size_t>(len);
  }
  return true;
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
struct ByteTable {
  std::string byte_to_text[256];
  std::unordered_map<uint32_t, uint8_t> cp_to_byte;
  ByteTable() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      append_utf8(byte_to_text[b], cp);
      cp_to_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};
const ByteTable& byte_table() {
  static const ByteTable table;
  return table;
}

// A compiled PCRE2 regex (UTF + UCP: \p{L}, \s and \w are Unicode-aware as in Oniguruma).
class Regex {
 public:
  Regex(const std::string& pattern, const std::string& label) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &error,
                          &offset, nullptr);
    if (code_ == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof message);
      bad(label, fmt::format("pre-tokenizer regex does not compile at offset {}: {}", offset,
                             reinterpret_cast<const char*>(message)));
    }
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // [begin, end) of every match, left to right (an empty match advances one code point).
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const {
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t at = 0;
    while (at <= s.size()) {
      const int rc = pcre2_match(code_, subject, s.size(), at, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        pcre2_match_data_free(md);
        fail(ErrorKind::kInternal, fmt::format("pre-tokenizer regex failed (PCRE2 error {})", rc));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[1] == ov[0]) {  // empty match: step over one code point
        at = ov[0] + 1;
        while (at < s.size() && (static_cast<unsigned char>(s[at]) & 0xC0) == 0x80) ++at;
        continue;
      }
      out.emplace_back(ov[0], ov[1]);
      at = ov[1];
    }
    pcre2_match_data_free(md);
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
};

struct PreTokenizerStep {
  std::unique_ptr<Regex> regex;  // Split (Isolated) or ByteLevel with use_regex
  bool add_prefix_space = false;
};

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false, lstrip = false, rstrip = false;
};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

}  // namespace

struct BpeTokenizer::Impl {
  std::string label;
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> id_to_token;      // "" for holes
  std::vector<uint8_t> special;              // per id
  std::vector<uint8_t> added;                // per id: an added token (decoded verbatim)
  std::vector<AddedToken> added_tokens;      // longest first
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left, right) -> (rank, merged id)
  std::vector<PreTokenizerStep> pre;
  bool ignore_merges = false;
  std::vector<int32_t> prefix_ids, suffix_ids;  // TemplateProcessing "single" around $A

  static uint64_t pair_key(int32_t a, int32_t b) { return (static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b); }

  void parse_pre_tokenizer(const Json& p) {
    if (p.is_null()) bad(label, "a byte-level BPE needs a ByteLevel pre-tokenizer (pre_tokenizer is null)");
    const std::string type = p.value("type", "");
    if (type == "Sequence") {
      for (const Json& step : p.at("pretokenizers")) parse_pre_tokenizer(step);
    } else if (type == "Split") {
      const Json& pattern = p.at("pattern");
      std::string regex;
      if (pattern.contains("Regex")) {
        regex = pattern["Regex"].get<std::string>();
      } else {
        bad(label, "Split pre-tokenizer: only a Regex pattern is supported");
      }
      if (p.value("behavior", "") != "Isolated" || p.value("invert", false)) {
        fail(ErrorKind::kUnsupported,
             fmt::format("{}: Split pre-tokenizer: only behavior Isolated without invert is supported", label));
      }
      pre.push_back({std::make_unique<Regex>(regex, label), false});
    } else if (type == "ByteLevel") {
      PreTokenizerStep step;
      step.add_prefix_space = p.value("add_prefix_space", false);
      if (p.value("use_regex", true)) step.regex = std::make_unique<Regex>(kGpt2Pattern, label);
      pre.push_back(std::move(step));
      has_byte_level = true;
    } else {
      fail(ErrorKind::kUnsupported, fmt::format("{}: pre-tokenizer type '{}' is not supported", label, type));
    }
  }
  bool has_byte_level = false;

  void parse_post_processor(const Json& p) {
    if (p.is_null()) return;
    const std::string type = p.value("type", "");
    if (type == "Sequence") {
      for (const Json& step : p.at("processors")) parse_post_processor(step);
    } else if (type == "TemplateProcessing") {
      bool seen_a = false;
      for (const Json& item : p.at("single")) {
        if (item.contains("Sequence")) {
          seen_a = true;
        } else if (item.contains("SpecialToken")) {
          const std::string name = item["SpecialToken"].at("id").get<std::string>();
          const Json& spec = p.at("special_tokens").at(name);
          for (const Json& id : spec.at("ids")) {
            const int32_t value = parse_token_id(id, label, "post_processor ids");
            // Parsed after the vocabulary and added_tokens: a template id must name one of
            // them, or encode would hand out an id the tokenizer does not have (found by
            // fuzz_tokenizer_bpe: a misspelt "added_tokens" left the template's <s> dangling).
            if (static_cast<size_t>(value) >= id_to_token.size() || id_to_token[static_cast<size_t>(value)].empty()) {
              bad(label, fmt::format("post_processor special token '{}' has id {}, which is not in the vocabulary "
                                     "or added_tokens ({} ids)", name, value, id_to_token.size()));
            }
            (seen_a ? suffix_ids : prefix_ids).push_back(value);
          }
        }
      }
    } else if (type != "ByteLevel") {
      fail(ErrorKind::kUnsupported, fmt::format("{}: post-processor type '{}' is not supported", label, type));
    }
  }

  void set_token(int32_t id, const std::string& text) {
    UNS_CHECK_KIND(kInvalidArgument, id >= 0, "{}: negative token id {}", label, id);
    if (static_cast<size_t>(id) >= id_to_token.size()) {
      id_to_token.resize(static_cast<size_t>(id) + 1);
      special.resize(static_cast<size_t>(id) + 1, 0);
      added.resize(static_cast<size_t>(id) + 1, 0);
    }
    id_to_token[static_cast<size_t>(id)] = text;
  }

  // Pieces of `text` after every pre-tokenizer step, each already byte-level mapped.
  std::vector<std::string> pretokenize(std::string_view text) const {
    std::vector<std::string> pieces{std::string(text)};
    for (const PreTokenizerStep& step : pre) {
      std::vector<std::string> next;
      for (std::string& piece : pieces) {
        if (step.add_prefix_space && !piece.empty() && piece[0] != ' ') piece.insert(piece.begin(), ' ');
        if (!step.regex) {
          next.push_back(std::move(piece));
          continue;
        }
        size_t last = 0;
        for (const auto& [b, e] : step.regex->find_all(piece)) {
          if (b > last) next.push_back(piece.substr(last, b - last));  // Isolated keeps the gaps too
          next.push_back(piece.substr(b, e - b));
          last = e;
        }
        if (last < piece.size()) next.push_back(piece.substr(last));
      }
      pieces.swap(next);
    }
    const ByteTable& table = byte_table();
    for (std::string& piece : pieces) {
      std::string mapped;
      for (char c : piece) mapped += table.byte_to_text[static_cast<unsigned char>(c)];
      piece.swap(mapped);
    }
    return pieces;
  }

  void bpe(const std::string& word, std::vector<int32_t>& out) const {
    if (ignore_merges) {
      if (auto it = vocab.find(word); it != vocab.end()) {
        out.push_back(it->second);
        return;
      }
    }
    std::vector<uint32_t> cps;
    decode_utf8(word, cps);
    std::vector<int32_t> symbols;
    symbols.reserve(cps.size());
    for (uint32_t cp : cps) {
      std::string ch;
      append_utf8(ch, cp);
      auto it = vocab.find(ch);
      UNS_CHECK_KIND(kInvalidArgument, it != vocab.end(), "{}: the vocabulary lacks the byte-level symbol '{}'", label,
                     ch);
      symbols.push_back(it->second);
    }
    while (symbols.size() > 1) {
      int32_t best_rank = INT32_MAX, best_id = -1;
      size_t best_at = 0;
      for (size_t i = 0; i + 1 < symbols.size(); ++i) {
        auto it = merges.find(pair_key(symbols[i], symbols[i + 1]));
        if (it != merges.end() && it->second.first < best_rank) {
          best_rank = it->second.first;
          best_id = it->second.second;
          best_at = i;
        }
      }
      if (best_id < 0) break;
      symbols[best_at] = best_id;
      symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
    }
    out.insert(out.end(), symbols.begin(), symbols.end());
  }

  // The text split into (added token id or -1, span) parts, added tokens leftmost-longest.
  void encode_plain(std::string_view text, std::vector<int32_t>& out) const {
    if (text.empty()) return;
    for (const std::string& piece : pretokenize(text)) bpe(piece, out);
  }
};

BpeTokenizer::BpeTokenizer() : impl_(std::make_unique<Impl>()) {}
BpeTokenizer::~BpeTokenizer() = default;

std::unique_ptr<BpeTokenizer> BpeTokenizer::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    fail(std::filesystem::exists(path) ? ErrorKind::kIo : ErrorKind::kNotFound, fmt::format("{}: cannot open", path));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return parse(ss.str(), path);
}

std::unique_ptr<BpeTokenizer> BpeTokenizer::parse(const std::string& json_text, const std::string& label) {
  std::unique_ptr<BpeTokenizer> t(new BpeTokenizer());
  Impl& m = *t->impl_;
  m.label = label;
  try {
    const Json j = Json::parse(json_text);
    const Json& model = j.at("model");
    const std::string type = model.value("type", "BPE");
    if (type != "BPE") fail(ErrorKind::kUnsupported, fmt::format("{}: model type '{}' is not supported", label, type));
    if (model.contains("byte_fallback") && model["byte_fallback"].is_boolean() && model["byte_fallback"].get<bool>()) {
      fail(ErrorKind::kUnsupported, fmt::format("{}: byte_fallback BPE is not supported (byte-level only)", label));
    }
    if (j.contains("normalizer") && !j["normalizer"].is_null()) {
      const std::string nt = j["normalizer"].value("type", "");
      if (nt != "NFC") fail(ErrorKind::kUnsupported, fmt::format("{}: normalizer '{}' is not supported", label, nt));
    }
    m.ignore_merges = model.value("ignore_merges", false);
    for (const auto& [text, id] : model.at("vocab").items()) {
      const int32_t value = parse_token_id(id, label, "model.vocab");
      m.vocab[text] = value;
      m.set_token(value, text);
    }
    int32_t rank = 0;
    for (const Json& merge : model.at("merges")) {
      std::string a, b;
      if (merge.is_string()) {
        const std::string s = merge.get<std::string>();
        const size_t space = s.find(' ', 1);
        if (space == std::string::npos) bad(label, fmt::format("merge '{}' has no space", s));
        a = s.substr(0, space);
        b = s.substr(space + 1);
      } else {
        a = merge.at(0).get<std::string>();
        b = merge.at(1).get<std::string>();
      }
      auto ia = m.vocab.find(a), ib = m.vocab.find(b), im = m.vocab.find(a + b);
      if (ia == m.vocab.end() || ib == m.vocab.end() || im == m.vocab.end()) {
        bad(label, fmt::format("merge '{} {}' names a token outside the vocabulary", a, b));
      }
      m.merges.emplace(Impl::pair_key(ia->second, ib->second), std::make_pair(rank++, im->second));
    }
    if (j.contains("added_tokens")) {
      for (const Json& a : j["added_tokens"]) {
        AddedToken tok{a.at("content").get<std::string>(), parse_token_id(a.at("id"), label, "added_tokens"),
                       a.value("special", false), a.value("lstrip", false), a.value("rstrip", false)};
        UNS_CHECK_KIND(kInvalidArgument, !tok.content.empty(), "{}: an added token is empty", label);
        m.set_token(tok.id, tok.content);
        m.vocab[tok.content] = tok.id;
        m.special[static_cast<size_t>(tok.id)] = tok.special;
        m.added[static_cast<size_t>(tok.id)] = 1;
        m.added_tokens.push_back(std::move(tok));
      }
    }
    std::stable_sort(m.added_tokens.begin(), m.added_tokens.end(),
                     [](const AddedToken& x, const AddedToken& y) { return x.content.size() > y.content.size(); });
    m.parse_pre_tokenizer(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : Json());
    if (!m.has_byte_level) {
      fail(ErrorKind::kUnsupported, fmt::format("{}: only byte-level BPE is supported (no ByteLevel pre-tokenizer)", label));
    }
    m.parse_post_processor(j.contains("post_processor") ? j["post_processor"] : Json());
  } catch (const Json::exception& e) {
    bad(label, fmt::format("not a valid tokenizer.json: {}", e.what()));
  }
  return t;
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text, bool add_special) const {
  const Impl& m = *impl_;
  std::vector<uint32_t> check;
  UNS_CHECK_KIND(kInvalidArgument, decode_utf8(text, check), "encode: the text is not valid UTF-8");
  std::vector<int32_t> out;
  if (add_special) out = m.prefix_ids;
  // Added tokens first: leftmost match, longest at that position.
  size_t plain_begin = 0, at = 0;
  while (at < text.size()) {
    const AddedToken* hit = nullptr;
    for (const AddedToken& a : m.added_tokens) {
      if (text.compare(at, a.content.size(), a.content) == 0) {
        hit = &a;
        break;
      }
    }
    if (hit == nullptr) {
      ++at;
      continue;
    }
    size_t plain_end = at;
    if (hit->lstrip) {
      while (plain_end > plain_begin && is_space(text[plain_end - 1])) --plain_end;
    }
    m.encode_plain(text.substr(plain_begin, plain_end - plain_begin), out);
    out.push_back(hit->id);
    at += hit->content.size();
    if (hit->rstrip) {
      while (at < text.size() && is_space(text[at])) ++at;
    }
    plain_begin = at;
  }
  m.encode_plain(text.substr(plain_begin), out);
  if (add_special) out.insert(out.end(), m.suffix_ids.begin(), m.suffix_ids.end());
  return out;
}

std::string BpeTokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  const Impl& m = *impl_;
  const ByteTable& table = byte_table();
  std::string out;
  std::vector<uint32_t> cps;
  for (int32_t id : ids) {
    UNS_CHECK_KIND(kInvalidArgument, id >= 0, "decode: negative token id {}", id);
    const auto i = static_cast<size_t>(id);
    if (i >= m.id_to_token.size() || m.id_to_token[i].empty()) continue;  // a padded model vocabulary: no text
    if (m.added[i]) {
      if (!(skip_special && m.special[i])) out += m.id_to_token[i];
      continue;
    }
    decode_utf8(m.id_to_token[i], cps);
    for (uint32_t cp : cps) {
      auto it = table.cp_to_byte.find(cp);
      if (it != table.cp_to_byte.end()) {
        out += static_cast<char>(it->second);
      } else {
        append_utf8(out, cp);
      }
    }
  }
  return out;
}

int64_t BpeTokenizer::vocab_size() const { return static_cast<int64_t>(impl_->id_to_token.size()); }

int32_t BpeTokenizer::token_id(std::string_view text) const {
  auto it = impl_->vocab.find(std::string(text));
  if (it != impl_->vocab.end()) return it->second;
  // Regular tokens are stored byte-level mapped.
  std::string mapped;
  for (char c : text) mapped += byte_table().byte_to_text[static_cast<unsigned char>(c)];
  it = impl_->vocab.find(mapped);
  return it == impl_->vocab.end() ? -1 : it->second;
}

std::vector<std::string> BpeTokenizer::pretokenize(std::string_view text) const { return impl_->pretokenize(text); }

bool BpeTokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->special.size() && impl_->special[static_cast<size_t>(id)];
}

// ---------------------------------------------------------------------------------------
// Training (make-model)

std::string train_bpe_tokenizer_json(const std::string& corpus, int64_t vocab, const std::string& pattern,
                                     const std::vector<std::string>& specials, bool add_bos) {
  const ByteTable& table = byte_table();
  Json pre;
  if (pattern.empty()) {
    pre = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  } else {
    pre = {{"type", "Sequence"},
           {"pretokenizers",
            {{{"type", "Split"}, {"pattern", {{"Regex", pattern}}}, {"behavior", "Isolated"}, {"invert", false}},
             {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};
  }
  Json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = pre;
  j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  Json vocab_json = Json::object();
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.push_back(table.byte_to_text[b]);
  for (size_t i = 0; i < tokens.size(); ++i) vocab_json[tokens[i]] = i;
  Json model = {{"type", "BPE"},          {"dropout", nullptr},    {"unk_token", nullptr},
                {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr}, {"fuse_unk", false},
                {"byte_fallback", false}, {"ignore_merges", false}, {"vocab", vocab_json},
                {"merges", Json::array()}};
  j["model"] = model;
  j["added_tokens"] = Json::array();
  j["post_processor"] = nullptr;

  // Words of the corpus as symbol sequences, with their counts.
  auto base = BpeTokenizer::parse(j.dump(), "<training>");
  std::map<std::string, int64_t> word_counts;
  for (const std::string& piece : base->pretokenize(corpus)) ++word_counts[piece];
  std::vector<std::pair<std::vector<std::string>, int64_t>> words;
  std::vector<uint32_t> cps;
  for (const auto& [word, count] : word_counts) {
    decode_utf8(word, cps);
    std::vector<std::string> symbols;
    for (uint32_t cp : cps) {
      symbols.emplace_back();
      append_utf8(symbols.back(), cp);
    }
    words.emplace_back(std::move(symbols), count);
  }
  const int64_t target = vocab - static_cast<int64_t>(specials.size());
  UNS_CHECK(target >= 256, "make-model: vocab {} is too small for 256 byte tokens and {} specials", vocab,
            specials.size());
  Json merges = Json::array();
  while (static_cast<int64_t>(tokens.size()) < target) {
    std::map<std::pair<std::string, std::string>, int64_t> pairs;
    for (const auto& [symbols, count] : words)
      for (size_t i = 0; i + 1 < symbols.size(); ++i) pairs[{symbols[i], symbols[i + 1]}] += count;
    const std::pair<std::string, std::string>* best = nullptr;
    int64_t best_count = 1;  // a merge must occur at least twice
    for (const auto& [pair, count] : pairs) {
      if (count > best_count) {
        best_count = count;
        best = &pair;
      }
    }
    if (best == nullptr) break;
    const std::string a = best->first, b = best->second, merged = a + b;
    merges.push_back(a + " " + b);
    if (!vocab_json.contains(merged)) {
      vocab_json[merged] = tokens.size();
      tokens.push_back(merged);
    }
    for (auto& [symbols, count] : words) {
      std::vector<std::string> next;
      for (size_t i = 0; i < symbols.size(); ++i) {
        if (i + 1 < symbols.size() && symbols[i] == a && symbols[i + 1] == b) {
          next.push_back(merged);
          ++i;
        } else {
          next.push_back(symbols[i]);
        }
      }
      symbols.swap(next);
    }
  }
  j["model"]["vocab"] = vocab_json;
  j["model"]["merges"] = merges;
  Json added = Json::array();
  for (size_t i = 0; i < specials.size(); ++i) {
    added.push_back({{"id", tokens.size() + i}, {"content", specials[i]}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}});
  }
  j["added_tokens"] = added;
  if (add_bos && !specials.empty()) {
    const std::string& bos = specials[0];
    const Json bos_item = {{"SpecialToken", {{"id", bos}, {"type_id", 0}}}};
    j["post_processor"] = {
        {"type", "TemplateProcessing"},
        {"single", {bos_item, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair",
         {bos_item, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}, bos_item, {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
        {"special_tokens", {{bos, {{"id", bos}, {"ids", {tokens.size()}}, {"tokens", {bos}}}}}}};
  }
  return j.dump(1) + "\n";
}

}  // namespace unshackle
