// The CPU reference backend, op by op, against SPEC written again in float64
// (support/naive_spec.h): RoPE, segments, scoring, proximity, top-k, the row list, attention,
// merge, LagKV.
// Inputs are seeded normals (never zeros) at odd sizes (1, 7, 97, 1003); tolerances come from
// tolerance.h (SPEC §8); -inf/NaN are compared by position before values.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>

#include "naive_spec.h"
#include "test_data.h"
#include "tolerance.h"
#include "unshackle/common/error.h"
#include "unshackle/kernels/attention_config.h"
#include "unshackle/kernels/backend.h"
#include "unshackle/kernels/reference_step.h"

namespace unshackle {
namespace {

using naive::at;
using testing::first_offenders;
using testing::normal_vector;
using testing::relative_error;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Rounding a double to float32 moves it by at most half an ulp: 2^-24 of its magnitude.
constexpr double kF32RoundingOfDouble = 0x1p-24;

// Deterministic Fisher-Yates permutation of [0, n) from (seed, index).
std::vector<int64_t> permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> out(at(n));
  std::iota(out.begin(), out.end(), 0);
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(testing::hashed_uniform(seed, at(i)) * static_cast<double>(i + 1));
    std::swap(out[at(i)], out[at(std::min(j, i))]);
  }
  return out;
}

std::vector<float> to_bf16_rounded(const std::vector<float>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = naive::round_bf16(x[i]);
  return out;
}

std::vector<uint16_t> to_bf16_bits(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  convert_from_f32(x.data(), DType::kBF16, out.data(), x.size());
  return out;
}

// A StepCase holding q, k, v, wq, wk of the given shape; the ops below read its tensors.
StepCase make_case(int64_t p, int64_t l_C, int H, int G, int d, int d_c, uint64_t seed) {
  StepCase c;
  c.p = p;
  c.l_C = l_C;
  c.H = H;
  c.G = G;
  c.d = d;
  c.d_c = d_c;
  c.q = normal_vector(at(l_C) * at(H) * at(d), seed);
  c.k = normal_vector(at(p + l_C) * at(G) * at(d), seed + 1);
  c.v = normal_vector(at(p + l_C) * at(G) * at(d), seed + 2);
  c.wq = normal_vector(at(d_c) * at(H) * at(d), seed + 3, 1.0f / std::sqrt(static_cast<float>(H * d)));
  c.wk = normal_vector(at(d_c) * at(G) * at(d), seed + 4, 1.0f / std::sqrt(static_cast<float>(G * d)));
  c.config.l_I = 7;
  c.config.l_L = 24;  // w = l_L
  c.rope_theta = 10000;
  return c;
}

// ---------------------------------------------------------------------------------------
// RoPE (SPEC §1)
// ---------------------------------------------------------------------------------------

TEST(Rope, InvFreqIsTheFloat32OfThetaPower) {
  for (int d : {2, 8, 16, 64, 128})
    for (double theta : {10000.0, 500000.0}) {
      const auto got = rope_inv_freq(d, theta);
      const naive::Vec want = naive::inv_freq_exact(d, theta);
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(got[0], 1.0f);
      for (size_t i = 0; i < want.size(); ++i)
        EXPECT_LE(std::fabs(got[i] - want[i]), kF32RoundingOfDouble * want[i]) << "d " << d << " i " << i;
    }
}

TEST(Rope, Llama3ScalingAsTransformersComputesIt) {
  // Llama 3.1: theta 500000, factor 8, low 1, high 4, original 8192.
  const RopeScaling llama3{.type = RopeScaling::Type::kLlama3, .factor = 8, .low_freq_factor = 1,
                           .high_freq_factor = 4, .original_max_position = 8192};
  const auto got = rope_inv_freq(128, 500000.0, llama3);
  const naive::Vec want = naive::inv_freq_exact(128, 500000.0, llama3);
  const naive::Vec plain = naive::inv_freq_exact(128, 500000.0);
  int high = 0, medium = 0, low = 0;  // all three bands must be exercised
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_LE(std::fabs(got[i] - want[i]), kF32RoundingOfDouble * want[i]) << i;
    const double wavelen = 2 * std::numbers::pi / plain[i];
    if (wavelen < 8192.0 / 4) {
      ++high;
      EXPECT_EQ(want[i], plain[i]);
    } else if (wavelen > 8192.0) {
      ++low;
      EXPECT_DOUBLE_EQ(want[i], plain[i] / 8);
    } else {
      ++medium;
    }
  }
  EXPECT_GT(high, 0);
  EXPECT_GT(medium, 0);
  EXPECT_GT(low, 0);

  const RopeScaling linear{.type = RopeScaling::Type::kLinear, .factor = 4};
  const auto got_linear = rope_inv_freq(16, 10000.0, linear);
  const naive::Vec want_linear = naive::inv_freq_exact(16, 10000.0, linear);
  for (size_t i = 0; i < want_linear.size(); ++i)
    EXPECT_LE(std::fabs(got_linear[i] - want_linear[i]), kF32RoundingOfDouble * want_linear[i]) << i;
}

TEST(Rope, RotateHalfIdentityAtZeroNormKeptLargePositionsAccurate) {
  const RopeScaling llama3{.type = RopeScaling::Type::kLlama3, .factor = 8, .low_freq_factor = 1,
                           .high_freq_factor = 4, .original_max_position = 8192};
  for (int d : {2, 16, 128})
    for (bool scaled : {false, true}) {
      const auto inv = rope_inv_freq(d, 500000.0, scaled ? llama3 : RopeScaling{});
      const naive::Vec inv64(inv.begin(), inv.end());  // the same float32 frequencies
      // 1e6 and 8e6: a float32 angle would be off by ~0.06 rad there; the result must not be.
      for (int64_t pos : {0, 1, 7, 97, 1003, 1000000, 8000000}) {
        const auto x = normal_vector(at(d), 11 + static_cast<uint64_t>(d));
        const naive::Vec x64(x.begin(), x.end());
        auto y = x;
        rope_rotate(y.data(), d, inv.data(), pos);
        const naive::Vec want = naive::rope(x64.data(), d, static_cast<double>(pos), inv64);
        EXPECT_LT(relative_error(y, want), tolerance::kF32) << "d " << d << " pos " << pos << "\n"
                                                            << first_offenders(y, want, tolerance::kF32);
        EXPECT_NEAR(testing::norm(y), testing::norm(x), tolerance::kF32 * testing::norm(x)) << pos;
        if (pos == 0) {
          EXPECT_EQ(y, x) << "position 0 must be the identity, bit for bit";
        }
      }
    }
  // Layout: rotate-half pairs (i, i + d/2), not interleaved (2i, 2i + 1).
  const auto inv = rope_inv_freq(8, 10000.0);
  std::vector<float> e0 = {1, 0, 0, 0, 0, 0, 0, 0};
  rope_rotate(e0.data(), 8, inv.data(), 1);
  EXPECT_FLOAT_EQ(e0[0], static_cast<float>(std::cos(1.0)));
  EXPECT_FLOAT_EQ(e0[4], static_cast<float>(std::sin(1.0)));
  EXPECT_EQ(e0[1], 0.0f);
}

// ---------------------------------------------------------------------------------------
// Segments (SPEC §2) and LagKV partition arithmetic
// ---------------------------------------------------------------------------------------

