#include "unshackle/model/model.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "unshackle/common/check.h"
#include "unshackle/common/safetensors.h"

#if UNS_MODEL_HAVE_BLAS
#include <cblas.h>
#endif

namespace unshackle {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

// ---------------------------------------------------------------------------------------
// Loading

// Every tensor of the checkpoint, by name, in whichever shard holds it.
class CheckpointFiles {
 public:
  explicit CheckpointFiles(const std::string& dir) : dir_(dir) {
    const fs::path index = fs::path(dir) / "model.safetensors.index.json";
    std::vector<std::string> files;
    if (fs::exists(index)) {
      Json j;
      try {
        std::ifstream in(index);
        j = Json::parse(in);
      } catch (const Json::exception& e) {
        fail(ErrorKind::kInvalidArgument, fmt::format("{}: not valid JSON: {}", index.string(), e.what()));
      }
      if (!j.contains("weight_map") || !j["weight_map"].is_object()) {
        fail(ErrorKind::kInvalidArgument, fmt::format("{}: missing object 'weight_map'", index.string()));
      }
      std::map<std::string, std::string> shard_of;
      for (const auto& [name, file] : j["weight_map"].items()) {
        if (!file.is_string()) {
          fail(ErrorKind::kInvalidArgument, fmt::format("{}: weight_map['{}'] must be a file name", index.string(), name));
        }
        shard_of[name] = file.get<std::string>();
        if (std::find(files.begin(), files.end(), shard_of[name]) == files.end()) files.push_back(shard_of[name]);
      }
      open_all(files);
      for (const auto& [name, file] : shard_of) {
        const SafetensorsFile& f = *files_.at(file);
        UNS_CHECK_KIND(kInvalidArgument, f.contains(name), "{}: names tensor '{}' in {}, which does not hold it",
                       index.string(), name, file);
        where_[name] = &f;
      }
      return;
    }
    if (fs::exists(fs::path(dir) / "model.safetensors")) {
      files.push_back("model.safetensors");
    } else {
      if (!fs::is_directory(dir)) fail(ErrorKind::kNotFound, fmt::format("model directory '{}' does not exist", dir));
      for (const auto& entry : fs::directory_iterator(dir)) {
        if (entry.path().extension() == ".safetensors") files.push_back(entry.path().filename().string());
      }
      std::sort(files.begin(), files.end());
      UNS_CHECK_KIND(kNotFound, !files.empty(), "model directory '{}' holds no *.safetensors file", dir);
    }
    open_all(files);
    for (const auto& [file, f] : files_) {
      for (const TensorInfo& t : f->tensors()) {
        UNS_CHECK_KIND(kInvalidArgument, !where_.contains(t.name), "{}: tensor '{}' appears in two files", dir, t.name);
        where_[t.name] = f.get();
      }
    }
  }

  bool contains(const std::string& name) const { return where_.contains(name); }

  // The tensor as float32, checked against `shape`.
  std::vector<float> get(const std::string& name, const std::vector<int64_t>& shape) const {
    auto it = where_.find(name);
    if (it == where_.end()) {
      fail(ErrorKind::kNotFound,
           fmt::format("model '{}': tensor '{}' is missing (expected shape [{}])", dir_, name, fmt::join(shape, ", ")));
    }
    const TensorInfo& info = it->second->info(name);
    UNS_CHECK_KIND(kInvalidArgument, info.shape == shape, "model '{}': tensor '{}' has shape [{}], expected [{}]", dir_,
                   name, fmt::join(info.shape, ", "), fmt::join(shape, ", "));
    UNS_CHECK_KIND(kUnsupported,
                   info.dtype == DType::kF32 || info.dtype == DType::kBF16 || info.dtype == DType::kF16,
                   "model '{}': tensor '{}' has dtype {} (BF16, F16 or F32 expected)", dir_, name,
                   dtype_name(info.dtype));
    return it->second->to_f32(name);
  }

 private:
  void open_all(const std::vector<std::string>& files) {
    for (const std::string& file : files) files_[file] = SafetensorsFile::open((fs::path(dir_) / file).string());
  }

