// Tokenizers: round trips on a corpus with unicode, whitespace runs and special tokens; the
// pre-tokenizer regexes of Llama-3 and Qwen2 split as their reference does; BPE merges
// compress; SentencePiece (a model trained here) splits special tokens out first.
#include <gtest/gtest.h>
#include <sentencepiece_trainer.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "model_fixtures.h"
#include "unshackle/common/check.h"
#include "unshackle/model/make_model.h"
#include "unshackle/model/tokenizer.h"

namespace unshackle::testing {
namespace {

const std::vector<std::string> kCorpus = {
    "Hello world",
    "  leading spaces, trailing spaces   ",
    "Whitespace   runs\t\tand\n\n\nnew lines    are   kept.\n",
    "Unicode: café, naïve, Größe, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, emoji 🙂🚀 and 👩‍👩‍👧.",
    "Numbers 1234567 and 3.14159, dates 2026-11-22.",
    "Contractions: it's, they'll, WE'VE, I'm, you'd.",
    "code:\n    def f(x):\n\treturn x  # comment\n",
    "",
    " ",
    "\n",
    "a",
};

TEST(ByteTokenizer, RoundTripsAndMatchesSpecials) {
  const ByteTokenizer t;
  for (const std::string& text : kCorpus) {
    const auto ids = t.encode(text, false);
    EXPECT_EQ(ids.size(), text.size());
    EXPECT_EQ(t.decode(ids), text);
  }
  const auto ids = t.encode("a</s>b<s>");
  EXPECT_EQ(ids, (std::vector<int32_t>{256, 'a', 257, 'b', 256}));
  EXPECT_EQ(t.decode(ids), "<s>a</s>b<s>");
  EXPECT_EQ(t.decode(ids, true), "ab");
  EXPECT_TRUE(t.is_special(257));
  EXPECT_FALSE(t.is_special('a'));
  EXPECT_EQ(t.token_id("</s>"), 257);
}

std::unique_ptr<BpeTokenizer> trained(const std::string& pattern, const std::vector<std::string>& specials, bool bos,
                                      int64_t vocab = 420) {
  return BpeTokenizer::parse(train_bpe_tokenizer_json(kTokenizerTrainingCorpus, vocab, pattern, specials, bos), "test");
}

// GPT-2's byte-to-unicode for the ASCII characters used below.
std::string mapped(const std::string& raw) {
  std::string out;
  for (char c : raw) out += c == ' ' ? "Ġ" : c == '\n' ? "Ċ" : c == '\t' ? "ĉ" : std::string(1, c);
  return out;
}

TEST(BpeTokenizer, Llama3SplitRegexPiecesAsTheReference) {
  const auto t = trained(kLlama3SplitPattern, {"<|begin_of_text|>"}, true);
  const std::vector<std::string> raw = {"Hello", " world", "'s", " ", " ", "123", "456", " foo", "\n\n", " bar",
                                        " WE", "'VE", "!!!\n", "   ", "\tx"};
  std::vector<std::string> want;
  for (const auto& r : raw) want.push_back(mapped(r));
  EXPECT_EQ(t->pretokenize("Hello world's  123456 foo\n\n bar WE'VE!!!\n   \tx"), want);
  // Letters of any script are one \p{L}+ run; emoji are punctuation-like.
  EXPECT_EQ(t->pretokenize("日本語🙂!").size(), 2u);
  EXPECT_EQ(t->pretokenize(" Ελληνικά").size(), 1u);
}

TEST(BpeTokenizer, Qwen2SplitsDigitsOneByOne) {
  const auto t = trained(kQwen2SplitPattern, {"<|endoftext|>"}, false);
  EXPECT_EQ(t->pretokenize("x 2026"), (std::vector<std::string>{"x", "Ġ", "2", "0", "2", "6"}));
}

TEST(BpeTokenizer, Gpt2ByteLevelRegex) {
  const auto t = trained("", {"<s>"}, true);
  EXPECT_EQ(t->pretokenize("Hello  world's 123"),
            (std::vector<std::string>{"Hello", "Ġ", "Ġworld", "'s", "Ġ123"}));
}

class BpeRoundTrip : public ::testing::TestWithParam<int> {};

TEST_P(BpeRoundTrip, CorpusRoundTripsSpecialsMatchFirstMergesCompress) {
  const int which = GetParam();
  const std::string pattern = which == 0 ? kLlama3SplitPattern : which == 1 ? kQwen2SplitPattern : "";
  const std::vector<std::string> specials = {"<|bos|>", "<|eos|>", "<|im_start|>"};
  const auto t = trained(pattern, specials, which != 1);
  // The corpus runs out of pairs seen twice before 420: fewer merges, specials right after.
  EXPECT_GT(t->vocab_size(), 320);
  EXPECT_LE(t->vocab_size(), 420);
  size_t bytes = 0, tokens = 0;
  for (const std::string& text : kCorpus) {
    const auto ids = t->encode(text, false);
    EXPECT_EQ(t->decode(ids), text);
    for (int32_t id : ids) EXPECT_FALSE(t->is_special(id));
    bytes += text.size();
    tokens += ids.size();
  }
  EXPECT_LT(tokens * 10, bytes * 8) << "merges should compress the corpus by 20 % at least";
  // Specials in the text are matched before anything else, also glued to words.
  const std::string with_specials = "<|im_start|>user\nhi<|eos|><|bos|>  x<|im_start|>";
  const auto ids = t->encode(with_specials, true);
  const int32_t bos = t->token_id("<|bos|>"), eos = t->token_id("<|eos|>"), im = t->token_id("<|im_start|>");
  ASSERT_EQ(bos, t->vocab_size() - 3);
  if (which != 1) {
    EXPECT_EQ(ids.front(), bos);
  } else {
    EXPECT_EQ(ids.front(), im);  // Qwen2 adds no BOS
  }
  EXPECT_EQ(std::count(ids.begin(), ids.end(), im), 2);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), eos), 1);
  EXPECT_EQ(t->decode(t->encode(with_specials, false)), with_specials);
  EXPECT_EQ(t->decode(t->encode(with_specials, false), true), "user\nhi  x");
  // Tokens the tokenizer lacks (padded model vocabulary) decode to nothing.
  const std::vector<int32_t> padded = {t->token_id("a"), 9999};
  EXPECT_EQ(t->decode(padded), "a");
  EXPECT_THROW(t->encode(std::string("bad \xff utf8"), false), Error);
}

