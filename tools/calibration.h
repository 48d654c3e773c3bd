// Fitting ESA compression weights (SPEC §6) on a model's own queries and keys.
//
//   calibration text → Model::prefill (observer hook) → per layer q̃ = RoPE(q, w), k (pre-RoPE)
//     → closed form (reduced-rank regression) → optional Adam refinement on real pairs
//     → Wq [d', H*d], Wk [d', G*d] → compression safetensors; recall@k against PCA / random.
//
// The target is f(m, c) = sum_h q̃_{h,c} · k_{g(h),m} = q̂_c · k_m, where q̂_c [G*d] sums
// the query heads that share a KV head. The closed form minimises the second-moment loss
//   E_c E_m (q̃_cᵀ (Sᵀ - Wqᵀ Wk) k_m)^2 = || Cq^{1/2} (Sᵀ - Wqᵀ Wk) Ck^{1/2} ||_F^2
// (Cq, Ck the query and key second moments, S the head-summing map): whiten, truncated SVD,
// un-whiten. Pairs are taken inside a segment (one prefill each) with m < c.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "unshackle/kernels/attention_config.h"
#include "unshackle/model/model.h"

namespace unshackle {

// Per-layer queries and keys of the calibration tokens, in token order, segment after segment.
struct CalibrationData {
  int layers = 0, H = 0, G = 0, d = 0;
  int64_t w = 0;                        // the query position of the ESA global part
  int64_t n = 0;                        // tokens
  std::vector<int64_t> segment_begin;   // first row of each segment; plus n at the end
  std::vector<std::vector<float>> q;    // [layers][n * H*d]: RoPE(q_h, w), heads concatenated
  std::vector<std::vector<float>> k;    // [layers][n * G*d]: pre-RoPE
  int64_t q_width() const { return int64_t{H} * d; }
  int64_t k_width() const { return int64_t{G} * d; }
  int64_t segments() const { return static_cast<int64_t>(segment_begin.size()) - 1; }
};

struct CollectOptions {
  AttentionConfig attention;   // the mode of the calibration prefill (full by default)
  int64_t segment = 512;       // tokens per prefill, BOS included
  int64_t chunk = 512;         // prefill chunk
  int32_t bos = -1;            // prepended to every segment when >= 0
  CollectOptions() { attention.mode = AttentionMode::kFull; }
};

// Cuts `tokens` into segments of segment - (bos >= 0) tokens (a shorter tail segment is kept
// when it has at least 2 tokens), prefills each in a fresh single-rank context and records q̃, k.
CalibrationData collect_calibration_data(const Model& model, std::span<const int32_t> tokens, int64_t w,
                                         const CollectOptions& options);

struct Projection {
  int d_c = 0;
  std::vector<float> wq;  // [d_c, H*d]
  std::vector<float> wk;  // [d_c, G*d]
};

// `segments` lists the segment indices a function may use (the fit set or the held-out set).
Projection fit_closed_form(const CalibrationData& data, int layer, int d_c, std::span<const int64_t> segments,
                           double ridge = 1e-6);
// Baselines of the same shape: Wk = P, Wq = P·S, with P the top-d' principal directions of the
// keys (uncentred) or a seeded Gaussian matrix.
Projection pca_projection(const CalibrationData& data, int layer, int d_c, std::span<const int64_t> segments);
Projection random_projection(const CalibrationData& data, int d_c, uint64_t seed);

// Relative squared error of s against f over the pairs m < c of `segments`:
// sum (f - s)^2 / sum f^2, over at most max_queries queries per segment (evenly spaced).
double pair_relative_mse(const CalibrationData& data, int layer, const Projection& p, std::span<const int64_t> segments,
                         int64_t max_queries = 128);

// Mean over queries c (those with at least min_candidates earlier tokens in their segment, at
// most max_queries per segment, evenly spaced) of |top-k of s ∩ top-k of f| / k over the
// candidates m < c of c's segment. Ties go to the lower index in both rankings.
double recall_at_k(const CalibrationData& data, int layer, const Projection& p, std::span<const int64_t> segments,
                   int64_t k, int64_t min_candidates, int64_t max_queries = 64);

struct RefineOptions {
  int steps = 200;
  int queries = 64;       // queries per step, from one fit segment
  double lr = 0.01;       // Adam step, relative to the RMS of each matrix's entries
  int eval_every = 50;    // held-out relative MSE is checked this often; the best is kept
  uint64_t seed = 1;
};
struct RefineResult {
  Projection projection;  // the best by held-out relative MSE (the input when nothing improved)
  double mse_before = 0, mse_after = 0;
  int best_step = 0;      // 0: the input was kept
};
// Adam on the mean of (f - s)^2 / mean(f^2) over pairs m < c of fit segments.
RefineResult refine_projection(const CalibrationData& data, int layer, const Projection& start,
                               std::span<const int64_t> fit, std::span<const int64_t> held_out,
                               const RefineOptions& options);

// SPEC §6 file: layers.{l}.wq [d', H*d], layers.{l}.wk [d', G*d] float32; metadata strings.
void write_compression_file(const std::string& path, const std::vector<Projection>& layers, int H, int G, int d,
                            const std::vector<std::pair<std::string, std::string>>& metadata);

// Symmetric eigendecomposition in double (LAPACK dsyevd with BLAS, cyclic Jacobi without):
// `a` [n, n] row-major in, eigenvalues descending out, vectors[i] (row i of the returned
// [n, n]) the unit eigenvector of values[i]. Exposed for tests.
void symmetric_eigen(int n, std::vector<double> a, std::vector<double>& values, std::vector<double>& vectors);

}  // namespace unshackle
