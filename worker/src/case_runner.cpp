#include "unshackle/worker/case_runner.h"

#include "unshackle/worker/context_attention.h"

namespace unshackle {
namespace {

// A host vector copied into backend memory.
BackendBuffer upload(Backend& backend, const std::vector<float>& values) {
  BackendBuffer buffer(backend, values.size() * sizeof(float));
  backend.copy_to_backend(buffer.data(), values.data(), values.size() * sizeof(float));
  return buffer;
}

}  // namespace

StepResult run_case_distributed(const StepCase& step, Backend& backend, Communicator& comm, int64_t kv_block) {
  step.validate();
  CompressionWeights weights;
  if (step.config.needs_compression()) {
    weights.d_c = step.d_c;
    weights.wq.push_back(step.wq);
    weights.wk.push_back(step.wk);
  }
  ContextAttentionOptions options{.attention = step.config, .layers = 1, .H = step.H, .G = step.G, .d = step.d,
                                  .kv_dtype = DType::kF32, .kv_block = kv_block,
                                  .inv_freq = rope_inv_freq(step.d, step.rope_theta, step.rope_scaling),
                                  .compression = step.config.needs_compression() ? &weights : nullptr};
  ContextAttention attention(backend, comm, options);
  const size_t row = static_cast<size_t>(step.G) * step.d;
  const BackendBuffer k = upload(backend, step.k), v = upload(backend, step.v), q = upload(backend, step.q);
  attention.load_kv(0, k.as<float>(), v.as<float>(), step.p);
  attention.commit_chunk(step.p);
  BackendBuffer o(backend, step.q.size() * sizeof(float));
  attention.forward(0, q.as<float>(), k.as<float>() + static_cast<size_t>(step.p) * row,
                    v.as<float>() + static_cast<size_t>(step.p) * row, step.l_C, o.as<float>());
  StepResult result;
  result.o.resize(step.q.size());
  backend.copy_to_host(result.o.data(), o.data(), result.o.size() * sizeof(float));
  result.selected = attention.last_stats(0).selected;
  result.evicted = attention.last_stats(0).evicted;
  return result;
}

}  // namespace unshackle