TEST(Segments, EdgeCases) {
  struct Row {
    const char* what;
    int64_t p, l_C, l_I, l_L, i_end, m_end;
  };
  const std::vector<Row> rows = {
      {"p = 0", 0, 5, 4, 16, 0, 0},
      {"p < l_I", 3, 5, 4, 16, 3, 3},
      {"p = l_I", 4, 5, 4, 16, 4, 4},
      {"p = l_I + l_L", 20, 5, 4, 16, 4, 4},
      {"p = l_I + l_L + 1", 21, 5, 4, 16, 4, 5},
      {"l_I = 0", 100, 5, 0, 16, 0, 84},
      {"l_I = 0, p = 0", 0, 1, 0, 16, 0, 0},
      {"l_L = 0", 100, 5, 4, 0, 4, 100},
      {"l_I = l_L = 0", 9, 2, 0, 0, 0, 9},
      {"chunk larger than l_L", 10, 5, 4, 3, 4, 7},
      {"decode", 1003, 1, 128, 512, 128, 491},
  };
  for (const Row& r : rows) {
    const Segments s = compute_segments(r.p, r.l_C, r.l_I, r.l_L);
    EXPECT_EQ(s.i_end, r.i_end) << r.what;
    EXPECT_EQ(s.m_begin, r.i_end) << r.what;
    EXPECT_EQ(s.m_end, r.m_end) << r.what;
    EXPECT_EQ(s.s0(), r.m_end) << r.what;
    EXPECT_EQ(s.c_end, r.p + r.l_C) << r.what;
  }
}

TEST(Segments, SweepPartitionsTheContextAsSpecSays) {
  for (int64_t l_I : {0, 1, 4, 7})
    for (int64_t l_L : {0, 1, 3, 16})
      for (int64_t l_C : {1, 7})
        for (int64_t p = 0; p <= 40; ++p) {
          const Segments s = compute_segments(p, l_C, l_I, l_L);
          const naive::Seg want = naive::segments(p, l_I, l_L);
          ASSERT_EQ(s.i_end, want.i_end);
          ASSERT_EQ(s.m_begin, want.i_end);
          ASSERT_EQ(s.m_end, want.s0);
          for (int64_t t = -1; t <= p + l_C; ++t) {
            const int in = int{s.in_I(t)} + int{s.in_M(t)} + int{s.in_L(t)} + int{s.in_C(t)};
            ASSERT_EQ(in, t >= 0 && t < p + l_C ? 1 : 0) << "token " << t << " p " << p;
            ASSERT_EQ(s.in_I(t), t >= 0 && t < want.i_end);
            ASSERT_EQ(s.in_L(t), t >= want.s0 && t < p);
          }
          // L is the last min(l_L, p - |I|) tokens before p.
          ASSERT_EQ(p - s.m_end, std::min(l_L, p - s.i_end));
        }
}

TEST(LagKVArithmetic, KeepCountAndEvictablePartitions) {
  struct Keep {
    double ratio;
    int64_t lag, keep;
  };
  // 0.3, 0.7 and 0.6 are the decimals whose (1 - ratio) * lag lands just above an integer.
  for (const Keep& k : std::vector<Keep>{{0.5, 8, 4}, {0.25, 8, 6}, {0.9, 8, 1}, {0.3, 10, 7}, {0.7, 10, 3},
                                         {0.6, 5, 2}, {0.5, 7, 4}, {1.0, 8, 0}, {0.01, 128, 127}, {0.1, 10, 9}}) {
    AttentionConfig cfg;
    cfg.lag = k.lag;
    cfg.lag_ratio = k.ratio;
    EXPECT_EQ(lag_keep_count(cfg), k.keep) << k.ratio << " " << k.lag;
    EXPECT_EQ(naive::lag_keep(k.ratio, k.lag), k.keep) << k.ratio << " " << k.lag;
  }
  for (int64_t l_I : {0, 3, 8})
    for (int64_t lag : {1, 3, 8})
      for (int64_t p = 0; p <= 60; ++p) {
        AttentionConfig cfg;
        cfg.l_I = l_I;
        cfg.l_L = 8;
        cfg.lag = lag;
        cfg.lag_ratio = 0.5;
        const naive::Seg seg = naive::segments(p, l_I, cfg.l_L);
        int64_t want = 0;  // partitions [l_I + i*lag, l_I + (i+1)*lag) wholly inside M
        for (int64_t b = l_I; b + lag <= seg.s0 && b >= seg.i_end; b += lag) ++want;
        EXPECT_EQ(lag_evictable_partitions(compute_segments(p, 1, l_I, cfg.l_L), cfg), want) << p;
        cfg.lag_ratio = 0;
        EXPECT_EQ(lag_evictable_partitions(compute_segments(p, 1, l_I, cfg.l_L), cfg), 0) << "no eviction";
      }
}

// ---------------------------------------------------------------------------------------
// Compression and scores (SPEC §3)
// ---------------------------------------------------------------------------------------

TEST(Compress, QueryWithWqAndTheExactGqaFold) {
  auto backend = make_cpu_backend();
  const StepCase c = make_case(97, 7, 8, 2, 16, 5, 21);
  const naive::Case s(c);
  const auto inv = rope_inv_freq(c.d, c.rope_theta);
  std::vector<float> qc(at(c.l_C) * at(c.d_c));
  backend->compress_query({.q = c.q.data(), .wq = c.wq.data(), .inv_freq = inv.data(),
                           .position = c.config.global_query_position(), .q_out = qc.data(), .l_C = 7, .H = c.H,
                           .G = c.G, .d = c.d, .d_c = c.d_c});
  naive::Vec want;
  for (const auto& row : s.q_compressed) want.insert(want.end(), row.begin(), row.end());
  EXPECT_LT(relative_error(qc, want), tolerance::kF32) << first_offenders(qc, want, tolerance::kF32);

  // wq == nullptr: q' · k_m must be f(m, c) = sum_h RoPE(q_{h,c}, w) · k_{g(h), m}.
  const int width = c.G * c.d;
  std::vector<float> fold(at(c.l_C) * at(width));
  backend->compress_query({.q = c.q.data(), .wq = nullptr, .inv_freq = inv.data(),
                           .position = c.config.global_query_position(), .q_out = fold.data(), .l_C = 7, .H = c.H,
                           .G = c.G, .d = c.d, .d_c = width});
  std::vector<double> got_f, want_f;
  for (int64_t m = 0; m < c.p + c.l_C; ++m)
    for (int64_t q = 0; q < c.l_C; ++q) {
      double dot = 0;
      for (int i = 0; i < width; ++i)
        dot += static_cast<double>(fold[at(q) * at(width) + at(i)]) * c.k[at(m) * at(width) + at(i)];
      got_f.push_back(dot);
      want_f.push_back(s.f(m, q));
    }
  EXPECT_LT(relative_error(got_f, want_f), tolerance::kF32) << first_offenders(got_f, want_f, tolerance::kF32);
}

