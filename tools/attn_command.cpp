#include "attn_command.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "case_file.h"
#include "unshackle/common/safetensors.h"
#include "unshackle/cluster/communicator.h"
#include "unshackle/common/check.h"
#include "unshackle/worker/case_runner.h"
#if UNS_HAVE_MPI
#include "unshackle/cluster/mpi_communicator.h"
#endif

namespace unshackle {

StepResult run_attention_case(const StepCase& step, const AttnOptions& options, bool& writes) {
#if UNS_HAVE_MPI
  if (MpiSession::launched_by_mpirun()) {
    MpiSession session(nullptr, nullptr);
    auto comm = make_mpi_communicator();
    auto backend = make_cpu_backend();
    StepResult result = run_case_distributed(step, *backend, *comm, options.kv_block);
    writes = comm->rank() == 0;
    return result;
  }
#endif
  writes = true;
  UNS_CHECK(options.ranks >= 1, "--ranks: must be >= 1 (got {})", options.ranks);
  if (options.ranks == 1) return reference_step(step);
  std::vector<StepResult> results(static_cast<size_t>(options.ranks));
  run_local_ranks(options.ranks, [&](int rank, Communicator& comm) {
    auto backend = make_cpu_backend();
    results[static_cast<size_t>(rank)] = run_case_distributed(step, *backend, comm, options.kv_block);
  });
  return results[0];
}

namespace {

// Hashed normals from (seed, stream, index), the generator of tests/support/test_data.h:
// each tensor draws from its own stream, so e.g. a longer --p leaves q unchanged.
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

class HashedRandom {
 public:
  HashedRandom(uint64_t seed, uint64_t stream)
      : key_(splitmix64(splitmix64(seed) ^ (stream * 0xd1b54a32d192ed03ull))) {}
  // Uniform in (0, 1): never 0, so the log below is finite.
  double uniform(uint64_t index) const {
    return (static_cast<double>(splitmix64(key_ ^ (index * 0x9e3779b97f4a7c15ull)) >> 11) + 0.5) / 9007199254740992.0;
  }
  float normal(uint64_t index) const {
    const double u1 = uniform(2 * index), u2 = uniform(2 * index + 1);
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }

