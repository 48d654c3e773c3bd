#include "calibration.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "unshackle/cluster/communicator.h"
#include "unshackle/common/check.h"
#include "unshackle/common/safetensors.h"
#include "unshackle/kernels/backend.h"
#include "unshackle/worker/context_attention.h"

#if UNS_CALIBRATION_HAVE_BLAS
#include <cblas.h>
extern "C" void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
                        double* work, const int* lwork, int* iwork, const int* liwork, int* info, size_t jobz_len,
                        size_t uplo_len);
#endif

namespace unshackle {
namespace {

using Mat = std::vector<double>;  // row-major

// C[m, n] = op(A) · op(B), op = transpose when the flag is set. A is [m, k] (or [k, m]), B [k, n] (or [n, k]).
Mat gemm(const double* A, bool ta, const double* B, bool tb, int64_t m, int64_t n, int64_t k) {
  Mat C(static_cast<size_t>(m * n), 0.0);
#if UNS_CALIBRATION_HAVE_BLAS
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), 1.0, A, static_cast<int>(ta ? m : k), B,
              static_cast<int>(tb ? k : n), 0.0, C.data(), static_cast<int>(n));
#else
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < k; ++p) {
      const double a = ta ? A[p * m + i] : A[i * k + p];
      if (a == 0) continue;
      for (int64_t j = 0; j < n; ++j) C[static_cast<size_t>(i * n + j)] += a * (tb ? B[j * k + p] : B[p * n + j]);
    }
#endif
  return C;
}

std::vector<double> to_double(const float* x, size_t n) { return std::vector<double>(x, x + n); }

// Rows of one layer's q̃ (or k) for the listed segments, as double [rows, width].
Mat gather_rows(const std::vector<float>& src, int64_t width, const CalibrationData& data,
                std::span<const int64_t> segments) {
  Mat out;
  for (int64_t s : segments) {
    const int64_t b = data.segment_begin[static_cast<size_t>(s)], e = data.segment_begin[static_cast<size_t>(s) + 1];
    out.insert(out.end(), src.begin() + b * width, src.begin() + e * width);
  }
  return out;
}

// q̂ [G*d] of one q̃ row: the sum of the query heads that read each KV head.
void sum_heads(const float* q, int H, int G, int d, double* out) {
  std::fill(out, out + int64_t{G} * d, 0.0);
  const int per = H / G;
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < d; ++i) out[(h / per) * d + i] += q[int64_t{h} * d + i];
}

// Wq = P·S: each query head gets the rows of P for its KV head.
Projection from_key_basis(const CalibrationData& data, int d_c, const Mat& P) {
  Projection p;
  p.d_c = d_c;
  const int64_t qw = data.q_width(), kw = data.k_width(), per = data.H / data.G;
  p.wk.assign(P.begin(), P.end());
  p.wq.assign(static_cast<size_t>(d_c * qw), 0.0f);
  for (int j = 0; j < d_c; ++j)
    for (int h = 0; h < data.H; ++h)
      for (int i = 0; i < data.d; ++i)
        p.wq[static_cast<size_t>(j * qw + h * data.d + i)] =
            static_cast<float>(P[static_cast<size_t>(j * kw + (h / per) * data.d + i)]);
  return p;
}

void check_segments(const CalibrationData& data, std::span<const int64_t> segments, const char* what) {
  UNS_CHECK(!segments.empty(), "calibration: no {} segments", what);
  for (int64_t s : segments) UNS_CHECK(s >= 0 && s < data.segments(), "calibration: segment {} of {}", s, data.segments());
}

// Scores of one query against the candidates [b, c): exact f and compressed s.
struct QueryScores {
  std::vector<double> f, s;
};

class Scorer {
 public:
  Scorer(const CalibrationData& data, int layer, const Projection& p) : data_(data), layer_(layer), p_(p) {
    const int64_t kw = data.k_width();
    qhat_.resize(static_cast<size_t>(kw));
    qc_.resize(static_cast<size_t>(p.d_c));
    // k' of every token of the layer, once.
    const auto& K = data.k[static_cast<size_t>(layer)];
    kc_.assign(static_cast<size_t>(data.n * p.d_c), 0.0);
    for (int64_t m = 0; m < data.n; ++m)
      for (int j = 0; j < p.d_c; ++j) {
        double acc = 0;
        for (int64_t i = 0; i < kw; ++i) acc += double{p.wk[static_cast<size_t>(j * kw + i)]} * K[static_cast<size_t>(m * kw + i)];
        kc_[static_cast<size_t>(m * p.d_c + j)] = acc;
      }
  }

