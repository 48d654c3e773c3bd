// The safetensors format (hand-written: no Debian package has a reader): an 8-byte
// little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, optional
// "__metadata__": {string: string}}, then the raw little-endian tensor bytes.
//
// The reader validates everything a broken or hostile file can get wrong: header size limit
// (100 MB, as the reference implementation), JSON shape, known dtypes, offsets in range and
// not overlapping, prod(shape) * dtype size == span, no key twice. Errors are
// Error(kInvalidArgument) naming the file and the tensor or field; a missing file is
// Error(kNotFound), other system failures Error(kIo).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "unshackle/common/dtype.h"

namespace unshackle {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  size_t offset = 0;  // into the data section
  size_t bytes = 0;
  int64_t numel() const;
};

// A memory-mapped safetensors file; tensor views stay valid while the object lives.
class SafetensorsFile {
 public:
  static constexpr size_t kMaxHeaderBytes = 100'000'000;

  // Opens and validates; throws Error naming `path` and the problem.
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  // Parses an in-memory image (copied); same validation.
  static std::unique_ptr<SafetensorsFile> parse(std::span<const uint8_t> bytes, std::string label = "<memory>");
  ~SafetensorsFile();

  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const;
  // Throws Error(kNotFound) naming the tensor.
  const TensorInfo& info(const std::string& name) const;
  // Raw bytes of a tensor.
  std::span<const uint8_t> data(const std::string& name) const;
  // Any float dtype converted to float32.
  std::vector<float> to_f32(const std::string& name) const;
  // I64 or I32 as int64.
  std::vector<int64_t> to_i64(const std::string& name) const;
  const std::string& label() const { return label_; }

 private:
  SafetensorsFile() = default;
  void parse_header(std::span<const uint8_t> file);

  std::string label_;
  std::map<std::string, std::string> metadata_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  const uint8_t* data_ = nullptr;  // start of the data section
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  std::vector<uint8_t> owned_;
};

// Collects tensors and metadata, then writes one file (tensors in insertion order, 8-byte
// aligned header as the reference writer pads it).
class SafetensorsWriter {
 public:
  void set_metadata(const std::string& key, const std::string& value);
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape, std::span<const uint8_t> bytes);
  void add_f32(const std::string& name, std::vector<int64_t> shape, std::span<const float> values);
  void add_i64(const std::string& name, std::vector<int64_t> shape, std::span<const int64_t> values);
  std::vector<uint8_t> serialize() const;
  // Writes atomically (temporary file + rename); throws Error(kIo) naming the path.
  void write(const std::string& path) const;

 private:
  struct Entry { std::string name; DType dtype; std::vector<int64_t> shape; std::vector<uint8_t> bytes; };
  std::map<std::string, std::string> metadata_;
  std::vector<Entry> entries_;
};

}  // namespace unshackle
