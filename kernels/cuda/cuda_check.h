// One check macro for CUDA calls: names file, line and the failed expression, and throws
// (never exits) so the service can turn it into a per-request error.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "unshackle/common/error.h"

#define UNS_CUDA_CHECK(expr)                                                                        \
  do {                                                                                              \
    const cudaError_t uns_cuda_status_ = (expr);                                                    \
    if (uns_cuda_status_ != cudaSuccess) [[unlikely]]                                               \
      ::unshackle::detail::throw_check_failure(::unshackle::ErrorKind::kInternal, __FILE__, __LINE__, \
                                               #expr, cudaGetErrorString(uns_cuda_status_));        \
  } while (0)

// After a launch: the launch itself must have been accepted.
#define UNS_CUDA_CHECK_LAUNCH() UNS_CUDA_CHECK(cudaGetLastError())

// UNS_CUDA_REQUIRE(kind, cond, message): a check in CUDA sources, which cannot use fmt.
#define UNS_CUDA_REQUIRE(kind, cond, message)                                                      \
  do {                                                                                             \
    if (!(cond)) [[unlikely]]                                                                      \
      ::unshackle::detail::throw_check_failure(::unshackle::ErrorKind::kind, __FILE__, __LINE__, #cond, \
                                               (message));                                         \
  } while (0)