  void score(int64_t c, int64_t b, QueryScores& out) {
    const int64_t qw = data_.q_width(), kw = data_.k_width();
    const float* q = data_.q[static_cast<size_t>(layer_)].data() + c * qw;
    sum_heads(q, data_.H, data_.G, data_.d, qhat_.data());
    for (int j = 0; j < p_.d_c; ++j) {
      double acc = 0;
      for (int64_t i = 0; i < qw; ++i) acc += double{p_.wq[static_cast<size_t>(j * qw + i)]} * q[i];
      qc_[static_cast<size_t>(j)] = acc;
    }
    const auto& K = data_.k[static_cast<size_t>(layer_)];
    out.f.resize(static_cast<size_t>(c - b));
    out.s.resize(static_cast<size_t>(c - b));
    for (int64_t m = b; m < c; ++m) {
      double f = 0, s = 0;
      for (int64_t i = 0; i < kw; ++i) f += qhat_[static_cast<size_t>(i)] * K[static_cast<size_t>(m * kw + i)];
      for (int j = 0; j < p_.d_c; ++j) s += qc_[static_cast<size_t>(j)] * kc_[static_cast<size_t>(m * p_.d_c + j)];
      out.f[static_cast<size_t>(m - b)] = f;
      out.s[static_cast<size_t>(m - b)] = s;
    }
  }

 private:
  const CalibrationData& data_;
  int layer_;
  const Projection& p_;
  std::vector<double> qhat_, qc_, kc_;
};

// Evenly spaced query rows of a segment with at least `min_before` earlier rows in it.
std::vector<int64_t> query_rows(const CalibrationData& data, int64_t segment, int64_t min_before, int64_t max_queries) {
  const int64_t b = data.segment_begin[static_cast<size_t>(segment)], e = data.segment_begin[static_cast<size_t>(segment) + 1];
  std::vector<int64_t> rows;
  const int64_t first = b + std::max<int64_t>(min_before, 1);
  if (first >= e) return rows;
  const int64_t count = std::min(max_queries, e - first);
  for (int64_t i = 0; i < count; ++i) rows.push_back(first + (e - 1 - first) * i / std::max<int64_t>(count - 1, 1));
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

std::vector<int64_t> top_k_indices(const std::vector<double>& x, int64_t k) {
  std::vector<int64_t> idx(x.size());
  std::iota(idx.begin(), idx.end(), 0);
  const auto better = [&](int64_t a, int64_t b) {
    const double xa = x[static_cast<size_t>(a)], xb = x[static_cast<size_t>(b)];
    return xa != xb ? xa > xb : a < b;
  };
  k = std::min<int64_t>(k, static_cast<int64_t>(idx.size()));
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), better);
  idx.resize(static_cast<size_t>(k));
  std::sort(idx.begin(), idx.end());
  return idx;
}

[[maybe_unused]] void jacobi_eigen(int n, Mat& a, std::vector<double>& values, Mat& vectors_cols) {
  vectors_cols.assign(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) vectors_cols[static_cast<size_t>(i) * n + i] = 1.0;
  const auto A = [&](int i, int j) -> double& { return a[static_cast<size_t>(i) * n + j]; };
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0, total = 0;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) (i == j ? total : off) += A(i, j) * A(i, j);
    if (off <= 1e-30 * (total + off) || off == 0) break;
    for (int p = 0; p < n - 1; ++p)
      for (int q = p + 1; q < n; ++q) {
        if (A(p, q) == 0) continue;
        const double theta = (A(q, q) - A(p, p)) / (2 * A(p, q));
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < n; ++k) {  // A ← A·J
          const double akp = A(k, p), akq = A(k, q);
          A(k, p) = c * akp - s * akq;
          A(k, q) = s * akp + c * akq;
        }
        for (int k = 0; k < n; ++k) {  // A ← Jᵀ·A
          const double apk = A(p, k), aqk = A(q, k);
          A(p, k) = c * apk - s * aqk;
          A(q, k) = s * apk + c * aqk;
        }
        for (int k = 0; k < n; ++k) {
          double& vp = vectors_cols[static_cast<size_t>(k) * n + p];
          double& vq = vectors_cols[static_cast<size_t>(k) * n + q];
          const double x = vp, y = vq;
          vp = c * x - s * y;
          vq = s * x + c * y;
        }
      }
  }
  values.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) values[static_cast<size_t>(i)] = A(i, i);
}

