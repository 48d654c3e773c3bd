// `unshackle calibrate`: fits ESA compression weights (SPEC §6) for a checkpoint on a
// calibration text and reports recall@k against PCA and random projections of the same d'.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <vector>

namespace unshackle {

struct CalibrateOptions {
  std::string model_dir, text_file, out;
  int rank = 16;                    // d'
  int64_t w = 4096;                 // ESA global query position (= l_L at inference)
  int64_t segment = 0;              // tokens per prefill; 0: min(max_position_embeddings, 4096)
  int64_t chunk = 512;
  int64_t max_tokens = 65536;       // of the text, at most
  double held_out = 0.25;           // share of segments kept for the report (at least one)
  int refine_steps = 200;           // 0: closed form only
  double refine_lr = 0.01;
  std::vector<int64_t> recall_k = {16, 64};
  uint64_t seed = 1;
  std::string report;               // markdown table to this file as well as stdout
};

struct CalibrateLayerReport {
  int layer = 0;
  double mse_closed = 0, mse_final = 0;  // held-out relative MSE of s against f
  int refine_step = 0;                   // 0: the closed form was kept
  std::vector<double> recall_fitted, recall_pca, recall_random;  // per recall_k
};

struct CalibrateResult {
  int64_t tokens = 0, segments = 0, held_out_segments = 0;
  std::vector<CalibrateLayerReport> layers;
  std::string table;  // markdown
};

CalibrateResult run_calibrate_command(const CalibrateOptions& options);
void add_calibrate_command(CLI::App& app);

}  // namespace unshackle
