// unshackle calibrate. The oracle for the fit is arithmetic: when the keys span r <= d'
// dimensions, f(m, c) = q̂_c · k_m has rank r and the closed form must reproduce it (up to the
// ridge); when they do not, the fitted projection must rank the exact top-k better than a
// random projection of the same d'. End to end on make-model checkpoints.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#include "calibrate_command.h"
#include "calibration.h"
#include "unshackle/common/error.h"
#include "unshackle/model/make_model.h"
#include "unshackle/model/model.h"

namespace unshackle {
namespace {

namespace fs = std::filesystem;

class ScratchDir {
 public:
  ScratchDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() / ("uns_calib_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() { fs::remove_all(path_); }
  std::string sub(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

// One layer, H = 4, G = 2, d = 8, `segments` segments of `len` tokens. Keys are B z with B
// [G*d, key_rank] (so f has rank <= key_rank); each basis direction has its own scale, so
// the spectrum is not flat. Queries: Gaussian with per-dimension scales.
CalibrationData synthetic(int key_rank, int segments, int len, uint64_t seed) {
  CalibrationData data;
  data.layers = 1;
  data.H = 4;
  data.G = 2;
  data.d = 8;
  data.w = 0;
  data.n = int64_t{segments} * len;
  for (int s = 0; s <= segments; ++s) data.segment_begin.push_back(int64_t{s} * len);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  const int64_t kw = data.k_width(), qw = data.q_width();
  std::vector<double> B(static_cast<size_t>(kw * key_rank));
  for (double& x : B) x = normal(rng);
  data.k.assign(1, std::vector<float>(static_cast<size_t>(data.n * kw)));
  data.q.assign(1, std::vector<float>(static_cast<size_t>(data.n * qw)));
  for (int64_t t = 0; t < data.n; ++t) {
    std::vector<double> z(static_cast<size_t>(key_rank));
    for (int j = 0; j < key_rank; ++j) z[static_cast<size_t>(j)] = normal(rng) * std::pow(0.8, j);
    for (int64_t i = 0; i < kw; ++i) {
      double acc = 0;
      for (int j = 0; j < key_rank; ++j) acc += B[static_cast<size_t>(i * key_rank + j)] * z[static_cast<size_t>(j)];
      data.k[0][static_cast<size_t>(t * kw + i)] = static_cast<float>(acc);
    }
    for (int64_t i = 0; i < qw; ++i)
      data.q[0][static_cast<size_t>(t * qw + i)] = static_cast<float>(normal(rng) * (1.0 + 0.5 * std::sin(0.7 * static_cast<double>(i))));
  }
  return data;
}

TEST(SymmetricEigen, ReconstructsARandomSymmetricMatrix) {
  const int n = 13;
  std::mt19937_64 rng(3);
  std::normal_distribution<double> normal;
  std::vector<double> a(n * n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j <= i; ++j) a[static_cast<size_t>(i * n + j)] = a[static_cast<size_t>(j * n + i)] = normal(rng);
  std::vector<double> values, vectors;
  symmetric_eigen(n, a, values, vectors);
  for (int i = 1; i < n; ++i) EXPECT_GE(values[static_cast<size_t>(i - 1)], values[static_cast<size_t>(i)]);
  // A v_i = λ_i v_i and |v_i| = 1.
  double worst = 0;
  for (int e = 0; e < n; ++e) {
    const double* v = vectors.data() + e * n;
    double norm = 0;
    for (int i = 0; i < n; ++i) {
      double av = 0;
      for (int j = 0; j < n; ++j) av += a[static_cast<size_t>(i * n + j)] * v[j];
      worst = std::max(worst, std::abs(av - values[static_cast<size_t>(e)] * v[i]));
      norm += v[i] * v[i];
    }
    EXPECT_NEAR(norm, 1.0, 1e-12);
  }
  EXPECT_LT(worst, 1e-10);
}

TEST(ClosedForm, ExactWhenTheScoresHaveRankAtMostDPrime) {
  const CalibrationData data = synthetic(/*key_rank=*/3, 4, 96, 11);
  const std::vector<int64_t> fit = {0, 1, 2}, held = {3};
  const Projection p = fit_closed_form(data, 0, /*d_c=*/3, fit);
  ASSERT_EQ(p.wq.size(), 3u * 32);
  ASSERT_EQ(p.wk.size(), 3u * 16);
  EXPECT_LT(pair_relative_mse(data, 0, p, held), 1e-8);
  EXPECT_DOUBLE_EQ(recall_at_k(data, 0, p, held, 8, 16), 1.0);
  // One dimension fewer than the rank cannot be exact.
  EXPECT_GT(pair_relative_mse(data, 0, fit_closed_form(data, 0, 2, fit), held), 1e-3);
}

TEST(ClosedForm, BeatsRandomProjectionsAndMatchesOrBeatsPca) {
  // Full-rank keys with a decaying spectrum: d' = 4 of 16 must choose well.
  const CalibrationData data = synthetic(/*key_rank=*/16, 6, 128, 5);
  const std::vector<int64_t> fit = {0, 1, 2, 3}, held = {4, 5};
  const Projection fitted = fit_closed_form(data, 0, 4, fit);
  const Projection pca = pca_projection(data, 0, 4, fit);
  double random_mean = 0;
  for (uint64_t seed = 1; seed <= 5; ++seed) random_mean += recall_at_k(data, 0, random_projection(data, 4, seed), held, 8, 16);
  random_mean /= 5;
  const double r_fit = recall_at_k(data, 0, fitted, held, 8, 16);
  const double r_pca = recall_at_k(data, 0, pca, held, 8, 16);
  EXPECT_GT(r_fit, random_mean + 0.1) << "fitted " << r_fit << " random " << random_mean;
  EXPECT_GE(r_fit, r_pca - 0.02) << "fitted " << r_fit << " PCA " << r_pca;
  // The closed form minimises the second-moment loss: its pair error is below PCA's.
  EXPECT_LT(pair_relative_mse(data, 0, fitted, held), pair_relative_mse(data, 0, pca, held));
}

TEST(Refine, NeverWorsensTheHeldOutError) {
  const CalibrationData data = synthetic(16, 5, 96, 9);
  const std::vector<int64_t> fit = {0, 1, 2, 3}, held = {4};
  // From a poor start (PCA) refinement has room to improve; from the closed form it may not.
  RefineOptions ro;
  ro.steps = 100;
  ro.eval_every = 20;
  const RefineResult from_pca = refine_projection(data, 0, pca_projection(data, 0, 4, fit), fit, held, ro);
  EXPECT_LE(from_pca.mse_after, from_pca.mse_before);
  EXPECT_GT(from_pca.best_step, 0) << "Adam on real pairs should improve on PCA's pair error";
  const RefineResult from_closed = refine_projection(data, 0, fit_closed_form(data, 0, 4, fit), fit, held, ro);
  EXPECT_LE(from_closed.mse_after, from_closed.mse_before);
}

TEST(Projection, BadArgumentsAreErrors) {
  const CalibrationData data = synthetic(3, 2, 32, 1);
  const std::vector<int64_t> fit = {0}, none = {}, wrong = {7};
  EXPECT_THROW(fit_closed_form(data, 0, 0, fit), Error);
  EXPECT_THROW(fit_closed_form(data, 0, 2, none), Error);
  EXPECT_THROW(fit_closed_form(data, 0, 2, wrong), Error);
  EXPECT_THROW(recall_at_k(data, 0, random_projection(data, 2, 1), fit, 64, 128), Error);  // no query has 128 earlier
}

// ---- end to end: make-model checkpoint → calibrate → file → load_compression_weights ----

struct Checkpoint {
  ScratchDir dir;
  std::string model, text;
  Checkpoint() {
    MakeModelOptions m;
    m.arch = "llama";
    m.layers = 2;
    m.hidden = 64;
    m.heads = 4;
    m.kv_heads = 2;
    m.vocab = 300;
    m.seed = 17;
    model = dir.sub("model");
    make_model(m, model);
    // Seeded non-trivial text: words drawn from a small vocabulary, so keys repeat with structure.
    const char* words[] = {"alpha ", "beta ", "gamma ", "delta ", "vault ", "code ", "river ", "stone ", "42 ", ". "};
    std::mt19937_64 rng(23);
    std::string s;
    while (s.size() < 1200) s += words[rng() % 10];
    text = dir.sub("calib.txt");
    std::ofstream(text) << s;
  }
};

TEST(CalibrateCommand, WritesAFileTheRuntimeLoadsAndBeatsRandom) {
  Checkpoint c;
  CalibrateOptions o;
  o.model_dir = c.model;
  o.text_file = c.text;
  o.out = c.dir.sub("comp.safetensors");
  o.rank = 4;
  o.w = 64;
  o.segment = 128;
  o.refine_steps = 20;
  o.recall_k = {8};
  o.report = c.dir.sub("report.md");
  const CalibrateResult r = run_calibrate_command(o);
  ASSERT_EQ(r.layers.size(), 2u);
  EXPECT_GE(r.segments, 8);
  double fitted = 0, random = 0;
  for (const CalibrateLayerReport& layer : r.layers) {
    EXPECT_LE(layer.mse_final, layer.mse_closed);
    fitted += layer.recall_fitted[0];
    random += layer.recall_random[0];
  }
  EXPECT_GT(fitted, random) << r.table;
  EXPECT_NE(r.table.find("| 1 |"), std::string::npos) << r.table;
  EXPECT_TRUE(fs::exists(o.report));

  const ModelConfig config = ModelConfig::load(c.model);
  const CompressionWeights w = load_compression_weights(o.out, config);
  EXPECT_EQ(w.d_c, 4);
  ASSERT_EQ(w.wq.size(), 2u);
  EXPECT_EQ(w.wq[0].size(), 4u * config.heads * config.head_dim);
  EXPECT_EQ(w.wk[1].size(), 4u * config.kv_heads * config.head_dim);
  double norm = 0;
  for (float x : w.wk[1]) norm += double{x} * x;
  EXPECT_GT(norm, 0);
}

TEST(CalibrateCommand, BadInputNamesTheFieldOrFile) {
  Checkpoint c;
  CalibrateOptions o;
  o.model_dir = c.model;
  o.text_file = c.text;
  o.out = c.dir.sub("comp.safetensors");
  o.segment = 128;
  const auto message = [](const CalibrateOptions& opts) {
    try {
      run_calibrate_command(opts);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CalibrateOptions missing = o;
  missing.text_file = c.dir.sub("nope.txt");
  EXPECT_NE(message(missing).find("nope.txt"), std::string::npos);
  CalibrateOptions rank = o;
  rank.rank = 0;
  EXPECT_NE(message(rank).find("--rank"), std::string::npos);
  CalibrateOptions one_segment = o;
  one_segment.segment = 4096;  // the whole text is one segment: nothing to hold out
  EXPECT_NE(message(one_segment).find("at least 2"), std::string::npos);
  CalibrateOptions no_model = o;
  no_model.model_dir = c.dir.sub("no_model");
  EXPECT_NE(message(no_model).find("no_model"), std::string::npos);
  CalibrateOptions k = o;
  k.recall_k = {0};
  EXPECT_NE(message(k).find("--recall-k"), std::string::npos);
  EXPECT_FALSE(fs::exists(o.out));
}

}  // namespace
}  // namespace unshackle