// Cov^{±1/2} from an eigendecomposition, eigenvalues floored at `floor`.
Mat matrix_power_half(int n, const std::vector<double>& values, const Mat& vectors, double floor, bool inverse) {
  Mat scaled(vectors);
  for (int i = 0; i < n; ++i) {
    const double v = std::max(values[static_cast<size_t>(i)], 0.0) + floor;
    const double f = inverse ? 1.0 / std::sqrt(v) : std::sqrt(v);
    for (int j = 0; j < n; ++j) scaled[static_cast<size_t>(i) * n + j] *= f;
  }
  return gemm(vectors.data(), true, scaled.data(), false, n, n, n);  // Vᵀ diag V with rows = vectors
}

}  // namespace

void symmetric_eigen(int n, std::vector<double> a, std::vector<double>& values, std::vector<double>& vectors) {
  UNS_CHECK(n > 0 && a.size() == static_cast<size_t>(n) * n, "symmetric_eigen: {} values for n = {}", a.size(), n);
  std::vector<double> vals;
  Mat rows(static_cast<size_t>(n) * n);
#if UNS_CALIBRATION_HAVE_BLAS
  // Column-major in LAPACK: eigenvector i is column i, i.e. row i of our row-major buffer.
  vals.resize(static_cast<size_t>(n));
  int info = 0, lwork = -1, liwork = -1, iwork_query = 0;
  double work_query = 0;
  dsyevd_("V", "U", &n, a.data(), &n, vals.data(), &work_query, &lwork, &iwork_query, &liwork, &info, 1, 1);
  lwork = static_cast<int>(work_query);
  liwork = iwork_query;
  std::vector<double> work(static_cast<size_t>(std::max(lwork, 1)));
  std::vector<int> iwork(static_cast<size_t>(std::max(liwork, 1)));
  dsyevd_("V", "U", &n, a.data(), &n, vals.data(), work.data(), &lwork, iwork.data(), &liwork, &info, 1, 1);
  UNS_CHECK_KIND(kInternal, info == 0, "symmetric_eigen: LAPACK dsyevd failed (info {})", info);
  rows = a;
#else
  Mat cols;
  jacobi_eigen(n, a, vals, cols);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) rows[static_cast<size_t>(i) * n + j] = cols[static_cast<size_t>(j) * n + i];
#endif
  std::vector<int> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int x, int y) { return vals[static_cast<size_t>(x)] > vals[static_cast<size_t>(y)]; });
  values.resize(static_cast<size_t>(n));
  vectors.resize(static_cast<size_t>(n) * n);
  for (int i = 0; i < n; ++i) {
    values[static_cast<size_t>(i)] = vals[static_cast<size_t>(order[static_cast<size_t>(i)])];
    std::copy_n(rows.begin() + static_cast<std::ptrdiff_t>(order[static_cast<size_t>(i)]) * n, n,
                vectors.begin() + static_cast<std::ptrdiff_t>(i) * n);
  }
}

