// The CUDA backend: the operations of backend.h on device memory, one stream per backend.
//
// Host synchronisation: only synchronize(), copy_to_host() and buffer growth/free wait for
// the stream. copy_to_backend() of up to kStageLimit bytes copies the host data into a pinned
// staging ring and queues the device copy: the caller may reuse its host buffer on return,
// and every later call on this backend sees the data (stream order). Readers on other streams
// (the communicator, the model's stream) must synchronize() first, as they already must for
// kernels. Larger copies (weights) stay synchronous from pageable memory.
#include <algorithm>
#include <cstring>
#include <memory>

#include "cuda_check.h"
#include "launchers.h"
#include "unshackle/kernels/backend.h"

namespace unshackle {
namespace cuda {

void* Workspace::reserve(size_t wanted) {
  if (wanted <= bytes) return data;
  if (data) {
    UNS_CUDA_CHECK(cudaDeviceSynchronize());  // earlier launches may still read it
    UNS_CUDA_CHECK(cudaFree(data));
  }
  bytes = std::max(wanted, 2 * bytes);
  UNS_CUDA_CHECK(cudaMalloc(&data, bytes));
  return data;
}

void* Workspace::pinned() {
  if (!host) UNS_CUDA_CHECK(cudaMallocHost(&host, 64));
  return host;
}

Workspace::~Workspace() {
  if (data) cudaFree(data);
  if (host) cudaFreeHost(host);
}

namespace {

constexpr size_t kStageLimit = size_t{256} << 10;  // staged (asynchronous) host->device copies up to this
constexpr size_t kStageHalf = size_t{1} << 20;      // each half of the pinned ring

// Pinned staging for small host->device copies, in two halves: a copy goes into the current
// half; when it does not fit, an event marks the half's last copy and the other half is
// reused once its own event has completed (normally long before). After a stream
// synchronisation every staged copy is done and the ring restarts empty.
class StagingRing {
 public:
  StagingRing() = default;
  StagingRing(const StagingRing&) = delete;
  StagingRing& operator=(const StagingRing&) = delete;
  ~StagingRing() {
    if (base_) cudaFreeHost(base_);
    for (cudaEvent_t e : done_)
      if (e) cudaEventDestroy(e);
  }

  // Copies `bytes` (<= kStageLimit) from host `src` to device `dst`, queued on `stream`.
  void copy(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
    if (!base_) {
      UNS_CUDA_CHECK(cudaMallocHost(&base_, 2 * kStageHalf));
      for (cudaEvent_t& e : done_) UNS_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    const size_t aligned = (bytes + 255) / 256 * 256;
    if (offset_ + aligned > kStageHalf) {  // leave this half: mark its last copy, take the other
      UNS_CUDA_CHECK(cudaEventRecord(done_[half_], stream));
      pending_[half_] = true;
      half_ ^= 1;
      offset_ = 0;
      if (pending_[half_]) UNS_CUDA_CHECK(cudaEventSynchronize(done_[half_]));
      pending_[half_] = false;
    }
    unsigned char* stage = base_ + static_cast<size_t>(half_) * kStageHalf + offset_;
    offset_ += aligned;
    std::memcpy(stage, src, bytes);
    UNS_CUDA_CHECK(cudaMemcpyAsync(dst, stage, bytes, cudaMemcpyHostToDevice, stream));
  }
  // The stream was synchronised: no staged copy is in flight.
  void idle() {
    pending_[0] = pending_[1] = false;
    half_ = 0;
    offset_ = 0;
  }

 private:
  unsigned char* base_ = nullptr;  // [2 * kStageHalf] pinned
  cudaEvent_t done_[2] = {nullptr, nullptr};
  bool pending_[2] = {false, false};
  int half_ = 0;
  size_t offset_ = 0;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    UNS_CUDA_CHECK(cudaSetDevice(device_));
    UNS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    cudaDeviceProp prop{};
    UNS_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    name_ = std::string("cuda:") + std::to_string(device_) + " (" + prop.name + ")";
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);  // staged copies and readbacks finish before their memory goes
    cudaStreamDestroy(stream_);
    if (readback_) cudaFreeHost(readback_);
  }

  std::string name() const override { return name_; }
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }
  bool supports(Op op, DType dtype, int dim) const override {
    if (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16) return false;
    switch (op) {
      // launch_attend's head dims (attend.cu): fast path 32/64/128 (and 256 in bf16), the rest generic.
      case Op::kAttend: return dim == 32 || dim == 64 || dim == 96 || dim == 128 || dim == 256;
      default: return dim > 0;
    }
  }

