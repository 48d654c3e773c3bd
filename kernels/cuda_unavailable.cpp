// Built when the CUDA backend is not: asking for it is a clear error, never a fallback.
#include "unshackle/common/check.h"
#include "unshackle/kernels/backend.h"

namespace unshackle {

std::unique_ptr<Backend> make_cuda_backend(int) {
  fail(ErrorKind::kUnsupported, "this build has no CUDA backend (configure with nvcc on PATH, UNS_ENABLE_CUDA=ON)");
}

bool cuda_backend_available() { return false; }

}  // namespace unshackle