  std::string dir_;
  std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
};

void check_size(const std::vector<float>& v, size_t want, const std::string& what) {
  UNS_CHECK(v.size() == want, "weights: {} has {} values, expected {}", what, v.size(), want);
}

void check_weights(const ModelConfig& c, const ModelWeights& w) {
  const auto D = static_cast<size_t>(c.hidden), I = static_cast<size_t>(c.intermediate);
  const auto V = static_cast<size_t>(c.vocab);
  const size_t q = static_cast<size_t>(c.heads) * c.head_dim, kv = static_cast<size_t>(c.kv_heads) * c.head_dim;
  check_size(w.embed, V * D, "embed");
  check_size(w.final_norm, D, "final_norm");
  if (!c.tie_word_embeddings) check_size(w.lm_head, V * D, "lm_head");
  UNS_CHECK(static_cast<int>(w.layers.size()) == c.layers, "weights: {} layers, config says {}", w.layers.size(),
            c.layers);
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& L = w.layers[l];
    const std::string p = fmt::format("layer {} ", l);
    check_size(L.attn_norm, D, p + "attn_norm");
    check_size(L.mlp_norm, D, p + "mlp_norm");
    check_size(L.wq, q * D, p + "wq");
    check_size(L.wk, kv * D, p + "wk");
    check_size(L.wv, kv * D, p + "wv");
    check_size(L.wo, D * q, p + "wo");
    check_size(L.w_gate, I * D, p + "w_gate");
    check_size(L.w_up, I * D, p + "w_up");
    check_size(L.w_down, D * I, p + "w_down");
    check_size(L.bq, c.qkv_bias ? q : 0, p + "bq");
    check_size(L.bk, c.qkv_bias ? kv : 0, p + "bk");
    check_size(L.bv, c.qkv_bias ? kv : 0, p + "bv");
    check_size(L.bo, c.o_bias ? D : 0, p + "bo");
    check_size(L.b_gate, c.mlp_bias ? I : 0, p + "b_gate");
    check_size(L.b_up, c.mlp_bias ? I : 0, p + "b_up");
    check_size(L.b_down, c.mlp_bias ? D : 0, p + "b_down");
  }
}

// ---------------------------------------------------------------------------------------
// Math

// y[n, out] = x[n, in] · W[out, in]^T (+ bias[out]).
void linear(const float* x, int64_t n, int64_t in, const std::vector<float>& W, int64_t out, float* y,
            const std::vector<float>& bias) {
#if UNS_MODEL_HAVE_BLAS
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(n), static_cast<blasint>(out),
              static_cast<blasint>(in), 1.0f, x, static_cast<blasint>(in), W.data(), static_cast<blasint>(in), 0.0f, y,
              static_cast<blasint>(out));
#else
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * in;
    for (int64_t o = 0; o < out; ++o) {
      const float* wr = W.data() + o * in;
      float acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += xr[i] * wr[i];
      y[r * out + o] = acc;
    }
  }
#endif
  if (!bias.empty()) {
    for (int64_t r = 0; r < n; ++r)
      for (int64_t o = 0; o < out; ++o) y[r * out + o] += bias[static_cast<size_t>(o)];
  }
}

// Hugging Face LlamaRMSNorm in float32: x * rsqrt(mean(x^2) + eps) * weight.
void rms_norm(const float* x, int64_t n, int64_t D, const std::vector<float>& weight, double eps, float* y) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    double sum = 0;
    for (int64_t i = 0; i < D; ++i) sum += static_cast<double>(xr[i]) * xr[i];
    const auto scale = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(D) + eps));
    for (int64_t i = 0; i < D; ++i) yr[i] = weight[static_cast<size_t>(i)] * (xr[i] * scale);
  }
}

void add_into(float* x, const float* y, size_t count) {
  for (size_t i = 0; i < count; ++i) x[i] += y[i];
}

}  // namespace

// ---------------------------------------------------------------------------------------

Model::Model(ModelConfig config, ModelWeights weights) : config_(std::move(config)), weights_(std::move(weights)) {
  check_weights(config_, weights_);
}

std::shared_ptr<const Model> Model::from_weights(ModelConfig config, ModelWeights weights) {
  return std::shared_ptr<const Model>(new Model(std::move(config), std::move(weights)));
}

