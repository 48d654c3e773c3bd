// End-to-end model timings: prefill tokens/s and decode ms/token of `Model` (CPU) or
// `CudaModel` (GPU) on a checkpoint directory, greedy, attention mode `full` unless told.
//
//   prefill tokens/s = prompt tokens / (wall time of the chunked prefill, last logits on the host)
//   decode ms/token  = wall time of `decode` single-token steps (forward + logits to host +
//                      argmax) / decode
// Each repeat uses a fresh context; one warm-up repeat is not reported (cuBLAS heuristics,
// first-touch allocation). Prints one line per repeat and a JSON summary with medians.
//   bench_model --model DIR [--backend cpu|cuda] [--prompt 512 [2048 ...]] [--chunk 512] [--decode 32]
//               [--repeats 3] [--mode full] [--kv-dtype auto|bf16|f32]
// The KV dtype defaults to what the service and `unshackle generate` use (auto: bf16 on the
// GPU, where chunks of >= 16 tokens attend on the tensor cores; f32 on the CPU).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "unshackle/cluster/communicator.h"
#include "unshackle/common/check.h"
#include "unshackle/model/cuda_model.h"
#include "unshackle/model/model.h"

namespace unshackle {
namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string model_dir, backend = "cpu", mode = "full", kv_dtype = "auto";
  std::vector<int64_t> prompts = {512};  // one measurement per prompt length, one model load
  int64_t chunk = 512, decode = 32;
  int repeats = 3;
};

int32_t argmax(const std::vector<float>& logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

void measure(const Options& o, const std::shared_ptr<const Model>& model, CudaModel* cuda, int64_t prompt_len);

int run(const Options& o) {
  const auto load_start = Clock::now();
  const auto model = Model::load(o.model_dir);
  const double load_s = std::chrono::duration<double>(Clock::now() - load_start).count();
  const ModelConfig& c = model->config();
  std::unique_ptr<CudaModel> cuda;
  double upload_s = 0;
  if (o.backend == "cuda") {
    const auto t = Clock::now();
    cuda = std::make_unique<CudaModel>(model, 0, CudaModel::default_weight_dtype(c));
    upload_s = std::chrono::duration<double>(Clock::now() - t).count();
  } else {
    UNS_CHECK(o.backend == "cpu", "--backend: cpu or cuda (got '{}')", o.backend);
  }
  std::printf("model %s: %s, %d layers, hidden %d, heads %d/%d, vocab %lld, dtype %s; load %.1f s, upload %.1f s\n",
              o.model_dir.c_str(), std::string(arch_name(c.arch)).c_str(), c.layers, c.hidden, c.heads, c.kv_heads,
              static_cast<long long>(c.vocab), c.torch_dtype.c_str(), load_s, upload_s);
  for (int64_t prompt_len : o.prompts) measure(o, model, cuda.get(), prompt_len);
  return 0;
}

void measure(const Options& o, const std::shared_ptr<const Model>& model, CudaModel* cuda, int64_t prompt_len) {
  const ModelConfig& c = model->config();
  // A seeded prompt of in-vocabulary ids.
  std::vector<int32_t> prompt(static_cast<size_t>(prompt_len));
  uint64_t s = 12345;
  for (auto& t : prompt) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    t = static_cast<int32_t>((s >> 33) % static_cast<uint64_t>(c.vocab));
  }
  AttentionConfig attention{.mode = parse_mode(o.mode)};
  attention.validate(c.heads, c.kv_heads);
  const DType kv_dtype = resolve_kv_dtype(o.kv_dtype, o.backend);
  std::vector<double> prefill_s, decode_s;
  std::vector<int32_t> first_tokens;
  for (int rep = 0; rep <= o.repeats; ++rep) {
    run_local_ranks(1, [&](int, Communicator& comm) {
      auto backend = cuda ? make_cuda_backend(0) : make_cpu_backend();
      ContextAttentionOptions options = model->attention_options(attention, nullptr, prompt_len + o.decode);
      options.kv_dtype = kv_dtype;
      ContextAttention context(*backend, comm, options);
      std::vector<float> logits;
      auto t0 = Clock::now();
      if (cuda) {
        cuda->prefill(context, prompt, o.chunk, logits);
      } else {
        model->prefill(context, prompt, o.chunk, logits);
      }
      const double p = std::chrono::duration<double>(Clock::now() - t0).count();
      std::vector<int32_t> tokens = {argmax(logits)};
      t0 = Clock::now();
      for (int64_t i = 0; i < o.decode; ++i) {
        const std::span<const int32_t> next(&tokens.back(), 1);
        if (cuda) {
          cuda->forward_chunk(context, next, logits);
        } else {
          model->forward_chunk(context, next, logits);
        }
        tokens.push_back(argmax(logits));
      }
      const double d = std::chrono::duration<double>(Clock::now() - t0).count();
      std::printf("%s repeat %d: prefill %lld tokens in %.4f s = %.1f tokens/s; decode %lld tokens in %.4f s = %.3f "
                  "ms/token\n",
                  rep == 0 ? "warm-up" : "timed", rep, static_cast<long long>(prompt_len), p,
                  static_cast<double>(prompt_len) / p, static_cast<long long>(o.decode), d, d * 1e3 / static_cast<double>(o.decode));
      if (rep == 0) {
        first_tokens = tokens;
        return;
      }
      // Greedy decoding of the same prompt must repeat itself.
      UNS_CHECK_KIND(kInternal, tokens == first_tokens, "repeat {} generated other tokens than the warm-up", rep);
      prefill_s.push_back(p);
      decode_s.push_back(d);
    });
  }
  const nlohmann::json j = {
      {"backend", o.backend},  {"model", o.model_dir},      {"layers", c.layers},
      {"hidden", c.hidden},    {"vocab", c.vocab},          {"dtype", c.torch_dtype},
      {"mode", o.mode},        {"kv_dtype", std::string(dtype_name(kv_dtype))}, {"prompt", prompt_len},        {"chunk", o.chunk},
      {"decode", o.decode},    {"repeats", o.repeats},
      {"prefill_tokens_per_s", static_cast<double>(prompt_len) / median(prefill_s)},
      {"decode_ms_per_token", median(decode_s) * 1e3 / static_cast<double>(o.decode)},
      {"weights_gib", cuda ? static_cast<double>(cuda->weight_bytes()) / (1 << 30) : 0.0},
      {"first_tokens", std::vector<int32_t>(first_tokens.begin(), first_tokens.begin() + std::min<size_t>(8, first_tokens.size()))}};
  std::printf("%s\n", j.dump().c_str());
}

}  // namespace
}  // namespace unshackle

int main(int argc, char** argv) {
  unshackle::Options o;
  CLI::App app{"bench_model: prefill tokens/s and decode ms/token of the model runtime"};
  app.add_option("--model", o.model_dir, "checkpoint directory")->required();
  app.add_option("--backend", o.backend, "cpu or cuda");
  app.add_option("--prompt", o.prompts, "prompt tokens (seeded ids); several values: one measurement each");
  app.add_option("--chunk", o.chunk, "prefill chunk");
  app.add_option("--kv-dtype", o.kv_dtype, "K, V and k' storage: auto (bf16 on cuda, f32 on cpu), bf16 or f32");
  app.add_option("--decode", o.decode, "decode steps timed");
  app.add_option("--repeats", o.repeats, "timed repeats (after one warm-up)");
  app.add_option("--mode", o.mode, "attention mode (full, streaming, exact-topk)");
  CLI11_PARSE(app, argc, argv);
  try {
    return unshackle::run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
