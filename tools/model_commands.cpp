#include "model_commands.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>

#include "unshackle/cluster/communicator.h"
#include "unshackle/common/check.h"
#include "unshackle/common/safetensors.h"
#include "unshackle/model/cuda_model.h"
#if UNS_HAVE_MPI
#include "unshackle/cluster/mpi_communicator.h"
#endif

namespace unshackle {
namespace {

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    long long value = 0;
    try {
      value = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    UNS_CHECK(used > 0 && item.find_first_not_of(" \t", used) == std::string::npos && value >= 0 && value <= INT32_MAX,
              "--prompt-ids: '{}' is not a token id", item);
    ids.push_back(static_cast<int32_t>(value));
  }
  UNS_CHECK(!ids.empty(), "--prompt-ids: no ids given");
  return ids;
}

std::string read_prompt_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  UNS_CHECK_KIND(kNotFound, in.good(), "--prompt-file: cannot open '{}'", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_logits(const std::string& path, const ModelConfig& config, const GenerateCommandResult& r) {
  SafetensorsWriter w;
  w.set_metadata("model_vocab", std::to_string(config.vocab));
  const std::vector<int64_t> prompt(r.prompt.begin(), r.prompt.end()), tokens(r.result.tokens.begin(), r.result.tokens.end());
  w.add_i64("prompt", {static_cast<int64_t>(prompt.size())}, prompt);
  w.add_i64("tokens", {static_cast<int64_t>(tokens.size())}, tokens);
  w.add_f32("prompt_logits", {static_cast<int64_t>(prompt.size()), config.vocab}, r.result.prompt_logits);
  w.add_f32("step_logits", {static_cast<int64_t>(tokens.size()), config.vocab}, r.result.step_logits);
  w.write(path);
}

}  // namespace

GenerateCommandResult run_generate_command(const GenerateCommandOptions& o) {
  const int sources = !o.prompt.empty() + !o.prompt_file.empty() + !o.prompt_ids.empty();
  UNS_CHECK(sources == 1, "give exactly one of --prompt, --prompt-file and --prompt-ids");
  UNS_CHECK(o.ranks >= 1, "--ranks: must be >= 1 (got {})", o.ranks);
  UNS_CHECK(o.backend == "cpu" || o.backend == "cuda", "--backend: cpu or cuda (got '{}')", o.backend);
  const DType kv_dtype = resolve_kv_dtype(o.kv_dtype, o.backend);
  if (o.attention.needs_compression() && o.compression.empty()) {
    fail(ErrorKind::kInvalidArgument,
         fmt::format("--mode {} scores with compressed queries and keys and needs --compression FILE (SPEC §6: "
                     "safetensors with layers.{{l}}.wq [d', H*d] and layers.{{l}}.wk [d', G*d]); exact-topk, full "
                     "and streaming need none",
                     mode_name(o.attention.mode)));
  }
  const auto model = Model::load(o.model_dir);
  const ModelConfig& config = model->config();
  o.attention.validate(config.heads, config.kv_heads);
  CompressionWeights compression;
  if (!o.compression.empty()) compression = load_compression_weights(o.compression, config);

  std::unique_ptr<Tokenizer> tokenizer;
  GenerateCommandResult out;
  if (!o.prompt_ids.empty()) {
    out.prompt = parse_ids(o.prompt_ids);
    // The text of the result needs a tokenizer; ids alone do not (stop strings do).
    try {
      tokenizer = load_tokenizer(o.model_dir);
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::kNotFound || !o.generate.stop_strings.empty()) throw;
    }
  } else {
    tokenizer = load_tokenizer(o.model_dir);
    const std::string text = o.prompt.empty() ? read_prompt_file(o.prompt_file) : o.prompt;
    out.prompt = tokenizer->encode(text, !o.no_special);
  }
  GenerateOptions gen = o.generate;
  if (!o.ignore_eos) gen.stop_ids.insert(gen.stop_ids.end(), config.eos_token_ids.begin(), config.eos_token_ids.end());
  const ContextAttentionOptions attention_options = model->attention_options(
      o.attention, o.compression.empty() ? nullptr : &compression,
      static_cast<int64_t>(out.prompt.size()) + gen.max_tokens);