  void* allocate(size_t bytes) override {
    bind();
    void* ptr = nullptr;
    if (bytes) UNS_CUDA_CHECK(cudaMalloc(&ptr, bytes));
    return ptr;
  }
  void deallocate(void* ptr) override {
    if (!ptr) return;
    if (cudaStreamSynchronize(stream_) == cudaSuccess) ring_.idle();  // queued work may still use it
    cudaFree(ptr);
  }
  void copy_to_backend(void* dst, const void* src, size_t bytes) override {
    if (!bytes) return;
    bind();
    if (bytes <= kStageLimit) return ring_.copy(dst, src, bytes, stream_);  // queued, no host wait
    UNS_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    sync_stream();  // the pageable host buffer may go away
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    if (!bytes) return;
    bind();
    if (bytes > kStageLimit) {
      UNS_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
      return sync_stream();
    }
    // Small results (selected tokens, gathered candidates) through pinned memory: one DMA
    // and one wait, not the driver's pageable staging.
    if (!readback_) UNS_CUDA_CHECK(cudaMallocHost(&readback_, kStageLimit));
    UNS_CUDA_CHECK(cudaMemcpyAsync(readback_, src, bytes, cudaMemcpyDeviceToHost, stream_));
    sync_stream();
    std::memcpy(dst, readback_, bytes);
  }
  void copy_within(void* dst, const void* src, size_t bytes) override {
    if (!bytes || dst == src) return;
    bind();
    const auto* s = static_cast<const unsigned char*>(src);
    auto* d = static_cast<unsigned char*>(dst);
    if (d + bytes <= s || s + bytes <= d) {
      UNS_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
      return;
    }
    // Overlapping (row compaction): cudaMemcpy does not promise memmove, so stage.
    void* stage = staging_.reserve(bytes);
    UNS_CUDA_CHECK(cudaMemcpyAsync(stage, src, bytes, cudaMemcpyDeviceToDevice, stream_));
    UNS_CUDA_CHECK(cudaMemcpyAsync(dst, stage, bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  void synchronize() override { sync_stream(); }
  void* native_stream() const override { return stream_; }
  void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t count) override {
    bind();
    if (src_dtype == dst_dtype) return copy_within(dst, src, count * dtype_size(src_dtype));
    cuda::launch_convert(src, src_dtype, dst, dst_dtype, count, stream_);
  }
  void convert_pair(const void* src_a, void* dst_a, const void* src_b, void* dst_b, DType src_dtype, DType dst_dtype,
                    size_t count) override {
    bind();
    if (src_dtype == dst_dtype) return Backend::convert_pair(src_a, dst_a, src_b, dst_b, src_dtype, dst_dtype, count);
    cuda::launch_convert_pair(src_a, dst_a, src_b, dst_b, src_dtype, dst_dtype, count, stream_);
  }

  void compress_query(const CompressQueryParams& p) override { bind(); cuda::launch_compress_query(p, stream_); }
  void compress_keys(const CompressKeysParams& p) override { bind(); cuda::launch_compress_keys(p, stream_); }
  void score_query_max(const ScoreParams& p) override { bind(); cuda::launch_score_query_max(p, score_workspace_, stream_); }
  void score_chunk(const ScoreParams& p) override { bind(); cuda::launch_score_chunk(p, score_workspace_, stream_); }
  void proximity(const ProximityParams& p) override { bind(); cuda::launch_proximity(p, stream_); }
  void top_k(const TopKParams& p) override { bind(); cuda::launch_top_k(p, topk_workspace_, stream_); }
  void attend(const AttendParams& p) override { bind(); cuda::launch_attend(p, attend_workspace_, stream_); }
  void merge(const MergeParams& p) override { bind(); cuda::launch_merge(p, stream_); }
  void rows_of_tokens(const RowsOfTokensParams& p) override { bind(); cuda::launch_rows_of_tokens(p, stream_); }
  void lag_reference_extrema(const LagExtremaParams& p) override { bind(); cuda::launch_lag_reference_extrema(p, stream_); }
  void lag_token_std(const LagStdParams& p) override { bind(); cuda::launch_lag_token_std(p, stream_); }
  void lag_partition_scores(const LagScoreParams& p) override { bind(); cuda::launch_lag_partition_scores(p, stream_); }

 private:
  void bind() const { UNS_CUDA_CHECK(cudaSetDevice(device_)); }
  void sync_stream() {
    UNS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    ring_.idle();
  }

  int device_;
  cudaStream_t stream_ = nullptr;
  std::string name_;
  cuda::Workspace topk_workspace_, attend_workspace_, score_workspace_, staging_;
  StagingRing ring_;          // small host->device copies
  void* readback_ = nullptr;  // [kStageLimit] pinned, small device->host copies
};

}  // namespace
}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
    fail(ErrorKind::kUnsupported, "no CUDA device is visible (cudaGetDeviceCount found none)");
  UNS_CUDA_REQUIRE(kUnsupported, device >= 0 && device < count, "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) + " visible)");
  return std::make_unique<cuda::CudaBackend>(device);
}

bool cuda_backend_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

}  // namespace unshackle