std::shared_ptr<const Model> Model::load(const std::string& model_dir) {
  ModelConfig c = ModelConfig::load(model_dir);
  CheckpointFiles files(model_dir);
  const int64_t D = c.hidden, I = c.intermediate, V = c.vocab;
  const int64_t q = int64_t{c.heads} * c.head_dim, kv = int64_t{c.kv_heads} * c.head_dim;
  ModelWeights w;
  w.embed = files.get("model.embed_tokens.weight", {V, D});
  w.final_norm = files.get("model.norm.weight", {D});
  if (!c.tie_word_embeddings) w.lm_head = files.get("lm_head.weight", {V, D});
  w.layers.resize(static_cast<size_t>(c.layers));
  for (int l = 0; l < c.layers; ++l) {
    LayerWeights& L = w.layers[static_cast<size_t>(l)];
    const std::string p = fmt::format("model.layers.{}.", l);
    L.attn_norm = files.get(p + "input_layernorm.weight", {D});
    L.mlp_norm = files.get(p + "post_attention_layernorm.weight", {D});
    L.wq = files.get(p + "self_attn.q_proj.weight", {q, D});
    L.wk = files.get(p + "self_attn.k_proj.weight", {kv, D});
    L.wv = files.get(p + "self_attn.v_proj.weight", {kv, D});
    L.wo = files.get(p + "self_attn.o_proj.weight", {D, q});
    if (c.qkv_bias) {
      L.bq = files.get(p + "self_attn.q_proj.bias", {q});
      L.bk = files.get(p + "self_attn.k_proj.bias", {kv});
      L.bv = files.get(p + "self_attn.v_proj.bias", {kv});
    }
    if (c.o_bias) L.bo = files.get(p + "self_attn.o_proj.bias", {D});
    L.w_gate = files.get(p + "mlp.gate_proj.weight", {I, D});
    L.w_up = files.get(p + "mlp.up_proj.weight", {I, D});
    L.w_down = files.get(p + "mlp.down_proj.weight", {D, I});
    if (c.mlp_bias) {
      L.b_gate = files.get(p + "mlp.gate_proj.bias", {I});
      L.b_up = files.get(p + "mlp.up_proj.bias", {I});
      L.b_down = files.get(p + "mlp.down_proj.bias", {D});
    }
  }
  return from_weights(std::move(c), std::move(w));
}

ContextAttentionOptions Model::attention_options(const AttentionConfig& attention, const CompressionWeights* compression,
                                                 int64_t reserve_tokens) const {
  ContextAttentionOptions o;
  o.attention = attention;
  o.layers = config_.layers;
  o.H = config_.heads;
  o.G = config_.kv_heads;
  o.d = config_.head_dim;
  o.inv_freq = config_.inv_freq();
  o.compression = compression;
  o.reserve_tokens = reserve_tokens;
  return o;
}