  ContextAttentionOptions options = attention_options;
  options.kv_block = o.kv_block;
  options.kv_dtype = kv_dtype;
  // One rank: its backend, its context; on the GPU its own copy of the weights on device
  // `device_index` % devices (hidden states are replicated, SPEC §7).
  const auto run_rank = [&](Communicator& comm, int device_index) {
    if (o.backend == "cuda") {
      const int devices = CudaModel::device_count();
      const int device = devices > 0 ? device_index % devices : 0;
      CudaModel cuda_model(model, device, CudaModel::default_weight_dtype(config));
      auto backend = make_cuda_backend(device);
      UNS_CHECK_KIND(kUnsupported, backend->supports(Op::kAttend, options.kv_dtype, config.head_dim),
                     "--backend cuda: the CUDA attention kernels do not take head dim {} (model '{}'; they take 32, 64, "
                     "96, 128 and 256); use --backend cpu",
                     config.head_dim, o.model_dir);
      ContextAttention context(*backend, comm, options);
      return generate(cuda_model, context, tokenizer.get(), out.prompt, gen);
    }
    auto backend = make_cpu_backend();
    ContextAttention context(*backend, comm, options);
    return generate(*model, context, tokenizer.get(), out.prompt, gen);
  };
#if UNS_HAVE_MPI
  if (MpiSession::launched_by_mpirun()) {
    MpiSession session(nullptr, nullptr);
    auto comm = make_mpi_communicator();
    const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    out.result = run_rank(*comm, local ? std::atoi(local) : comm->rank());
    out.root = comm->rank() == 0;
    // Every rank must have generated the same tokens: gather them (padded with -1) and compare.
    const size_t width = static_cast<size_t>(gen.max_tokens) + 1;
    std::vector<int32_t> mine(width, -1), all(width * static_cast<size_t>(comm->size()));
    std::copy(out.result.tokens.begin(), out.result.tokens.end(), mine.begin());
    comm->all_gather(mine.data(), all.data(), width * sizeof(int32_t));
    for (int r = 1; r < comm->size(); ++r) {
      UNS_CHECK_KIND(kInternal, std::equal(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(width),
                                           all.begin() + static_cast<std::ptrdiff_t>(width) * r),
                     "mpirun: rank {} generated other tokens than rank 0", r);
    }
    return out;
  }
#endif
  std::vector<GenerateResult> results(static_cast<size_t>(o.ranks));
  run_local_ranks(o.ranks, [&](int rank, Communicator& comm) { results[static_cast<size_t>(rank)] = run_rank(comm, rank); });
  for (int r = 1; r < o.ranks; ++r) {
    UNS_CHECK_KIND(kInternal, results[static_cast<size_t>(r)].tokens == results[0].tokens,
                   "rank {} generated [{}], rank 0 [{}]", r, fmt::join(results[static_cast<size_t>(r)].tokens, ","),
                   fmt::join(results[0].tokens, ","));
  }
  out.result = std::move(results[0]);
  return out;
}

