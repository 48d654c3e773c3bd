// The safetensors reader/writer: round trips of every dtype, and a table of broken files,
// each rejected with a message that says what is wrong.
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "test_data.h"
#include "unshackle/common/check.h"
#include "unshackle/common/safetensors.h"

namespace unshackle {
namespace {

std::vector<uint8_t> file_with_header(const std::string& header, size_t data_bytes) {
  std::vector<uint8_t> out(8 + header.size() + data_bytes, 0x5a);
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<uint8_t>(n >> (8 * i));
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}

TEST(Safetensors, RoundTripEveryDtypeAndMetadata) {
  SafetensorsWriter writer;
  const auto f32 = testing::normal_vector(24, 1);
  writer.add_f32("a", {2, 3, 4}, f32);
  std::vector<uint16_t> bf16(7);
  for (size_t i = 0; i < bf16.size(); ++i) bf16[i] = float_to_bf16(f32[i]);
  writer.add("b", DType::kBF16, {7}, {reinterpret_cast<const uint8_t*>(bf16.data()), bf16.size() * 2});
  const std::vector<int64_t> ids = {5, -3, 1LL << 40};
  writer.add_i64("ids", {3}, ids);
  writer.add_i64("empty", {0}, {});
  std::vector<uint8_t> bytes = {1, 0, 1};
  writer.add("mask", DType::kBool, {3}, bytes);
  writer.set_metadata("mode", "esa");
  const auto image = writer.serialize();
  EXPECT_EQ((image[0] | (image[1] << 8)) % 8, 0) << "header padded to 8 bytes";
  const auto file = SafetensorsFile::parse(image, "mem");
  EXPECT_EQ(file->metadata().at("mode"), "esa");
  EXPECT_EQ(file->to_f32("a"), f32);
  EXPECT_EQ(file->info("a").shape, (std::vector<int64_t>{2, 3, 4}));
  const auto b = file->to_f32("b");
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(b[i], bf16_to_float(bf16[i]));
  EXPECT_EQ(file->to_i64("ids"), ids);
  EXPECT_TRUE(file->to_i64("empty").empty());
  EXPECT_EQ(file->info("mask").dtype, DType::kBool);
  EXPECT_THROW(file->info("nope"), Error);
}

TEST(Safetensors, FileOnDiskIsMapped) {
  const std::string path = ::testing::TempDir() + "/roundtrip.safetensors";
  SafetensorsWriter writer;
  const auto values = testing::normal_vector(1000, 2);
  writer.add_f32("x", {10, 100}, values);
  writer.write(path);
  const auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file->to_f32("x"), values);
  EXPECT_THROW(SafetensorsFile::open(path + ".missing"), Error);
}

struct Broken {
  const char* name;
  std::vector<uint8_t> bytes;
  const char* expected;  // substring of the error
};

TEST(Safetensors, BrokenFilesAreRejectedClearly) {
  const std::string ok_entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  std::vector<uint8_t> huge(8, 0);
  huge[4] = 0x10;  // 2^36 bytes
  std::vector<Broken> cases = {
      {"shorter than 8 bytes", {1, 2, 3}, "shorter than the 8-byte header"},
      {"header past end", file_with_header("{}", 0), ""},
      {"header over limit", huge, "exceeds the limit"},
      {"invalid json", file_with_header("{\"t\":", 0), "not valid JSON"},
      {"not an object", file_with_header("[1,2]", 0), "not a JSON object"},
      {"unknown dtype", file_with_header(R"({"t":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}})", 8), "unknown dtype"},
      {"negative shape", file_with_header(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "shape"},
      {"offsets out of range", file_with_header(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4),
       "beyond the 4-byte data section"},
      {"begin after end", file_with_header(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8),
       "begin after end"},
      {"span mismatch", file_with_header(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 12),
       "needs 12"},
      {"overlap", file_with_header("{" + ok_entry + R"(,"u":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
       "overlap"},
      {"metadata not string", file_with_header(R"({"__metadata__":{"mode":3}})", 0), "not a string"},
      {"missing offsets", file_with_header(R"({"t":{"dtype":"F32","shape":[2]}})", 8), "data_offsets"},
  };
  // "header past end": claim a longer header than the file holds.
  cases[1].bytes[0] = 200;
  cases[1].expected = "runs past the end";
  for (const Broken& c : cases) {
    try {
      SafetensorsFile::parse(c.bytes, "case.safetensors");
      ADD_FAILURE() << c.name << ": accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument) << c.name;
      EXPECT_NE(std::string(e.what()).find(c.expected), std::string::npos) << c.name << ": " << e.what();
      EXPECT_NE(std::string(e.what()).find("case.safetensors"), std::string::npos) << c.name << ": names the file";
    }
  }
}

}  // namespace
}  // namespace unshackle
