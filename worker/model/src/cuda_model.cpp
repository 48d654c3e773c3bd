// CudaModel: weights on one GPU, cuBLAS GEMMs, the element-wise kernels of
// cuda/model_kernels.h, attention through ContextAttention on the CUDA backend.
#include "unshackle/model/cuda_model.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <thread>

#include "cuda/model_kernels.h"
#include "unshackle/common/check.h"

namespace unshackle {
namespace {

void cuda_ok(cudaError_t status, const char* what) {
  UNS_CHECK_KIND(kInternal, status == cudaSuccess, "CUDA model: {} failed: {}", what, cudaGetErrorString(status));
}

void blas_ok(cublasStatus_t status, const char* what) {
  UNS_CHECK_KIND(kInternal, status == CUBLAS_STATUS_SUCCESS, "CUDA model: {} failed: cuBLAS status {} ({})", what,
                 static_cast<int>(status), cublasGetStatusString(status));
}

// One cudaMalloc'd allocation (RAII), or with pinned_host() one cudaMallocHost'd (page-locked
// host memory: copies to and from it are DMA, without the driver's staging through pageable).
class DeviceMemory {
 public:
  DeviceMemory() = default;
  explicit DeviceMemory(size_t bytes) : bytes_(bytes) {
    if (bytes) cuda_ok(cudaMalloc(&ptr_, bytes), "cudaMalloc");
  }
  static DeviceMemory pinned_host(size_t bytes) {
    DeviceMemory m;
    m.bytes_ = bytes;
    m.host_ = true;
    if (bytes) cuda_ok(cudaMallocHost(&m.ptr_, bytes), "cudaMallocHost");
    return m;
  }
  DeviceMemory(DeviceMemory&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_), host_(o.host_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceMemory& operator=(DeviceMemory&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    std::swap(host_, o.host_);
    return *this;
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    if (ptr_ && host_) cudaFreeHost(ptr_);
    else if (ptr_) cudaFree(ptr_);
  }
  void* get() const { return ptr_; }
  template <typename T> T* as() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  bool host_ = false;
};

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kBF16: return CUDA_R_16BF;
    case DType::kF16: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

// Converts host float32 to `dtype` (exact when the values came from that dtype, as a
// loaded checkpoint's do), in parallel: an 8B model is 8G values.
std::vector<uint16_t> to_16bit(const float* src, size_t count, DType dtype) {
  std::vector<uint16_t> out(count);
  const size_t workers = std::clamp<size_t>(std::thread::hardware_concurrency(), 1, 16);
  const size_t per = (count + workers - 1) / workers;
  std::vector<std::thread> threads;
  for (size_t w = 0; w < workers && w * per < count; ++w) {
    threads.emplace_back([&, w] {
      const size_t end = std::min(count, (w + 1) * per);
      for (size_t i = w * per; i < end; ++i) out[i] = dtype == DType::kBF16 ? float_to_bf16(src[i]) : float_to_fp16(src[i]);
    });
  }
  for (auto& t : threads) t.join();
  return out;
}

}  // namespace

struct CudaModel::Impl {
  struct Layer {
    DeviceMemory wqkv;        // [Wq + 2 Wkv, D], weight dtype (rows of wq, then wk, then wv)
    DeviceMemory wo;          // [D, Wq]
    DeviceMemory w_gate_up;   // [2I, D] (rows of w_gate, then w_up)
    DeviceMemory w_down;      // [D, I]
    DeviceMemory attn_norm, mlp_norm;              // [D] f32
    DeviceMemory bqkv;        // [Wq + 2 Wkv] f32: bq | bk | bv (zeros for an absent part), empty without any
    DeviceMemory bo, b_gate, b_up, b_down;  // f32, empty when absent
  };

