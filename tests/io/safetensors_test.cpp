// The safetensors reader/writer: round trips of every dtype (empty tensors and metadata
// included), files on disk, and a table of broken files, each rejected with a message that
// names the file and says what is wrong.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
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

// Seeded bytes (never all zero) for the integer dtypes.
std::vector<uint8_t> seeded_bytes(size_t n, uint64_t seed) {
  std::vector<uint8_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(testing::splitmix64(seed * 1000003 + i));
  return out;
}

template <typename T>
std::span<const uint8_t> as_bytes(const std::vector<T>& values) {
  return {reinterpret_cast<const uint8_t*>(values.data()), values.size() * sizeof(T)};
}

TEST(Safetensors, RoundTripEveryDtypeAndMetadata) {
  const auto f32 = testing::normal_vector(24, 1);
  std::vector<uint16_t> bf16(7), f16(5);
  for (size_t i = 0; i < bf16.size(); ++i) bf16[i] = float_to_bf16(f32[i]);
  for (size_t i = 0; i < f16.size(); ++i) f16[i] = float_to_fp16(f32[i + 7]);
  std::vector<double> f64(6);
  for (size_t i = 0; i < f64.size(); ++i) f64[i] = static_cast<double>(f32[i + 12]) / 3.0;
  const std::vector<int64_t> i64 = {5, -3, 1LL << 40};
  const std::vector<int32_t> i32 = {-7, 1 << 30, 9, 4};
  const auto i8 = seeded_bytes(9, 2), u8 = seeded_bytes(3, 3);
  const std::vector<uint8_t> mask = {1, 0, 1};

  SafetensorsWriter writer;
  writer.add_f32("f32", {2, 3, 4}, f32);
  writer.add("bf16", DType::kBF16, {7}, as_bytes(bf16));
  writer.add("f16", DType::kF16, {5, 1}, as_bytes(f16));
  writer.add("f64", DType::kF64, {2, 3}, as_bytes(f64));
  writer.add_i64("i64", {3}, i64);
  writer.add("i32", DType::kI32, {2, 2}, as_bytes(i32));
  writer.add("i8", DType::kI8, {3, 3}, i8);
  writer.add("u8", DType::kU8, {3}, u8);
  writer.add("bool", DType::kBool, {3}, mask);
  writer.add_i64("empty", {0}, {});
  writer.add_f32("empty2d", {4, 0}, {});
  writer.add_f32("scalar", {}, std::span<const float>(f32).subspan(0, 1));
  writer.set_metadata("mode", "esa");
  writer.set_metadata("top_k", "256");
  writer.set_metadata("blank", "");
  const auto image = writer.serialize();

  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | image[static_cast<size_t>(i)];
  EXPECT_EQ(header_bytes % 8, 0u) << "header padded to 8 bytes";
  EXPECT_EQ(image[8], '{');
  // Tensors in insertion order: the first tensor's bytes start the data section.
  EXPECT_EQ(std::memcmp(image.data() + 8 + header_bytes, f32.data(), 4 * f32.size()), 0);

  const auto file = SafetensorsFile::parse(image, "mem");
  EXPECT_EQ(file->metadata(), (std::map<std::string, std::string>{{"mode", "esa"}, {"top_k", "256"}, {"blank", ""}}));
  EXPECT_EQ(file->tensors().size(), 12u);
  EXPECT_EQ(file->to_f32("f32"), f32);
  EXPECT_EQ(file->info("f32").shape, (std::vector<int64_t>{2, 3, 4}));
  const auto b = file->to_f32("bf16");
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(b[i], bf16_to_float(bf16[i]));
  const auto h = file->to_f32("f16");
  for (size_t i = 0; i < h.size(); ++i) EXPECT_EQ(h[i], fp16_to_float(f16[i]));
  const auto dd = file->to_f32("f64");
  for (size_t i = 0; i < dd.size(); ++i) EXPECT_EQ(dd[i], static_cast<float>(f64[i]));
  EXPECT_EQ(file->to_i64("i64"), i64);
  EXPECT_EQ(file->to_i64("i32"), (std::vector<int64_t>{-7, 1 << 30, 9, 4}));
  const std::pair<const char*, const std::vector<uint8_t>*> raw[] = {{"i8", &i8}, {"u8", &u8}, {"bool", &mask}};
  for (const auto& [name, want] : raw) {
    const auto got = file->data(name);
    EXPECT_EQ(std::vector<uint8_t>(got.begin(), got.end()), *want) << name;
  }
  EXPECT_EQ(file->info("i8").dtype, DType::kI8);
  EXPECT_EQ(file->info("u8").dtype, DType::kU8);
  EXPECT_EQ(file->info("bool").dtype, DType::kBool);
  EXPECT_TRUE(file->to_i64("empty").empty());
  EXPECT_EQ(file->info("empty2d").shape, (std::vector<int64_t>{4, 0}));
  EXPECT_TRUE(file->to_f32("empty2d").empty());
  EXPECT_TRUE(file->info("scalar").shape.empty());
  EXPECT_EQ(file->to_f32("scalar"), std::vector<float>{f32[0]});

  try {
    file->info("nope");
    ADD_FAILURE() << "unknown tensor accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kNotFound);
    EXPECT_NE(std::string(e.what()).find("'nope'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(file->to_f32("i64"), Error);
  EXPECT_THROW(file->to_i64("f32"), Error);
}

TEST(Safetensors, WriterRejectsInconsistentTensors) {
  SafetensorsWriter writer;
  const auto values = testing::normal_vector(6, 4);
  EXPECT_THROW(writer.add_f32("x", {2, 2}, values), Error);  // 6 values for 4 elements
  EXPECT_THROW(writer.add_f32("__metadata__", {6}, values), Error);
  writer.add_f32("x", {6}, values);
  EXPECT_THROW(writer.add_f32("x", {6}, values), Error);
}

TEST(Safetensors, UnalignedOffsetsStillConvert) {
  // Another writer may place an F32 tensor at an odd offset; values must come out intact.
  const auto values = testing::normal_vector(4, 5);
  std::string header = R"({"b":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},)"
                       R"("x":{"dtype":"F32","shape":[4],"data_offsets":[3,19]}})";
  header.append((8 - header.size() % 8) % 8, ' ');  // data section 8-aligned, so 'x' sits at an odd address
  auto image = file_with_header(header, 19);
  std::memcpy(image.data() + 8 + header.size() + 3, values.data(), 16);
  const auto file = SafetensorsFile::parse(image, "mem");
  EXPECT_EQ(file->to_f32("x"), values);
}

TEST(Safetensors, FileOnDiskIsMappedAndWrittenAtomically) {
  const std::string dir = ::testing::TempDir() + "/io_disk_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/roundtrip.safetensors";
  SafetensorsWriter writer;
  const auto values = testing::normal_vector(1000, 2);
  writer.add_f32("x", {10, 100}, values);
  writer.set_metadata("seed", "2");
  writer.write(path);
  writer.write(path);  // replacing an existing file works too
  const auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file->to_f32("x"), values);
  EXPECT_EQ(file->metadata().at("seed"), "2");
  EXPECT_EQ(file->label(), path);
  // Only the file itself is left: no temporary beside it.
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir), std::filesystem::directory_iterator()), 1);

  try {
    SafetensorsFile::open(path + ".missing");
    ADD_FAILURE() << "missing file opened";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kNotFound);
    EXPECT_NE(std::string(e.what()).find(path + ".missing"), std::string::npos) << e.what();
  }
  try {
    SafetensorsFile::open(dir);
    ADD_FAILURE() << "directory opened";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
  }
  const std::string unwritable = dir + "/no/such/dir/out.safetensors";
  try {
    writer.write(unwritable);
    ADD_FAILURE() << "wrote into a missing directory";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kIo);
    EXPECT_NE(std::string(e.what()).find(unwritable), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

struct Broken {
  const char* name;
  std::vector<uint8_t> bytes;
  const char* expected;  // substring of the error
};

TEST(Safetensors, BrokenFilesAreRejectedClearly) {
  const std::string ok_entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  std::vector<uint8_t> over_limit(16, 0);
  over_limit[4] = 0x10;  // 2^36 bytes
  std::vector<uint8_t> past_end = file_with_header("{}", 0);
  past_end[0] = 200;
  const std::vector<Broken> cases = {
      {"empty file", {}, "shorter than the 8-byte header"},
      {"truncated header length", {1, 2, 3}, "file is 3 bytes, shorter than the 8-byte header"},
      {"header past end", past_end, "header length 200 runs past the end of the 10-byte file"},
      {"header over limit", over_limit, "exceeds the limit of 100000000 bytes"},
      {"invalid json", file_with_header("{\"t\":", 0), "not valid JSON"},
      {"not an object", file_with_header("[1,2]", 0), "not a JSON object"},
      {"entry not an object", file_with_header(R"({"t":[1]})", 0), "tensor 't' is not an object"},
      {"duplicate tensor", file_with_header("{" + ok_entry + "," + ok_entry + "}", 8), "key 't' twice"},
      {"unknown dtype", file_with_header(R"({"t":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}})", 8), "F31"},
      {"missing dtype", file_with_header(R"({"t":{"shape":[2],"data_offsets":[0,8]}})", 8),
       "tensor 't': missing dtype"},
      {"missing shape", file_with_header(R"({"t":{"dtype":"F32","data_offsets":[0,8]}})", 8),
       "tensor 't': missing shape"},
      {"negative shape", file_with_header(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
       "tensor 't': shape [-2] must hold integers >= 0"},
      {"fractional shape", file_with_header(R"({"t":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", 8),
       "shape [2.5]"},
      {"missing data_offsets", file_with_header(R"({"t":{"dtype":"F32","shape":[2]}})", 8),
       "tensor 't': missing data_offsets"},
      {"one data_offset", file_with_header(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8),
       "missing data_offsets [begin, end]"},
      {"negative offset", file_with_header(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8),
       "data_offsets [-8,0] must be integers >= 0"},
      {"offsets out of range", file_with_header(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4),
       "tensor 't': data_offsets [0, 8] run beyond the 4-byte data section"},
      {"begin after end", file_with_header(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8),
       "tensor 't': data_offsets [8, 0] begin after end"},
      {"span mismatch", file_with_header(R"({"k":{"dtype":"F32","shape":[2,3,4],"data_offsets":[0,88]}})", 96),
       "tensor 'k': data_offsets [0, 88] span 88 bytes but shape [2,3,4] x F32 needs 96"},
      {"overlap", file_with_header("{" + ok_entry + R"(,"u":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
       "tensors 't' [0, 8] and 'u' [4, 12] overlap"},
      // An empty tensor between two overlapping ones must not hide the overlap.
      {"overlap around an empty tensor",
       file_with_header(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                        R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                        R"("c":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16),
       "tensors 'a' [0, 16] and 'c' [8, 16] overlap"},
      {"metadata not an object", file_with_header(R"({"__metadata__":["mode"]})", 0), "__metadata__ is not an object"},
      {"metadata value not a string", file_with_header(R"({"__metadata__":{"top_k":3}})", 0),
       "__metadata__ 'top_k' is not a string (got 3)"},
  };
  for (const Broken& c : cases) {
    try {
      SafetensorsFile::parse(c.bytes, "case.safetensors");
      ADD_FAILURE() << c.name << ": accepted";
    } catch (const Error& e) {
      const std::string message = e.what();
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument) << c.name;
      EXPECT_NE(message.find(c.expected), std::string::npos) << c.name << ": " << message;
      EXPECT_EQ(message.rfind("case.safetensors: ", 0), 0u) << c.name << ": names the file first: " << message;
    }
  }
}

TEST(Safetensors, WellFormedNeighboursOfTheBrokenCasesParse) {
  // The table above must fail for the reason it names: the same files, fixed, are accepted.
  const std::vector<std::vector<uint8_t>> good = {
      file_with_header("{}", 0),
      file_with_header(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
      file_with_header(R"({"k":{"dtype":"F32","shape":[2,3,4],"data_offsets":[0,96]}})", 96),
      file_with_header(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                       R"("u":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12),
      file_with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                       R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                       R"("c":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16),
      file_with_header(R"({"__metadata__":{"top_k":"3"}}    )", 0),  // trailing pad spaces
  };
  for (size_t i = 0; i < good.size(); ++i) EXPECT_NO_THROW(SafetensorsFile::parse(good[i], "good")) << i;
}

}  // namespace
}  // namespace unshackle
