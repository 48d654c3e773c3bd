// Element types the engine stores and exchanges, and the bf16/fp16 conversions the
// CPU paths use (round to nearest even, NaN kept quiet).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace unshackle {

enum class DType : uint8_t { kF32, kF16, kBF16, kF64, kI64, kI32, kI8, kU8, kBool };

size_t dtype_size(DType dtype);
// Safetensors spelling: "F32", "BF16", "I64", ...
std::string_view dtype_name(DType dtype);
// Throws Error(kInvalidArgument) naming the spelling when unknown.
DType dtype_from_name(std::string_view name);

inline float bf16_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

inline uint16_t float_to_bf16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  if ((word & 0x7f800000u) == 0x7f800000u && (word & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((word >> 16) | 0x0040u);  // quiet NaN
  }
  const uint32_t rounding_bias = 0x7fffu + ((word >> 16) & 1u);
  return static_cast<uint16_t>((word + rounding_bias) >> 16);
}

float fp16_to_float(uint16_t bits);
uint16_t float_to_fp16(float value);

// Converts `count` elements of `src` (any float dtype) to float32.
void convert_to_f32(DType src_dtype, const void* src, float* dst, size_t count);
// Converts float32 to `dst_dtype` (F32, F16, BF16).
void convert_from_f32(const float* src, DType dst_dtype, void* dst, size_t count);

}  // namespace unshackle