CalibrationData collect_calibration_data(const Model& model, std::span<const int32_t> tokens, int64_t w,
                                         const CollectOptions& o) {
  const ModelConfig& c = model.config();
  const int64_t body = o.segment - (o.bos >= 0 ? 1 : 0);
  UNS_CHECK(body >= 1, "--segment: must leave at least one text token per segment (got {})", o.segment);
  UNS_CHECK(o.chunk > 0, "--chunk: must be > 0 (got {})", o.chunk);
  UNS_CHECK(w >= 0, "--w: must be >= 0 (got {})", w);
  o.attention.validate(c.heads, c.kv_heads);
  UNS_CHECK(!o.attention.needs_compression(),
            "calibration prefill: mode {} needs compression weights, which are what is being fitted; use full, "
            "streaming or exact-topk", mode_name(o.attention.mode));
  CalibrationData data;
  data.layers = c.layers;
  data.H = c.heads;
  data.G = c.kv_heads;
  data.d = c.head_dim;
  data.w = w;
  data.q.resize(static_cast<size_t>(c.layers));
  data.k.resize(static_cast<size_t>(c.layers));
  const std::vector<float> inv_freq = c.inv_freq();
  const int64_t qw = data.q_width(), kw = data.k_width();

  for (size_t begin = 0; begin < tokens.size(); begin += static_cast<size_t>(body)) {
    const size_t count = std::min(static_cast<size_t>(body), tokens.size() - begin);
    std::vector<int32_t> seg;
    seg.reserve(count + 1);
    if (o.bos >= 0) seg.push_back(o.bos);
    for (size_t i = 0; i < count; ++i) seg.push_back(tokens[begin + i]);
    if (seg.size() < 2) break;
    data.segment_begin.push_back(data.n);
    run_local_ranks(1, [&](int, Communicator& comm) {
      auto backend = make_cpu_backend();
      ContextAttentionOptions options = model.attention_options(o.attention, nullptr, static_cast<int64_t>(seg.size()));
      // Host memory on the CPU backend: the observer copies q (rotated to w) and k as they come.
      options.observer = [&](int layer, const float* q, const float* k, int64_t l_C, int64_t) {
        auto& Q = data.q[static_cast<size_t>(layer)];
        auto& K = data.k[static_cast<size_t>(layer)];
        const size_t q0 = Q.size();
        Q.insert(Q.end(), q, q + l_C * qw);
        for (int64_t t = 0; t < l_C; ++t)
          for (int h = 0; h < c.heads; ++h)
            rope_rotate(Q.data() + q0 + static_cast<size_t>(t * qw + int64_t{h} * c.head_dim), c.head_dim,
                        inv_freq.data(), w);
        K.insert(K.end(), k, k + l_C * kw);
      };
      ContextAttention context(*backend, comm, options);
      std::vector<float> logits;
      model.prefill(context, seg, o.chunk, logits);
    });
    data.n += static_cast<int64_t>(seg.size());
  }
  data.segment_begin.push_back(data.n);
  UNS_CHECK(data.segments() >= 1, "calibration text: fewer than 2 tokens");
  return data;
}