INSTANTIATE_TEST_SUITE_P(Tokenizer, BpeRoundTrip, ::testing::Values(0, 1, 2));

TEST(BpeTokenizer, HuggingFaceFileFeatures) {
  // A tokenizer.json edited by hand: legacy "a b" merges, ignore_merges (Llama-3), an added
  // token with lstrip, TemplateProcessing inside a Sequence post-processor.
  nlohmann::json j = nlohmann::json::parse(train_bpe_tokenizer_json("", 256, "", {}, false));
  auto& vocab = j["model"]["vocab"];
  vocab["Ġt"] = 256;
  vocab["he"] = 257;
  vocab["Ġthe"] = 258;
  vocab["Ġhello"] = 259;
  j["model"]["merges"] = {"Ġ t", "h e", "Ġt he"};
  j["added_tokens"] = {
      {{"id", 260}, {"content", "<mask>"}, {"lstrip", true}, {"rstrip", false}, {"special", true}},
      {{"id", 261}, {"content", "<bos>"}, {"lstrip", false}, {"rstrip", false}, {"special", true}}};
  j["post_processor"] = {
      {"type", "Sequence"},
      {"processors",
       {{{"type", "ByteLevel"}},
        {{"type", "TemplateProcessing"},
         {"single", {{{"SpecialToken", {{"id", "<bos>"}}}}, {{"Sequence", {{"id", "A"}}}}}},
         {"special_tokens", {{"<bos>", {{"id", "<bos>"}, {"ids", {261}}, {"tokens", {"<bos>"}}}}}}}}}};
  j["model"]["ignore_merges"] = true;
  const auto t = BpeTokenizer::parse(j.dump(), "edited");
  EXPECT_EQ(t->encode(" the hello"), (std::vector<int32_t>{261, 258, 259}));
  EXPECT_EQ(t->decode(t->encode(" the hello")), "<bos> the hello");
  const auto ids = t->encode("a   <mask>b", false);
  EXPECT_EQ(ids, (std::vector<int32_t>{'a', 260, 'b'}));
  EXPECT_EQ(t->decode(ids), "a<mask>b");
  j["model"]["ignore_merges"] = false;
  const auto merging = BpeTokenizer::parse(j.dump(), "edited");
  EXPECT_EQ(merging->encode(" hello", false).size(), 5u);  // Ġ he l l o
  EXPECT_EQ(merging->decode(merging->encode(" hello", false)), " hello");
  // What the loader refuses, by name.
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  try {
    BpeTokenizer::parse(j.dump(), "edited");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Whitespace"), std::string::npos) << e.what();
  }
}