 private:
  uint64_t key_;
};

enum Stream : uint64_t { kStreamQ = 1, kStreamK, kStreamV, kStreamWq, kStreamNeedles };

struct MakeCaseOptions {
  std::string output;
  std::string mode = "esa";
  int64_t p = 5000, chunk = 1, l_I = 16, l_L = 512, top_k = 256, eps = 1, block = 32, lag = 64, w = -1;
  int heads = 8, kv_heads = 2, head_dim = 64, rank = 32, needles = 0;
  double lag_ratio = 0, rope_theta = 10000;
  uint64_t seed = 1;
};

// A random case; with needles, that many tokens of M get keys aligned with the chunk's
// queries (so exact-topk must select them), and wk = wq · repeat is a random projection
// consistent with wq (s approximates f by Johnson-Lindenstrauss), so esa finds them too.
void make_case(const MakeCaseOptions& o) {
  StepCase step;
  step.p = o.p;
  step.l_C = o.chunk;
  step.H = o.heads;
  step.G = o.kv_heads;
  step.d = o.head_dim;
  step.d_c = o.rank;
  step.rope_theta = o.rope_theta;
  AttentionConfig& c = step.config;
  c.mode = parse_mode(o.mode);
  c.l_I = o.l_I; c.l_L = o.l_L; c.top_k = o.top_k; c.eps = o.eps; c.block = o.block; c.w = o.w;
  c.lag = o.lag; c.lag_ratio = o.lag_ratio;
  const auto require = [](bool ok, const std::string& message) {
    if (!ok) fail(ErrorKind::kInvalidArgument, message);
  };
  require(o.heads > 0 && o.kv_heads > 0 && o.heads % o.kv_heads == 0,
          fmt::format("--heads ({}) must be a positive multiple of --kv-heads ({})", o.heads, o.kv_heads));
  require(o.head_dim > 0 && o.head_dim % 2 == 0, fmt::format("--head-dim ({}) must be positive and even", o.head_dim));
  require(o.rank > 0, fmt::format("--rank ({}) must be > 0", o.rank));
  require(o.p >= 0, fmt::format("--p ({}) must be >= 0", o.p));
  require(o.chunk > 0, fmt::format("--chunk ({}) must be > 0", o.chunk));
  require(o.needles >= 0, fmt::format("--needles ({}) must be >= 0", o.needles));
  const auto fill = [&](std::vector<float>& values, size_t n, float scale, Stream stream) {
    const HashedRandom random(o.seed, stream);
    values.resize(n);
    for (size_t i = 0; i < n; ++i) values[i] = scale * random.normal(i);
  };
  const int dH = o.heads * o.head_dim, dK = o.kv_heads * o.head_dim;
  fill(step.q, static_cast<size_t>(o.chunk) * dH, 1.0f, kStreamQ);
  fill(step.k, static_cast<size_t>(o.p + o.chunk) * dK, 1.0f, kStreamK);
  fill(step.v, static_cast<size_t>(o.p + o.chunk) * dK, 1.0f, kStreamV);
  fill(step.wq, static_cast<size_t>(o.rank) * dH, 1.0f / std::sqrt(static_cast<float>(o.rank)), kStreamWq);
  step.wk.assign(static_cast<size_t>(o.rank) * dK, 0.0f);
  const int group = o.heads / o.kv_heads;
  for (int j = 0; j < o.rank; ++j)  // wk[j, g*d+i] = sum over heads h of group g of wq[j, h*d+i]
    for (int h = 0; h < o.heads; ++h)
      for (int i = 0; i < o.head_dim; ++i)
        step.wk[static_cast<size_t>(j) * dK + static_cast<size_t>(h / group) * o.head_dim + i] +=
            step.wq[static_cast<size_t>(j) * dH + static_cast<size_t>(h) * o.head_dim + i];

  std::vector<int64_t> needles;
  const Segments seg = compute_segments(o.p, o.chunk, o.l_I, o.l_L);
  if (o.needles > 0) {
    UNS_CHECK(seg.m_size() >= o.needles, "--needles {}: M holds only {} tokens", o.needles, seg.m_size());
    // The folded, rotated query direction of the chunk's first token: sum of its heads per KV head.
    const auto inv_freq = rope_inv_freq(o.head_dim, o.rope_theta);
    std::vector<float> direction(static_cast<size_t>(dK), 0.0f), head(static_cast<size_t>(o.head_dim));
    for (int h = 0; h < o.heads; ++h) {
      std::copy_n(step.q.begin() + static_cast<std::ptrdiff_t>(h) * o.head_dim, o.head_dim, head.begin());
      rope_rotate(head.data(), o.head_dim, inv_freq.data(), c.global_query_position());
      for (int i = 0; i < o.head_dim; ++i) direction[static_cast<size_t>((h / group) * o.head_dim + i)] += head[static_cast<size_t>(i)];
    }
    double norm = 0;
    for (float x : direction) norm += static_cast<double>(x) * x;
    const float scale = static_cast<float>(4.0 * std::sqrt(static_cast<double>(dK)) / std::sqrt(norm));
    // One needle in each of `needles` equal stretches of M, at a seeded place within it.
    const HashedRandom random(o.seed, kStreamNeedles);
    const int64_t stride = seg.m_size() / o.needles;
    for (int n = 0; n < o.needles; ++n) {
      const int64_t t = seg.m_begin + n * stride +
                        static_cast<int64_t>(random.uniform(static_cast<uint64_t>(n)) * static_cast<double>(stride));
      needles.push_back(t);
      for (int i = 0; i < dK; ++i) step.k[static_cast<size_t>(t) * dK + i] = scale * direction[static_cast<size_t>(i)];
    }
  }
  step.validate();
  std::vector<std::pair<std::string, std::vector<int64_t>>> extra;
  if (!needles.empty()) extra.emplace_back("needles", needles);
  write_case_file(o.output, step, extra);
  std::printf("wrote %s: mode %s, p = %lld, l_C = %lld, H = %d, G = %d, d = %d, d' = %d, |M| = %lld, %d needles\n",
              o.output.c_str(), o.mode.c_str(), static_cast<long long>(o.p), static_cast<long long>(o.chunk), o.heads,
              o.kv_heads, o.head_dim, o.rank, static_cast<long long>(seg.m_size()), o.needles);
}

}  // namespace

void add_attn_commands(CLI::App& app) {
  auto attn = std::make_shared<AttnOptions>();
  CLI::App* cmd = app.add_subcommand("attn", "Run one attention step (SPEC §9) from a safetensors case file");
  cmd->add_option("--input", attn->input, "case file (q, k, v, wq, wk + metadata)")->required();
  cmd->add_option("--output", attn->output, "result file (o, selected, evicted)")->required();
  cmd->add_option("--ranks", attn->ranks, "in-process ranks for the distributed step (under mpirun: the MPI world)");
  cmd->add_option("--kv-block", attn->kv_block, "tokens per placement block in the distributed step");
  cmd->callback([attn] {
    const StepCase step = read_case_file(attn->input);
    bool writes = false;
    const StepResult result = run_attention_case(step, *attn, writes);
    if (!writes) return;
    write_result_file(attn->output, step, result);
    std::printf("wrote %s: mode %s, o [%lld, %d, %d], %zu selected, %zu evicted\n", attn->output.c_str(),
                std::string(mode_name(step.config.mode)).c_str(), static_cast<long long>(step.l_C), step.H, step.d,
                result.selected.size(), result.evicted.size());
    // Cases made with --needles carry the planted tokens: report how many were selected.
    const auto input = SafetensorsFile::open(attn->input);
    if (input->contains("needles")) {
      const auto needles = input->to_i64("needles");
      size_t found = 0;
      for (int64_t t : needles) found += std::binary_search(result.selected.begin(), result.selected.end(), t);
      std::printf("needles selected: %zu of %zu\n", found, needles.size());
    }
  });

  auto make = std::make_shared<MakeCaseOptions>();
  CLI::App* mc = app.add_subcommand("make-case", "Write a seeded random case file (optionally with planted needles)");
  mc->add_option("--output", make->output, "case file to write")->required();
  mc->add_option("--mode", make->mode, "full, esa, exact-topk, streaming or block");
  mc->add_option("--p", make->p, "tokens before the chunk");
  mc->add_option("--chunk", make->chunk, "chunk length l_C");
  mc->add_option("--heads", make->heads, "query heads H");
  mc->add_option("--kv-heads", make->kv_heads, "KV heads G");
  mc->add_option("--head-dim", make->head_dim, "head dim d");
  mc->add_option("--rank", make->rank, "compressed width d'");
  mc->add_option("--top-k", make->top_k, "top_k");
  mc->add_option("--l-i", make->l_I, "initial tokens l_I");
  mc->add_option("--l-l", make->l_L, "local window l_L");
  mc->add_option("--eps", make->eps, "proximity distance");
  mc->add_option("--w", make->w, "query position in the global part (-1: l_L)");
  mc->add_option("--block", make->block, "block mode's block");
  mc->add_option("--lag", make->lag, "LagKV partition length");
  mc->add_option("--lag-ratio", make->lag_ratio, "LagKV eviction ratio (0: none)");
  mc->add_option("--rope-theta", make->rope_theta, "RoPE theta");
  mc->add_option("--needles", make->needles, "tokens of M planted to match the query");
  mc->add_option("--seed", make->seed, "random seed");
  mc->callback([make] { make_case(*make); });
}

}  // namespace unshackle
