// The decode GEMVs of the CUDA model (worker/model/src/cuda/model_kernels.h) on seeded bf16 and
// f16 inputs: the plain GEMV against a float64 host product within the f32-accumulation bound,
// and each fused form exactly equal (bit for bit) to the unfused kernels it replaces, as the
// header promises: bias + accumulate = GEMV then bias add; f32 x = cast then GEMV; gated =
// GEMV into f32 then SwiGLU. Shapes with a tail (cols not a multiple of 4 x 32 x 8) and rows
// not a multiple of a block's 8 warps. Skips, saying why, without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "cuda/model_kernels.h"
#include "unshackle/common/dtype.h"

namespace unshackle::testing {
namespace {

using cuda_model::GatedGemvParams;
using cuda_model::GemvParams;

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

bool have_gpu() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}
constexpr const char* kNoGpu = "no CUDA device (CPU-only machine or a build without CUDA)";

// A device copy of a host vector, freed at scope exit.
template <typename T>
struct Device {
  T* ptr = nullptr;
  size_t count = 0;
  explicit Device(const std::vector<T>& host) : count(host.size()) {
    EXPECT_EQ(cudaMalloc(&ptr, count * sizeof(T)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(ptr, host.data(), count * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~Device() { cudaFree(ptr); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  std::vector<T> host() const {
    std::vector<T> out(count);
    EXPECT_EQ(cudaMemcpy(out.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }
};

std::vector<float> seeded(size_t count, uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(count);
  for (float& x : v) x = dist(rng);
  return v;
}
std::vector<uint16_t> to_16bit(const std::vector<float>& v, DType dtype) {
  std::vector<uint16_t> out(v.size());
  convert_from_f32(v.data(), dtype, out.data(), v.size());
  return out;
}
float from_16bit(uint16_t bits, DType dtype) { return dtype == DType::kBF16 ? bf16_to_float(bits) : fp16_to_float(bits); }

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

struct Shape {
  int64_t rows, cols;
  DType dtype;
};
void PrintTo(const Shape& s, std::ostream* os) { *os << s.rows << " x " << s.cols << " " << dtype_name(s.dtype); }
std::string shape_name(const ::testing::TestParamInfo<Shape>& info) {
  return std::to_string(info.param.rows) + "x" + std::to_string(info.param.cols) + "_" +
         std::string(dtype_name(info.param.dtype));
}
class DecodeGemv : public ::testing::TestWithParam<Shape> {};

TEST_P(DecodeGemv, MatchesFloat64AndFusedFormsAreExact) {
  if (!have_gpu()) GTEST_SKIP() << kNoGpu;
  const auto [rows, cols, dtype] = GetParam();
  const std::vector<uint16_t> w16 = to_16bit(seeded(static_cast<size_t>(rows * cols), 1, 1.0f), dtype);
  const std::vector<float> x32 = seeded(static_cast<size_t>(cols), 2, 2.0f);
  const std::vector<uint16_t> x16 = to_16bit(x32, dtype);
  const std::vector<float> y0 = seeded(static_cast<size_t>(rows), 3, 4.0f), bias = seeded(static_cast<size_t>(rows), 4, 1.0f);
  Device<uint16_t> W(w16), x(x16);
  Device<float> xf(x32), b(bias);

  // Plain: against the float64 product of the same 16-bit values. Bound: f32 accumulation of
  // `cols` products, relative to the sum of their magnitudes (~cols x 2^-24, taken 8x).
  Device<float> y(std::vector<float>(static_cast<size_t>(rows), 0.0f));
  CUDA_OK(cuda_model::launch_gemv({.W = W.ptr, .x = x.ptr, .y = y.ptr, .rows = rows, .cols = cols, .dtype = dtype}, nullptr));
  const std::vector<float> got = y.host();
  for (int64_t r = 0; r < rows; ++r) {
    double want = 0, magnitude = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const double term = static_cast<double>(from_16bit(w16[static_cast<size_t>(r * cols + c)], dtype)) *
                          from_16bit(x16[static_cast<size_t>(c)], dtype);
      want += term;
      magnitude += std::fabs(term);
    }
    ASSERT_NEAR(got[static_cast<size_t>(r)], want, 8.0 * static_cast<double>(cols) * 0x1p-24 * magnitude) << "row " << r;
  }

  // Accumulate + bias, fused, against accumulate then the bias added on the host in f32.
  Device<float> acc(y0);
  CUDA_OK(cuda_model::launch_gemv({.W = W.ptr, .x = x.ptr, .bias = b.ptr, .y = acc.ptr, .rows = rows, .cols = cols,
                                   .dtype = dtype, .accumulate = true}, nullptr));
  std::vector<float> want_acc(static_cast<size_t>(rows));
  for (size_t r = 0; r < want_acc.size(); ++r) want_acc[r] = (y0[r] + got[r]) + bias[r];
  EXPECT_TRUE(bitwise_equal(acc.host(), want_acc)) << "y + W x + bias differs from the unfused order";

  // f32 x rounded as it is read = the 16-bit x (the cast kernel's round to nearest even).
  Device<float> yf(std::vector<float>(static_cast<size_t>(rows), 0.0f));
  CUDA_OK(cuda_model::launch_gemv({.W = W.ptr, .x = xf.ptr, .y = yf.ptr, .rows = rows, .cols = cols, .dtype = dtype,
                                   .x_f32 = true}, nullptr));
  EXPECT_TRUE(bitwise_equal(yf.host(), got)) << "f32 x differs from its 16-bit cast";

  // Gated: rows = 2I of gate then up; silu(g + bg) * (u + bu), rounded to dtype, from the
  // plain GEMV's f32 sums (as the SwiGLU kernel computes it).
  if (rows % 2 == 0) {
    const int64_t I = rows / 2;
    const std::vector<float> bg(bias.begin(), bias.begin() + I), bu(bias.begin() + I, bias.end());
    Device<float> d_bg(bg), d_bu(bu);
    Device<uint16_t> out(std::vector<uint16_t>(static_cast<size_t>(I), 0));
    CUDA_OK(cuda_model::launch_gated_gemv({.W = W.ptr, .x = x.ptr, .b_gate = d_bg.ptr, .b_up = d_bu.ptr, .out = out.ptr,
                                           .I = I, .cols = cols, .dtype = dtype}, nullptr));
    // The SwiGLU on the GPU (expf there), from the GEMV's sums.
    Device<float> gate_up(got);
    Device<uint16_t> swiglu(std::vector<uint16_t>(static_cast<size_t>(I), 0));
    CUDA_OK(cuda_model::launch_swiglu({.gate_up = gate_up.ptr, .b_gate = d_bg.ptr, .b_up = d_bu.ptr, .out = swiglu.ptr,
                                       .n = 1, .I = I, .out_dtype = dtype}, nullptr));
    EXPECT_EQ(out.host(), swiglu.host()) << "gated GEMV differs from GEMV + SwiGLU";
  }
  CUDA_OK(cudaDeviceSynchronize());
}

INSTANTIATE_TEST_SUITE_P(Shapes, DecodeGemv,
                         ::testing::Values(Shape{8, 1024, DType::kBF16},     // one block, no tail
                                           Shape{202, 4096 + 24, DType::kBF16},  // rows past a block, a tail
                                           Shape{66, 520, DType::kF16},      // the tail loop only
                                           Shape{2 * 300, 1536, DType::kBF16}),
                         shape_name);

TEST(DecodeGemv, RefusesWhatItCannotRead) {
  if (!have_gpu()) GTEST_SKIP() << kNoGpu;
  const std::vector<uint16_t> w(64 * 16, 0x3f80), x(16, 0x3f80);
  Device<uint16_t> W(w), X(x);
  Device<float> y(std::vector<float>(64, 0.0f));
  const GemvParams ok{.W = W.ptr, .x = X.ptr, .y = y.ptr, .rows = 64, .cols = 16};
  EXPECT_TRUE(cuda_model::gemv_supported(ok));
  GemvParams odd = ok;
  odd.cols = 12;  // not a whole 16-byte vector
  EXPECT_EQ(cuda_model::launch_gemv(odd, nullptr), cudaErrorInvalidValue);
  GemvParams f32 = ok;
  f32.dtype = DType::kF32;  // cuBLAS's case
  EXPECT_EQ(cuda_model::launch_gemv(f32, nullptr), cudaErrorInvalidValue);
  GemvParams misaligned = ok;
  misaligned.x = X.ptr + 1;
  EXPECT_EQ(cuda_model::launch_gemv(misaligned, nullptr), cudaErrorInvalidValue);
  GatedGemvParams gated{.W = W.ptr, .x = X.ptr, .out = y.ptr, .I = 32, .cols = 16};
  EXPECT_TRUE(cuda_model::gated_gemv_supported(gated));
  gated.cols = 4;
  EXPECT_EQ(cuda_model::launch_gated_gemv(gated, nullptr), cudaErrorInvalidValue);
  CUDA_OK(cudaGetLastError());  // the refusals launched nothing
}

}  // namespace
}  // namespace unshackle::testing