// Token ids in tokenizer.json must be integers in [0, 2^22): a float id out of int's range was
// undefined behaviour (json's conversion; found by fuzz_tokenizer_bpe, 3.3e48), a negative or
// too large one wrapped, and an id of 2^31 - 1 sized the id table at 2^31 strings (the
// fuzzer's out-of-memory). Each is an Error naming the field; a sparse id above any real
// vocabulary (300,000) still loads.
TEST(BpeTokenizer, TokenIdsOutOfRangeAreErrorsNamingTheField) {
  const nlohmann::json base = nlohmann::json::parse(train_bpe_tokenizer_json("", 256, "", {}, false));
  EXPECT_NO_THROW(BpeTokenizer::parse(base.dump(), "edited"));
  nlohmann::json sparse = base;
  sparse["added_tokens"] = {{{"id", 300000}, {"content", "<x>"}, {"special", true}}};
  EXPECT_EQ(BpeTokenizer::parse(sparse.dump(), "edited")->vocab_size(), 300001);
  for (const nlohmann::json& id : {nlohmann::json(3.33333e48), nlohmann::json(2.5), nlohmann::json(-1),
                                   nlohmann::json(int64_t{1} << 31), nlohmann::json(uint64_t{1} << 63),
                                   nlohmann::json(INT32_MAX), nlohmann::json(int64_t{1} << 22),
                                   nlohmann::json("7")}) {
    SCOPED_TRACE(id.dump());
    for (const char* field : {"model.vocab", "added_tokens"}) {
      nlohmann::json j = base;
      if (std::string(field) == "model.vocab") {
        j["model"]["vocab"]["Ġt"] = id;
      } else {
        j["added_tokens"] = {{{"id", id}, {"content", "<x>"}, {"special", true}}};
      }
      try {
        BpeTokenizer::parse(j.dump(), "edited");
        ADD_FAILURE() << field << ": no error";
      } catch (const Error& e) {
        EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
        EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
      }
    }
  }
}

// Found by fuzz_tokenizer_bpe (a misspelt "added_tokens"): a TemplateProcessing id that names
// no token was handed out by encode, outside [0, vocab_size()). Now the load refuses it.
TEST(BpeTokenizer, TemplateIdsOutsideTheVocabularyAreErrorsNamingTheToken) {
  const nlohmann::json base = nlohmann::json::parse(train_bpe_tokenizer_json("", 258, "", {"<s>", "</s>"}, true));
  const auto good = BpeTokenizer::parse(base.dump(), "edited");
  const std::vector<int32_t> ids = good->encode("hi", true);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.front(), 256);  // <s>, the first added token, prefixed by the template
  nlohmann::json no_added = base;
  no_added.erase("added_tokens");
  nlohmann::json past_end = base;
  past_end["post_processor"]["special_tokens"]["<s>"]["ids"] = {100000};
  nlohmann::json hole = base;  // an id below the size that no token holds
  hole["added_tokens"][0]["id"] = 300;
  hole["post_processor"]["special_tokens"]["<s>"]["ids"] = {299};
  for (const auto& [name, j] : {std::pair{"no added_tokens", no_added}, {"past the end", past_end}, {"a hole", hole}}) {
    SCOPED_TRACE(name);
    try {
      BpeTokenizer::parse(j.dump(), "edited");
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("post_processor special token '<s>'"), std::string::npos) << e.what();
    }
  }
}

// A SentencePiece model trained here on the corpus (identity normalisation, byte fallback).
class SentencePiece : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new ScratchDir("sp");
    {
      std::ofstream corpus(dir_->sub("corpus.txt"));
      corpus << kTokenizerTrainingCorpus;
      for (const auto& line : kCorpus) corpus << line << "\n";
    }
    const auto status = sentencepiece::SentencePieceTrainer::Train(
        "--input=" + dir_->sub("corpus.txt") + " --model_prefix=" + dir_->sub("sp") +
        " --vocab_size=400 --model_type=bpe --character_coverage=1.0 --byte_fallback=true"
        " --normalization_rule_name=identity --remove_extra_whitespaces=false --hard_vocab_limit=false"
        " --minloglevel=2");
    ASSERT_TRUE(status.ok()) << status.ToString();
    std::filesystem::rename(dir_->sub("sp.model"), dir_->sub("tokenizer.model"));
  }
  static void TearDownTestSuite() { delete dir_; }
  static ScratchDir* dir_;
};
ScratchDir* SentencePiece::dir_ = nullptr;