void Model::forward_chunk(ContextAttention& context, std::span<const int32_t> tokens, std::vector<float>& logits,
                          bool all_positions) const {
  const ModelConfig& c = config_;
  const auto n = static_cast<int64_t>(tokens.size());
  UNS_CHECK(n > 0, "forward_chunk: empty chunk");
  const ContextAttentionOptions& ao = context.options();
  UNS_CHECK(ao.layers == c.layers && ao.H == c.heads && ao.G == c.kv_heads && ao.d == c.head_dim,
            "forward_chunk: the context was built for another model shape");
  const int64_t D = c.hidden, I = c.intermediate, V = c.vocab;
  const int64_t q_width = int64_t{c.heads} * c.head_dim, kv_width = int64_t{c.kv_heads} * c.head_dim;
  const auto sz = [](int64_t a, int64_t b) { return static_cast<size_t>(a * b); };

  std::vector<float> x(sz(n, D)), h(sz(n, D)), q(sz(n, q_width)), k(sz(n, kv_width)), v(sz(n, kv_width)),
      o(sz(n, q_width)), gate(sz(n, I)), up(sz(n, I));
  for (int64_t t = 0; t < n; ++t) {
    const int32_t id = tokens[static_cast<size_t>(t)];
    UNS_CHECK(id >= 0 && id < V, "token id {} outside the vocabulary [0, {})", id, V);
    std::copy_n(weights_.embed.data() + sz(id, D), D, x.data() + sz(t, D));
  }
  for (int layer = 0; layer < c.layers; ++layer) {
    const LayerWeights& L = weights_.layers[static_cast<size_t>(layer)];
    // Attention block.
    rms_norm(x.data(), n, D, L.attn_norm, c.rms_eps, h.data());
    linear(h.data(), n, D, L.wq, q_width, q.data(), L.bq);
    linear(h.data(), n, D, L.wk, kv_width, k.data(), L.bk);
    linear(h.data(), n, D, L.wv, kv_width, v.data(), L.bv);
    context.forward(layer, q.data(), k.data(), v.data(), n, o.data());
    linear(o.data(), n, q_width, L.wo, D, h.data(), L.bo);
    add_into(x.data(), h.data(), x.size());
    // SwiGLU MLP: down(silu(gate(h)) * up(h)).
    rms_norm(x.data(), n, D, L.mlp_norm, c.rms_eps, h.data());
    linear(h.data(), n, D, L.w_gate, I, gate.data(), L.b_gate);
    linear(h.data(), n, D, L.w_up, I, up.data(), L.b_up);
    for (size_t i = 0; i < gate.size(); ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    linear(gate.data(), n, I, L.w_down, D, h.data(), L.b_down);
    add_into(x.data(), h.data(), x.size());
  }
  context.commit_chunk(n);

  const int64_t first = all_positions ? 0 : n - 1, rows = n - first;
  rms_norm(x.data() + sz(first, D), rows, D, weights_.final_norm, c.rms_eps, h.data());
  logits.resize(sz(rows, V));
  const std::vector<float>& head = c.tie_word_embeddings ? weights_.embed : weights_.lm_head;
  linear(h.data(), rows, D, head, V, logits.data(), {});
}

void Model::prefill(ContextAttention& context, std::span<const int32_t> tokens, int64_t chunk,
                    std::vector<float>& logits, bool all_positions) const {
  UNS_CHECK(chunk > 0, "chunk: must be > 0 (got {})", chunk);
  UNS_CHECK(!tokens.empty(), "prefill: no tokens");
  std::vector<float> piece_logits;
  if (all_positions) logits.clear();
  for (size_t begin = 0; begin < tokens.size(); begin += static_cast<size_t>(chunk)) {
    const size_t count = std::min(static_cast<size_t>(chunk), tokens.size() - begin);
    forward_chunk(context, tokens.subspan(begin, count), piece_logits, all_positions);
    if (all_positions) {
      logits.insert(logits.end(), piece_logits.begin(), piece_logits.end());
    } else {
      logits.swap(piece_logits);
    }
  }
}

CompressionWeights load_compression_weights(const std::string& path, const ModelConfig& config) {
  auto file = SafetensorsFile::open(path);
  CompressionWeights cw;
  const int64_t q_width = int64_t{config.heads} * config.head_dim, kv_width = int64_t{config.kv_heads} * config.head_dim;
  for (int l = 0; l < config.layers; ++l) {
    const std::string wq_name = fmt::format("layers.{}.wq", l), wk_name = fmt::format("layers.{}.wk", l);
    UNS_CHECK_KIND(kNotFound, file->contains(wq_name) && file->contains(wk_name),
                   "{}: compression weights for layer {} are missing ('{}' and '{}' expected for a model with {} layers)",
                   path, l, wq_name, wk_name, config.layers);
    const TensorInfo& iq = file->info(wq_name);
    const TensorInfo& ik = file->info(wk_name);
    UNS_CHECK_KIND(kInvalidArgument, iq.shape.size() == 2 && iq.shape[1] == q_width && iq.shape[0] > 0,
                   "{}: '{}' has shape [{}], expected [d', {}] (H*d)", path, wq_name, fmt::join(iq.shape, ", "), q_width);
    if (l == 0) cw.d_c = static_cast<int>(iq.shape[0]);
    UNS_CHECK_KIND(kInvalidArgument, iq.shape[0] == cw.d_c, "{}: '{}' has d' = {}, layer 0 has {}", path, wq_name,
                   iq.shape[0], cw.d_c);
    UNS_CHECK_KIND(kInvalidArgument, ik.shape == std::vector<int64_t>({cw.d_c, kv_width}),
                   "{}: '{}' has shape [{}], expected [{}, {}] (d', G*d)", path, wk_name, fmt::join(ik.shape, ", "),
                   cw.d_c, kv_width);
    cw.wq.push_back(file->to_f32(wq_name));
    cw.wk.push_back(file->to_f32(wk_name));
  }
  return cw;
}

}  // namespace unshackle
