// Top-k launcher (kernel bodies and the method: topk.cuh). min(k, n) <= 4096 takes the radix
// select (a memset and four launches, no full sort); anything larger a full CUB radix sort of
// the same keys. Both give the SPEC order exactly; the op synchronises only to fill a non-null out_count.
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
  const size_t shared = (1u << digit_bits(2)) * sizeof(uint32_t);  // the largest tail histogram
  tail_kernel<<<1, kTailThreads, shared, stream>>>(p, state, buffer[0], buffer[1], out_keys, out_index);
  UNS_CUDA_CHECK_LAUNCH();
  // Fixed grid: the selected count is known on the device only (blocks past it only pad).
  const int64_t rank_keys = std::max<int64_t>(wanted, 1);
  rank_kernel<<<static_cast<unsigned>((rank_keys + kRankThreads - 1) / kRankThreads), kRankThreads, 0, stream>>>(
      p, state, out_keys, out_index);
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
    if (p.out_count) *p.out_count = 0;
    return;
  }
  const uint32_t* count = std::min(p.k, p.n) <= topk::kMaxSorted ? radix_select(p, workspace, stream)
                                                                 : full_sort(p, workspace, stream);
  if (!p.out_count) return;  // the caller counts the tokens before the -1 padding: no synchronisation
  auto* host_count = static_cast<uint32_t*>(workspace.pinned());  // pinned: a short copy
  UNS_CUDA_CHECK(cudaMemcpyAsync(host_count, count, sizeof *host_count, cudaMemcpyDeviceToHost, stream));
  UNS_CUDA_CHECK(cudaStreamSynchronize(stream));
  *p.out_count = std::min<int64_t>(static_cast<int64_t>(*host_count), p.k);
}

}  // namespace unshackle::cuda
