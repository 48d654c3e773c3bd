// Partial attention over gathered rows (SPEC §4), split over many CTAs along the rows with an
// LSE combine, and the LSE merge of partial results.
// One CTA = one (query token c, KV head g, split): a warp per query head of the GQA group, so
// each K/V row is read once for the whole group. Rows come in tiles of 32: lane j scores row j,
// then an online softmax folds the tile into per-lane output dims (lane, lane+32, ...).
#include <algorithm>

#include "common.cuh"
#include "cuda_check.h"
#include "launchers.h"

namespace unshackle::cuda {
namespace {

constexpr int kTile = 32;
constexpr int kMaxGroup = 16;  // query heads per KV head handled by one CTA (static shared memory < 48 KB)

template <int D>
__global__ void attend_split_kernel(AttendParams p, int64_t rows_per_split, int splits, float* part_o, float* part_lse) {
  __shared__ float keys[kTile][D + 1];  // +1: lanes reading different rows hit different banks
  __shared__ float values[kTile][D + 1];
  __shared__ int64_t tokens[kTile];
  __shared__ float queries[kMaxGroup][D];
  const int split = blockIdx.x, g = blockIdx.y, c = blockIdx.z;
  const int group = p.H / p.G, warp = threadIdx.x / 32, lane = threadIdx.x % 32, half = D / 2;
  const int h = g * group + warp;
  const int64_t query_token = p.q_token0 + c;
  const int64_t query_position = p.positions == PositionScheme::kGlobal ? p.query_position : query_token - p.origin;
  for (int idx = threadIdx.x; idx < group * half; idx += blockDim.x) {
    const int w = idx / half, i = idx % half;
    const float* q = p.q + (static_cast<size_t>(c) * p.H + g * group + w) * D;
    float s, co;
    rope_sincos(query_position, p.inv_freq[i], &s, &co);
    queries[w][i] = q[i] * co - q[i + half] * s;
    queries[w][i + half] = q[i + half] * co + q[i] * s;
  }
  const int64_t begin = split * rows_per_split, end = min(static_cast<long long>(p.n), static_cast<long long>(begin + rows_per_split));
  float m = neg_inf(), l = 0, acc[D / 32];
  for (int k = 0; k < D / 32; ++k) acc[k] = 0;
  for (int64_t tile = begin; tile < end; tile += kTile) {
    const int count = static_cast<int>(end - tile < kTile ? end - tile : kTile);
    __syncthreads();  // previous tile fully consumed (and queries written, first time)
    for (int idx = threadIdx.x; idx < kTile * half; idx += blockDim.x) {
      const int j = idx / half, i = idx % half;
      if (j >= count) continue;
      const int64_t row = p.rows ? p.rows[tile + j] : tile + j;
      const int64_t token = p.key_tokens[row];
      const int64_t base = (row * p.G + g) * D;
      float k1 = load_as_float(p.k, p.kv_dtype, base + i), k2 = load_as_float(p.k, p.kv_dtype, base + i + half);
      if (p.positions == PositionScheme::kRelative) {
        float s, co;
        rope_sincos(token - p.origin, p.inv_freq[i], &s, &co);
        const float r1 = k1 * co - k2 * s, r2 = k2 * co + k1 * s;
        k1 = r1;
        k2 = r2;
      }
      keys[j][i] = k1;
      keys[j][i + half] = k2;
      values[j][i] = load_as_float(p.v, p.kv_dtype, base + i);
      values[j][i + half] = load_as_float(p.v, p.kv_dtype, base + i + half);
      if (i == 0) tokens[j] = token;
    }
    __syncthreads();
    float logit = neg_inf();
    if (lane < count && !(p.causal && tokens[lane] > query_token)) {
      float dot = 0;
      for (int i = 0; i < D; ++i) dot = fmaf(queries[warp][i], keys[lane][i], dot);
      logit = dot * p.scale;
    }
    const float tile_max = warp_max(logit);
    if (tile_max == neg_inf()) continue;  // nothing visible in this tile
    const float m_new = fmaxf(m, tile_max);
    const float correction = expf(m - m_new);
    const float weight = logit == neg_inf() ? 0.0f : expf(logit - m_new);
    l = l * correction + warp_sum(weight);
    for (int k = 0; k < D / 32; ++k) acc[k] *= correction;
    for (int j = 0; j < count; ++j) {
      const float w = __shfl_sync(0xffffffffu, weight, j);
      for (int k = 0; k < D / 32; ++k) acc[k] = fmaf(w, values[j][lane + 32 * k], acc[k]);
    }
    m = m_new;
  }
  const size_t part = (static_cast<size_t>(c) * p.H + h) * splits + split;
  for (int k = 0; k < D / 32; ++k) part_o[part * D + lane + 32 * k] = l > 0 ? acc[k] / l : 0.0f;
  if (lane == 0) part_lse[part] = l > 0 ? m + logf(l) : neg_inf();
}

// Merges `parts` partials per output row. stride_part / stride_row say where part i of row r
// lives: o at (i * stride_part + r * stride_row) * d, lse at i * stride_part + r * stride_row.
__global__ void merge_kernel(const float* o_parts, const float* lse_parts, int parts, int64_t stride_part,
                             int64_t stride_row, int d, float* o, float* lse) {
  const int64_t r = blockIdx.x;
  float best = neg_inf();
  for (int i = 0; i < parts; ++i) best = fmaxf(best, lse_parts[i * stride_part + r * stride_row]);
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    float sum = 0, value = 0;
    if (best != neg_inf()) {
      for (int i = 0; i < parts; ++i) {
        const int64_t at = i * stride_part + r * stride_row;
        const float part_lse = lse_parts[at];
        if (part_lse == neg_inf()) continue;
        const float w = expf(part_lse - best);
        sum += w;
        value = fmaf(w, o_parts[at * d + j], value);
      }
    }
    o[r * d + j] = sum > 0 ? value / sum : 0.0f;
    if (j == 0 && lse) lse[r] = sum > 0 ? best + logf(sum) : neg_inf();
  }
}

template <int D>
void run_attend(const AttendParams& p, Workspace& workspace, cudaStream_t stream) {
  int device = 0, sms = 0;
  UNS_CUDA_CHECK(cudaGetDevice(&device));
  UNS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Enough CTAs for 16 per SM (each is only a few warps and waits on loads), but no split
  // shorter than two tiles.
  const int64_t ctas = static_cast<int64_t>(p.l_C) * p.G;
  const int64_t max_splits = std::max<int64_t>(1, (p.n + 2 * kTile - 1) / (2 * kTile));
  const int splits = static_cast<int>(std::clamp<int64_t>((16 * sms + ctas - 1) / ctas, 1, std::min<int64_t>(max_splits, 4096)));
  const int64_t rows_per_split = std::max<int64_t>(1, (p.n + splits - 1) / splits);
  const size_t rows = static_cast<size_t>(p.l_C) * p.H;
  auto* parts = static_cast<float*>(workspace.reserve(rows * splits * (D + 1) * sizeof(float)));
  float* part_lse = parts + rows * splits * D;
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(p.G), static_cast<unsigned>(p.l_C));
  attend_split_kernel<D><<<grid, (p.H / p.G) * 32, 0, stream>>>(p, rows_per_split, splits, parts, part_lse);
  UNS_CUDA_CHECK_LAUNCH();
  merge_kernel<<<static_cast<unsigned>(rows), D, 0, stream>>>(parts, part_lse, splits, 1, splits, D, p.o, p.lse);
  UNS_CUDA_CHECK_LAUNCH();
}

}  // namespace

void launch_attend(const AttendParams& p, Workspace& workspace, cudaStream_t stream) {
  p.check();
  UNS_CUDA_REQUIRE(kUnsupported, (p.H / p.G) <= kMaxGroup, "attend: at most 16 query heads per KV head on CUDA (got " + std::to_string(p.H / p.G) + ")");
  UNS_CUDA_REQUIRE(kInvalidArgument, p.l_C <= 65535, "attend: chunk of " + std::to_string(p.l_C) + " exceeds one launch");
  switch (p.d) {
    case 64: return run_attend<64>(p, workspace, stream);
    case 128: return run_attend<128>(p, workspace, stream);
    default: fail(ErrorKind::kUnsupported, "attend: head dim " + std::to_string(p.d) + " unsupported on CUDA (64, 128)");
  }
}

void launch_merge(const MergeParams& p, cudaStream_t stream) {
  p.check();
  if (p.rows == 0) return;
  merge_kernel<<<static_cast<unsigned>(p.rows), std::min(p.d, 1024), 0, stream>>>(p.o_parts, p.lse_parts, p.n_parts,
                                                                                  p.rows, 1, p.d, p.o, p.lse);
  UNS_CUDA_CHECK_LAUNCH();
}

}  // namespace unshackle::cuda
