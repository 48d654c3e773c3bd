// Device buffers for the shared collective checks (collective_checks.h) on NCCL.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "unshackle/common/check.h"

namespace unshackle::cluster_checks {

struct DeviceMemory {
  int device = 0;

  void* allocate(size_t bytes) {
    void* p = nullptr;
    cuda(cudaSetDevice(device), "cudaSetDevice");
    cuda(cudaMalloc(&p, std::max<size_t>(bytes, 1)), "cudaMalloc");
    return p;
  }
  void release(void* p) { cudaFree(p); }
  // A pageable host-to-device copy may return before its DMA lands, and the communicator's
  // non-blocking stream does not wait for the legacy stream: synchronise before any call.
  void put(void* dst, const void* src, size_t bytes) {
    cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
    cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
  void get(void* dst, const void* src, size_t bytes) {
    cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
  }

  static void cuda(cudaError_t code, const char* what) {
    UNS_CHECK_KIND(kInternal, code == cudaSuccess, "{} failed: {}", what, cudaGetErrorString(code));
  }
};

}  // namespace unshackle::cluster_checks