  DType wdtype = DType::kF32;
  // One token (decode) runs the layers' projections as our GEMVs, with the bias, the SwiGLU
  // and the cast of the attention output fused in (16-bit weights, widths a multiple of 8).
  bool decode_gemv = false;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  // Attention queues on the backend's stream; these order it against ours without a host wait
  // (two waits a layer before: decode 7.99 -> 7.14 ms per token without them, 8B shape, H200).
  cudaEvent_t qkv_ready = nullptr, attention_done = nullptr;
  DeviceMemory embed, lm_head, final_norm;  // lm_head empty when tied
  std::vector<Layer> layers;
  size_t weight_bytes = 0;

  // Scratch for up to `rows` tokens per chunk; grown on demand.
  int64_t rows = 0;
  DeviceMemory ids;         // [rows] int32
  DeviceMemory x;           // [rows, D] f32: the residual stream
  DeviceMemory h;           // [rows, max(D, Wq, I)] weight dtype: the next GEMM's input
  DeviceMemory qkv;         // [rows, Wq + 2 Wkv] f32
  DeviceMemory q, k, v, o;  // [rows, Wq], [rows, Wkv] x2, [rows, Wq] f32
  DeviceMemory gate_up;     // [rows, 2I] f32
  DeviceMemory logits;      // [logit_rows, V] f32
  int64_t logit_rows = 0;
  // Pinned staging for a decode step's transfers (ids in, one row of logits out): a pageable
  // copy of 513 KB of Llama-3 logits goes through the driver's staging, on the critical path
  // of every token. Larger chunks copy from and to pageable memory directly.
  static constexpr int64_t kPinnedRows = 8;
  DeviceMemory ids_pinned;     // [kPinnedRows] int32, pinned host
  DeviceMemory logits_pinned;  // [kPinnedRows, V] f32, pinned host

  ~Impl() {
    if (stream) cudaStreamSynchronize(stream);
    if (qkv_ready) cudaEventDestroy(qkv_ready);
    if (attention_done) cudaEventDestroy(attention_done);
    if (blas) cublasDestroy(blas);
    if (stream) cudaStreamDestroy(stream);
  }

  // Concatenates host f32 matrices row-wise and uploads them in the weight dtype.
  DeviceMemory upload(std::initializer_list<const std::vector<float>*> parts, DType dtype) {
    size_t count = 0;
    for (const auto* p : parts) count += p->size();
    DeviceMemory mem(count * dtype_size(dtype));
    size_t offset = 0;
    for (const auto* p : parts) {
      if (dtype == DType::kF32) {
        cuda_ok(cudaMemcpy(mem.as<float>() + offset, p->data(), p->size() * 4, cudaMemcpyHostToDevice), "upload");
      } else {
        const std::vector<uint16_t> half = to_16bit(p->data(), p->size(), dtype);
        cuda_ok(cudaMemcpy(mem.as<uint16_t>() + offset, half.data(), half.size() * 2, cudaMemcpyHostToDevice), "upload");
      }
      offset += p->size();
    }
    weight_bytes += mem.bytes();
    return mem;
  }
  DeviceMemory upload_f32(const std::vector<float>& values) {
    if (values.empty()) return {};
    return upload({&values}, DType::kF32);
  }