TEST_F(SentencePiece, RoundTripsAndSplitsSpecialsFirst) {
  const auto t = load_tokenizer(dir_->path());
  ASSERT_EQ(t->kind(), "sentencepiece");
  size_t bytes = 0, tokens = 0;
  for (const std::string& text : kCorpus) {
    const auto ids = t->encode(text, false);
    EXPECT_EQ(t->decode(ids), text);
    bytes += text.size();
    tokens += ids.size();
  }
  EXPECT_LT(tokens * 10, bytes * 8);
  const int32_t bos = t->token_id("<s>"), eos = t->token_id("</s>");
  ASSERT_GE(bos, 0);
  ASSERT_GE(eos, 0);
  const auto ids = t->encode("Hello</s>world<s>");
  EXPECT_EQ(ids.front(), bos);  // add_bos by default (Llama-2, Mistral)
  EXPECT_EQ(std::count(ids.begin(), ids.end(), eos), 1);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), bos), 2);
  EXPECT_EQ(t->decode(ids), "<s>Hello</s>world<s>");
  EXPECT_EQ(t->decode(ids, true), "Helloworld");
  // tokenizer_config.json can turn the BOS off.
  std::ofstream(dir_->sub("tokenizer_config.json")) << R"({"add_bos_token": false})";
  const auto no_bos = load_tokenizer(dir_->path());
  EXPECT_NE(no_bos->encode("Hello").front(), bos);
  std::filesystem::remove(dir_->sub("tokenizer_config.json"));
}

// A malformed tokenizer.model that libsentencepiece refuses with its own exception (a
// zero-length piece: darts' "zero-length key") is an Error naming the file, as every
// loader's (found by tests/fuzz/fuzz_tokenizer_sentencepiece: it escaped as a foreign
// exception). The model: <unk>, <s>, </s>, "a" and the piece "\0", as protobuf bytes.
TEST(SentencePieceFile, MalformedModelIsAnErrorNamingTheFile) {
  ScratchDir dir("sp_bad");
  const std::string model_hex =
      "0a0e0a053c756e6b3e150000000018020a0c0a033c733e150000000018030a0d0a043c2f733e150000000018030a080a0161"
      "15000080bf0a080a010015000000c0";
  std::string model;
  for (size_t i = 0; i < model_hex.size(); i += 2) model += static_cast<char>(std::stoi(model_hex.substr(i, 2), nullptr, 16));
  std::ofstream(dir.sub("tokenizer.model"), std::ios::binary) << model;
  try {
    load_tokenizer(dir.path());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find(dir.sub("tokenizer.model")), std::string::npos) << e.what();
  }
  // Without the "\0" piece the same model loads.
  std::ofstream(dir.sub("tokenizer.model"), std::ios::binary) << model.substr(0, model.size() - 10);
  EXPECT_EQ(load_tokenizer(dir.path())->vocab_size(), 4);
}

// Encodings by transformers.js (an independent implementation of tokenizer.json) of a corpus
// with unicode, whitespace runs (also non-ASCII spaces), CR/LF and special tokens, for the
// Llama-3, Qwen2 and GPT-2 style tokenizers that make-model writes. The file holds the
// tokenizer.json files themselves; data/make_tokenizer_golden.mjs wrote it.
TEST(BpeTokenizer, MatchesTransformersJsGoldenEncodings) {
  std::ifstream in(UNS_MODEL_TEST_DATA "/tokenizer_golden.json");
  ASSERT_TRUE(in.good());
  const nlohmann::json golden = nlohmann::json::parse(in);
  const auto texts = golden.at("texts").get<std::vector<std::string>>();
  size_t compared = 0;
  for (const auto& [name, entry] : golden.at("tokenizers").items()) {
    SCOPED_TRACE(name);
    const auto t = BpeTokenizer::parse(entry.at("tokenizer_json").dump(), name);
    const auto& cases = entry.at("cases");
    ASSERT_EQ(cases.size(), texts.size());
    for (size_t i = 0; i < texts.size(); ++i) {
      SCOPED_TRACE(texts[i]);
      EXPECT_EQ(t->encode(texts[i], true), cases[i].at("with_special").get<std::vector<int32_t>>());
      const auto plain = cases[i].at("plain").get<std::vector<int32_t>>();
      EXPECT_EQ(t->encode(texts[i], false), plain);
      EXPECT_EQ(t->decode(plain), cases[i].at("decoded").get<std::string>());
      EXPECT_EQ(t->decode(plain), texts[i]);
      ++compared;
    }
  }
  EXPECT_EQ(compared, 3 * texts.size());
}

TEST(LoadTokenizer, MissingTokenizerIsNotFound) {
  ScratchDir dir("notok");
  try {
    load_tokenizer(dir.path());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kNotFound);
  }
}

}  // namespace
}  // namespace unshackle::testing
