// The one backend interface. The CPU backend (kernels/cpu) is the oracle; the CUDA backend
// (kernels/cuda) implements the same operations on device memory. A backend says what it
// supports (ggml's supports_op); callers never get a silent fallback.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

#include "unshackle/common/dtype.h"
#include "unshackle/kernels/params.h"

namespace unshackle {

enum class Op : uint8_t {
  kCompressQuery,
  kCompressKeys,
  kScoreQueryMax,
  kScoreChunk,
  kProximity,
  kTopK,
  kAttend,
  kMerge,
  kLagKV,
  kRowsOfTokens,
};
std::string_view op_name(Op op);

enum class MemorySpace : uint8_t { kHost, kDevice };

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;
  // Where the pointers of every Params struct must live.
  virtual MemorySpace memory_space() const = 0;
  // Whether `op` runs for storage dtype `dtype` and head dim (or compressed width) `dim`.
  virtual bool supports(Op op, DType dtype, int dim) const = 0;

  // Memory in this backend's space; `synchronize` waits for queued work.
  // copy_to_backend: on return the host buffer may be reused; the device copy itself may still
  // be queued in stream order (the CUDA backend stages small uploads through pinned memory).
  // copy_to_host: on return the host buffer holds the data (it waits for the queued work).
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* ptr) = 0;
  virtual void copy_to_backend(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void copy_to_host(void* host_dst, const void* src, size_t bytes) = 0;
  // Within backend memory; overlapping ranges are allowed (memmove semantics).
  virtual void copy_within(void* dst, const void* src, size_t bytes) = 0;
  virtual void synchronize() = 0;
  // The cudaStream_t this backend queues on, for callers that time or order work against it
  // (benchmarks: CUDA events around a step); nullptr where there is none (CPU).
  virtual void* native_stream() const { return nullptr; }
  // Element-wise dtype conversion within backend memory (F32 <-> BF16/F16, or a copy).
  virtual void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t count) = 0;
  // Two conversions of one shape (a KV append's K and V): one launch where the backend can
  // (a decode token's two conversions are launch-bound, ~3 us each on an H100).
  virtual void convert_pair(const void* src_a, void* dst_a, const void* src_b, void* dst_b, DType src_dtype,
                            DType dst_dtype, size_t count) {
    convert(src_a, src_dtype, dst_a, dst_dtype, count);
    convert(src_b, src_dtype, dst_b, dst_dtype, count);
  }

  // The operations of SPEC §3-§5; see params.h for shapes and meaning.
  virtual void compress_query(const CompressQueryParams& p) = 0;
  virtual void compress_keys(const CompressKeysParams& p) = 0;
  virtual void score_query_max(const ScoreParams& p) = 0;
  virtual void score_chunk(const ScoreParams& p) = 0;
  virtual void proximity(const ProximityParams& p) = 0;
  // out_count is a host pointer in every backend (selection sizes steer host code).
  virtual void top_k(const TopKParams& p) = 0;
  virtual void attend(const AttendParams& p) = 0;
  // Queued like the other ops: the row list stays in backend memory (no host wait).
  virtual void rows_of_tokens(const RowsOfTokensParams& p) = 0;
  virtual void merge(const MergeParams& p) = 0;
  virtual void lag_reference_extrema(const LagExtremaParams& p) = 0;
  virtual void lag_token_std(const LagStdParams& p) = 0;
  virtual void lag_partition_scores(const LagScoreParams& p) = 0;
};

std::unique_ptr<Backend> make_cpu_backend();
// Throws Error(kUnsupported) when the build has no CUDA or no device `device` exists.
std::unique_ptr<Backend> make_cuda_backend(int device);
bool cuda_backend_available();  // built with CUDA and at least one device visible

// A buffer in a backend's memory space (RAII).
class BackendBuffer {
 public:
  BackendBuffer() = default;
  BackendBuffer(Backend& backend, size_t bytes) : backend_(&backend), bytes_(bytes) {
    ptr_ = bytes ? backend.allocate(bytes) : nullptr;
  }
  BackendBuffer(BackendBuffer&& other) noexcept { *this = std::move(other); }
  BackendBuffer& operator=(BackendBuffer&& other) noexcept {
    if (this != &other) {
      reset();
      backend_ = other.backend_; ptr_ = other.ptr_; bytes_ = other.bytes_;
      other.ptr_ = nullptr; other.bytes_ = 0;
    }
    return *this;
  }
  BackendBuffer(const BackendBuffer&) = delete;
  BackendBuffer& operator=(const BackendBuffer&) = delete;
  ~BackendBuffer() { reset(); }

  void reset() {
    if (ptr_) backend_->deallocate(ptr_);
    ptr_ = nullptr; bytes_ = 0;
  }
  void* data() const { return ptr_; }
  template <typename T> T* as() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  Backend* backend_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace unshackle
