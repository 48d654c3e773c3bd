// Tokenizers behind one interface: text ↔ token ids.
//
//  - ByteTokenizer: one token per byte (ids 0..255) plus a few special tokens after them;
//    for small test models. Stored as DIR/unshackle_tokenizer.json.
//  - BpeTokenizer: Hugging Face tokenizer.json with a byte-level BPE model (GPT-2, Llama-3,
//    Qwen2): added/special tokens matched first, then the pre-tokenizer (a Split regex from
//    the file, run by PCRE2 in UTF mode, and/or ByteLevel with the GPT-2 regex), the GPT-2
//    byte↔unicode table, merges by rank (ignore_merges as Llama-3), TemplateProcessing for
//    the BOS. Normalizers other than none/NFC are refused; NFC is assumed of the input
//    (not applied).
//  - SentencePieceTokenizer: tokenizer.model through libsentencepiece (Llama-2, Mistral);
//    special tokens in the text are split out first, as transformers' LlamaTokenizer does.
//
// All throw Error naming the file on a malformed tokenizer; encode/decode are const and
// safe to call from several threads.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace unshackle {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string kind() const = 0;  // "bytes", "bpe", "sentencepiece"
  // Text to ids; with add_special the model's template tokens (BOS) are added.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special = true) const = 0;
  // Ids to text; special tokens are written as their text unless skip_special. Ids the
  // tokenizer lacks (a model vocabulary padded past the tokenizer's, as Qwen2's) give no
  // text, as in transformers; negative ids are Error(kInvalidArgument). Bytes are returned
  // as they are (a prefix may end inside a UTF-8 sequence).
  virtual std::string decode(std::span<const int32_t> ids, bool skip_special = false) const = 0;
  virtual int64_t vocab_size() const = 0;  // one past the largest id
  // The id of a token written exactly as `text` (special or regular), or -1.
  virtual int32_t token_id(std::string_view text) const = 0;
  virtual bool is_special(int32_t id) const = 0;
};

// DIR/unshackle_tokenizer.json (bytes), else DIR/tokenizer.json (bpe), else
// DIR/tokenizer.model (sentencepiece); Error(kNotFound) when there is none.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& model_dir);

// ---- byte-level ----
class ByteTokenizer final : public Tokenizer {
 public:
  // Specials get ids 256, 257, ... in order; add_bos: encode(add_special) starts with specials[bos].
  explicit ByteTokenizer(std::vector<std::string> specials = {"<s>", "</s>", "<pad>"}, int bos_index = 0);
  static std::unique_ptr<ByteTokenizer> load(const std::string& path);
  void save(const std::string& path) const;

  std::string kind() const override { return "bytes"; }
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const override;
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const override;
  int64_t vocab_size() const override { return 256 + static_cast<int64_t>(specials_.size()); }
  int32_t token_id(std::string_view text) const override;
  bool is_special(int32_t id) const override { return id >= 256 && id < vocab_size(); }

 private:
  std::vector<std::string> specials_;
  int bos_index_;  // -1: no BOS
};

// ---- Hugging Face tokenizer.json, byte-level BPE ----
class BpeTokenizer final : public Tokenizer {
 public:
  static std::unique_ptr<BpeTokenizer> load(const std::string& path);
  static std::unique_ptr<BpeTokenizer> parse(const std::string& json_text, const std::string& label);
  ~BpeTokenizer() override;

  std::string kind() const override { return "bpe"; }
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const override;
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const override;
  int64_t vocab_size() const override;
  int32_t token_id(std::string_view text) const override;
  bool is_special(int32_t id) const override;
  // The pre-tokenizer's pieces of plain text (no added tokens), byte-level mapped.
  std::vector<std::string> pretokenize(std::string_view text) const;

  struct Impl;

 private:
  BpeTokenizer();
  std::unique_ptr<Impl> impl_;
};

// What make-model writes: a byte-level BPE tokenizer.json trained (plain BPE, most frequent
// pair first, ties by the lower pair) on `corpus` until the vocabulary (256 byte tokens,
// the merges, then the specials) has `vocab` entries. `pattern` is the Split regex
// ("" = ByteLevel with the GPT-2 regex). With add_bos the first special is the BOS that a
// TemplateProcessing post-processor adds (Llama-3); without, nothing is added (Qwen2).
std::string train_bpe_tokenizer_json(const std::string& corpus, int64_t vocab, const std::string& pattern,
                                     const std::vector<std::string>& specials, bool add_bos);
// The pre-tokenizer regexes of Llama-3 and Qwen2 as their tokenizer.json files spell them.
extern const char* const kLlama3SplitPattern;
extern const char* const kQwen2SplitPattern;

// ---- SentencePiece ----
class SentencePieceTokenizer final : public Tokenizer {
 public:
  // add_bos: whether encode(add_special) prepends BOS (Llama-2/Mistral: true).
  static std::unique_ptr<SentencePieceTokenizer> load(const std::string& path, bool add_bos = true,
                                                      bool add_eos = false);
  ~SentencePieceTokenizer() override;

  std::string kind() const override { return "sentencepiece"; }
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const override;
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const override;
  int64_t vocab_size() const override;
  int32_t token_id(std::string_view text) const override;
  bool is_special(int32_t id) const override;

  struct Impl;

 private:
  SentencePieceTokenizer();
  std::unique_ptr<Impl> impl_;
};

}  // namespace unshackle