Projection fit_closed_form(const CalibrationData& data, int layer, int d_c, std::span<const int64_t> segments,
                           double ridge) {
  check_segments(data, segments, "fit");
  UNS_CHECK(d_c >= 1, "--rank: d' must be >= 1 (got {})", d_c);
  const int64_t qw = data.q_width(), kw = data.k_width(), per = data.H / data.G;
  const Mat Q = gather_rows(data.q[static_cast<size_t>(layer)], qw, data, segments);
  const Mat K = gather_rows(data.k[static_cast<size_t>(layer)], kw, data, segments);
  const int64_t n = static_cast<int64_t>(Q.size()) / qw;
  Mat Cq = gemm(Q.data(), true, Q.data(), false, qw, qw, n);
  Mat Ck = gemm(K.data(), true, K.data(), false, kw, kw, n);
  for (double& x : Cq) x /= static_cast<double>(n);
  for (double& x : Ck) x /= static_cast<double>(n);

  std::vector<double> lq, lk;
  Mat Vq, Vk;
  symmetric_eigen(static_cast<int>(qw), Cq, lq, Vq);
  symmetric_eigen(static_cast<int>(kw), Ck, lk, Vk);
  // The ridge keeps directions the text never used from blowing up the inverse.
  const double fq = ridge * std::max(std::accumulate(lq.begin(), lq.end(), 0.0) / static_cast<double>(qw), 1e-300);
  const double fk = ridge * std::max(std::accumulate(lk.begin(), lk.end(), 0.0) / static_cast<double>(kw), 1e-300);
  const Mat Cq_half = matrix_power_half(static_cast<int>(qw), lq, Vq, fq, false);
  const Mat Cq_ihalf = matrix_power_half(static_cast<int>(qw), lq, Vq, fq, true);
  const Mat Ck_half = matrix_power_half(static_cast<int>(kw), lk, Vk, fk, false);
  const Mat Ck_ihalf = matrix_power_half(static_cast<int>(kw), lk, Vk, fk, true);

  // M = Cq^{1/2} Sᵀ Ck^{1/2}; (Sᵀ X)[h*d+i, :] = X[g(h)*d+i, :].
  Mat St_Ck(static_cast<size_t>(qw * kw));
  for (int h = 0; h < data.H; ++h)
    for (int i = 0; i < data.d; ++i)
      std::copy_n(Ck_half.begin() + ((h / per) * data.d + i) * kw, kw, St_Ck.begin() + (int64_t{h} * data.d + i) * kw);
  const Mat M = gemm(Cq_half.data(), false, St_Ck.data(), false, qw, kw, qw);
  // SVD of M through MᵀM = V Σ² Vᵀ; u_j = M v_j / σ_j.
  const Mat MtM = gemm(M.data(), true, M.data(), false, kw, kw, qw);
  std::vector<double> sig2;
  Mat V;
  symmetric_eigen(static_cast<int>(kw), MtM, sig2, V);
  const int r = static_cast<int>(std::min<int64_t>(d_c, kw));
  Mat Ur(static_cast<size_t>(r * qw), 0.0), Vr(static_cast<size_t>(r * kw), 0.0);  // rows: u_j, sqrt(σ)-scaled
  for (int j = 0; j < r; ++j) {
    const double sigma = std::sqrt(std::max(sig2[static_cast<size_t>(j)], 0.0));
    if (sigma <= 1e-12 * std::sqrt(std::max(sig2[0], 1e-300))) continue;  // rank exhausted: zero row
    const double* v = V.data() + int64_t{j} * kw;
    for (int64_t a = 0; a < qw; ++a) {
      double acc = 0;
      for (int64_t b = 0; b < kw; ++b) acc += M[static_cast<size_t>(a * kw + b)] * v[b];
      Ur[static_cast<size_t>(j * qw + a)] = acc / sigma * std::sqrt(sigma);
    }
    for (int64_t b = 0; b < kw; ++b) Vr[static_cast<size_t>(j * kw + b)] = v[b] * std::sqrt(sigma);
  }
  // Wq = Σ^{1/2} Uᵀ Cq^{-1/2}, Wk = Σ^{1/2} Vᵀ Ck^{-1/2} (both inverse halves are symmetric).
  const Mat Wq = gemm(Ur.data(), false, Cq_ihalf.data(), false, r, qw, qw);
  const Mat Wk = gemm(Vr.data(), false, Ck_ihalf.data(), false, r, kw, kw);
  Projection p;
  p.d_c = d_c;
  p.wq.assign(static_cast<size_t>(d_c * qw), 0.0f);
  p.wk.assign(static_cast<size_t>(d_c * kw), 0.0f);
  for (size_t i = 0; i < Wq.size(); ++i) p.wq[i] = static_cast<float>(Wq[i]);
  for (size_t i = 0; i < Wk.size(); ++i) p.wk[i] = static_cast<float>(Wk[i]);
  return p;
}

Projection pca_projection(const CalibrationData& data, int layer, int d_c, std::span<const int64_t> segments) {
  check_segments(data, segments, "fit");
  UNS_CHECK(d_c >= 1, "--rank: d' must be >= 1 (got {})", d_c);
  const int64_t kw = data.k_width();
  const Mat K = gather_rows(data.k[static_cast<size_t>(layer)], kw, data, segments);
  const int64_t n = static_cast<int64_t>(K.size()) / kw;
  const Mat Ck = gemm(K.data(), true, K.data(), false, kw, kw, n);
  std::vector<double> values;
  Mat vectors;
  symmetric_eigen(static_cast<int>(kw), Ck, values, vectors);
  Mat P(static_cast<size_t>(d_c * kw), 0.0);
  std::copy_n(vectors.begin(), std::min<int64_t>(d_c, kw) * kw, P.begin());
  return from_key_basis(data, d_c, P);
}

Projection random_projection(const CalibrationData& data, int d_c, uint64_t seed) {
  UNS_CHECK(d_c >= 1, "--rank: d' must be >= 1 (got {})", d_c);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  Mat P(static_cast<size_t>(d_c * data.k_width()));
  for (double& x : P) x = normal(rng);
  return from_key_basis(data, d_c, P);
}

