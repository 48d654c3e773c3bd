// Each CUDA op of one decode step (and the prefill chunk's scoring and attention) at 128k,
// 256k and 1M rows, Llama-3-8B shape (H = 32, G = 8, d = 128, d' = 128, k = 2048), bf16
// K/V/k', through the launchers with CUDA events on one stream: median over many reps after
// warm-up, inputs rotated over enough copies that no rep reads from L2 (> 4x its 50-60 MB).
// Bandwidth is (bytes read + written) / time, against a device-to-device copy measured in the
// same run.
//   bench_kernels [rows...]        ($OUT set: also writes $OUT/bench_kernels.csv)
//
// Bytes and FLOPs (n rows; R = 6272 = l_I + k + l_L attended rows in ESA):
//   score decode:      n*d'*2 (k') + n*4 (score out)            FLOPs 2*n*d'
//   score query max:   n*d'*2                                   FLOPs 2*n*d'
//   score, rows list:  n*d'*2 + n*4 (rows) + n*4 (out)          FLOPs 2*n*d'
//   score chunk 512:   n*d'*2 + n*4 (queries from L2)            FLOPs 2*n*d'*512 useful; the tensor
//   score qmax 512:    n*d'*2                                     cores run 2x that (q' = bf16 hi + lo):
//                                                                 "executed" FLOPs 4*n*d'*512
//   bf16 GEMM anchor:  cuBLAS 8192^3, bf16 in/out, fp32 compute    FLOPs 2*8192^3 (the tensor-core peak
//                                                                 the chunk rows are a percentage of)
//   proximity eps 1:   n*(4 + 8 + 4)
//   top-k 2048:        n*(4 + 8) read (the minimum, one pass); also its launches per call
//                      (counted from a stream capture), the captured graph replayed, and a
//                      per-kernel breakdown (UNS_TOPK_SPLIT_RANK: the rank as its own launch;
//                      the captured kernels launched one by one, events between)
//   attend ESA (R):    R*2*G*d*2 + R*(4 + 8) (rows, tokens)       FLOPs 4*R*H*d   (relative: keys rotated)
//   attend ESA global: R*2*G*d*2 + R*4                          FLOPs 4*R*H*d   (keys unrotated)
//   attend full (n):   n*2*G*d*2 + n*8 (tokens)                   FLOPs 4*n*H*d
//   attend chunk (C):  C = 6784 = 128 + 2048 + 4096 + 512 rows (I, M_k, window, chunk), l_C = 512
//                      queries: C*2*G*d*2 + C*12 + l_C*H*d*4 + l_C*H*(d+1)*4 (K/V counted once)
//                      FLOPs 4*l_C*C*H*d, on the tensor cores (attend_mma.cuh); l_C = 15 / 16
//                      rows compare the row kernel with the tensor-core one at the dispatch edge
//   mma.sync peak:     back-to-back bf16 m16n8k16 from registers (the chunk kernel's
//                      instruction), FLOPs 4096 per mma: the anchor the chunk rows are a % of
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "launchers.h"
#include "unshackle/kernels/attention_config.h"

using namespace unshackle;

namespace {

constexpr int kH = 32, kG = 8, kD = 128, kDc = 128, kTopK = 2048, kEsaRows = 6272, kChunk = 512;
constexpr int kEsaChunkRows = 128 + 2048 + 4096 + 512;

__device__ __forceinline__ float hashed(uint64_t seed, uint64_t i) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + i;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<float>(static_cast<double>(x >> 11) * (2.0 / 9007199254740992.0) - 1.0);  // (-1, 1)
}
__global__ void fill_bf16(__nv_bfloat16* out, size_t count, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(hashed(seed, i));
}
__global__ void fill_f32(float* out, size_t count, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = hashed(seed, i);
}
// Rows: a scattered permutation-like walk of the store; tokens: ascending with gaps.
__global__ void fill_rows(int32_t* rows, int64_t count, int64_t store, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count; i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    rows[i] = static_cast<int32_t>((static_cast<uint64_t>(i) * 2654435761ull + seed) % static_cast<uint64_t>(store));
}
__global__ void fill_tokens(int64_t* tokens, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count; i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    tokens[i] = 2 * i;
}

template <typename T>
T* device_alloc(size_t count) {
  void* p = nullptr;
  UNS_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)));
  return static_cast<T*>(p);
}