TEST(Compress, KeysF32AndBf16Storage) {
  auto backend = make_cpu_backend();
  const StepCase c = make_case(1003, 7, 4, 2, 16, 5, 31);
  const int64_t n = c.p + c.l_C;
  const auto naive_kc = [&](const std::vector<float>& keys) {
    naive::Vec out;
    for (int64_t m = 0; m < n; ++m)
      for (int j = 0; j < c.d_c; ++j) {
        double acc = 0;
        for (int i = 0; i < c.G * c.d; ++i)
          acc += static_cast<double>(c.wk[at(j) * at(c.G * c.d) + at(i)]) * keys[at(m) * at(c.G * c.d) + at(i)];
        out.push_back(acc);
      }
    return out;
  };
  std::vector<float> kc(at(n) * at(c.d_c));
  backend->compress_keys({.k = c.k.data(), .wk = c.wk.data(), .kc_out = kc.data(), .n = n, .G = c.G, .d = c.d,
                          .d_c = c.d_c});
  EXPECT_LT(relative_error(kc, naive_kc(c.k)), tolerance::kF32);

  // bf16 keys: exact against the naive on the rounded keys, kBF16 against the unrounded.
  const auto bits = to_bf16_bits(c.k);
  backend->compress_keys({.k = bits.data(), .k_dtype = DType::kBF16, .wk = c.wk.data(), .kc_out = kc.data(), .n = n,
                          .G = c.G, .d = c.d, .d_c = c.d_c});
  const naive::Vec rounded = naive_kc(to_bf16_rounded(c.k)), unrounded = naive_kc(c.k);
  EXPECT_LT(relative_error(kc, rounded), tolerance::kF32);
  const double bf16_err = relative_error(kc, unrounded);
  EXPECT_LT(bf16_err, tolerance::kBF16);
  EXPECT_GT(bf16_err, tolerance::kF32) << "the keys were not actually stored in bf16";

  // bf16 output of k'.
  std::vector<uint16_t> kc_bits(kc.size());
  backend->compress_keys({.k = c.k.data(), .wk = c.wk.data(), .kc_out = kc_bits.data(), .kc_dtype = DType::kBF16,
                          .n = n, .G = c.G, .d = c.d, .d_c = c.d_c});
  std::vector<float> kc_back(kc.size());
  convert_to_f32(DType::kBF16, kc_bits.data(), kc_back.data(), kc_back.size());
  EXPECT_LT(relative_error(kc_back, unrounded), tolerance::kBF16);
}

TEST(Scores, QueryMaxAndChunkScoreWithAndWithoutRowMax) {
  auto backend = make_cpu_backend();
  const int d_c = 12;
  const int64_t n_store = 1010;
  const auto kc = normal_vector(at(n_store) * at(d_c), 41);
  const auto kc_bits = to_bf16_bits(kc);
  const auto kc_rounded = to_bf16_rounded(kc);
  for (DType dtype : {DType::kF32, DType::kBF16})
    for (int l_C : {1, 7})
      for (int64_t n : {1, 7, 97, 1003}) {
        const auto qc = normal_vector(at(l_C) * at(d_c), 42 + at(n));
        const auto perm = permutation(n_store, 43 + at(n));  // an arbitrary subset, arbitrary order
        const std::vector<int32_t> rows(perm.begin(), perm.begin() + n);
        const std::vector<float>& keys = dtype == DType::kF32 ? kc : kc_rounded;
        const auto s = [&](int64_t i, int q) {
          double acc = 0;
          for (int j = 0; j < d_c; ++j)
            acc += static_cast<double>(qc[at(q) * at(d_c) + at(j)]) * keys[at(rows[at(i)]) * at(d_c) + at(j)];
          return acc;
        };
        naive::Vec want_max(at(l_C), naive::kNegInf);
        for (int64_t i = 0; i < n; ++i)
          for (int q = 0; q < l_C; ++q) want_max[at(q)] = std::max(want_max[at(q)], s(i, q));
        naive::Vec want_F(at(n), naive::kNegInf), want_raw(at(n), naive::kNegInf);
        for (int64_t i = 0; i < n; ++i)
          for (int q = 0; q < l_C; ++q) {
            want_F[at(i)] = std::max(want_F[at(i)], s(i, q) - want_max[at(q)]);
            want_raw[at(i)] = std::max(want_raw[at(i)], s(i, q));
          }
        const std::string label = std::string(dtype_name(dtype)) + " l_C " + std::to_string(l_C) + " n " + std::to_string(n);

        std::vector<float> qmax(at(l_C)), score(at(n));
        ScoreParams sp{.qc = qc.data(), .kc = dtype == DType::kF32 ? static_cast<const void*>(kc.data()) : kc_bits.data(),
                       .kc_dtype = dtype, .rows = rows.data(), .n = n, .l_C = l_C, .d_c = d_c,
                       .query_max_out = qmax.data(), .score_out = score.data()};
        backend->score_query_max(sp);
        EXPECT_LT(relative_error(qmax, want_max), tolerance::kF32) << label;
        sp.row_max = qmax.data();
        backend->score_chunk(sp);
        // F is a difference near 0 for the best rows: compare it on the scale of the scores.
        double worst = 0, scale = 0;
        for (int64_t i = 0; i < n; ++i) {
          worst = std::max(worst, std::fabs(score[at(i)] - want_F[at(i)]));
          scale = std::max(scale, std::fabs(want_raw[at(i)]));
        }
        EXPECT_LE(worst, tolerance::kF32 * scale) << label;
        // With its own maxima the argmax row of each query scores exactly 0 and nothing is above.
        EXPECT_EQ(*std::max_element(score.begin(), score.end()), 0.0f) << label;
        sp.row_max = nullptr;  // decode: rank by s directly
        backend->score_chunk(sp);
        EXPECT_LT(relative_error(score, want_raw), tolerance::kF32) << label;
      }
  // An empty row set: maxima are -inf, scores untouched.
  const auto qc = normal_vector(7 * at(d_c), 44);
  std::vector<float> qmax(7, 3.0f), score(1, 3.0f);
  ScoreParams sp{.qc = qc.data(), .kc = kc.data(), .n = 0, .l_C = 7, .d_c = d_c, .query_max_out = qmax.data(),
                 .score_out = score.data()};
  backend->score_query_max(sp);
  for (float x : qmax) EXPECT_EQ(x, kNegInf);
  backend->score_chunk(sp);
  EXPECT_EQ(score[0], 3.0f);
}

// ---------------------------------------------------------------------------------------
// Proximity and top-k (SPEC §3)
// ---------------------------------------------------------------------------------------

TEST(Proximity, HandTableWithEvictionGaps) {
  auto backend = make_cpu_backend();
  const std::vector<float> F = {1, 5, 2, 2, 9, 0, 3};
  const std::vector<int64_t> tokens = {10, 11, 12, 20, 21, 23, 24};  // gaps: evicted tokens absent
  std::vector<float> out(F.size());
  backend->proximity({.score = F.data(), .tokens = tokens.data(), .n = 7, .eps = 0, .out = out.data()});
  EXPECT_EQ(out, F);
  backend->proximity({.score = F.data(), .tokens = tokens.data(), .n = 7, .eps = 1, .out = out.data()});
  EXPECT_EQ(out, (std::vector<float>{5, 5, 5, 9, 9, 3, 3}));  // 21 and 23 are 2 apart: not neighbours
  backend->proximity({.score = F.data(), .tokens = tokens.data(), .n = 7, .eps = 2, .out = out.data()});
  EXPECT_EQ(out, (std::vector<float>{5, 5, 5, 9, 9, 9, 3}));
}

TEST(Proximity, AgainstBruteForceOverTokens) {
  auto backend = make_cpu_backend();
  for (int64_t n : {1, 7, 97, 1003}) {
    const auto F = normal_vector(at(n), 51 + at(n));
    std::vector<int64_t> tokens;
    int64_t t = 13;
    for (int64_t i = 0; i < n; ++i) {  // gaps of 1-3: evicted tokens in between
      tokens.push_back(t);
      t += 1 + static_cast<int64_t>(3 * testing::hashed_uniform(52, at(i)));
    }
    for (int64_t eps : {0, 1, 2, 5}) {
      std::vector<float> out(at(n));
      backend->proximity({.score = F.data(), .tokens = tokens.data(), .n = n, .eps = eps, .out = out.data()});
      std::vector<float> want(at(n), kNegInf);
      int by_index_differs = 0;  // would a neighbourhood by array index give another answer?
      for (int64_t j = 0; j < n; ++j) {
        float by_index = kNegInf;
        for (int64_t i = 0; i < n; ++i) {
          if (std::llabs(tokens[at(i)] - tokens[at(j)]) <= eps) want[at(j)] = std::max(want[at(j)], F[at(i)]);
          if (std::llabs(i - j) <= eps) by_index = std::max(by_index, F[at(i)]);
        }
        by_index_differs += by_index != want[at(j)];
      }
      EXPECT_EQ(out, want) << "n " << n << " eps " << eps;  // a max is exact
      if (eps == 0) {
        EXPECT_EQ(out, F);
      }
      if (n >= 97 && eps > 0) {
        EXPECT_GT(by_index_differs, 0) << "the gaps must matter for this input";
      }
    }
  }
}

