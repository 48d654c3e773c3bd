// Built when the CUDA backend is not: asking for the CUDA model is a clear error, never a
// fallback to the CPU.
#include "unshackle/common/check.h"
#include "unshackle/model/cuda_model.h"

namespace unshackle {

struct CudaModel::Impl {};

namespace {
[[noreturn]] void unavailable() {
  fail(ErrorKind::kUnsupported,
       "--backend cuda: this build has no CUDA (configure with nvcc on PATH, UNS_ENABLE_CUDA=ON)");
}
}  // namespace

DType CudaModel::default_weight_dtype(const ModelConfig& config) {
  if (config.torch_dtype == "bfloat16") return DType::kBF16;
  if (config.torch_dtype == "float16") return DType::kF16;
  return DType::kF32;
}
int CudaModel::device_count() { return 0; }
CudaModel::CudaModel(std::shared_ptr<const Model> model, int device, DType weight_dtype)
    : model_(std::move(model)), device_(device), weight_dtype_(weight_dtype) {
  unavailable();
}
CudaModel::~CudaModel() = default;
size_t CudaModel::weight_bytes() const { return 0; }
void CudaModel::forward_chunk(ContextAttention&, std::span<const int32_t>, std::vector<float>&, bool) { unavailable(); }
void CudaModel::prefill(ContextAttention&, std::span<const int32_t>, int64_t, std::vector<float>&, bool) {
  unavailable();
}

}  // namespace unshackle
