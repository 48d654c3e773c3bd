// The wire framing, the attention JSON and the UTF-8 hold-back of streamed text.
#include <gtest/gtest.h>

#include "unshackle/coordinator/routes.h"
#include "unshackle/service/engine_ops.h"
#include "unshackle/service/wire.h"

namespace unshackle::wire {
namespace {

using nlohmann::json;

TEST(Wire, FramesSurviveAnySplit) {
  const json a{{"type", "call"}, {"id", 7}, {"op", "prefill"}, {"args", {{"tokens", {1, 2, 3}}}}};
  const json b{{"type", "heartbeat"}, {"text", "é\xE2\x82\xAC"}};
  const std::string bytes = encode_frame(a) + encode_frame(b);
  for (size_t step : {size_t{1}, size_t{3}, size_t{5}, bytes.size()}) {
    FrameDecoder decoder;
    std::vector<json> out;
    for (size_t i = 0; i < bytes.size(); i += step) {
      decoder.feed(bytes.data() + i, std::min(step, bytes.size() - i));
      while (auto m = decoder.next()) out.push_back(*m);
    }
    ASSERT_EQ(out.size(), 2u) << step;
    EXPECT_EQ(out[0], a);
    EXPECT_EQ(out[1], b);
    EXPECT_EQ(decoder.buffered(), 0u);
  }
}

TEST(Wire, RejectsOversizedAndMalformedFrames) {
  EXPECT_THROW(encode_frame(json{{"type", std::string(100, 'x')}}, 50), Error);
  {
    FrameDecoder decoder(50);
    const std::string header("\x00\x00\x01\x00", 4);  // 256 bytes announced
    decoder.feed(header.data(), header.size());
    try {
      decoder.next();
      FAIL() << "no throw";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kComm);
      EXPECT_NE(std::string(e.what()).find("exceeds the limit of 50"), std::string::npos);
    }
  }
  for (const std::string& text : {std::string("{bad"), std::string("[1,2]"), std::string("{\"no_type\":1}")}) {
    FrameDecoder decoder;
    std::string frame = encode_frame(json{{"type", "x"}});
    frame = frame.substr(0, 3) + static_cast<char>(text.size()) + text;
    decoder.feed(frame.data(), frame.size());
    EXPECT_THROW(decoder.next(), Error) << text;
  }
}

TEST(Wire, AttentionRoundTripAndFieldNames) {
  AttentionConfig c;
  c.mode = AttentionMode::kBlock;
  c.top_k = 77;
  c.lag_ratio = 0.25;
  const AttentionConfig back = attention_from_json(attention_to_json(c), AttentionConfig{});
  EXPECT_EQ(back.mode, AttentionMode::kBlock);
  EXPECT_EQ(back.top_k, 77);
  EXPECT_DOUBLE_EQ(back.lag_ratio, 0.25);
  try {
    attention_from_json(json{{"block", 0}, {"mode", "block"}}, AttentionConfig{}, "attention.");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(plain_message(e).rfind("attention.block: must be > 0", 0), 0u) << e.what();
  }
}

TEST(Wire, Utf8HoldBack) {
  EXPECT_EQ(complete_utf8_prefix("abc"), 3u);
  EXPECT_EQ(complete_utf8_prefix("ab\xE2\x82"), 2u);        // € cut after two bytes
  EXPECT_EQ(complete_utf8_prefix("ab\xE2\x82\xAC"), 5u);    // € whole
  EXPECT_EQ(complete_utf8_prefix("ab\xF0\x9F"), 2u);        // 4-byte cut
  EXPECT_EQ(complete_utf8_prefix("ab\xEF\xBF\xBD"), 2u);    // trailing replacement char
  EXPECT_EQ(complete_utf8_prefix(""), 0u);
}

TEST(Wire, Multipart) {
  using coord::parse_multipart;
  const auto parts = parse_multipart("multipart/form-data; boundary=\"b1\"",
                                     "--b1\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\ny\r\n--b1--\r\n");
  ASSERT_EQ(parts.count("a"), 1u);
  EXPECT_EQ(parts.at("a").content, "x\r\ny");
  EXPECT_THROW(parse_multipart("multipart/form-data; boundary=b1", "--b1\r\nno headers end"), coord::ApiError);
  EXPECT_THROW(parse_multipart("multipart/form-data", "x"), coord::ApiError);
}

}  // namespace
}  // namespace unshackle::wire