TEST(TopK, HandTableTiesPaddingNaN) {
  auto backend = make_cpu_backend();
  const std::vector<float> values = {3, 7, 7, NAN, 7, 1, 2};
  const std::vector<int64_t> toks = {5, 9, 4, 1, -1, 6, 2};  // -1 is padding
  std::vector<float> top_v(8);
  std::vector<int64_t> top_t(8);
  int64_t count = -1;
  backend->top_k({.values = values.data(), .tokens = toks.data(), .n = 7, .k = 3, .out_values = top_v.data(),
                  .out_tokens = top_t.data(), .out_count = &count});
  EXPECT_EQ(count, 3);
  EXPECT_EQ(std::vector<int64_t>(top_t.begin(), top_t.begin() + 3), (std::vector<int64_t>{4, 9, 5}));
  backend->top_k({.values = values.data(), .tokens = toks.data(), .n = 7, .k = 8, .out_values = top_v.data(),
                  .out_tokens = top_t.data(), .out_count = &count});
  EXPECT_EQ(count, 6);  // k >= n: all but padding, NaN last, then (-inf, -1) slots
  EXPECT_EQ(top_t, (std::vector<int64_t>{4, 9, 5, 2, 6, 1, -1, -1}));
  EXPECT_TRUE(std::isnan(top_v[5]));
  EXPECT_EQ(top_v[6], kNegInf);
  backend->top_k({.values = values.data(), .tokens = toks.data(), .n = 7, .k = 0, .out_values = nullptr,
                  .out_tokens = nullptr, .out_count = &count});
  EXPECT_EQ(count, 0);
}

