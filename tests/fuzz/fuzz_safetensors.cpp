// fuzz_safetensors: a checkpoint file through the hand-written reader
// (SafetensorsFile::parse, the same validation as open()). An accepted file must describe
// only what it holds: every tensor's bytes inside the data section, prod(shape) x dtype
// size bytes, dimensions >= 0; every tensor must then read (data, to_f32 or to_i64).
#include <cstddef>
#include <cstdint>
#include <span>

#include "fuzz_check.h"
#include "unshackle/common/error.h"
#include "unshackle/common/safetensors.h"

using namespace unshackle;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<SafetensorsFile> file;
  try {
    file = SafetensorsFile::parse(std::span<const uint8_t>(data, size), "fuzz.safetensors");
  } catch (const Error& e) {
    FUZZ_CHECK(e.kind() == ErrorKind::kInvalidArgument, "kind {} for a bad file: {}", error_kind_name(e.kind()), e.what());
    return 0;
  }
  uint64_t header = 0;  // accepted, so the file has its 8-byte header length
  for (int i = 7; i >= 0; --i) header = (header << 8) | data[i];
  const size_t data_bytes = size - 8 - static_cast<size_t>(header);
  for (const TensorInfo& t : file->tensors()) {
    FUZZ_CHECK(file->contains(t.name) && &file->info(t.name) == &t, "tensor '{}' is not found by name", t.name);
    FUZZ_CHECK(t.offset <= data_bytes && t.bytes <= data_bytes - t.offset, "tensor '{}' [{}, +{}) beyond {} bytes", t.name,
               t.offset, t.bytes, data_bytes);
    for (int64_t d : t.shape) FUZZ_CHECK(d >= 0, "tensor '{}' has dimension {}", t.name, d);
    FUZZ_CHECK(static_cast<size_t>(t.numel()) * dtype_size(t.dtype) == t.bytes, "tensor '{}': {} elements in {} bytes",
               t.name, t.numel(), t.bytes);
    FUZZ_CHECK(file->data(t.name).size() == t.bytes, "data of '{}'", t.name);
    try {
      if (t.dtype == DType::kI64 || t.dtype == DType::kI32) {
        FUZZ_CHECK(static_cast<int64_t>(file->to_i64(t.name).size()) == t.numel(), "to_i64 of '{}'", t.name);
      } else {
        const auto values = file->to_f32(t.name);
        FUZZ_CHECK(static_cast<int64_t>(values.size()) == t.numel(), "to_f32 of '{}'", t.name);
      }
    } catch (const Error& e) {
      // Integer types have no float view and the reverse: only I8, U8 and BOOL may refuse.
      FUZZ_CHECK(t.dtype == DType::kI8 || t.dtype == DType::kU8 || t.dtype == DType::kBool, "'{}': {}", t.name, e.what());
    }
  }
  return 0;
}
