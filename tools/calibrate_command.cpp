#include "calibrate_command.h"

#include <fmt/format.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include "calibration.h"
#include "unshackle/common/check.h"
#include "unshackle/model/tokenizer.h"

namespace unshackle {
namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  UNS_CHECK_KIND(kNotFound, in.good(), "--text: cannot read '{}'", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

CalibrateResult run_calibrate_command(const CalibrateOptions& o) {
  UNS_CHECK(o.rank >= 1, "--rank: d' must be >= 1 (got {})", o.rank);
  UNS_CHECK(o.w >= 0, "--w: must be >= 0 (got {})", o.w);
  UNS_CHECK(o.segment >= 0, "--segment: must be >= 0 (got {})", o.segment);
  UNS_CHECK(o.max_tokens >= 2, "--max-tokens: must be >= 2 (got {})", o.max_tokens);
  UNS_CHECK(o.held_out > 0 && o.held_out < 1, "--held-out: a share in (0, 1) (got {})", o.held_out);
  UNS_CHECK(o.refine_steps >= 0, "--refine-steps: must be >= 0 (got {})", o.refine_steps);
  UNS_CHECK(!o.recall_k.empty(), "--recall-k: at least one k");
  for (int64_t k : o.recall_k) UNS_CHECK(k >= 1, "--recall-k: each k must be >= 1 (got {})", k);
  UNS_CHECK(!o.out.empty(), "--out: a file to write is required");

  const auto model = Model::load(o.model_dir);
  const ModelConfig& config = model->config();
  const auto tokenizer = load_tokenizer(o.model_dir);
  const std::string text = read_text(o.text_file);
  std::vector<int32_t> tokens = tokenizer->encode(text, false);
  UNS_CHECK(tokens.size() >= 2, "--text '{}': fewer than 2 tokens", o.text_file);
  if (static_cast<int64_t>(tokens.size()) > o.max_tokens) tokens.resize(static_cast<size_t>(o.max_tokens));

  CollectOptions co;
  co.segment = o.segment > 0 ? o.segment
                             : std::min<int64_t>(config.max_position_embeddings > 0 ? config.max_position_embeddings : 4096,
                                                 4096);
  co.chunk = o.chunk;
  co.bos = config.bos_token_ids.empty() ? -1 : config.bos_token_ids[0];
  const CalibrationData data = collect_calibration_data(*model, tokens, o.w, co);
  UNS_CHECK(data.segments() >= 2,
            "--text '{}': {} tokens make {} segment(s) of --segment {}; at least 2 are needed (fit and held-out)",
            o.text_file, tokens.size(), data.segments(), co.segment);
  const int64_t n_held = std::max<int64_t>(1, static_cast<int64_t>(o.held_out * static_cast<double>(data.segments())));
  std::vector<int64_t> fit, held;
  for (int64_t s = 0; s < data.segments(); ++s) (s < data.segments() - n_held ? fit : held).push_back(s);

  CalibrateResult result;
  result.tokens = data.n;
  result.segments = data.segments();
  result.held_out_segments = n_held;
  std::vector<Projection> final_layers;
  for (int l = 0; l < data.layers; ++l) {
    CalibrateLayerReport r;
    r.layer = l;
    const Projection closed = fit_closed_form(data, l, o.rank, fit);
    RefineOptions ro;
    ro.steps = o.refine_steps;
    ro.lr = o.refine_lr;
    ro.seed = o.seed + static_cast<uint64_t>(l);
    const RefineResult refined = refine_projection(data, l, closed, fit, held, ro);
    r.mse_closed = refined.mse_before;
    r.mse_final = refined.mse_after;
    r.refine_step = refined.best_step;
    const Projection pca = pca_projection(data, l, o.rank, fit);
    const Projection rnd = random_projection(data, o.rank, o.seed * 7919 + static_cast<uint64_t>(l));
    for (int64_t k : o.recall_k) {
      r.recall_fitted.push_back(recall_at_k(data, l, refined.projection, held, k, 2 * k));
      r.recall_pca.push_back(recall_at_k(data, l, pca, held, k, 2 * k));
      r.recall_random.push_back(recall_at_k(data, l, rnd, held, k, 2 * k));
    }
    final_layers.push_back(refined.projection);
    result.layers.push_back(std::move(r));
  }
  write_compression_file(o.out, final_layers, data.H, data.G, data.d,
                         {{"model", std::filesystem::path(o.model_dir).filename().string()},
                          {"w", std::to_string(o.w)},
                          {"calibration_text", std::filesystem::path(o.text_file).filename().string()},
                          {"calibration_tokens", std::to_string(data.n)},
                          {"segment", std::to_string(co.segment)},
                          {"method", o.refine_steps > 0 ? "closed-form + Adam refinement" : "closed-form"}});

  std::string t = fmt::format(
      "d' = {}, w = {}, {} tokens in {} segments of {} (fit on {}, report on the last {}); recall@k over "
      "queries with >= 2k earlier tokens, candidates = all earlier tokens of the segment\n\n",
      o.rank, o.w, data.n, data.segments(), co.segment, fit.size(), n_held);
  t += "| layer | rel. MSE closed form | rel. MSE final | refine step |";
  for (int64_t k : o.recall_k) t += fmt::format(" recall@{} fitted | PCA | random |", k);
  t += "\n|---:|---:|---:|---:|";
  for (size_t i = 0; i < o.recall_k.size(); ++i) t += "---:|---:|---:|";
  t += "\n";
  for (const CalibrateLayerReport& r : result.layers) {
    t += fmt::format("| {} | {:.4f} | {:.4f} | {} |", r.layer, r.mse_closed, r.mse_final, r.refine_step);
    for (size_t i = 0; i < o.recall_k.size(); ++i)
      t += fmt::format(" {:.3f} | {:.3f} | {:.3f} |", r.recall_fitted[i], r.recall_pca[i], r.recall_random[i]);
    t += "\n";
  }
  result.table = std::move(t);
  if (!o.report.empty()) {
    std::ofstream out(o.report, std::ios::binary);
    out << result.table;
    UNS_CHECK_KIND(kIo, out.good(), "--report: cannot write '{}'", o.report);
  }
  return result;
}

void add_calibrate_command(CLI::App& app) {
  auto o = std::make_shared<CalibrateOptions>();
  CLI::App* c = app.add_subcommand(
      "calibrate", "Fit ESA compression weights (SPEC §6) on a calibration text; report recall@k vs PCA and random");
  c->add_option("--model", o->model_dir, "checkpoint directory")->required();
  c->add_option("--text", o->text_file, "calibration text file")->required();
  c->add_option("--out", o->out, "compression weights to write (safetensors)")->required();
  c->add_option("--rank", o->rank, "d', the compressed width");
  c->add_option("--w", o->w, "ESA global query position: the l_L the weights will be used with");
  c->add_option("--segment", o->segment, "tokens per prefill (0: min(max_position_embeddings, 4096))");
  c->add_option("--chunk", o->chunk, "prefill chunk");
  c->add_option("--max-tokens", o->max_tokens, "text tokens used at most");
  c->add_option("--held-out", o->held_out, "share of segments held out for the report");
  c->add_option("--refine-steps", o->refine_steps, "Adam steps on real pairs after the closed form (0: none)");
  c->add_option("--refine-lr", o->refine_lr, "Adam step relative to the weights' RMS");
  c->add_option("--recall-k", o->recall_k, "k of recall@k (repeatable)")->delimiter(',');
  c->add_option("--seed", o->seed, "seed of the refinement and the random baseline");
  c->add_option("--report", o->report, "also write the markdown table here");
  c->callback([o] {
    const CalibrateResult r = run_calibrate_command(*o);
    std::printf("%s", r.table.c_str());
    std::printf("wrote %s\n", o->out.c_str());
  });
}

}  // namespace unshackle
