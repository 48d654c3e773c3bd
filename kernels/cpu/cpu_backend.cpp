// The CPU reference backend: plain loops over host memory, float32 storage (bf16/fp16
// accepted), accumulation in double where sums run long. It is the oracle every other
// backend is tested against, so clarity beats speed here.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "unshackle/common/check.h"
#include "unshackle/kernels/attention_config.h"
#include "unshackle/kernels/backend.h"

namespace unshackle {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Reads `count` elements starting at element `offset` of a store array as float32.
void load_row(const void* base, DType dtype, int64_t offset, int count, float* out) {
  const auto* bytes = static_cast<const unsigned char*>(base) + static_cast<size_t>(offset) * dtype_size(dtype);
  convert_to_f32(dtype, bytes, out, static_cast<size_t>(count));
}

// Strict weak order of the SPEC tie rule: larger value first, then lower token; NaN last.
bool ranks_before(float a_value, int64_t a_token, float b_value, int64_t b_token) {
  const bool a_nan = std::isnan(a_value), b_nan = std::isnan(b_value);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a_value != b_value) return a_value > b_value;
  return a_token < b_token;
}

double dot(const float* a, const float* b, int n) {
  double acc = 0;
  for (int i = 0; i < n; ++i) acc += static_cast<double>(a[i]) * b[i];
  return acc;
}

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  MemorySpace memory_space() const override { return MemorySpace::kHost; }
  bool supports(Op, DType dtype, int dim) const override {
    return (dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16) && dim > 0;
  }

  void* allocate(size_t bytes) override { return bytes ? ::operator new(bytes) : nullptr; }
  void deallocate(void* ptr) override { ::operator delete(ptr); }
  void copy_to_backend(void* dst, const void* src, size_t bytes) override { if (bytes) std::memcpy(dst, src, bytes); }
  void copy_to_host(void* dst, const void* src, size_t bytes) override { if (bytes) std::memcpy(dst, src, bytes); }
  void copy_within(void* dst, const void* src, size_t bytes) override { if (bytes) std::memmove(dst, src, bytes); }
  void synchronize() override {}
  void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t count) override {
    if (src_dtype == dst_dtype) {
      if (count) std::memmove(dst, src, count * dtype_size(src_dtype));
      return;
    }
    if (src_dtype == DType::kF32) return convert_from_f32(static_cast<const float*>(src), dst_dtype, dst, count);
    UNS_CHECK(dst_dtype == DType::kF32, "convert: {} -> {} unsupported", dtype_name(src_dtype), dtype_name(dst_dtype));
    convert_to_f32(src_dtype, src, static_cast<float*>(dst), count);
  }

  void compress_query(const CompressQueryParams& p) override {
    p.check();
    const int dH = p.H * p.d, group = p.H / p.G;
    std::vector<float> rotated(static_cast<size_t>(dH));
    for (int c = 0; c < p.l_C; ++c) {
      std::memcpy(rotated.data(), p.q + static_cast<size_t>(c) * dH, sizeof(float) * dH);
      for (int h = 0; h < p.H; ++h) rope_rotate(rotated.data() + h * p.d, p.d, p.inv_freq, p.position);
      float* out = p.q_out + static_cast<size_t>(c) * p.d_c;
      if (p.wq) {
        for (int j = 0; j < p.d_c; ++j)
          out[j] = static_cast<float>(dot(p.wq + static_cast<size_t>(j) * dH, rotated.data(), dH));
      } else {  // exact fold: sum the query heads that share a KV head
        for (int g = 0; g < p.G; ++g)
          for (int i = 0; i < p.d; ++i) {
            double acc = 0;
            for (int r = 0; r < group; ++r) acc += rotated[static_cast<size_t>((g * group + r) * p.d + i)];
            out[g * p.d + i] = static_cast<float>(acc);
          }
      }
    }
  }

  void compress_keys(const CompressKeysParams& p) override {
    p.check();
    const int width = p.G * p.d;
    std::vector<float> key(static_cast<size_t>(width)), out(static_cast<size_t>(p.d_c));
    for (int64_t m = 0; m < p.n; ++m) {
      load_row(p.k, p.k_dtype, m * width, width, key.data());
      for (int j = 0; j < p.d_c; ++j)
        out[static_cast<size_t>(j)] = static_cast<float>(dot(p.wk + static_cast<size_t>(j) * width, key.data(), width));
      auto* dst = static_cast<unsigned char*>(p.kc_out) + static_cast<size_t>(m) * p.d_c * dtype_size(p.kc_dtype);
      convert_from_f32(out.data(), p.kc_dtype, dst, static_cast<size_t>(p.d_c));
    }
  }

  // s(m, c) in float: the same arithmetic for every rank and every caller, so that scores
  // compare exactly across a distributed run.
  static float score_one(const float* qc, const float* key, int d_c) {
    return static_cast<float>(dot(qc, key, d_c));
  }

  void score_query_max(const ScoreParams& p) override {
    p.check();
    UNS_CHECK(p.query_max_out, "score_query_max: null output");
    std::fill(p.query_max_out, p.query_max_out + p.l_C, kNegInf);
    std::vector<float> key(static_cast<size_t>(p.d_c));
    for (int64_t i = 0; i < p.n; ++i) {
      const int64_t row = p.rows ? p.rows[i] : i;
      load_row(p.kc, p.kc_dtype, row * p.d_c, p.d_c, key.data());
      for (int c = 0; c < p.l_C; ++c)
        p.query_max_out[c] = std::max(p.query_max_out[c], score_one(p.qc + static_cast<size_t>(c) * p.d_c, key.data(), p.d_c));
    }
  }

  void score_chunk(const ScoreParams& p) override {
    p.check();
    UNS_CHECK(p.score_out, "score_chunk: null output");
    std::vector<float> key(static_cast<size_t>(p.d_c));
    for (int64_t i = 0; i < p.n; ++i) {
      const int64_t row = p.rows ? p.rows[i] : i;
      load_row(p.kc, p.kc_dtype, row * p.d_c, p.d_c, key.data());
      float best = kNegInf;
      for (int c = 0; c < p.l_C; ++c) {
        float s = score_one(p.qc + static_cast<size_t>(c) * p.d_c, key.data(), p.d_c);
        if (p.row_max) s -= p.row_max[c];
        best = std::max(best, s);
      }
      p.score_out[i] = best;
    }
  }

  void proximity(const ProximityParams& p) override {
    p.check();
    int64_t lo = 0;
    for (int64_t j = 0; j < p.n; ++j) {
      while (p.tokens[lo] < p.tokens[j] - p.eps) ++lo;
      float best = kNegInf;
      for (int64_t i = lo; i < p.n && p.tokens[i] <= p.tokens[j] + p.eps; ++i) best = std::max(best, p.score[i]);
      p.out[j] = best;
    }
  }

  void top_k(const TopKParams& p) override {
    p.check();
    std::vector<int64_t> order;
    order.reserve(static_cast<size_t>(p.n));
    for (int64_t i = 0; i < p.n; ++i)
      if (p.tokens[i] >= 0) order.push_back(i);
    const auto before = [&](int64_t a, int64_t b) {
      return ranks_before(p.values[a], p.tokens[a], p.values[b], p.tokens[b]);
    };
    const int64_t count = std::min<int64_t>(p.k, static_cast<int64_t>(order.size()));
    std::partial_sort(order.begin(), order.begin() + count, order.end(), before);
    for (int64_t i = 0; i < p.k; ++i) {
      p.out_values[i] = i < count ? p.values[order[static_cast<size_t>(i)]] : kNegInf;
      p.out_tokens[i] = i < count ? p.tokens[order[static_cast<size_t>(i)]] : -1;
    }
    if (p.out_count) *p.out_count = count;
  }

  void rows_of_tokens(const RowsOfTokensParams& p) override {
    p.check();
    const int64_t n_initial = p.initial_end - p.initial_begin;
    for (int64_t i = 0; i < n_initial; ++i) p.rows_out[i] = static_cast<int32_t>(p.initial_begin + i);
    // Ascending tokens, padding last; a stable sort so that the order is defined for any input.
    std::vector<int64_t> order(static_cast<size_t>(p.k));
    std::iota(order.begin(), order.end(), int64_t{0});
    const auto key = [&](int64_t i) { return p.selected[i] < 0 ? std::numeric_limits<int64_t>::max() : p.selected[i]; };
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) < key(b); });
    const int64_t* first = p.tokens + p.search_begin;
    const int64_t* last = p.tokens + p.search_end;
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t t = p.selected[order[static_cast<size_t>(j)]];
      const int64_t* at = t < 0 ? last : std::lower_bound(first, last, t);
      p.rows_out[n_initial + j] = at != last && *at == t ? static_cast<int32_t>(at - p.tokens) : -1;
    }
  }

  void attend(const AttendParams& p) override {
    p.check();
    const int group = p.H / p.G;
    const size_t n = static_cast<size_t>(p.n);
    std::vector<float> keys(n * p.d), values(n * p.d), query(static_cast<size_t>(p.d));
    std::vector<double> logits(n), acc(static_cast<size_t>(p.d));
    std::vector<int64_t> key_token(n);
    std::vector<bool> live(n, true);  // entries with row < 0 are no rows: they contribute nothing
    for (int g = 0; g < p.G; ++g) {
      // Gather (and for relative positions rotate) this KV head's rows once.
      for (size_t i = 0; i < n; ++i) {
        const int64_t row = p.rows ? p.rows[i] : static_cast<int64_t>(i);
        if (row < 0) {
          live[i] = false;
          continue;
        }
        key_token[i] = p.key_tokens[row];
        const int64_t offset = (row * p.G + g) * p.d;
        load_row(p.k, p.kv_dtype, offset, p.d, keys.data() + i * p.d);
        load_row(p.v, p.kv_dtype, offset, p.d, values.data() + i * p.d);
        if (p.positions == PositionScheme::kRelative)
          rope_rotate(keys.data() + i * p.d, p.d, p.inv_freq, key_token[i] - p.origin);
      }
      for (int c = 0; c < p.l_C; ++c) {
        const int64_t query_token = p.q_token0 + c;
        const int64_t query_pos =
            p.positions == PositionScheme::kGlobal ? p.query_position : query_token - p.origin;
        for (int r = 0; r < group; ++r) {
          const int h = g * group + r;
          const size_t head = static_cast<size_t>(c) * p.H + h;
          std::memcpy(query.data(), p.q + head * p.d, sizeof(float) * p.d);
          rope_rotate(query.data(), p.d, p.inv_freq, query_pos);
          double max_logit = -std::numeric_limits<double>::infinity();
          for (size_t i = 0; i < n; ++i) {
            const bool visible = live[i] && (!p.causal || key_token[i] <= query_token);
            logits[i] = visible ? p.scale * dot(query.data(), keys.data() + i * p.d, p.d)
                                : -std::numeric_limits<double>::infinity();
            max_logit = std::max(max_logit, logits[i]);
          }
          float* o = p.o + head * p.d;
          if (max_logit == -std::numeric_limits<double>::infinity()) {  // nothing visible
            std::fill(o, o + p.d, 0.0f);
            p.lse[head] = kNegInf;
            continue;
          }
          std::fill(acc.begin(), acc.end(), 0.0);
          double sum = 0;
          for (size_t i = 0; i < n; ++i) {
            if (logits[i] == -std::numeric_limits<double>::infinity()) continue;
            const double weight = std::exp(logits[i] - max_logit);
            sum += weight;
            const float* value = values.data() + i * p.d;
            for (int j = 0; j < p.d; ++j) acc[static_cast<size_t>(j)] += weight * value[j];
          }
          for (int j = 0; j < p.d; ++j) o[j] = static_cast<float>(acc[static_cast<size_t>(j)] / sum);
          p.lse[head] = static_cast<float>(max_logit + std::log(sum));
        }
      }
    }
  }

  void merge(const MergeParams& p) override {
    p.check();
    for (int64_t r = 0; r < p.rows; ++r) {
      float max_lse = kNegInf;
      for (int i = 0; i < p.n_parts; ++i) max_lse = std::max(max_lse, p.lse_parts[i * p.rows + r]);
      float* o = p.o + r * p.d;
      if (max_lse == kNegInf) {  // every part empty: o = 0, lse = -inf, never NaN
        std::fill(o, o + p.d, 0.0f);
        if (p.lse) p.lse[r] = kNegInf;
        continue;
      }
      double sum = 0;
      std::vector<double> acc(static_cast<size_t>(p.d), 0.0);
      for (int i = 0; i < p.n_parts; ++i) {
        const float lse = p.lse_parts[i * p.rows + r];
        if (lse == kNegInf) continue;
        const double weight = std::exp(static_cast<double>(lse) - max_lse);
        sum += weight;
        const float* part = p.o_parts + (static_cast<size_t>(i) * p.rows + r) * p.d;
        for (int j = 0; j < p.d; ++j) acc[static_cast<size_t>(j)] += weight * part[j];
      }
      for (int j = 0; j < p.d; ++j) o[j] = static_cast<float>(acc[static_cast<size_t>(j)] / sum);
      if (p.lse) p.lse[r] = static_cast<float>(max_lse + std::log(sum));
    }
  }

  void lag_reference_extrema(const LagExtremaParams& p) override {
    p.check();
    const int width = p.G * p.d;
    std::fill(p.extrema, p.extrema + 4 * width, kNegInf);
    std::vector<float> row(static_cast<size_t>(width));
    for (int64_t i = 0; i < p.n; ++i) {
      const int64_t r = p.rows ? p.rows[i] : i;
      for (int kv = 0; kv < 2; ++kv) {
        load_row(kv == 0 ? p.k : p.v, p.kv_dtype, r * width, width, row.data());
        float* max_out = p.extrema + (2 * kv) * width;
        float* neg_min_out = p.extrema + (2 * kv + 1) * width;
        for (int j = 0; j < width; ++j) {
          max_out[j] = std::max(max_out[j], row[static_cast<size_t>(j)]);
          neg_min_out[j] = std::max(neg_min_out[j], -row[static_cast<size_t>(j)]);
        }
      }
    }
  }

  void lag_token_std(const LagStdParams& p) override {
    p.check();
    const int width = p.G * p.d;
    std::vector<float> row(static_cast<size_t>(width));
    std::vector<double> normalised(static_cast<size_t>(p.d));
    for (int64_t i = 0; i < p.n; ++i) {
      const int64_t r = p.rows ? p.rows[i] : i;
      for (int kv = 0; kv < 2; ++kv) {
        load_row(kv == 0 ? p.k : p.v, p.kv_dtype, r * width, width, row.data());
        const float* max_ref = p.extrema + (2 * kv) * width;
        const float* neg_min_ref = p.extrema + (2 * kv + 1) * width;
        for (int g = 0; g < p.G; ++g) {
          double mean = 0;
          for (int j = 0; j < p.d; ++j) {
            const int idx = g * p.d + j;
            const double lo = -static_cast<double>(neg_min_ref[idx]), hi = max_ref[idx];
            normalised[static_cast<size_t>(j)] = (row[static_cast<size_t>(idx)] - lo) / std::max(hi - lo, 1e-6);
            mean += normalised[static_cast<size_t>(j)];
          }
          mean /= p.d;
          double var = 0;
          for (int j = 0; j < p.d; ++j) {
            const double diff = normalised[static_cast<size_t>(j)] - mean;
            var += diff * diff;
          }
          p.token_std[(i * 2 + kv) * p.G + g] = static_cast<float>(std::sqrt(var / (p.d - 1)));
        }
      }
    }
  }

  void lag_partition_scores(const LagScoreParams& p) override {
    p.check();
    std::vector<double> score(static_cast<size_t>(p.lag), 0.0);
    for (int kv = 0; kv < 2; ++kv) {
      for (int g = 0; g < p.G; ++g) {
        const auto at = [&](int64_t t) { return static_cast<double>(p.token_std[(t * 2 + kv) * p.G + g]); };
        double max_value = -std::numeric_limits<double>::infinity();
        for (int64_t t = 0; t < p.lag; ++t) max_value = std::max(max_value, at(t));
        double sum = 0;
        for (int64_t t = 0; t < p.lag; ++t) sum += std::exp(at(t) - max_value);
        // (softmax_K + softmax_V) / 2, then mean over heads
        for (int64_t t = 0; t < p.lag; ++t)
          score[static_cast<size_t>(t)] += std::exp(at(t) - max_value) / sum / (2.0 * p.G);
      }
    }
    for (int64_t t = 0; t < p.lag; ++t) p.score[t] = static_cast<float>(score[static_cast<size_t>(t)]);
  }
};

}  // namespace

std::string_view op_name(Op op) {
  switch (op) {
    case Op::kCompressQuery: return "compress_query";
    case Op::kCompressKeys: return "compress_keys";
    case Op::kScoreQueryMax: return "score_query_max";
    case Op::kScoreChunk: return "score_chunk";
    case Op::kProximity: return "proximity";
    case Op::kTopK: return "top_k";
    case Op::kAttend: return "attend";
    case Op::kMerge: return "merge";
    case Op::kLagKV: return "lagkv";
    case Op::kRowsOfTokens: return "rows_of_tokens";
  }
  return "?";
}

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace unshackle
