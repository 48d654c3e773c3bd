// Top-k by (value descending, token ascending) — the SPEC tie rule — as one descending radix
// sort of unique 64-bit keys: the high word orders values (NaN lowest), the low word orders
// tokens inverted, so a tie in value goes to the lower token and no two keys are equal.
// Correct first; the ~10 µs radix-select of issue 5 replaces the full sort later.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>

#include "common.cuh"
#include "cuda_check.h"
#include "launchers.h"

namespace unshackle::cuda {
namespace {

__device__ __forceinline__ uint64_t ranking_key(float value, int64_t token) {
  if (token < 0) return 0;  // padding: below everything
  uint32_t bits = __float_as_uint(value);
  if (value != value) bits = 0;  // NaN ranks below every number
  else bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | (0xffffffffu - static_cast<uint32_t>(token));
}

__global__ void make_keys_kernel(TopKParams p, uint64_t* keys, int32_t* index, unsigned long long* valid) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    keys[i] = ranking_key(p.values[i], p.tokens[i]);
    index[i] = static_cast<int32_t>(i);
    if (p.tokens[i] >= 0) atomicAdd(valid, 1ull);
  }
}

__global__ void gather_kernel(TopKParams p, const int32_t* sorted_index, const unsigned long long* valid) {
  const int64_t count = min(static_cast<int64_t>(*valid), p.k);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < count) {
      const int32_t j = sorted_index[i];
      p.out_values[i] = p.values[j];
      p.out_tokens[i] = p.tokens[j];
    } else {
      p.out_values[i] = neg_inf();
      p.out_tokens[i] = -1;
    }
  }
}

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

void launch_top_k(const TopKParams& p, Workspace& workspace, cudaStream_t stream) {
  p.check();
  UNS_CUDA_REQUIRE(kInvalidArgument, p.n < (int64_t{1} << 31), "top_k: " + std::to_string(p.n) + " candidates exceed one launch");
  const int n = static_cast<int>(p.n);
  size_t sort_bytes = 0;
  UNS_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(nullptr, sort_bytes, static_cast<const uint64_t*>(nullptr),
                                                          static_cast<uint64_t*>(nullptr),
                                                          static_cast<const int32_t*>(nullptr),
                                                          static_cast<int32_t*>(nullptr), std::max(n, 1), 0, 64, stream));
  const size_t keys_bytes = align_up(sizeof(uint64_t) * std::max(n, 1)), index_bytes = align_up(sizeof(int32_t) * std::max(n, 1));
  auto* base = static_cast<unsigned char*>(workspace.reserve(2 * keys_bytes + 2 * index_bytes + 256 + sort_bytes));
  auto* keys_in = reinterpret_cast<uint64_t*>(base);
  auto* keys_out = reinterpret_cast<uint64_t*>(base + keys_bytes);
  auto* index_in = reinterpret_cast<int32_t*>(base + 2 * keys_bytes);
  auto* index_out = reinterpret_cast<int32_t*>(base + 2 * keys_bytes + index_bytes);
  auto* valid = reinterpret_cast<unsigned long long*>(base + 2 * keys_bytes + 2 * index_bytes);
  void* sort_temp = base + 2 * keys_bytes + 2 * index_bytes + 256;
  UNS_CUDA_CHECK(cudaMemsetAsync(valid, 0, sizeof(unsigned long long), stream));
  const unsigned blocks = static_cast<unsigned>(std::clamp<int64_t>((p.n + 255) / 256, 1, 4096));
  if (n > 0) {
    make_keys_kernel<<<blocks, 256, 0, stream>>>(p, keys_in, index_in, valid);
    UNS_CUDA_CHECK_LAUNCH();
    UNS_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(sort_temp, sort_bytes, keys_in, keys_out, index_in,
                                                            index_out, n, 0, 64, stream));
  }
  if (p.k > 0) {
    gather_kernel<<<static_cast<unsigned>(std::clamp<int64_t>((p.k + 255) / 256, 1, 4096)), 256, 0, stream>>>(
        p, index_out, valid);
    UNS_CUDA_CHECK_LAUNCH();
  }
  unsigned long long host_valid = 0;
  UNS_CUDA_CHECK(cudaMemcpyAsync(&host_valid, valid, sizeof host_valid, cudaMemcpyDeviceToHost, stream));
  UNS_CUDA_CHECK(cudaStreamSynchronize(stream));
  *p.out_count = std::min<int64_t>(static_cast<int64_t>(host_valid), p.k);
}

}  // namespace unshackle::cuda