  // y[n, out] = x[n, in] · W[out, in]^T (+ y when accumulate). cuBLAS is column-major: the
  // row-major y^T = W · x^T is C = op(A) B with A = W read as [in, out] (transposed) and
  // B = x read as [in, n]. Float32 accumulation, no TF32. Chunks and the lm_head (99% of
  // bandwidth at one token, ncu, H200); a decode layer's projections go to gemv below.
  void gemm(const void* W, const void* x_in, float* y, int64_t n, int64_t in, int64_t out, bool accumulate) {
    UNS_CHECK(n <= INT_MAX && in <= INT_MAX && out <= INT_MAX, "CUDA model: GEMM sizes beyond int");
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    const cudaDataType_t t = cuda_type(wdtype);
    blas_ok(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(n),
                         static_cast<int>(in), &alpha, W, t, static_cast<int>(in), x_in, t, static_cast<int>(in),
                         &beta, y, CUDA_R_32F, static_cast<int>(out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "cublasGemmEx");
  }
  // One token's projections: cuBLAS read the layers' q/k/v, o and down weights at 51-81% of
  // bandwidth there (split-K + a reduce where it accumulates; ncu, H200).
  void gemv(cuda_model::GemvParams p) {
    p.dtype = wdtype;
    cuda_ok(cuda_model::launch_gemv(p, stream), "gemv");
  }

  void reserve(const ModelConfig& c, int64_t n) {
    if (n <= rows) return;
    cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    const int64_t D = c.hidden, I = c.intermediate;
    const int64_t Wq = int64_t{c.heads} * c.head_dim, Wkv = int64_t{c.kv_heads} * c.head_dim;
    const auto f32 = [&](int64_t width) { return DeviceMemory(static_cast<size_t>(n * width) * 4); };
    ids = DeviceMemory(static_cast<size_t>(n) * 4);
    x = f32(D);
    h = DeviceMemory(static_cast<size_t>(n * std::max({D, Wq, I})) * dtype_size(wdtype));
    qkv = f32(Wq + 2 * Wkv);
    q = f32(Wq);
    k = f32(Wkv);
    v = f32(Wkv);
    o = f32(Wq);
    gate_up = f32(2 * I);
    rows = n;
  }
};

DType CudaModel::default_weight_dtype(const ModelConfig& config) {
  if (config.torch_dtype == "bfloat16") return DType::kBF16;
  if (config.torch_dtype == "float16") return DType::kF16;
  return DType::kF32;
}

int CudaModel::device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

CudaModel::CudaModel(std::shared_ptr<const Model> model, int device, DType weight_dtype)
    : model_(std::move(model)), device_(device), weight_dtype_(weight_dtype), impl_(std::make_unique<Impl>()) {
  UNS_CHECK(model_ != nullptr, "CudaModel: no model");
  UNS_CHECK(weight_dtype == DType::kF32 || weight_dtype == DType::kBF16 || weight_dtype == DType::kF16,
            "CudaModel: weight dtype must be F32, BF16 or F16 (got {})", dtype_name(weight_dtype));
  const int count = device_count();
  UNS_CHECK_KIND(kUnsupported, device >= 0 && device < count, "--backend cuda: no CUDA device {} ({} visible)", device,
                 count);
  cuda_ok(cudaSetDevice(device), "cudaSetDevice");
  Impl& m = *impl_;
  m.wdtype = weight_dtype;
  {
    const ModelConfig& c = model_->config();
    const int64_t Wq = int64_t{c.heads} * c.head_dim;
    m.decode_gemv = weight_dtype != DType::kF32 && c.hidden % 8 == 0 && Wq % 8 == 0 && c.intermediate % 8 == 0;
  }
  cuda_ok(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  cuda_ok(cudaEventCreateWithFlags(&m.qkv_ready, cudaEventDisableTiming), "cudaEventCreate");
  cuda_ok(cudaEventCreateWithFlags(&m.attention_done, cudaEventDisableTiming), "cudaEventCreate");
  blas_ok(cublasCreate(&m.blas), "cublasCreate");
  blas_ok(cublasSetStream(m.blas, m.stream), "cublasSetStream");
  blas_ok(cublasSetMathMode(m.blas, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");  // no TF32
  m.ids_pinned = DeviceMemory::pinned_host(static_cast<size_t>(Impl::kPinnedRows) * 4);
  m.logits_pinned = DeviceMemory::pinned_host(static_cast<size_t>(Impl::kPinnedRows * model_->config().vocab) * 4);

  const ModelConfig& c = model_->config();
  const ModelWeights& w = model_->weights();
  m.embed = m.upload({&w.embed}, weight_dtype);
  if (!c.tie_word_embeddings) m.lm_head = m.upload({&w.lm_head}, weight_dtype);
  m.final_norm = m.upload_f32(w.final_norm);
  m.layers.resize(w.layers.size());
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& L = w.layers[l];
    Impl::Layer& d = m.layers[l];
    d.wqkv = m.upload({&L.wq, &L.wk, &L.wv}, weight_dtype);
    d.wo = m.upload({&L.wo}, weight_dtype);
    d.w_gate_up = m.upload({&L.w_gate, &L.w_up}, weight_dtype);
    d.w_down = m.upload({&L.w_down}, weight_dtype);
    d.attn_norm = m.upload_f32(L.attn_norm);
    d.mlp_norm = m.upload_f32(L.mlp_norm);
    if (!L.bq.empty() || !L.bk.empty() || !L.bv.empty()) {
      const size_t Wq = static_cast<size_t>(c.heads) * c.head_dim, Wkv = static_cast<size_t>(c.kv_heads) * c.head_dim;
      std::vector<float> bqkv(Wq + 2 * Wkv, 0.0f);
      std::copy(L.bq.begin(), L.bq.end(), bqkv.begin());
      std::copy(L.bk.begin(), L.bk.end(), bqkv.begin() + static_cast<ptrdiff_t>(Wq));
      std::copy(L.bv.begin(), L.bv.end(), bqkv.begin() + static_cast<ptrdiff_t>(Wq + Wkv));
      d.bqkv = m.upload_f32(bqkv);
    }
    d.bo = m.upload_f32(L.bo);
    d.b_gate = m.upload_f32(L.b_gate);
    d.b_up = m.upload_f32(L.b_up);
    d.b_down = m.upload_f32(L.b_down);
  }
}

CudaModel::~CudaModel() {
  if (impl_) cudaSetDevice(device_);
}

size_t CudaModel::weight_bytes() const { return impl_->weight_bytes; }

void CudaModel::forward_chunk(ContextAttention& context, std::span<const int32_t> tokens, std::vector<float>& logits,
                              bool all_positions) {
  const ModelConfig& c = config();
  const auto n = static_cast<int64_t>(tokens.size());
  UNS_CHECK(n > 0, "forward_chunk: empty chunk");
  const ContextAttentionOptions& ao = context.options();
  UNS_CHECK(ao.layers == c.layers && ao.H == c.heads && ao.G == c.kv_heads && ao.d == c.head_dim,
            "forward_chunk: the context was built for another model shape");
  UNS_CHECK(context.backend().memory_space() == MemorySpace::kDevice,
            "forward_chunk: the CUDA model needs a context on the CUDA backend (got '{}')", context.backend().name());
  const int64_t D = c.hidden, I = c.intermediate, V = c.vocab;
  const int64_t Wq = int64_t{c.heads} * c.head_dim, Wkv = int64_t{c.kv_heads} * c.head_dim;
  for (int64_t t = 0; t < n; ++t) {
    const int32_t id = tokens[static_cast<size_t>(t)];
    UNS_CHECK(id >= 0 && id < V, "token id {} outside the vocabulary [0, {})", id, V);
  }
  cuda_ok(cudaSetDevice(device_), "cudaSetDevice");
  Impl& m = *impl_;
  m.reserve(c, n);
  cudaStream_t s = m.stream;
  auto* const attention_stream = static_cast<cudaStream_t>(context.backend().native_stream());
  const DType wd = m.wdtype;
  const auto eps = static_cast<float>(c.rms_eps);
  const void* ids_src = tokens.data();
  if (n <= Impl::kPinnedRows) {  // no copy from it is pending: every call that returned ended synchronized
    std::copy(tokens.begin(), tokens.end(), m.ids_pinned.as<int32_t>());
    ids_src = m.ids_pinned.get();
  }
  cuda_ok(cudaMemcpyAsync(m.ids.get(), ids_src, static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, s), "ids");
  cuda_ok(cuda_model::launch_gather({.ids = m.ids.as<int32_t>(), .table = m.embed.get(), .out = m.x.as<float>(), .n = n,
                                     .D = D, .table_dtype = wd}, s), "gather");
  // One token with 16-bit weights: GEMVs with the bias, the SwiGLU and the cast fused in, and
  // q, k, v read in place from the q|k|v row (3 kernels a layer fewer than a chunk's path).
  const bool decode = n == 1 && m.decode_gemv;
  for (int layer = 0; layer < c.layers; ++layer) {
    const Impl::Layer& L = m.layers[static_cast<size_t>(layer)];
    const float* bqkv = L.bqkv.as<float>();  // null when the model has no q/k/v bias
    // Attention block.
    cuda_ok(cuda_model::launch_rms_norm({.x = m.x.as<float>(), .weight = L.attn_norm.as<float>(), .out = m.h.get(),
                                         .n = n, .D = D, .eps = eps, .out_dtype = wd}, s), "rms_norm");
    float *q = m.q.as<float>(), *k = m.k.as<float>(), *v = m.v.as<float>();
    if (decode) {
      m.gemv({.W = L.wqkv.get(), .x = m.h.get(), .bias = bqkv, .y = m.qkv.as<float>(), .rows = Wq + 2 * Wkv, .cols = D});
      q = m.qkv.as<float>();
      k = q + Wq;
      v = k + Wkv;
    } else {
      m.gemm(L.wqkv.get(), m.h.get(), m.qkv.as<float>(), n, D, Wq + 2 * Wkv, false);
      cuda_ok(cuda_model::launch_split_qkv({.qkv = m.qkv.as<float>(), .bq = bqkv, .bk = bqkv ? bqkv + Wq : nullptr,
                                            .bv = bqkv ? bqkv + Wq + Wkv : nullptr, .q = q, .k = k, .v = v, .n = n,
                                            .Wq = Wq, .Wkv = Wkv}, s), "split_qkv");
    }
    // The backend queues on its own stream: q, k, v must be written before it reads them,
    // and o must be complete before our stream reads it (and before the next layer's
    // projection overwrites q, k, v). Stream-ordered by events where the backend names its
    // stream; the host goes on queueing (host code inside forward that reads back, e.g. a
    // LagKV partition, waits on the backend's stream, which waits on ours).
    if (attention_stream != nullptr) {
      cuda_ok(cudaEventRecord(m.qkv_ready, s), "cudaEventRecord");
      cuda_ok(cudaStreamWaitEvent(attention_stream, m.qkv_ready, 0), "cudaStreamWaitEvent");
    } else {
      cuda_ok(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    }
    context.forward(layer, q, k, v, n, m.o.as<float>());
    if (attention_stream != nullptr) {
      cuda_ok(cudaEventRecord(m.attention_done, attention_stream), "cudaEventRecord");
      cuda_ok(cudaStreamWaitEvent(s, m.attention_done, 0), "cudaStreamWaitEvent");
    } else {
      context.backend().synchronize();
    }
    if (decode) {  // x += o · Wo^T (+ bo), o rounded to the weight dtype as it is read
      m.gemv({.W = L.wo.get(), .x = m.o.get(), .bias = L.bo.as<float>(), .y = m.x.as<float>(), .rows = D, .cols = Wq,
              .x_f32 = true, .accumulate = true});
    } else {
      const void* o_in = m.o.get();
      if (wd != DType::kF32) {
        cuda_ok(cuda_model::launch_cast({.in = m.o.as<float>(), .out = m.h.get(), .count = n * Wq, .out_dtype = wd}, s),
                "cast");
        o_in = m.h.get();
      }
      m.gemm(L.wo.get(), o_in, m.x.as<float>(), n, Wq, D, true);  // x += o · Wo^T
      if (L.bo.get()) {
        cuda_ok(cuda_model::launch_bias_add({.y = m.x.as<float>(), .bias = L.bo.as<float>(), .n = n, .width = D}, s),
                "bias_add");
      }
    }
    // SwiGLU MLP: x += down(silu(gate(h)) * up(h)).
    cuda_ok(cuda_model::launch_rms_norm({.x = m.x.as<float>(), .weight = L.mlp_norm.as<float>(), .out = m.h.get(),
                                         .n = n, .D = D, .eps = eps, .out_dtype = wd}, s), "rms_norm");
    if (decode) {
      // The activation silu(g) * u, [I] in the weight dtype, in gate_up's f32 scratch (unused
      // here): m.h holds the GEMV's input.
      void* const act = m.gate_up.get();
      cuda_ok(cuda_model::launch_gated_gemv({.W = L.w_gate_up.get(), .x = m.h.get(), .b_gate = L.b_gate.as<float>(),
                                             .b_up = L.b_up.as<float>(), .out = act, .I = I, .cols = D, .dtype = wd}, s),
              "gated_gemv");
      m.gemv({.W = L.w_down.get(), .x = act, .bias = L.b_down.as<float>(), .y = m.x.as<float>(), .rows = D, .cols = I,
              .accumulate = true});
    } else {
      m.gemm(L.w_gate_up.get(), m.h.get(), m.gate_up.as<float>(), n, D, 2 * I, false);
      cuda_ok(cuda_model::launch_swiglu({.gate_up = m.gate_up.as<float>(), .b_gate = L.b_gate.as<float>(),
                                         .b_up = L.b_up.as<float>(), .out = m.h.get(), .n = n, .I = I, .out_dtype = wd}, s),
              "swiglu");
      m.gemm(L.w_down.get(), m.h.get(), m.x.as<float>(), n, I, D, true);
      if (L.b_down.get()) {
        cuda_ok(cuda_model::launch_bias_add({.y = m.x.as<float>(), .bias = L.b_down.as<float>(), .n = n, .width = D}, s),
                "bias_add");
      }
    }
  }
  context.commit_chunk(n);

  const int64_t first = all_positions ? 0 : n - 1, rows = n - first;
  cuda_ok(cuda_model::launch_rms_norm({.x = m.x.as<float>() + first * D, .weight = m.final_norm.as<float>(),
                                       .out = m.h.get(), .n = rows, .D = D, .eps = eps, .out_dtype = wd}, s), "rms_norm");
  if (rows > m.logit_rows) {
    cuda_ok(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    m.logits = DeviceMemory(static_cast<size_t>(rows * V) * 4);
    m.logit_rows = rows;
  }
  m.gemm(c.tie_word_embeddings ? m.embed.get() : m.lm_head.get(), m.h.get(), m.logits.as<float>(), rows, D, V, false);
  logits.resize(static_cast<size_t>(rows * V));
  const bool pinned = rows <= Impl::kPinnedRows;
  cuda_ok(cudaMemcpyAsync(pinned ? m.logits_pinned.get() : logits.data(), m.logits.get(), logits.size() * 4,
                          cudaMemcpyDeviceToHost, s), "logits");
  cuda_ok(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  if (pinned) std::copy_n(m.logits_pinned.as<float>(), logits.size(), logits.data());
}

void CudaModel::prefill(ContextAttention& context, std::span<const int32_t> tokens, int64_t chunk,
                        std::vector<float>& logits, bool all_positions) {
  UNS_CHECK(chunk > 0, "chunk: must be > 0 (got {})", chunk);
  UNS_CHECK(!tokens.empty(), "prefill: no tokens");
  std::vector<float> piece;
  if (all_positions) logits.clear();
  for (size_t begin = 0; begin < tokens.size(); begin += static_cast<size_t>(chunk)) {
    const size_t count = std::min(static_cast<size_t>(chunk), tokens.size() - begin);
    forward_chunk(context, tokens.subspan(begin, count), piece, all_positions);
    if (all_positions) {
      logits.insert(logits.end(), piece.begin(), piece.end());
    } else {
      logits.swap(piece);
    }
  }
}

}  // namespace unshackle