double pair_relative_mse(const CalibrationData& data, int layer, const Projection& p, std::span<const int64_t> segments,
                         int64_t max_queries) {
  check_segments(data, segments, "held-out");
  Scorer scorer(data, layer, p);
  QueryScores qs;
  double err = 0, ref = 0;
  for (int64_t s : segments) {
    const int64_t b = data.segment_begin[static_cast<size_t>(s)];
    for (int64_t c : query_rows(data, s, 1, max_queries)) {
      scorer.score(c, b, qs);
      for (size_t i = 0; i < qs.f.size(); ++i) {
        err += (qs.f[i] - qs.s[i]) * (qs.f[i] - qs.s[i]);
        ref += qs.f[i] * qs.f[i];
      }
    }
  }
  UNS_CHECK(ref > 0, "calibration: no pairs with a non-zero score in the held-out segments");
  return err / ref;
}

double recall_at_k(const CalibrationData& data, int layer, const Projection& p, std::span<const int64_t> segments,
                   int64_t k, int64_t min_candidates, int64_t max_queries) {
  check_segments(data, segments, "held-out");
  UNS_CHECK(k >= 1, "recall k must be >= 1 (got {})", k);
  Scorer scorer(data, layer, p);
  QueryScores qs;
  double total = 0;
  int64_t queries = 0;
  for (int64_t s : segments) {
    const int64_t b = data.segment_begin[static_cast<size_t>(s)];
    for (int64_t c : query_rows(data, s, std::max(min_candidates, k), max_queries)) {
      scorer.score(c, b, qs);
      const auto exact = top_k_indices(qs.f, k), approx = top_k_indices(qs.s, k);
      std::vector<int64_t> both;
      std::set_intersection(exact.begin(), exact.end(), approx.begin(), approx.end(), std::back_inserter(both));
      total += static_cast<double>(both.size()) / static_cast<double>(exact.size());
      ++queries;
    }
  }
  UNS_CHECK(queries > 0, "recall@{}: no held-out query has {} earlier tokens in its segment (use a longer --segment)", k,
            std::max(min_candidates, k));
  return total / static_cast<double>(queries);
}

