// Top-k launcher (kernel bodies and the method: topk.cuh). min(k, n) <= 4096 takes the radix
// select (one launch, two with UNS_TOPK_SPLIT_RANK; no memset but the first on a new workspace), anything larger a full
// CUB radix sort of the same keys. Both give the SPEC order exactly; the op synchronises only
// to fill a non-null out_count.
//
// The workspace is top-k's own: its head holds the radix select's state, which the kernels
// leave zeroed for the next call. It is zeroed here when the workspace is (re)allocated, and
// dropped (freed, so the next call starts clean) when a call fails midway.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "cuda_check.h"
#include "launchers.h"
#include "launch.cuh"
#include "topk.cuh"

namespace unshackle::cuda {
namespace {

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

struct DeviceInfo {
  int sms = 0;
  bool dependent_launch = false;  // sm_90+: programmatic dependent launch
  int select_blocks = 0;          // most blocks of select_kernel resident at once (its grid limit)
};

// Per device, asked once (the occupancy query is not free).
DeviceInfo device_info() {
  int device = 0, sms = 0, major = 0, cooperative = 0, per_sm = 0;
  UNS_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<int, DeviceInfo> known;
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(device); it != known.end()) return it->second;
  UNS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  UNS_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  UNS_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  UNS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, topk::select_kernel, topk::kSelectThreads, 0));
  UNS_CUDA_REQUIRE(kInternal, cooperative && per_sm > 0, "top_k: the device cannot launch the cooperative select kernel");
  return known[device] = {sms, major >= 9, per_sm * sms};
}

// The state at the head of the workspace, then `payload` bytes (returned).
unsigned char* reserve(Workspace& workspace, size_t payload, cudaStream_t stream) {
  const size_t state_bytes = align_up(sizeof(topk::State));
  const bool fresh = workspace.bytes < state_bytes + payload;  // reserve() reallocates: garbage
  auto* base = static_cast<unsigned char*>(workspace.reserve(state_bytes + payload));
  if (fresh) UNS_CUDA_CHECK(cudaMemsetAsync(base, 0, sizeof(topk::State), stream));
  return base + state_bytes;
}

// After a failure between launches the state may be half-used: free it (the next call
// allocates and zeroes a new one). Errors here are ignored: the first one is being reported.
void drop(Workspace& workspace) noexcept {
  cudaDeviceSynchronize();
  if (workspace.data) cudaFree(workspace.data);
  workspace.data = nullptr;
  workspace.bytes = 0;
}

// Returns the device address of the selected count.
const uint32_t* radix_select(const TopKParams& p, Workspace& workspace, cudaStream_t stream) {
  using namespace topk;
  const size_t n = static_cast<size_t>(std::max<int64_t>(p.n, 1));
  const size_t list_keys = align_up(kMaxSorted * sizeof(uint64_t)), list_values = align_up(kMaxSorted * sizeof(float));
  const size_t candidate_keys = align_up(n * sizeof(uint64_t)), candidate_values = align_up(n * sizeof(float));
  unsigned char* base = reserve(workspace, list_keys + list_values + candidate_keys + candidate_values, stream);
  auto* state = reinterpret_cast<State*>(static_cast<unsigned char*>(workspace.data));
  const Lists lists{reinterpret_cast<uint64_t*>(base), reinterpret_cast<float*>(base + list_keys),
                    reinterpret_cast<uint64_t*>(base + list_keys + list_values),
                    reinterpret_cast<float*>(base + list_keys + list_values + candidate_keys)};
  const DeviceInfo device = device_info();
  const int64_t wanted = std::min(p.k, p.n);
  const auto blocks = [](int64_t items, int64_t per_block, int64_t most) {
    return static_cast<unsigned>(std::clamp<int64_t>((items + per_block - 1) / per_block, 1, most));
  };
  // UNS_TOPK_SPLIT_RANK set: the rank runs as a second launch (bench_kernels' per-kernel
  // breakdown uses it; the tests run both). Default: one launch.
  const bool split = std::getenv("UNS_TOPK_SPLIT_RANK") != nullptr;
  // Grid: a tile (kSelectItems per thread) per block, and for the rank at least one block per
  // 16 wanted keys (one key per warp); at most what is resident at once.
  const int64_t rank_share = split ? 1 : (wanted + kSelectThreads / 32 - 1) / (kSelectThreads / 32);
  const unsigned select_blocks = static_cast<unsigned>(
      std::max<int64_t>(blocks(p.n, kSelectThreads * kSelectItems, device.select_blocks),
                        std::min<int64_t>(rank_share, device.select_blocks)));
  UNS_CUDA_CHECK(launch_kernel(Launch::kCooperative, select_kernel, select_blocks, kSelectThreads, stream, p, state,
                               lists, static_cast<uint32_t>(wanted), !split));
  if (!split) return &state->result;
  // One block per kRankKeys selected keys, or more for long padding (k > n).
  const unsigned rank_blocks = std::max(blocks(wanted, kRankKeys, int64_t{1} << 20),
                                        blocks(p.k, kRankThreads * 4, 4 * int64_t{device.sms}));
  UNS_CUDA_CHECK(launch_kernel(device.dependent_launch ? Launch::kDependent : Launch::kPlain, rank_kernel, rank_blocks,
                               kRankThreads, stream, p, static_cast<const State*>(state), lists));
  return &state->result;
}

const uint32_t* full_sort(const TopKParams& p, Workspace& workspace, cudaStream_t stream) {
  using namespace topk;
  const int n = static_cast<int>(p.n);
  size_t sort_bytes = 0;
  UNS_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(nullptr, sort_bytes, static_cast<const uint64_t*>(nullptr),
                                                          static_cast<uint64_t*>(nullptr),
                                                          static_cast<const int32_t*>(nullptr),
                                                          static_cast<int32_t*>(nullptr), std::max(n, 1), 0, 64, stream));
  const size_t keys_bytes = align_up(sizeof(uint64_t) * std::max(n, 1)), index_bytes = align_up(sizeof(int32_t) * std::max(n, 1));
  // After the radix select's state, which this path leaves alone.
  unsigned char* base = reserve(workspace, 2 * keys_bytes + 2 * index_bytes + 256 + sort_bytes, stream);
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
  const bool select = std::min(p.k, p.n) <= topk::kMaxSorted;
  // Counts are 32-bit in the select, indices 32-bit in the sort.
  UNS_CUDA_REQUIRE(kInvalidArgument, p.n <= (select ? int64_t{0xffffffff} : int64_t{0x7fffffff}),
                   "top_k: " + std::to_string(p.n) + " candidates exceed one launch");
  try {
    const uint32_t* count = select ? radix_select(p, workspace, stream) : full_sort(p, workspace, stream);
    if (!p.out_count) return;  // the caller counts the tokens before the -1 padding: no synchronisation
    auto* host_count = static_cast<uint32_t*>(workspace.pinned());  // pinned: a short copy
    UNS_CUDA_CHECK(cudaMemcpyAsync(host_count, count, sizeof *host_count, cudaMemcpyDeviceToHost, stream));
    UNS_CUDA_CHECK(cudaStreamSynchronize(stream));
    *p.out_count = std::min<int64_t>(static_cast<int64_t>(*host_count), p.k);
  } catch (...) {
    drop(workspace);
    throw;
  }
}

}  // namespace unshackle::cuda
