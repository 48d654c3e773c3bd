// Top-k launcher (kernel bodies and the method: topk.cuh). min(k, n) <= 4096 takes the radix
// select (a memset and three launches, no full sort); anything larger a full CUB radix sort of
// the same keys. Both give the SPEC order exactly; the op synchronises to fill out_count.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>

#include "cuda_check.h"
#include "launchers.h"
#include "topk.cuh"

namespace unshackle::cuda {
namespace {

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

int multiprocessors() {
  int device = 0, sms = 0;
  UNS_CUDA_CHECK(cudaGetDevice(&device));
  UNS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Returns the device address of the selected count.
const uint32_t* radix_select(const TopKParams& p, Workspace& workspace, cudaStream_t stream) {
  using namespace topk;
  const size_t n = static_cast<size_t>(p.n);
  const uint32_t wanted = static_cast<uint32_t>(std::min<int64_t>(p.k, p.n));
  const size_t state_bytes = align_up(sizeof(State)), list_bytes = align_up(kMaxSorted * (sizeof(uint64_t) + 4));
  const size_t buffer_bytes = align_up(std::max<size_t>(n, 1) * sizeof(Candidate));
  auto* base = static_cast<unsigned char*>(workspace.reserve(state_bytes + list_bytes + 2 * buffer_bytes));
  auto* state = reinterpret_cast<State*>(base);
  auto* out_keys = reinterpret_cast<uint64_t*>(base + state_bytes);
  auto* out_index = reinterpret_cast<uint32_t*>(out_keys + kMaxSorted);
  Candidate* buffer[2] = {reinterpret_cast<Candidate*>(base + state_bytes + list_bytes),
                          reinterpret_cast<Candidate*>(base + state_bytes + list_bytes + buffer_bytes)};
  UNS_CUDA_CHECK(cudaMemsetAsync(state, 0, sizeof(State), stream));
  static const int sms = multiprocessors();
  const unsigned grid = static_cast<unsigned>(std::clamp<int64_t>((p.n + kThreads * 8 - 1) / (kThreads * 8), 1, 4 * static_cast<int64_t>(sms)));
  first_pass_kernel<<<grid, kThreads, 0, stream>>>(p, state, wanted);
  UNS_CUDA_CHECK_LAUNCH();
  second_pass_kernel<<<grid, kThreads, 0, stream>>>(p, state, buffer[1], out_keys, out_index);
  UNS_CUDA_CHECK_LAUNCH();
  uint32_t size = 2;
  while (size < wanted) size <<= 1;
  const size_t shared = std::max<size_t>(size * (sizeof(uint64_t) + sizeof(uint32_t)), (1u << digit_bits(2)) * sizeof(uint32_t));
  // Past 48 KB of shared memory a block needs the opt-in (k near 4096: 4096 * 12 B plus the
  // static scan storage); the device run of 2026-11-22 failed the launch without it.
  if (shared > 32 * 1024)
    UNS_CUDA_CHECK(cudaFuncSetAttribute(tail_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  tail_kernel<<<1, kTailThreads, shared, stream>>>(p, state, buffer[0], buffer[1], out_keys, out_index);
  UNS_CUDA_CHECK_LAUNCH();
  return &state->selected;
}

const uint32_t* full_sort(const TopKParams& p, Workspace& workspace, cudaStream_t stream) {
  using namespace topk;
  UNS_CUDA_REQUIRE(kInvalidArgument, p.n < (int64_t{1} << 31),
                   "top_k: " + std::to_string(p.n) + " candidates exceed one launch");
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
  auto* valid = reinterpret_cast<uint32_t*>(base + 2 * keys_bytes + 2 * index_bytes);
  void* sort_temp = base + 2 * keys_bytes + 2 * index_bytes + 256;
  UNS_CUDA_CHECK(cudaMemsetAsync(valid, 0, sizeof(uint32_t), stream));
  if (n > 0) {
    const unsigned blocks = static_cast<unsigned>(std::clamp<int64_t>((p.n + 255) / 256, 1, 4096));
    full_sort_keys_kernel<<<blocks, 256, 0, stream>>>(p, keys_in, index_in, valid);
    UNS_CUDA_CHECK_LAUNCH();
    UNS_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(sort_temp, sort_bytes, keys_in, keys_out, index_in,
                                                            index_out, n, 0, 64, stream));
  }
  full_sort_gather_kernel<<<static_cast<unsigned>(std::clamp<int64_t>((p.k + 255) / 256, 1, 4096)), 256, 0, stream>>>(
      p, index_out, valid);
  UNS_CUDA_CHECK_LAUNCH();
  return valid;
}

}  // namespace

void launch_top_k(const TopKParams& p, Workspace& workspace, cudaStream_t stream) {
  p.check();
  if (p.k == 0) {
    *p.out_count = 0;
    return;
  }
  const uint32_t* count = std::min(p.k, p.n) <= topk::kMaxSorted ? radix_select(p, workspace, stream)
                                                                 : full_sort(p, workspace, stream);
  auto* host_count = static_cast<uint32_t*>(workspace.pinned());  // pinned: a short copy
  UNS_CUDA_CHECK(cudaMemcpyAsync(host_count, count, sizeof *host_count, cudaMemcpyDeviceToHost, stream));
  UNS_CUDA_CHECK(cudaStreamSynchronize(stream));
  *p.out_count = std::min<int64_t>(static_cast<int64_t>(*host_count), p.k);
}

}  // namespace unshackle::cuda