struct Timer {
  cudaStream_t stream;
  // Median milliseconds of `reps` runs of op(rep) after `warmup` runs, one event pair each.
  double median_ms(int reps, const std::function<void(int)>& op, int warmup = 3) {
    for (int i = 0; i < warmup; ++i) op(i);
    UNS_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<cudaEvent_t> events(2 * static_cast<size_t>(reps));
    for (auto& e : events) UNS_CUDA_CHECK(cudaEventCreate(&e));
    for (int i = 0; i < reps; ++i) {
      UNS_CUDA_CHECK(cudaEventRecord(events[2 * i], stream));
      op(i);
      UNS_CUDA_CHECK(cudaEventRecord(events[2 * i + 1], stream));
    }
    UNS_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<double> ms;
    for (int i = 0; i < reps; ++i) {
      float t = 0;
      UNS_CUDA_CHECK(cudaEventElapsedTime(&t, events[2 * i], events[2 * i + 1]));
      ms.push_back(t);
    }
    for (auto& e : events) cudaEventDestroy(e);
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }
};

struct Row {
  std::string op;
  int64_t rows;
  double us, bytes, flops;
};

#define BENCH_CUBLAS_CHECK(expr)                                                                 \
  do {                                                                                           \
    const cublasStatus_t status_ = (expr);                                                       \
    if (status_ != CUBLAS_STATUS_SUCCESS) {                                                      \
      std::fprintf(stderr, "%s:%d: %s failed: status %d\n", __FILE__, __LINE__, #expr, status_); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

// The bf16 tensor-core rate this device reaches in a large, well-shaped GEMM: cuBLAS
// C = A * B, 8192^3, bf16 in and out, fp32 compute, random inputs (zeros run faster). TFLOP/s.
double gemm_anchor_tflops(Timer& timer, cudaStream_t stream) {
  constexpr int kM = 8192;
  const size_t count = static_cast<size_t>(kM) * kM;
  __nv_bfloat16* a = device_alloc<__nv_bfloat16>(count);
  __nv_bfloat16* b = device_alloc<__nv_bfloat16>(count);
  __nv_bfloat16* c = device_alloc<__nv_bfloat16>(count);
  fill_bf16<<<1024, 256, 0, stream>>>(a, count, 50);
  fill_bf16<<<1024, 256, 0, stream>>>(b, count, 51);
  cublasHandle_t handle;
  BENCH_CUBLAS_CHECK(cublasCreate(&handle));
  BENCH_CUBLAS_CHECK(cublasSetStream(handle, stream));
  const float alpha = 1.0f, beta = 0.0f;
  const double ms = timer.median_ms(20, [&](int) {
    BENCH_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, kM, kM, kM, &alpha, a, CUDA_R_16BF, kM, b, CUDA_R_16BF,
                                    kM, &beta, c, CUDA_R_16BF, kM, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }, 5);
  BENCH_CUBLAS_CHECK(cublasDestroy(handle));
  UNS_CUDA_CHECK(cudaFree(a));
  UNS_CUDA_CHECK(cudaFree(b));
  UNS_CUDA_CHECK(cudaFree(c));
  return 2.0 * kM * kM * static_cast<double>(kM) / (ms * 1e-3) * 1e-12;
}

// The bf16 tensor-core rate of mma.sync on this device: every warp runs kChains independent
// m16n8k16 accumulations on register operands (non-zero bf16 bits), no memory traffic.
constexpr int kChains = 8;
__global__ void mma_peak_kernel(float* sink, int iters) {
  const uint32_t lane = threadIdx.x % 32;
  const uint32_t a0 = 0x3f803f00u ^ lane, a1 = 0x3f403e80u + lane, a2 = 0x3ec03f20u, a3 = 0x3f103f60u ^ (lane << 1);
  const uint32_t b0 = 0x3f203e40u + lane, b1 = 0x3e603f30u ^ lane;
  float acc[kChains][4] = {};
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c)
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(acc[c][0]), "+f"(acc[c][1]), "+f"(acc[c][2]), "+f"(acc[c][3])
          : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  float total = 0;
#pragma unroll
  for (int c = 0; c < kChains; ++c) total += acc[c][0] + acc[c][1] + acc[c][2] + acc[c][3];
  if (total == 1.5f) sink[0] = total;  // never true for these inputs; keeps the chains live
}

double mma_peak_tflops(Timer& timer, cudaStream_t stream, int sms) {
  constexpr int kIters = 256, kWarps = 4;
  const int blocks = 8 * sms;
  float* sink = device_alloc<float>(1);
  const double ms = timer.median_ms(10, [&](int) { mma_peak_kernel<<<blocks, kWarps * 32, 0, stream>>>(sink, kIters); }, 3);
  UNS_CUDA_CHECK(cudaGetLastError());
  UNS_CUDA_CHECK(cudaFree(sink));
  return static_cast<double>(blocks) * kWarps * kIters * kChains * 4096.0 / (ms * 1e-3) * 1e-12;
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  std::vector<int64_t> sizes;
  for (int i = 1; i < argc; ++i) sizes.push_back(std::atoll(argv[i]));
  if (sizes.empty()) sizes = {131072, 262144, 1048576};
  cudaDeviceProp prop{};
  UNS_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  UNS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Timer timer{stream};
  cuda::Workspace topk_ws, attend_ws, score_ws;

  // Ceiling: a 1 GiB device-to-device copy, bytes read + written.
  const size_t copy_bytes = size_t{1} << 30;
  auto* a = device_alloc<unsigned char>(copy_bytes);
  auto* b = device_alloc<unsigned char>(copy_bytes);
  UNS_CUDA_CHECK(cudaMemsetAsync(a, 1, copy_bytes, stream));
  // Warm-up: ~0.3 s of copies so that clocks have ramped before anything is timed.
  for (int i = 0; i < 400; ++i) UNS_CUDA_CHECK(cudaMemcpyAsync(b, a, copy_bytes, cudaMemcpyDeviceToDevice, stream));
  const double copy_ms = timer.median_ms(20, [&](int) { UNS_CUDA_CHECK(cudaMemcpyAsync(b, a, copy_bytes, cudaMemcpyDeviceToDevice, stream)); });
  const double ceiling = 2.0 * static_cast<double>(copy_bytes) / (copy_ms * 1e-3) * 1e-9;  // GB/s
  UNS_CUDA_CHECK(cudaFree(a));
  UNS_CUDA_CHECK(cudaFree(b));
  std::printf("bench_kernels (commit %s) on %s, %d SMs, L2 %d MB; copy ceiling %.0f GB/s (1 GiB D2D, read + write)\n",
              UNS_BENCH_COMMIT, prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, ceiling);
  const double anchor = gemm_anchor_tflops(timer, stream);
  std::printf("bf16 tensor-core anchor: cuBLAS GEMM 8192^3 (bf16 in/out, fp32 compute) %.1f TFLOP/s\n", anchor);
  constexpr double kAnchorFlops = 2.0 * 8192 * 8192 * 8192;
  std::printf("shape H=%d G=%d d=%d d'=%d k=%d, bf16 K/V/k'; median of CUDA-event timed reps\n\n", kH, kG, kD, kDc, kTopK);
  const double mma_peak = mma_peak_tflops(timer, stream, prop.multiProcessorCount);
  std::printf("tensor-core anchor: mma.sync bf16 m16n8k16 from registers %.1f TFLOP/s\n\n", mma_peak);

  std::vector<Row> table, tensor_rows;
  const auto report = [&](const std::string& op, int64_t rows, double ms, double bytes, double flops) {
    table.push_back({op, rows, ms * 1e3, bytes, flops});
    const double gbs = bytes / (ms * 1e-3) * 1e-9;
    std::printf("%-24s n=%-8lld %10.2f us  %7.0f GB/s  %5.1f%% of copy  %8.2f TFLOP/s  (bytes %.4g, FLOPs %.4g)\n",
                op.c_str(), static_cast<long long>(rows), ms * 1e3, gbs, 100 * gbs / ceiling, flops / (ms * 1e-3) * 1e-12,
                bytes, flops);
    std::fflush(stdout);
  };

  const auto inv_host = rope_inv_freq(kD, 500000.0);
  float* inv = device_alloc<float>(inv_host.size());
  UNS_CUDA_CHECK(cudaMemcpy(inv, inv_host.data(), inv_host.size() * 4, cudaMemcpyHostToDevice));
  float* qc = device_alloc<float>(static_cast<size_t>(kChunk) * kDc);
  float* q = device_alloc<float>(static_cast<size_t>(kH) * kD);
  float* q_chunk = device_alloc<float>(static_cast<size_t>(kChunk) * kH * kD);
  float* o_chunk = device_alloc<float>(static_cast<size_t>(kChunk) * kH * kD);
  float* lse_chunk = device_alloc<float>(static_cast<size_t>(kChunk) * kH);
  float* row_max = device_alloc<float>(kChunk);
  fill_f32<<<64, 256, 0, stream>>>(qc, static_cast<size_t>(kChunk) * kDc, 1);
  fill_f32<<<64, 256, 0, stream>>>(q, static_cast<size_t>(kH) * kD, 2);
  fill_f32<<<256, 256, 0, stream>>>(q_chunk, static_cast<size_t>(kChunk) * kH * kD, 4);
  fill_f32<<<64, 256, 0, stream>>>(row_max, kChunk, 3);

  for (const int64_t n : sizes) {
    const size_t nn = static_cast<size_t>(n);
    // Copies so that each rep's inputs are evicted from L2 by the others' (>= 256 MB in all).
    const auto copies_for = [](double bytes) { return static_cast<int>(std::clamp(std::ceil(256e6 / bytes), 2.0, 16.0)); };
    const int kc_copies = copies_for(static_cast<double>(nn) * kDc * 2);
    std::vector<__nv_bfloat16*> kc(kc_copies);
    for (int c = 0; c < kc_copies; ++c) {
      kc[c] = device_alloc<__nv_bfloat16>(nn * kDc);
      fill_bf16<<<1024, 256, 0, stream>>>(kc[c], nn * kDc, 10 + c);
    }
    float* score = device_alloc<float>(nn);
    float* prox = device_alloc<float>(nn);
    float* qmax = device_alloc<float>(kChunk);
    int32_t* rows = device_alloc<int32_t>(nn);
    int64_t* tokens = device_alloc<int64_t>(nn);
    fill_rows<<<1024, 256, 0, stream>>>(rows, n, n, 17);
    fill_tokens<<<1024, 256, 0, stream>>>(tokens, n);
    UNS_CUDA_CHECK(cudaStreamSynchronize(stream));

    ScoreParams sp{.qc = qc, .kc_dtype = DType::kBF16, .n = n, .l_C = 1, .d_c = kDc, .query_max_out = qmax, .score_out = score};
    const double dn = static_cast<double>(n);
    report("score decode", n, timer.median_ms(50, [&](int i) { sp.kc = kc[i % kc_copies]; cuda::launch_score_chunk(sp, score_ws, stream); }),
           dn * (kDc * 2 + 4), 2 * dn * kDc);
    report("score query max", n, timer.median_ms(50, [&](int i) { sp.kc = kc[i % kc_copies]; cuda::launch_score_query_max(sp, score_ws, stream); }),
           dn * kDc * 2, 2 * dn * kDc);
    {
      ScoreParams rp = sp;
      rp.rows = rows;
      report("score decode, rows list", n, timer.median_ms(50, [&](int i) { rp.kc = kc[i % kc_copies]; cuda::launch_score_chunk(rp, score_ws, stream); }),
             dn * (kDc * 2 + 8), 2 * dn * kDc);
    }
    {
      // Prefill chunk, both passes of the layer step (query maxima, then scores against them):
      // bf16 k', d' = 128, l_C = 512 is the tensor-core path (score_mma.cuh).
      ScoreParams cp = sp;
      cp.l_C = kChunk;
      const double useful = 2 * dn * kDc * kChunk, executed = 2 * useful;  // executed: k.hi + k.lo
      cp.kc = kc[0];
      std::printf("  chunk l_C=%d: query max on %s, scores on %s\n", kChunk, cuda::score_kernel_name(cp, true),
                  cuda::score_kernel_name(cp, false));
      const auto tensor_report = [&](const char* op, double ms, double bytes) {
        report(op, n, ms, bytes, useful);
        std::printf("  %s: useful %.1f TFLOP/s = %.1f%% of the GEMM anchor; executed (2 MMAs, hi + lo) %.1f TFLOP/s = %.1f%%\n",
                    op, useful / (ms * 1e-3) * 1e-12, 100 * useful / (ms * 1e-3) * 1e-12 / anchor,
                    executed / (ms * 1e-3) * 1e-12, 100 * executed / (ms * 1e-3) * 1e-12 / anchor);
        tensor_rows.push_back({op, n, ms * 1e3, 0, useful});
      };
      tensor_report("score qmax l_C=512", timer.median_ms(10, [&](int i) {
                      cp.kc = kc[i % kc_copies];
                      cuda::launch_score_query_max(cp, score_ws, stream);
                    }, 2), dn * kDc * 2);
      UNS_CUDA_CHECK(cudaMemcpyAsync(row_max, qmax, kChunk * sizeof(float), cudaMemcpyDeviceToDevice, stream));
      cp.row_max = row_max;
      tensor_report("score chunk l_C=512", timer.median_ms(10, [&](int i) {
                      cp.kc = kc[i % kc_copies];
                      cuda::launch_score_chunk(cp, score_ws, stream);
                    }, 2), dn * (kDc * 2 + 4));
    }
    ProximityParams pp{.score = score, .tokens = tokens, .n = n, .eps = 1, .out = prox};
    report("proximity eps=1", n, timer.median_ms(50, [&](int) { cuda::launch_proximity(pp, stream); }), dn * 16, 0);
    {
      // Scores of the last rep as top-k input (real, distinct-ish values), rotated copies.
      const int copies = copies_for(dn * 12);
      std::vector<float*> values(copies);
      std::vector<int64_t*> toks(copies);
      for (int c = 0; c < copies; ++c) {
        values[c] = device_alloc<float>(nn);
        toks[c] = device_alloc<int64_t>(nn);
        sp.kc = kc[c % kc_copies];
        sp.score_out = values[c];
        cuda::launch_score_chunk(sp, score_ws, stream);
        UNS_CUDA_CHECK(cudaMemcpyAsync(toks[c], tokens, nn * 8, cudaMemcpyDeviceToDevice, stream));
      }
      sp.score_out = score;
      float* out_v = device_alloc<float>(kTopK);
      int64_t* out_t = device_alloc<int64_t>(kTopK);
      int64_t count = 0;
      TopKParams tp{.n = n, .k = kTopK, .out_values = out_v, .out_tokens = out_t, .out_count = &count};
      report("top-k 2048", n, timer.median_ms(50, [&](int i) {
               tp.values = values[i % copies];
               tp.tokens = toks[i % copies];
               cuda::launch_top_k(tp, topk_ws, stream);
             }), dn * 12, 0);
      if (count != kTopK) std::printf("  (top-k returned %lld entries)\n", static_cast<long long>(count));
      // Without out_count the op is queued only (ContextAttention's use): the device-side time.
      TopKParams queued = tp;
      queued.out_count = nullptr;
      report("top-k 2048, queued", n, timer.median_ms(50, [&](int i) {
               queued.values = values[i % copies];
               queued.tokens = toks[i % copies];
               cuda::launch_top_k(queued, topk_ws, stream);
             }), dn * 12, 0);
      // Launches per call, counted from a stream capture of queued calls (one graph per input
      // copy); replaying those graphs times the device work without the host's submission.
      std::vector<cudaGraphExec_t> graphs;
      std::vector<cudaGraph_t> captured;  // kept for the per-kernel breakdown below
      size_t kernels = 0, memsets = 0, others = 0;
      try {  // not fatal: the rows after this one still run
        for (int c = 0; c < copies; ++c) {
          queued.values = values[c];
          queued.tokens = toks[c];
          cudaGraph_t graph = nullptr;
          UNS_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
          cuda::launch_top_k(queued, topk_ws, stream);
          UNS_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
          if (c == 0) {
            size_t count = 0;
            UNS_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &count));
            std::vector<cudaGraphNode_t> nodes(count);
            UNS_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &count));
            for (cudaGraphNode_t node : nodes) {
              cudaGraphNodeType type;
              UNS_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
              (type == cudaGraphNodeTypeKernel ? kernels : type == cudaGraphNodeTypeMemset ? memsets : others) += 1;
            }
          }
          cudaGraphExec_t exec = nullptr;
          UNS_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
          captured.push_back(graph);
          graphs.push_back(exec);
        }
        std::printf("  top-k launches per call (stream capture, n=%lld): %zu kernels, %zu memsets, %zu other nodes\n",
                    static_cast<long long>(n), kernels, memsets, others);
        report("top-k 2048, graph", n, timer.median_ms(50, [&](int i) {
                 UNS_CUDA_CHECK(cudaGraphLaunch(graphs[static_cast<size_t>(i % copies)], stream));
               }), dn * 12, 0);
        // The replayed graph gives what a direct call gives (same input copy).
        std::vector<int64_t> direct(kTopK), replayed(kTopK);
        cuda::launch_top_k(queued, topk_ws, stream);
        UNS_CUDA_CHECK(cudaMemcpyAsync(direct.data(), out_t, kTopK * 8, cudaMemcpyDeviceToHost, stream));
        UNS_CUDA_CHECK(cudaGraphLaunch(graphs.back(), stream));
        UNS_CUDA_CHECK(cudaMemcpyAsync(replayed.data(), out_t, kTopK * 8, cudaMemcpyDeviceToHost, stream));
        UNS_CUDA_CHECK(cudaStreamSynchronize(stream));
        if (direct != replayed || std::count(direct.begin(), direct.end(), int64_t{-1}) != 0)
          std::printf("  (top-k graph replay differs from a direct call, or fewer than %d entries)\n", kTopK);
        // Per-kernel breakdown: calls captured with the rank split into its own launch
        // (UNS_TOPK_SPLIT_RANK), their kernels (capture order = launch order) launched one by one
        // with an event pair around each (cooperative where captured so; no dependent-launch
        // overlap), input copies rotated as above. Each kernel's time includes its launch gap.
        setenv("UNS_TOPK_SPLIT_RANK", "1", 1);
        std::vector<cudaGraph_t> split(static_cast<size_t>(copies));
        for (int c = 0; c < copies; ++c) {
          queued.values = values[c];
          queued.tokens = toks[c];
          UNS_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
          cuda::launch_top_k(queued, topk_ws, stream);
          UNS_CUDA_CHECK(cudaStreamEndCapture(stream, &split[static_cast<size_t>(c)]));
          captured.push_back(split[static_cast<size_t>(c)]);  // destroyed with the others
        }
        unsetenv("UNS_TOPK_SPLIT_RANK");
        std::vector<std::vector<cudaKernelNodeParams>> launches(split.size());
        std::vector<int> cooperative;  // per kernel (the select's grid barrier needs co-residency)
        for (size_t c = 0; c < split.size(); ++c) {
          size_t count = 0;
          UNS_CUDA_CHECK(cudaGraphGetNodes(split[c], nullptr, &count));
          std::vector<cudaGraphNode_t> nodes(count);
          UNS_CUDA_CHECK(cudaGraphGetNodes(split[c], nodes.data(), &count));
          for (cudaGraphNode_t node : nodes) {
            cudaGraphNodeType type;
            UNS_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
            if (type != cudaGraphNodeTypeKernel) continue;
            cudaKernelNodeParams kp{};
            UNS_CUDA_CHECK(cudaGraphKernelNodeGetParams(node, &kp));
            launches[c].push_back(kp);
            if (c == 0) {
              cudaLaunchAttributeValue value{};
              UNS_CUDA_CHECK(cudaGraphKernelNodeGetAttribute(node, cudaLaunchAttributeCooperative, &value));
              cooperative.push_back(value.cooperative);
            }
          }
        }
        const size_t stages = launches[0].size();
        const int reps = 50;
        std::vector<cudaEvent_t> marks(static_cast<size_t>(reps) * (stages + 1));
        for (auto& e : marks) UNS_CUDA_CHECK(cudaEventCreate(&e));
        for (int i = -3; i < reps; ++i) {  // 3 warm-up calls
          const auto& calls = launches[static_cast<size_t>((i + 3) % copies)];
          for (size_t s = 0; s < stages; ++s) {
            if (i >= 0) UNS_CUDA_CHECK(cudaEventRecord(marks[static_cast<size_t>(i) * (stages + 1) + s], stream));
            if (cooperative[s])
              UNS_CUDA_CHECK(cudaLaunchCooperativeKernel(calls[s].func, calls[s].gridDim, calls[s].blockDim,
                                                         calls[s].kernelParams, calls[s].sharedMemBytes, stream));
            else
              UNS_CUDA_CHECK(cudaLaunchKernel(calls[s].func, calls[s].gridDim, calls[s].blockDim, calls[s].kernelParams,
                                              calls[s].sharedMemBytes, stream));
          }
          if (i >= 0) UNS_CUDA_CHECK(cudaEventRecord(marks[static_cast<size_t>(i) * (stages + 1) + stages], stream));
        }
        UNS_CUDA_CHECK(cudaStreamSynchronize(stream));
        double total = 0;
        for (size_t s = 0; s <= stages; ++s) {
          std::vector<double> ms;
          for (int i = 0; i < reps; ++i) {
            const size_t at = static_cast<size_t>(i) * (stages + 1);
            float t = 0;
            UNS_CUDA_CHECK(cudaEventElapsedTime(&t, marks[at + (s < stages ? s : 0)], marks[at + (s < stages ? s + 1 : stages)]));
            ms.push_back(t);
          }
          std::sort(ms.begin(), ms.end());
          const double us = ms[ms.size() / 2] * 1e3;
          if (s == stages) {
            std::printf("  top-k breakdown n=%lld (rank split off): kernels one by one %.2f us (sum of medians %.2f us)\n",
                        static_cast<long long>(n), us, total);
            break;
          }
          total += us;
          const char* name = nullptr;
          if (cudaFuncGetName(&name, launches[0][s].func) != cudaSuccess || !name) name = "?";
          const dim3 g = launches[0][s].gridDim, b = launches[0][s].blockDim;
          std::printf("  top-k breakdown n=%lld: kernel %zu %s <<<%u, %u>>> %.2f us\n", static_cast<long long>(n), s + 1,
                      name, g.x * g.y * g.z, b.x * b.y * b.z, us);
        }
        for (auto& e : marks) cudaEventDestroy(e);
      } catch (const std::exception& e) {
        cudaGraph_t partial = nullptr;
        if (cudaStreamEndCapture(stream, &partial) == cudaSuccess && partial) cudaGraphDestroy(partial);
        cudaGetLastError();
        std::printf("  top-k capture failed: %s\n", e.what());
      }
      for (cudaGraphExec_t exec : graphs) UNS_CUDA_CHECK(cudaGraphExecDestroy(exec));
      for (cudaGraph_t graph : captured) UNS_CUDA_CHECK(cudaGraphDestroy(graph));
      for (int c = 0; c < copies; ++c) {
        UNS_CUDA_CHECK(cudaFree(values[c]));
        UNS_CUDA_CHECK(cudaFree(toks[c]));
      }
      UNS_CUDA_CHECK(cudaFree(out_v));
      UNS_CUDA_CHECK(cudaFree(out_t));
    }
    for (auto* p : kc) UNS_CUDA_CHECK(cudaFree(p));
    {
      // K/V store of n rows; two copies (>= 1 GB each at 128k rows).
      const size_t kv = nn * kG * kD;
      __nv_bfloat16* k[2];
      __nv_bfloat16* v[2];
      for (int c = 0; c < 2; ++c) {
        k[c] = device_alloc<__nv_bfloat16>(kv);
        v[c] = device_alloc<__nv_bfloat16>(kv);
        fill_bf16<<<4096, 256, 0, stream>>>(k[c], kv, 20 + c);
        fill_bf16<<<4096, 256, 0, stream>>>(v[c], kv, 30 + c);
      }
      float* o = device_alloc<float>(static_cast<size_t>(kH) * kD);
      float* lse = device_alloc<float>(kH);
      AttendParams ap{.q = q, .q_token0 = 2 * n, .kv_dtype = DType::kBF16, .key_tokens = tokens, .n = n, .l_C = 1,
                      .H = kH, .G = kG, .d = kD, .causal = true, .positions = PositionScheme::kRelative, .origin = 0,
                      .inv_freq = inv, .scale = 1.0f / std::sqrt(static_cast<float>(kD)), .o = o, .lse = lse};
      // ESA: 6272 scattered rows of the store (a different subset per rep), relative positions.
      AttendParams ep = ap;
      ep.n = std::min<int64_t>(kEsaRows, n);
      report("attend ESA 6272 rows", n, timer.median_ms(50, [&](int i) {
               ep.k = k[i % 2];
               ep.v = v[i % 2];
               ep.rows = rows + (static_cast<int64_t>(i) * 7919) % std::max<int64_t>(1, n - ep.n);
               cuda::launch_attend(ep, attend_ws, stream);
             }), static_cast<double>(ep.n) * (2.0 * kG * kD * 2 + 12), 4.0 * static_cast<double>(ep.n) * kH * kD);
      ep.positions = PositionScheme::kGlobal;  // the same rows unrotated (ESA's I and M_k part)
      ep.causal = false;
      ep.query_position = 4096;
      report("attend ESA rows, global", n, timer.median_ms(50, [&](int i) {
               ep.k = k[i % 2];
               ep.v = v[i % 2];
               ep.rows = rows + (static_cast<int64_t>(i) * 7919) % std::max<int64_t>(1, n - ep.n);
               cuda::launch_attend(ep, attend_ws, stream);
             }), static_cast<double>(ep.n) * (2.0 * kG * kD * 2 + 4), 4.0 * static_cast<double>(ep.n) * kH * kD);
      // Prefill chunk over ESA's rows (scattered, a different subset per rep): global = the
      // I ∪ M_k call (unrotated, non-causal), relative = keys rotated, causal (every key
      // before the chunk here, so the same work); then l_C = 15 / 16 around the dispatch edge.
      AttendParams cp = ap;
      cp.q = q_chunk;
      cp.o = o_chunk;
      cp.lse = lse_chunk;
      cp.n = std::min<int64_t>(kEsaChunkRows, n);
      const auto chunk_row = [&](const std::string& op, int l_C, bool global) {
        cp.l_C = l_C;
        cp.positions = global ? PositionScheme::kGlobal : PositionScheme::kRelative;
        cp.causal = !global;
        cp.query_position = 4096;
        const double cn = static_cast<double>(cp.n), flops = 4.0 * l_C * cn * kH * kD;
        const double ms = timer.median_ms(20, [&](int i) {
          cp.k = k[i % 2];
          cp.v = v[i % 2];
          cp.rows = rows + (static_cast<int64_t>(i) * 7919) % std::max<int64_t>(1, n - cp.n);
          cuda::launch_attend(cp, attend_ws, stream);
        });
        report(op, n, ms, cn * (2.0 * kG * kD * 2 + 12) + l_C * kH * (kD * 4.0 + (kD + 1) * 4.0), flops);
        std::printf("    %s: %.3g FLOP, %.1f TFLOP/s = %.1f%% of the mma.sync peak (%.1f TFLOP/s), %.1f%% of the cuBLAS GEMM anchor (this run)\n",
                    op.c_str(), flops, flops / (ms * 1e-3) * 1e-12, 100 * flops / (ms * 1e-3) * 1e-12 / mma_peak, mma_peak,
                    100 * flops / (ms * 1e-3) * 1e-12 / anchor);
      };
      chunk_row("attend chunk 512, ESA rows, global", kChunk, true);
      chunk_row("attend chunk 512, ESA rows, relative", kChunk, false);
      chunk_row("attend chunk 15 (row kernel), global", 15, true);
      chunk_row("attend chunk 16 (tensor cores), global", 16, true);
      report("attend full decode", n, timer.median_ms(20, [&](int i) {
               ap.k = k[i % 2];
               ap.v = v[i % 2];
               cuda::launch_attend(ap, attend_ws, stream);
             }), dn * (2.0 * kG * kD * 2 + 8), 4.0 * dn * kH * kD);
      for (int c = 0; c < 2; ++c) {
        UNS_CUDA_CHECK(cudaFree(k[c]));
        UNS_CUDA_CHECK(cudaFree(v[c]));
      }
      UNS_CUDA_CHECK(cudaFree(o));
      UNS_CUDA_CHECK(cudaFree(lse));
    }
    UNS_CUDA_CHECK(cudaFree(score));
    UNS_CUDA_CHECK(cudaFree(prox));
    UNS_CUDA_CHECK(cudaFree(qmax));
    UNS_CUDA_CHECK(cudaFree(rows));
    UNS_CUDA_CHECK(cudaFree(tokens));
  }
  {
    // Merge of 4 partials (32 heads x 128) and compress_query (Wq 128 x 4096): size-independent.
    float* parts = device_alloc<float>(4 * kH * (kD + 1));
    float* o = device_alloc<float>(kH * kD);
    float* lse = device_alloc<float>(kH);
    fill_f32<<<64, 256, 0, stream>>>(parts, 4 * kH * (kD + 1), 40);
    MergeParams mp{.o_parts = parts, .lse_parts = parts + 4 * kH * kD, .n_parts = 4, .rows = kH, .d = kD, .o = o, .lse = lse};
    report("merge 4 parts", kH, timer.median_ms(100, [&](int) { cuda::launch_merge(mp, stream); }), 4.0 * kH * (kD + 1) * 4 + kH * (kD + 1) * 4, 0);
    float* wq = device_alloc<float>(static_cast<size_t>(kDc) * kH * kD);
    fill_f32<<<256, 256, 0, stream>>>(wq, static_cast<size_t>(kDc) * kH * kD, 41);
    CompressQueryParams cq{.q = q, .wq = wq, .inv_freq = inv, .position = 4096, .q_out = o, .l_C = 1, .H = kH, .G = kG, .d = kD, .d_c = kDc};
    report("compress query", 1, timer.median_ms(100, [&](int) { cuda::launch_compress_query(cq, stream); }),
           static_cast<double>(kDc) * kH * kD * 4, 2.0 * kDc * kH * kD);
    UNS_CUDA_CHECK(cudaFree(parts));
    UNS_CUDA_CHECK(cudaFree(o));
    UNS_CUDA_CHECK(cudaFree(lse));
    UNS_CUDA_CHECK(cudaFree(wq));
  }
  UNS_CUDA_CHECK(cudaFree(q_chunk));
  UNS_CUDA_CHECK(cudaFree(o_chunk));
  UNS_CUDA_CHECK(cudaFree(lse_chunk));
  UNS_CUDA_CHECK(cudaGetLastError());

  table.push_back({"bf16 GEMM anchor 8192^3 (cuBLAS)", 8192, kAnchorFlops / (anchor * 1e12) * 1e6, 0, kAnchorFlops});
  std::printf("\nTensor-core chunk scoring against the anchor (%.1f TFLOP/s). Useful FLOPs 2*n*d'*l_C per pass;\n"
              "executed 2x that (two MMAs per tile, k'.hi + k'.lo).\n", anchor);
  std::printf("| op | rows | median us | useful TFLOP/s | of anchor | executed TFLOP/s | of anchor |\n|---|---|---|---|---|---|---|\n");
  for (const Row& r : tensor_rows) {
    const double tflops = r.flops / r.us * 1e-6;
    std::printf("| %s | %lld | %.2f | %.1f | %.1f%% | %.1f | %.1f%% |\n", r.op.c_str(), static_cast<long long>(r.rows), r.us,
                tflops, 100 * tflops / anchor, 2 * tflops, 200 * tflops / anchor);
  }
  std::printf("\n| op | rows | median us | GB/s | of copy | TFLOP/s |\n|---|---|---|---|---|---|\n");
  for (const Row& r : table) {
    const double gbs = r.bytes / r.us * 1e-3;
    std::printf("| %s | %lld | %.2f | %.0f | %.1f%% | %.2f |\n", r.op.c_str(), static_cast<long long>(r.rows), r.us, gbs,
                100 * gbs / ceiling, r.flops / r.us * 1e-6);
  }
  if (const char* out = std::getenv("OUT")) {
    const std::string path = std::string(out) + "/bench_kernels.csv";
    if (FILE* f = std::fopen(path.c_str(), "w")) {
      std::fprintf(f, "device,commit,op,rows,median_us,bytes,flops,gbs,of_copy,copy_gbs\n");
      for (const Row& r : table) {
        const double gbs = r.bytes / r.us * 1e-3;
        std::fprintf(f, "%s,%s,%s,%lld,%.3f,%.0f,%.0f,%.1f,%.4f,%.1f\n", prop.name, UNS_BENCH_COMMIT, r.op.c_str(),
                     static_cast<long long>(r.rows), r.us, r.bytes, r.flops, gbs, gbs / ceiling, ceiling);
      }
      std::fclose(f);
      std::printf("wrote %s\n", path.c_str());
    }
  }
  cudaStreamDestroy(stream);
  return 0;
}