void add_model_commands(CLI::App& app) {
  auto g = std::make_shared<GenerateCommandOptions>();
  auto mode = std::make_shared<std::string>("full");
  CLI::App* gen = app.add_subcommand("generate", "Generate text with a Hugging Face checkpoint (Llama, Mistral, Qwen2)");
  gen->add_option("--model", g->model_dir, "checkpoint directory (config.json, *.safetensors, tokenizer)")->required();
  gen->add_option("--prompt", g->prompt, "prompt text");
  gen->add_option("--prompt-file", g->prompt_file, "file holding the prompt text");
  gen->add_option("--prompt-ids", g->prompt_ids, "prompt as comma-separated token ids (no tokenizer needed)");
  gen->add_flag("--no-special", g->no_special, "encode the prompt without BOS / template tokens");
  gen->add_option("--mode", *mode, "attention: full, esa, exact-topk, streaming or block");
  gen->add_option("--top-k", g->attention.top_k, "middle tokens selected per step (esa, exact-topk, block)");
  gen->add_option("--l-i", g->attention.l_I, "initial (sink) tokens always attended");
  gen->add_option("--l-l", g->attention.l_L, "local window always attended");
  gen->add_option("--eps", g->attention.eps, "proximity influence distance");
  gen->add_option("--block", g->attention.block, "block mode's block length");
  gen->add_option("--w", g->attention.w, "query position in the global part (-1: l_L)");
  gen->add_option("--lag", g->attention.lag, "LagKV partition length");
  gen->add_option("--lag-ratio", g->attention.lag_ratio, "LagKV eviction ratio (0: none)");
  gen->add_option("--compression", g->compression, "ESA compression weights (SPEC §6 safetensors)");
  gen->add_option("--max-tokens", g->generate.max_tokens, "tokens to generate at most");
  gen->add_option("--temperature", g->generate.sampling.temperature, "0: greedy");
  gen->add_option("--top-p", g->generate.sampling.top_p, "nucleus sampling mass");
  gen->add_option("--sample-top-k", g->generate.sampling.top_k, "sample among the k most likely tokens (0: all)");
  gen->add_option("--seed", g->generate.sampling.seed, "sampling seed");
  gen->add_option("--stop", g->generate.stop_strings, "stop when the text contains this string (repeatable)");
  gen->add_option("--stop-id", g->generate.stop_ids, "stop at this token id (repeatable; eos ids always stop)");
  gen->add_flag("--ignore-eos", g->ignore_eos, "do not stop at the model's eos token ids");
  gen->add_option("--chunk", g->generate.chunk, "prefill chunk length");
  gen->add_option("--ranks", g->ranks, "in-process ranks (attention sharded, hidden states replicated)");
  gen->add_option("--kv-block", g->kv_block, "tokens per KV placement block across ranks");
  gen->add_option("--backend", g->backend, "cpu or cuda (weights on the GPU, cuBLAS, CUDA attention kernels)");
  gen->add_option("--kv-dtype", g->kv_dtype, "K, V and k' storage: auto (bf16 with --backend cuda, f32 with cpu), bf16 or f32");
  gen->add_flag("--json", g->json, "print {prompt_tokens, tokens, text, finish_reason} as JSON");
  gen->add_option("--logits-out", g->logits_out, "write prompt and step logits to this safetensors file");
  gen->callback([g, mode] {
    g->attention.mode = parse_mode(*mode);
    g->generate.record_logits = !g->logits_out.empty();
    const GenerateCommandResult r = run_generate_command(*g);
    if (!r.root) return;
    if (!g->logits_out.empty()) write_logits(g->logits_out, ModelConfig::load(g->model_dir), r);
    if (g->json) {
      const nlohmann::json j = {{"prompt_tokens", r.prompt},
                                {"tokens", r.result.tokens},
                                {"text", r.result.text},
                                {"finish_reason", finish_reason_name(r.result.finish)}};
      std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } else {
      std::printf("%s\n", r.result.text.c_str());
    }
  });

  auto m = std::make_shared<MakeModelOptions>();
  auto output = std::make_shared<std::string>();
  auto dtype = std::make_shared<std::string>("f32");
  CLI::App* mm = app.add_subcommand("make-model", "Write a small random-weight checkpoint in Hugging Face format");
  mm->add_option("--arch", m->arch, "llama, llama3, mistral or qwen2")->required();
  mm->add_option("--output", *output, "directory to write")->required();
  mm->add_option("--layers", m->layers, "decoder layers");
  mm->add_option("--hidden", m->hidden, "hidden size");
  mm->add_option("--intermediate", m->intermediate, "MLP width (0: 8/3 hidden)");
  mm->add_option("--heads", m->heads, "query heads");
  mm->add_option("--kv-heads", m->kv_heads, "key/value heads");
  mm->add_option("--head-dim", m->head_dim, "head dim (0: hidden / heads)");
  mm->add_option("--vocab", m->vocab, "vocabulary size");
  mm->add_option("--seed", m->seed, "weight seed");
  mm->add_option("--dtype", *dtype, "f32, bf16 or f16");
  mm->add_option("--tokenizer", m->tokenizer, "bytes or bpe (default: bytes for llama/mistral, bpe for llama3/qwen2)");
  mm->add_option("--shards", m->shards, "safetensors files (> 1 writes model.safetensors.index.json)");
  mm->add_option("--rope-theta", m->rope_theta, "RoPE theta (0: the architecture's usual)");
  mm->add_option("--rope-linear", m->rope_linear, "linear rope_scaling factor (0: none)");
  mm->add_flag("--tie-embeddings", m->tie_embeddings, "tie the LM head to the embeddings");
  mm->add_option("--max-position", m->max_position, "max_position_embeddings");
  mm->callback([m, output, dtype] {
    if (*dtype == "f32") {
      m->dtype = DType::kF32;
    } else if (*dtype == "bf16") {
      m->dtype = DType::kBF16;
    } else if (*dtype == "f16") {
      m->dtype = DType::kF16;
    } else {
      fail(ErrorKind::kInvalidArgument, fmt::format("--dtype: f32, bf16 or f16 (got '{}')", *dtype));
    }
    const ModelConfig c = make_model(*m, *output);
    std::printf("wrote %s: %s, %d layers, hidden %d, heads %d/%d, head dim %d, vocab %lld, %s\n", output->c_str(),
                std::string(arch_name(c.arch)).c_str(), c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim,
                static_cast<long long>(c.vocab), dtype->c_str());
  });
}

}  // namespace unshackle
