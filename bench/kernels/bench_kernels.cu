// Each CUDA op of one decode step (and the prefill chunk scoring) at 128k, 256k and 1M rows,
// Llama-3-8B shape (H = 32, G = 8, d = 128, d' = 128, k = 2048), bf16 K/V/k', through the
// launchers with CUDA events on one stream: median over many reps after warm-up, inputs
// rotated over enough copies that no rep reads from L2 (> 4x its 50-60 MB). Bandwidth is
// (bytes read + written) / time, against a device-to-device copy measured in the same run.
//   bench_kernels [rows...]        ($OUT set: also writes $OUT/bench_kernels.csv)
//
// Bytes and FLOPs (n rows; R = 6272 = l_I + k + l_L attended rows in ESA):
//   score decode:      n*d'*2 (k') + n*4 (score out)            FLOPs 2*n*d'
//   score query max:   n*d'*2                                   FLOPs 2*n*d'
//   score, rows list:  n*d'*2 + n*4 (rows) + n*4 (out)          FLOPs 2*n*d'
//   score chunk 512:   n*d'*2 + n*4 (queries from L2)            FLOPs 2*n*d'*512
//   proximity eps 1:   n*(4 + 8 + 4)
//   top-k 2048:        n*(4 + 8) read (the minimum, one pass); also its launches per call
//                      (counted from a stream capture), the captured graph replayed, and a
//                      per-kernel breakdown (UNS_TOPK_SPLIT_RANK: the rank as its own launch;
//                      the captured kernels launched one by one, events between)
//   attend ESA (R):    R*2*G*d*2 + R*(4 + 8) (rows, tokens)       FLOPs 4*R*H*d   (relative: keys rotated)
//   attend ESA global: R*2*G*d*2 + R*4                          FLOPs 4*R*H*d   (keys unrotated)
//   attend full (n):   n*2*G*d*2 + n*8 (tokens)                   FLOPs 4*n*H*d
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
  cuda::Workspace topk_ws, attend_ws;

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
  std::printf("shape H=%d G=%d d=%d d'=%d k=%d, bf16 K/V/k'; median of CUDA-event timed reps\n\n", kH, kG, kD, kDc, kTopK);

  std::vector<Row> table;
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
  float* row_max = device_alloc<float>(kChunk);
  fill_f32<<<64, 256, 0, stream>>>(qc, static_cast<size_t>(kChunk) * kDc, 1);
  fill_f32<<<64, 256, 0, stream>>>(q, static_cast<size_t>(kH) * kD, 2);
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
    report("score decode", n, timer.median_ms(50, [&](int i) { sp.kc = kc[i % kc_copies]; cuda::launch_score_chunk(sp, stream); }),
           dn * (kDc * 2 + 4), 2 * dn * kDc);
    report("score query max", n, timer.median_ms(50, [&](int i) { sp.kc = kc[i % kc_copies]; cuda::launch_score_query_max(sp, stream); }),
           dn * kDc * 2, 2 * dn * kDc);
    {
      ScoreParams rp = sp;
      rp.rows = rows;
      report("score decode, rows list", n, timer.median_ms(50, [&](int i) { rp.kc = kc[i % kc_copies]; cuda::launch_score_chunk(rp, stream); }),
             dn * (kDc * 2 + 8), 2 * dn * kDc);
    }
    {
      ScoreParams cp = sp;
      cp.l_C = kChunk;
      cp.row_max = row_max;
      report("score chunk l_C=512", n, timer.median_ms(10, [&](int i) { cp.kc = kc[i % kc_copies]; cuda::launch_score_chunk(cp, stream); }, 1),
             dn * (kDc * 2 + 4), 2 * dn * kDc * kChunk);
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
        cuda::launch_score_chunk(sp, stream);
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
  UNS_CUDA_CHECK(cudaGetLastError());

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