RefineResult refine_projection(const CalibrationData& data, int layer, const Projection& start,
                               std::span<const int64_t> fit, std::span<const int64_t> held_out,
                               const RefineOptions& o) {
  check_segments(data, fit, "fit");
  UNS_CHECK(o.steps >= 0 && o.queries >= 1 && o.lr > 0 && o.eval_every >= 1,
            "refine: steps >= 0, queries >= 1, lr > 0, eval_every >= 1");
  const int64_t qw = data.q_width(), kw = data.k_width();
  const int r = start.d_c;
  RefineResult result;
  result.projection = start;
  result.mse_before = result.mse_after = pair_relative_mse(data, layer, start, held_out);
  if (o.steps == 0) return result;

  Mat Wq(start.wq.begin(), start.wq.end()), Wk(start.wk.begin(), start.wk.end());
  const auto rms = [](const Mat& m) {
    double s = 0;
    for (double x : m) s += x * x;
    return std::sqrt(s / static_cast<double>(std::max<size_t>(m.size(), 1)));
  };
  const double lr_q = o.lr * std::max(rms(Wq), 1e-12), lr_k = o.lr * std::max(rms(Wk), 1e-12);
  Mat mq(Wq.size(), 0.0), vq(Wq.size(), 0.0), mk(Wk.size(), 0.0), vk(Wk.size(), 0.0);
  std::mt19937_64 rng(o.seed);
  const auto& Qall = data.q[static_cast<size_t>(layer)];
  const auto& Kall = data.k[static_cast<size_t>(layer)];
  std::vector<double> qhat(static_cast<size_t>(kw));
  for (int step = 1; step <= o.steps; ++step) {
    const int64_t s = fit[std::uniform_int_distribution<size_t>(0, fit.size() - 1)(rng)];
    const int64_t b = data.segment_begin[static_cast<size_t>(s)], e = data.segment_begin[static_cast<size_t>(s) + 1];
    const int64_t nk = e - b;
    if (nk < 2) continue;
    std::vector<int64_t> rows(static_cast<size_t>(o.queries));
    for (auto& c : rows) c = std::uniform_int_distribution<int64_t>(b + 1, e - 1)(rng);
    const int64_t B = o.queries;
    Mat Qb(static_cast<size_t>(B * qw)), Qh(static_cast<size_t>(B * kw));
    for (int64_t i = 0; i < B; ++i) {
      const float* q = Qall.data() + rows[static_cast<size_t>(i)] * qw;
      std::copy_n(q, qw, Qb.begin() + i * qw);
      sum_heads(q, data.H, data.G, data.d, Qh.data() + i * kw);
    }
    const Mat Ks = to_double(Kall.data() + b * kw, static_cast<size_t>(nk * kw));
    const Mat Qc = gemm(Qb.data(), false, Wq.data(), true, B, r, qw);   // [B, r]
    const Mat Kc = gemm(Ks.data(), false, Wk.data(), true, nk, r, kw);  // [nk, r]
    const Mat S = gemm(Qc.data(), false, Kc.data(), true, B, nk, r);
    const Mat F = gemm(Qh.data(), false, Ks.data(), true, B, nk, kw);
    Mat R(S.size(), 0.0);
    double norm = 0;
    int64_t pairs = 0;
    for (int64_t i = 0; i < B; ++i)
      for (int64_t m = 0; m < rows[static_cast<size_t>(i)] - b; ++m) {
        const size_t at = static_cast<size_t>(i * nk + m);
        R[at] = S[at] - F[at];
        norm += F[at] * F[at];
        ++pairs;
      }
    if (pairs == 0 || norm == 0) continue;
    for (double& x : R) x *= 2.0 / norm;  // d/dS of sum (S - F)^2 / sum F^2
    const Mat dQc = gemm(R.data(), false, Kc.data(), false, B, r, nk);   // [B, r]
    const Mat dKc = gemm(R.data(), true, Qc.data(), false, nk, r, B);    // [nk, r]
    const Mat gWq = gemm(dQc.data(), true, Qb.data(), false, r, qw, B);  // [r, qw]
    const Mat gWk = gemm(dKc.data(), true, Ks.data(), false, r, kw, nk); // [r, kw]
    const auto adam = [&](Mat& W, Mat& m1, Mat& m2, const Mat& g, double lr) {
      const double b1 = 0.9, b2 = 0.999, c1 = 1 - std::pow(b1, step), c2 = 1 - std::pow(b2, step);
      for (size_t i = 0; i < W.size(); ++i) {
        m1[i] = b1 * m1[i] + (1 - b1) * g[i];
        m2[i] = b2 * m2[i] + (1 - b2) * g[i] * g[i];
        W[i] -= lr * (m1[i] / c1) / (std::sqrt(m2[i] / c2) + 1e-12);
      }
    };
    adam(Wq, mq, vq, gWq, lr_q);
    adam(Wk, mk, vk, gWk, lr_k);
    if (step % o.eval_every == 0 || step == o.steps) {
      Projection p{r, std::vector<float>(Wq.begin(), Wq.end()), std::vector<float>(Wk.begin(), Wk.end())};
      const double mse = pair_relative_mse(data, layer, p, held_out);
      if (mse < result.mse_after) {
        result.mse_after = mse;
        result.projection = std::move(p);
        result.best_step = step;
      }
    }
  }
  return result;
}

void write_compression_file(const std::string& path, const std::vector<Projection>& layers, int H, int G, int d,
                            const std::vector<std::pair<std::string, std::string>>& metadata) {
  UNS_CHECK(!layers.empty(), "compression file: no layers");
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  for (const auto& [key, value] : metadata) w.set_metadata(key, value);
  w.set_metadata("d_prime", std::to_string(layers[0].d_c));
  for (size_t l = 0; l < layers.size(); ++l) {
    const Projection& p = layers[l];
    UNS_CHECK(p.d_c == layers[0].d_c, "compression file: layer {} has d' {}, layer 0 {}", l, p.d_c, layers[0].d_c);
    w.add_f32(fmt::format("layers.{}.wq", l), {p.d_c, int64_t{H} * d}, p.wq);
    w.add_f32(fmt::format("layers.{}.wk", l), {p.d_c, int64_t{G} * d}, p.wk);
  }
  w.write(path);
}

}  // namespace unshackle