TEST(TopK, AgainstFullSortWithManyTies) {
  auto backend = make_cpu_backend();
  for (int64_t n : {1, 7, 97, 1003}) {
    std::vector<float> values(at(n));
    std::vector<int64_t> tokens(at(n));
    const auto perm = permutation(3 * n, 61 + at(n));
    for (int64_t i = 0; i < n; ++i) {
      const double u = testing::hashed_uniform(62 + at(n), at(i));
      values[at(i)] = u < 0.05 ? NAN : static_cast<float>(std::floor(11 * u) - 5);  // 11 levels: many ties
      tokens[at(i)] = testing::hashed_uniform(63 + at(n), at(i)) < 0.05 ? -1 : perm[at(i)];  // unique or padding
    }
    std::vector<int64_t> order;  // (NaN last, value desc, token asc), padding excluded
    for (int64_t i = 0; i < n; ++i)
      if (tokens[at(i)] >= 0) order.push_back(i);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      const bool na = std::isnan(values[at(a)]), nb = std::isnan(values[at(b)]);
      if (na != nb) return nb;
      if (!na && values[at(a)] != values[at(b)]) return values[at(a)] > values[at(b)];
      return tokens[at(a)] < tokens[at(b)];
    });
    for (int64_t k : {int64_t{1}, int64_t{7}, n / 2, n, n + 3}) {
      if (k == 0) continue;
      std::vector<float> out_v(at(k));
      std::vector<int64_t> out_t(at(k));
      int64_t count = -1;
      backend->top_k({.values = values.data(), .tokens = tokens.data(), .n = n, .k = k, .out_values = out_v.data(),
                      .out_tokens = out_t.data(), .out_count = &count});
      const int64_t want_count = std::min<int64_t>(k, static_cast<int64_t>(order.size()));
      ASSERT_EQ(count, want_count) << "n " << n << " k " << k;
      for (int64_t i = 0; i < k; ++i) {
        if (i < want_count) {
          const int64_t src = order[at(i)];
          ASSERT_EQ(out_t[at(i)], tokens[at(src)]) << "n " << n << " k " << k << " rank " << i;
          ASSERT_TRUE(std::isnan(values[at(src)]) ? std::isnan(out_v[at(i)]) : out_v[at(i)] == values[at(src)]);
        } else {
          ASSERT_EQ(out_t[at(i)], -1);
          ASSERT_EQ(out_v[at(i)], kNegInf);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// The global part's row list (rows_of_tokens, SPEC §7)
// ---------------------------------------------------------------------------------------

// One rank's store as KvShard lays it out: tokens [0, n) in blocks of `block`, block b on
// rank b mod P, minus the evicted tokens (a seeded ~40% of [evict_begin, evict_end)).
struct PlacedStore {
  std::vector<int64_t> tokens;  // this rank's held tokens, ascending
  std::vector<bool> evicted;    // [n] by global token
};

PlacedStore placed_store(int64_t n, int64_t block, int ranks, int rank, int64_t evict_begin, int64_t evict_end,
                         uint64_t seed) {
  PlacedStore s;
  s.evicted.assign(at(n), false);
  for (int64_t t = evict_begin; t < evict_end; ++t) s.evicted[at(t)] = testing::hashed_uniform(seed, at(t)) < 0.4;
  for (int64_t t = 0; t < n; ++t)
    if ((t / block) % ranks == rank && !s.evicted[at(t)]) s.tokens.push_back(t);
  return s;
}

// What the op must write, by brute force: I rows, then per selected entry in ascending token
// order (padding last) the row found by a linear scan of the search range, else -1.
std::vector<int32_t> brute_rows(const std::vector<int64_t>& selected, const std::vector<int64_t>& tokens,
                                int64_t s0, int64_t s1, int64_t i0, int64_t i1) {
  std::vector<int32_t> out;
  for (int64_t r = i0; r < i1; ++r) out.push_back(static_cast<int32_t>(r));
  std::vector<int64_t> sorted, padding;
  for (int64_t t : selected) (t < 0 ? padding : sorted).push_back(t);
  std::sort(sorted.begin(), sorted.end());
  for (int64_t t : sorted) {
    int32_t row = -1;
    for (int64_t r = s0; r < s1; ++r)
      if (tokens[at(r)] == t) row = static_cast<int32_t>(r);
    out.push_back(row);
  }
  out.insert(out.end(), padding.size(), -1);
  return out;
}

TEST(RowsOfTokens, AgainstBruteForceOverPlacementsEvictionPadding) {
  auto backend = make_cpu_backend();
  const int64_t n = 3001, block = 16, l_I = 24, m_end = 2600;  // I = [0, 24), M = [24, 2600)
  for (int ranks = 1; ranks <= 4; ++ranks) {
    for (int64_t k : {int64_t{0}, int64_t{1}, int64_t{57}, int64_t{400}}) {
      SCOPED_TRACE("P " + std::to_string(ranks) + " k " + std::to_string(k));
      // The selection: held tokens of M, evicted ones, tokens of I and of L (outside the search
      // range: never found), padding at any place; distinct, shuffled.
      const PlacedStore ref = placed_store(n, block, 1, 0, l_I + 100, m_end - 200, 81);
      const auto perm = permutation(n, 82 + at(k));
      std::vector<int64_t> selected;
      int64_t found_in_m = 0;
      for (int64_t i = 0; static_cast<int64_t>(selected.size()) < k; ++i) {
        const int64_t t = perm[at(i)];
        const bool pad = testing::hashed_uniform(83, at(i)) < 0.1;
        selected.push_back(pad ? -1 - static_cast<int64_t>(i % 3) : t);  // -1, -2, -3: any negative is padding
        found_in_m += !pad && t >= l_I && t < m_end && !ref.evicted[at(t)];
      }
      if (k >= 57) {
        ASSERT_GT(found_in_m, 0);
        ASSERT_LT(found_in_m, k);
      }
      std::vector<int64_t> hits(at(k), 0);  // entry j found on how many ranks
      for (int rank = 0; rank < ranks; ++rank) {
        const PlacedStore store = placed_store(n, block, ranks, rank, l_I + 100, m_end - 200, 81);
        const auto& tok = store.tokens;
        const auto i1 = static_cast<int64_t>(std::lower_bound(tok.begin(), tok.end(), l_I) - tok.begin());
        const auto m1 = static_cast<int64_t>(std::lower_bound(tok.begin(), tok.end(), m_end) - tok.begin());
        std::vector<int32_t> out(at(i1 + k), 99);
        backend->rows_of_tokens({.selected = selected.data(), .k = k, .tokens = tok.data(), .search_begin = i1,
                                 .search_end = m1, .initial_begin = 0, .initial_end = i1, .rows_out = out.data()});
        ASSERT_EQ(out, brute_rows(selected, tok, i1, m1, 0, i1)) << "rank " << rank;
        for (int64_t j = 0; j < k; ++j) hits[at(j)] += out[at(i1 + j)] >= 0;
        for (int64_t j = 1; j < k; ++j) {  // rows ascend with the tokens: memory order
          if (out[at(i1 + j)] >= 0 && out[at(i1 + j - 1)] >= 0) {
            ASSERT_LT(out[at(i1 + j - 1)], out[at(i1 + j)]);
          }
        }
      }
      // Every held token of M has its row on exactly one rank; nothing else on any.
      int64_t total = 0;
      for (int64_t h : hits) {
        ASSERT_LE(h, 1);
        total += h;
      }
      EXPECT_EQ(total, found_in_m);
    }
  }
}

TEST(RowsOfTokens, InitialRowsOnlyEmptyRangesAndBadParams) {
  auto backend = make_cpu_backend();
  const std::vector<int64_t> tokens = {2, 3, 5, 8, 13};
  std::vector<int32_t> out(5, 99);
  backend->rows_of_tokens({.k = 0, .tokens = tokens.data(), .initial_begin = 1, .initial_end = 4, .rows_out = out.data()});
  EXPECT_EQ(out, (std::vector<int32_t>{1, 2, 3, 99, 99}));
  const std::vector<int64_t> selected = {13, -1, 3};
  backend->rows_of_tokens({.selected = selected.data(), .k = 3, .tokens = tokens.data(), .search_begin = 2,
                           .search_end = 2, .rows_out = out.data()});  // empty search range: nothing found
  EXPECT_EQ(out, (std::vector<int32_t>{-1, -1, -1, 99, 99}));
  backend->rows_of_tokens({.selected = selected.data(), .k = 3, .tokens = tokens.data(), .search_begin = 0,
                           .search_end = 5, .initial_begin = 4, .initial_end = 5, .rows_out = out.data()});
  EXPECT_EQ(out, (std::vector<int32_t>{4, 1, 4, -1, 99}));
  EXPECT_THROW(backend->rows_of_tokens({.selected = selected.data(), .k = 3, .tokens = tokens.data(), .search_begin = 3,
                                        .search_end = 2, .rows_out = out.data()}),
               Error);
  EXPECT_THROW(backend->rows_of_tokens({.selected = nullptr, .k = 3, .tokens = tokens.data(), .rows_out = out.data()}),
               Error);
}

// ---------------------------------------------------------------------------------------
// Attention and merge (SPEC §4)
// ---------------------------------------------------------------------------------------

// A store of 1010 rows whose tokens are 2r (every other token evicted: rows are not tokens),
// a chunk of 7 queries starting at token 1500 (keys after it are masked when causal), and
// values offset by 3 per KV head so that a wrong GQA head mapping cannot pass.
struct AttendFixture {
  int H = 8, G = 2, d = 16, l_C = 7;
  int64_t n_store = 1010, q_token0 = 1500, origin = 37, w = 24;
  std::vector<float> q, k, v;
  std::vector<int64_t> key_tokens;
  std::vector<float> inv;
  naive::Vec inv64;
  AttendFixture() {
    q = normal_vector(at(l_C) * at(H) * at(d), 71);
    k = normal_vector(at(n_store) * at(G) * at(d), 72);
    v = normal_vector(at(n_store) * at(G) * at(d), 73);
    for (size_t i = 0; i < v.size(); ++i) v[i] += 3.0f * static_cast<float>((i / at(d)) % at(G));
    for (int64_t r = 0; r < n_store; ++r) key_tokens.push_back(2 * r);
    inv = rope_inv_freq(d, 10000.0);
    inv64.assign(inv.begin(), inv.end());
  }
  AttendParams params(const std::vector<int32_t>& rows, PositionScheme positions, bool causal, float* o, float* lse) const {
    return {.q = q.data(), .q_token0 = q_token0, .k = k.data(), .v = v.data(), .key_tokens = key_tokens.data(),
            .rows = rows.data(), .n = static_cast<int64_t>(rows.size()), .l_C = l_C, .H = H, .G = G, .d = d,
            .causal = causal, .positions = positions, .origin = origin, .query_position = w, .inv_freq = inv.data(),
            .scale = 1.0f / std::sqrt(static_cast<float>(d)), .o = o, .lse = lse};
  }
  // The float64 attention of every (c, h) over `rows` of the given K, V.
  void naive_attend(const std::vector<int32_t>& rows, PositionScheme positions, bool causal,
                    const std::vector<float>& kk, const std::vector<float>& vv, naive::Vec& o, naive::Vec& lse) const {
    const naive::Vec k64(kk.begin(), kk.end()), v64(vv.begin(), vv.end()), q64(q.begin(), q.end());
    o.clear();
    lse.clear();
    for (int c = 0; c < l_C; ++c)
      for (int h = 0; h < H; ++h) {
        const int g = h / (H / G);
        std::vector<naive::Key> keys;
        for (int32_t r : rows) {
          const size_t off = (at(r) * at(G) + at(g)) * at(d);
          const double pos = positions == PositionScheme::kGlobal ? NAN : static_cast<double>(key_tokens[at(r)] - origin);
          keys.push_back({k64.data() + off, v64.data() + off, key_tokens[at(r)], pos});
        }
        const int64_t q_token = q_token0 + c;
        const double q_pos = positions == PositionScheme::kGlobal ? static_cast<double>(w) : static_cast<double>(q_token - origin);
        const auto [oo, ll] = naive::softmax_attend(
            naive::rope(q64.data() + (at(c) * at(H) + at(h)) * at(d), d, q_pos, inv64), d, keys, q_token, causal, inv64);
        o.insert(o.end(), oo.begin(), oo.end());
        lse.push_back(ll);
      }
  }
};

// -inf at the same positions first (habit 7), then norm-relative error of the finite rest.
void expect_lse_matches(const std::vector<float>& got, const naive::Vec& want, double tol, const std::string& label) {
  ASSERT_EQ(got.size(), want.size());
  std::vector<double> g, w;
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_FALSE(std::isnan(got[i])) << label << " lse[" << i << "] is NaN";
    ASSERT_EQ(got[i] == kNegInf, want[i] == naive::kNegInf) << label << " lse[" << i << "] = " << got[i];
    if (want[i] != naive::kNegInf) {
      g.push_back(got[i]);
      w.push_back(want[i]);
    }
  }
  EXPECT_LT(relative_error(g, w), tol) << label;
}

TEST(Attend, BothPositionSchemesCausalOrNotGqa) {
  auto backend = make_cpu_backend();
  const AttendFixture fx;
  const auto perm = permutation(fx.n_store, 74);
  for (int64_t n : {1, 7, 97}) {
    // The subset holds the key right before the chunk, so no query is left without keys.
    std::vector<int32_t> rows = {static_cast<int32_t>(fx.q_token0 / 2 - 1)};
    for (int64_t i = 0; static_cast<int64_t>(rows.size()) < n; ++i)
      if (perm[at(i)] != rows[0]) rows.push_back(static_cast<int32_t>(perm[at(i)]));
    for (PositionScheme positions : {PositionScheme::kGlobal, PositionScheme::kRelative})
      for (bool causal : {false, true}) {
        const std::string label = std::string(positions == PositionScheme::kGlobal ? "global" : "relative") +
                                  (causal ? " causal" : "") + " n " + std::to_string(n);
        std::vector<float> o(at(fx.l_C) * at(fx.H) * at(fx.d)), lse(at(fx.l_C) * at(fx.H));
        backend->attend(fx.params(rows, positions, causal, o.data(), lse.data()));
        naive::Vec want_o, want_lse;
        fx.naive_attend(rows, positions, causal, fx.k, fx.v, want_o, want_lse);
        EXPECT_LT(relative_error(o, want_o), tolerance::kF32) << label << "\n" << first_offenders(o, want_o, 1e-4);
        expect_lse_matches(lse, want_lse, tolerance::kF32, label);
      }
  }
}

TEST(Attend, Bf16StorageAgainstRoundedAndUnroundedInputs) {
  auto backend = make_cpu_backend();
  const AttendFixture fx;
  const auto perm = permutation(fx.n_store, 75);
  const std::vector<int32_t> rows(perm.begin(), perm.begin() + 97);
  const auto k_bits = to_bf16_bits(fx.k), v_bits = to_bf16_bits(fx.v);
  const auto k_round = to_bf16_rounded(fx.k), v_round = to_bf16_rounded(fx.v);
  for (PositionScheme positions : {PositionScheme::kGlobal, PositionScheme::kRelative}) {
    std::vector<float> o(at(fx.l_C) * at(fx.H) * at(fx.d)), lse(at(fx.l_C) * at(fx.H));
    AttendParams ap = fx.params(rows, positions, false, o.data(), lse.data());
    ap.k = k_bits.data();
    ap.v = v_bits.data();
    ap.kv_dtype = DType::kBF16;
    backend->attend(ap);
    naive::Vec want_o, want_lse, exact_o, exact_lse;
    fx.naive_attend(rows, positions, false, k_round, v_round, want_o, want_lse);
    fx.naive_attend(rows, positions, false, fx.k, fx.v, exact_o, exact_lse);
    EXPECT_LT(relative_error(o, want_o), tolerance::kF32) << "vs the naive on the bf16-rounded K, V";
    expect_lse_matches(lse, want_lse, tolerance::kF32, "bf16 rounded");
    const double err = relative_error(o, exact_o);
    EXPECT_LT(err, tolerance::kBF16) << "vs the unrounded K, V";
    EXPECT_GT(err, tolerance::kF32) << "K, V were not actually read as bf16";
    expect_lse_matches(lse, exact_lse, tolerance::kBF16, "bf16 unrounded");
  }
}

TEST(Attend, QueriesThatSeeNothingGiveMinusInfAndZero) {
  auto backend = make_cpu_backend();
  const AttendFixture fx;
  // Rows q_token0/2 + {2, 1} hold tokens q_token0 + {4, 2}: causal queries 0 and 1 see no key,
  // queries 2 and 3 see one, queries 4-6 see two.
  const std::vector<int32_t> rows = {static_cast<int32_t>(fx.q_token0 / 2 + 2), static_cast<int32_t>(fx.q_token0 / 2 + 1)};
  std::vector<float> o(at(fx.l_C) * at(fx.H) * at(fx.d), 7.0f), lse(at(fx.l_C) * at(fx.H), 7.0f);
  backend->attend(fx.params(rows, PositionScheme::kRelative, true, o.data(), lse.data()));
  naive::Vec want_o, want_lse;
  fx.naive_attend(rows, PositionScheme::kRelative, true, fx.k, fx.v, want_o, want_lse);
  expect_lse_matches(lse, want_lse, tolerance::kF32, "partly empty");
  EXPECT_LT(relative_error(o, want_o), tolerance::kF32);
  int empty = 0;
  for (size_t i = 0; i < lse.size(); ++i) {
    if (lse[i] != kNegInf) continue;
    ++empty;
    for (int j = 0; j < fx.d; ++j) EXPECT_EQ(o[i * at(fx.d) + at(j)], 0.0f);
  }
  EXPECT_EQ(empty, 2 * fx.H);
  // n = 0: every query empty.
  std::fill(o.begin(), o.end(), 7.0f);
  backend->attend(fx.params({}, PositionScheme::kGlobal, false, o.data(), lse.data()));
  for (float x : o) EXPECT_EQ(x, 0.0f);
  for (float x : lse) EXPECT_EQ(x, kNegInf);
}

// A rows entry < 0 is no row: the result equals the attention over the list without those
// entries, bit for bit (the live rows are summed in the same order); all skipped: empty.
TEST(Attend, NegativeRowsAreSkipped) {
  auto backend = make_cpu_backend();
  const AttendFixture fx;
  const auto perm = permutation(fx.n_store, 76);
  std::vector<int32_t> live, with_gaps;
  for (int64_t i = 0; i < 97; ++i) {
    const auto r = static_cast<int32_t>(perm[at(i)]);
    if (testing::hashed_uniform(77, at(i)) < 0.3) with_gaps.push_back(-1 - static_cast<int32_t>(i % 2));
    with_gaps.push_back(r);
    live.push_back(r);
  }
  with_gaps.push_back(-1);
  ASSERT_GT(with_gaps.size(), live.size() + 10);
  for (PositionScheme positions : {PositionScheme::kGlobal, PositionScheme::kRelative})
    for (bool causal : {false, true}) {
      const size_t outs = at(fx.l_C) * at(fx.H);
      std::vector<float> o(outs * at(fx.d)), lse(outs), want_o(outs * at(fx.d)), want_lse(outs);
      backend->attend(fx.params(with_gaps, positions, causal, o.data(), lse.data()));
      backend->attend(fx.params(live, positions, causal, want_o.data(), want_lse.data()));
      EXPECT_EQ(o, want_o) << "causal " << causal;
      EXPECT_EQ(lse, want_lse) << "causal " << causal;
    }
  std::vector<float> o(at(fx.l_C) * at(fx.H) * at(fx.d), 7.0f), lse(at(fx.l_C) * at(fx.H), 7.0f);
  backend->attend(fx.params({-1, -1, -5}, PositionScheme::kGlobal, false, o.data(), lse.data()));
  for (float x : o) EXPECT_EQ(x, 0.0f);
  for (float x : lse) EXPECT_EQ(x, kNegInf);
}

// Attend each part of a split of `rows`, in the fixture's relative causal setting.
struct Partials {
  std::vector<float> o, lse;  // [parts, l_C*H, d], [parts, l_C*H]
};
Partials attend_parts(Backend& backend, const AttendFixture& fx, const std::vector<std::vector<int32_t>>& parts) {
  const size_t od = at(fx.l_C) * at(fx.H) * at(fx.d), ol = at(fx.l_C) * at(fx.H);
  Partials out{std::vector<float>(parts.size() * od), std::vector<float>(parts.size() * ol)};
  for (size_t i = 0; i < parts.size(); ++i)
    backend.attend(fx.params(parts[i], PositionScheme::kRelative, true, out.o.data() + i * od, out.lse.data() + i * ol));
  return out;
}

TEST(Merge, RandomSplitsMergeToTheWholeInAnyOrderAndGrouping) {
  auto backend = make_cpu_backend();
  const AttendFixture fx;
  const size_t od = at(fx.l_C) * at(fx.H) * at(fx.d), ol = at(fx.l_C) * at(fx.H);
  const int64_t rows_total = 97;
  // Rows around the chunk: tokens q_token0 - 96 .. q_token0 + 96, so causal masking empties some parts per query.
  std::vector<int32_t> rows;
  for (int64_t i = 0; i < rows_total; ++i) rows.push_back(static_cast<int32_t>(fx.q_token0 / 2 - 48 + i));
  std::vector<float> whole_o(od), whole_lse(ol);
  backend->attend(fx.params(rows, PositionScheme::kRelative, true, whole_o.data(), whole_lse.data()));
  naive::Vec want_o, want_lse;
  fx.naive_attend(rows, PositionScheme::kRelative, true, fx.k, fx.v, want_o, want_lse);
  EXPECT_LT(relative_error(whole_o, want_o), tolerance::kF32);

  for (uint64_t seed = 0; seed < 12; ++seed) {
    const int n_parts = 1 + static_cast<int>(6 * testing::hashed_uniform(81, seed));
    std::vector<std::vector<int32_t>> parts(at(n_parts) + 1);  // the last part always stays empty
    for (int32_t r : rows)
      parts[at(static_cast<int64_t>(n_parts * testing::hashed_uniform(82 + seed, at(r))))].push_back(r);
    const auto order = permutation(static_cast<int64_t>(parts.size()), 83 + seed);
    std::vector<std::vector<int32_t>> shuffled;
    for (int64_t i : order) shuffled.push_back(parts[at(i)]);
    const Partials pa = attend_parts(*backend, fx, shuffled);
    const int count = static_cast<int>(shuffled.size());
    std::vector<float> flat(od), flat_lse(ol);
    backend->merge({.o_parts = pa.o.data(), .lse_parts = pa.lse.data(), .n_parts = count,
                    .rows = static_cast<int64_t>(ol), .d = fx.d, .o = flat.data(), .lse = flat_lse.data()});
    const std::string label = "seed " + std::to_string(seed) + " parts " + std::to_string(count);
    EXPECT_LT(relative_error(flat, want_o), tolerance::kF32) << label;
    expect_lse_matches(flat_lse, want_lse, tolerance::kF32, label);

    // Any grouping: merge two random partials at a time until one is left.
    std::vector<std::vector<float>> po, pl;
    for (int i = 0; i < count; ++i) {
      po.emplace_back(pa.o.begin() + static_cast<std::ptrdiff_t>(at(i) * od), pa.o.begin() + static_cast<std::ptrdiff_t>(at(i + 1) * od));
      pl.emplace_back(pa.lse.begin() + static_cast<std::ptrdiff_t>(at(i) * ol), pa.lse.begin() + static_cast<std::ptrdiff_t>(at(i + 1) * ol));
    }
    for (uint64_t step = 0; po.size() > 1; ++step) {
      const size_t a = at(static_cast<int64_t>(static_cast<double>(po.size()) * testing::hashed_uniform(84 + seed, 2 * step)));
      std::vector<float> pair_o = po[a], pair_l = pl[a];
      po.erase(po.begin() + static_cast<std::ptrdiff_t>(a));
      pl.erase(pl.begin() + static_cast<std::ptrdiff_t>(a));
      const size_t b = at(static_cast<int64_t>(static_cast<double>(po.size()) * testing::hashed_uniform(84 + seed, 2 * step + 1)));
      pair_o.insert(pair_o.end(), po[b].begin(), po[b].end());
      pair_l.insert(pair_l.end(), pl[b].begin(), pl[b].end());
      backend->merge({.o_parts = pair_o.data(), .lse_parts = pair_l.data(), .n_parts = 2,
                      .rows = static_cast<int64_t>(ol), .d = fx.d, .o = po[b].data(), .lse = pl[b].data()});
    }
    EXPECT_LT(relative_error(po[0], flat), tolerance::kF32) << label << " grouped";
    expect_lse_matches(pl[0], naive::Vec(flat_lse.begin(), flat_lse.end()), tolerance::kF32, label + " grouped");
  }
}

TEST(Merge, EmptyPartsContributeNothing) {
  auto backend = make_cpu_backend();
  const AttendFixture fx;
  const size_t od = at(fx.l_C) * at(fx.H) * at(fx.d), ol = at(fx.l_C) * at(fx.H);
  std::vector<int32_t> rows;
  for (int32_t r = 0; r < 97; ++r) rows.push_back(r * 3);
  const Partials pa = attend_parts(*backend, fx, {{}, rows, {}});  // empty, A, empty
  std::vector<float> o(od), lse(ol);
  backend->merge({.o_parts = pa.o.data(), .lse_parts = pa.lse.data(), .n_parts = 3, .rows = static_cast<int64_t>(ol),
                  .d = fx.d, .o = o.data(), .lse = lse.data()});
  // e^0 * A / 1 and lse + log 1 are exact: the merge must give A back bit for bit.
  EXPECT_EQ(o, std::vector<float>(pa.o.begin() + static_cast<std::ptrdiff_t>(od), pa.o.begin() + static_cast<std::ptrdiff_t>(2 * od)));
  EXPECT_EQ(lse, std::vector<float>(pa.lse.begin() + static_cast<std::ptrdiff_t>(ol), pa.lse.begin() + static_cast<std::ptrdiff_t>(2 * ol)));
  // All parts empty: o = 0, lse = -inf, never NaN (whatever garbage the empty o holds).
  std::vector<float> garbage_o(3 * od, NAN), empty_lse(3 * ol, kNegInf);
  std::fill(o.begin(), o.end(), 5.0f);
  backend->merge({.o_parts = garbage_o.data(), .lse_parts = empty_lse.data(), .n_parts = 3,
                  .rows = static_cast<int64_t>(ol), .d = fx.d, .o = o.data(), .lse = lse.data()});
  for (float x : o) EXPECT_EQ(x, 0.0f);
  for (float x : lse) EXPECT_EQ(x, kNegInf);
}

// ---------------------------------------------------------------------------------------
// LagKV (SPEC §5)
// ---------------------------------------------------------------------------------------

struct LagShape {
  int G, d;
  int64_t lag;
  double ratio;
  int64_t l_I, l_L, p;
};

StepCase lag_case(const LagShape& s, uint64_t seed) {
  StepCase c = make_case(s.p, 1, s.G, s.G, s.d, 0, seed);
  c.config.mode = AttentionMode::kStreaming;
  c.config.l_I = s.l_I;
  c.config.l_L = s.l_L;
  c.config.lag = s.lag;
  c.config.lag_ratio = s.ratio;
  return c;
}

TEST(LagKV, EvictionsMatchTheFloat64Formula) {
  for (const LagShape& s : std::vector<LagShape>{{2, 16, 8, 0.25, 4, 16, 140},
                                                 {1, 8, 7, 0.5, 0, 7, 97},
                                                 {3, 6, 16, 0.9, 5, 20, 1003},
                                                 {2, 2, 5, 0.3, 1, 5, 60},
                                                 {2, 8, 8, 1.0, 4, 8, 60}}) {
    const StepCase c = lag_case(s, 91 + at(s.p));
    const std::vector<int64_t> got = reference_lag_evictions(c);
    const std::vector<int64_t> want = naive::lag_evictions(naive::Case(c));
    const std::string label = "G " + std::to_string(s.G) + " d " + std::to_string(s.d) + " lag " +
                              std::to_string(s.lag) + " ratio " + std::to_string(s.ratio) + " p " + std::to_string(s.p);
    EXPECT_EQ(got, want) << label;
    EXPECT_TRUE(std::is_sorted(got.begin(), got.end())) << label;
    // Exactly lag - keep per evictable partition, only partitions wholly inside M.
    const naive::Seg seg = naive::segments(s.p, s.l_I, s.l_L);
    const int64_t partitions = (seg.s0 - s.l_I) / s.lag;
    ASSERT_GT(partitions, 1) << label;
    const int64_t per = s.lag - naive::lag_keep(s.ratio, s.lag);
    EXPECT_EQ(static_cast<int64_t>(got.size()), partitions * per) << label;
    std::vector<int64_t> per_partition(at(partitions), 0);
    for (int64_t t : got) {
      ASSERT_GE(t, s.l_I) << label << ": I is never evicted";
      ASSERT_LT(t, s.l_I + partitions * s.lag) << label << ": only whole partitions inside M, never L";
      ++per_partition[at((t - s.l_I) / s.lag)];
    }
    for (int64_t e : per_partition) EXPECT_EQ(e, per) << label;
  }
}

TEST(LagKV, StageOpsGiveTheFormulasScores) {
  // The three stages composed give SPEC §5's partition scores (values, not only the ranking:
  // a biased std or a wrong softmax axis changes them); the reference extrema of a split
  // reference, combined by element-wise max (the MAX all-reduce), equal the whole one's.
  auto backend = make_cpu_backend();
  const LagShape s{3, 6, 16, 0.5, 5, 20, 200};
  const StepCase c = lag_case(s, 95);
  const naive::Case nc(c);
  const int width = s.G * s.d;
  for (int64_t part = 0; part < 3; ++part) {
    const int64_t begin = s.l_I + part * s.lag;
    std::vector<int32_t> rows, ref;
    for (int64_t t = begin; t < begin + s.lag; ++t) rows.push_back(static_cast<int32_t>(t));
    for (int64_t t = begin + s.lag; t < begin + 2 * s.lag; ++t) ref.push_back(static_cast<int32_t>(t));
    std::vector<float> extrema(4 * at(width)), half_a(4 * at(width)), half_b(4 * at(width));
    backend->lag_reference_extrema({.k = c.k.data(), .v = c.v.data(), .rows = ref.data(), .n = s.lag, .G = s.G,
                                    .d = s.d, .extrema = extrema.data()});
    backend->lag_reference_extrema({.k = c.k.data(), .v = c.v.data(), .rows = ref.data(), .n = 7, .G = s.G, .d = s.d,
                                    .extrema = half_a.data()});
    backend->lag_reference_extrema({.k = c.k.data(), .v = c.v.data(), .rows = ref.data() + 7, .n = s.lag - 7,
                                    .G = s.G, .d = s.d, .extrema = half_b.data()});
    for (size_t i = 0; i < extrema.size(); ++i) ASSERT_EQ(std::max(half_a[i], half_b[i]), extrema[i]) << i;
    std::vector<float> token_std(at(s.lag) * 2 * at(s.G)), score(at(s.lag));
    backend->lag_token_std({.k = c.k.data(), .v = c.v.data(), .rows = rows.data(), .n = s.lag, .G = s.G, .d = s.d,
                            .extrema = extrema.data(), .token_std = token_std.data()});
    backend->lag_partition_scores({.token_std = token_std.data(), .lag = s.lag, .G = s.G, .score = score.data()});
    const naive::Vec want = naive::lag_scores(nc, begin, s.lag);
    EXPECT_LT(relative_error(score, want), tolerance::kF32) << "partition " << part << "\n"
                                                           << first_offenders(score, want, tolerance::kF32);
  }
}

TEST(LagKV, NothingBeforeAWholePartitionLiesInM) {
  const LagShape s{2, 8, 8, 0.5, 4, 16, 0};
  for (int64_t p : {0, 3, 4, 20, 27}) {  // s0 - l_I = p - 20 < 8
    LagShape at_p = s;
    at_p.p = p;
    EXPECT_TRUE(reference_lag_evictions(lag_case(at_p, 92)).empty()) << p;
  }
  LagShape first = s;
  first.p = 28;  // s0 = 12: partition [4, 12) is wholly in M
  const auto got = reference_lag_evictions(lag_case(first, 92));
  EXPECT_EQ(got.size(), 4u);
  for (int64_t t : got) EXPECT_TRUE(t >= 4 && t < 12) << t;
}

TEST(LagKV, TiesKeepTheLowerIndex) {
  // Partition 0 = [4, 12): eight identical tokens score exactly alike; keep the first ceil(0.375*8) = 3.
  StepCase c = lag_case({2, 8, 8, 0.625, 4, 16, 60}, 93);
  const size_t width = at(c.G) * at(c.d);
  for (int64_t t = 5; t < 12; ++t) {
    std::copy_n(c.k.begin() + static_cast<std::ptrdiff_t>(4 * width), width, c.k.begin() + static_cast<std::ptrdiff_t>(at(t) * width));
    std::copy_n(c.v.begin() + static_cast<std::ptrdiff_t>(4 * width), width, c.v.begin() + static_cast<std::ptrdiff_t>(at(t) * width));
  }
  const auto got = reference_lag_evictions(c);
  EXPECT_EQ(std::vector<int64_t>(got.begin(), got.begin() + 5), (std::vector<int64_t>{7, 8, 9, 10, 11}));
  EXPECT_EQ(got, naive::lag_evictions(naive::Case(c)));
}

TEST(LagKV, ScoresUseTheNextPartitionAsReference) {
  // Changing partition i+1 must change partition i's ranking; changing i+2 must not.
  StepCase c = lag_case({2, 8, 8, 0.5, 4, 16, 60}, 94);  // partitions [4,12), [12,20), [20,28) evictable
  const auto base = reference_lag_evictions(c);
  const auto first = [](const std::vector<int64_t>& e) { return std::vector<int64_t>(e.begin(), e.begin() + 4); };
  StepCase far = c, near = c;
  const size_t width = at(c.G) * at(c.d);
  for (size_t i = 20 * width; i < 28 * width; ++i) far.k[i] *= 5.0f;
  EXPECT_EQ(first(reference_lag_evictions(far)), first(base));
  // Make the reference's key range tiny in every channel: normalisation then spreads partition 0.
  for (size_t i = 12 * width; i < 20 * width; ++i) near.k[i] = 0.01f * near.k[i] + 3.0f;
  for (size_t i = 12 * width; i < 20 * width; ++i) near.v[i] = 0.01f * near.v[i] - 2.0f;
  const auto changed = reference_lag_evictions(near);
  EXPECT_EQ(changed, naive::lag_evictions(naive::Case(near)));
  EXPECT_NE(first(changed), first(base)) << "partition 0 ignored its reference partition";
}

}  // namespace
}  // namespace unshackle
