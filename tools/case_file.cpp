#include "case_file.h"

#include <charconv>

#include "unshackle/common/check.h"
#include "unshackle/common/safetensors.h"

namespace unshackle {
namespace {

template <typename T>
T parse_number(const std::map<std::string, std::string>& metadata, const std::string& key, T fallback) {
  const auto it = metadata.find(key);
  if (it == metadata.end()) return fallback;
  const std::string& text = it->second;
  T value{};
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  UNS_CHECK(error == std::errc() && end == text.data() + text.size() && !text.empty(),
            "metadata '{}': expected {}, got '{}'", key, std::is_integral_v<T> ? "an integer" : "a number", text);
  return value;
}

// The tensor's shape, checked for rank; its name in every message.
std::vector<int64_t> shape_of(const SafetensorsFile& file, const std::string& name, size_t rank, const char* layout) {
  UNS_CHECK_KIND(kInvalidArgument, file.contains(name), "{}: missing tensor '{}' ({})", file.label(), name, layout);
  const TensorInfo& info = file.info(name);
  UNS_CHECK(info.shape.size() == rank, "{}: tensor '{}' must be {} (got {} dims)", file.label(), name, layout,
            info.shape.size());
  UNS_CHECK(info.dtype == DType::kF32 || info.dtype == DType::kBF16 || info.dtype == DType::kF16,
            "{}: tensor '{}' must be F32 (or BF16/F16), got {}", file.label(), name, dtype_name(info.dtype));
  return info.shape;
}

std::string number_text(double value) { return fmt::format("{}", value); }

}  // namespace

StepCase read_case_file(const std::string& path) {
  const auto file = SafetensorsFile::open(path);
  const auto& metadata = file->metadata();
  StepCase step;
  AttentionConfig& cfg = step.config;
  if (const auto it = metadata.find("mode"); it != metadata.end()) cfg.mode = parse_mode(it->second);
  cfg.l_I = parse_number<int64_t>(metadata, "l_I", cfg.l_I);
  cfg.l_L = parse_number<int64_t>(metadata, "l_L", cfg.l_L);
  cfg.top_k = parse_number<int64_t>(metadata, "top_k", cfg.top_k);
  cfg.eps = parse_number<int64_t>(metadata, "eps", cfg.eps);
  cfg.w = parse_number<int64_t>(metadata, "w", cfg.w);
  cfg.block = parse_number<int64_t>(metadata, "block", cfg.block);
  cfg.lag = parse_number<int64_t>(metadata, "lag", cfg.lag);
  cfg.lag_ratio = parse_number<double>(metadata, "lag_ratio", cfg.lag_ratio);
  step.rope_theta = parse_number<double>(metadata, "rope_theta", step.rope_theta);

  const auto q = shape_of(*file, "q", 3, "[l_C, H, d]");
  const auto k = shape_of(*file, "k", 3, "[p + l_C, G, d]");
  const auto v = shape_of(*file, "v", 3, "[p + l_C, G, d]");
  UNS_CHECK(k == v, "{}: tensors 'k' and 'v' must have the same shape [p + l_C, G, d]", path);
  UNS_CHECK(q[2] == k[2], "{}: head dim of 'q' ({}) and 'k' ({}) differ", path, q[2], k[2]);
  UNS_CHECK(q[0] > 0, "{}: tensor 'q' holds no query (l_C = 0)", path);
  UNS_CHECK(k[0] >= q[0], "{}: 'k' has {} rows, fewer than the chunk's {} queries", path, k[0], q[0]);
  step.l_C = q[0];
  step.H = static_cast<int>(q[1]);
  step.d = static_cast<int>(q[2]);
  step.G = static_cast<int>(k[1]);
  step.p = k[0] - q[0];
  UNS_CHECK(step.G > 0 && step.H % step.G == 0, "H: query heads ({}) must be a multiple of G ({})", step.H, step.G);
  step.q = file->to_f32("q");
  step.k = file->to_f32("k");
  step.v = file->to_f32("v");
  const bool has_wq = file->contains("wq"), has_wk = file->contains("wk");
  UNS_CHECK(has_wq == has_wk, "{}: give both 'wq' and 'wk' or neither", path);
  if (has_wq) {
    const auto wq = shape_of(*file, "wq", 2, "[d', H*d]");
    const auto wk = shape_of(*file, "wk", 2, "[d', G*d]");
    UNS_CHECK(wq[1] == int64_t{step.H} * step.d, "{}: 'wq' must be [d', H*d = {}], got [{}, {}]", path, step.H * step.d,
              wq[0], wq[1]);
    UNS_CHECK(wk[1] == int64_t{step.G} * step.d, "{}: 'wk' must be [d', G*d = {}], got [{}, {}]", path, step.G * step.d,
              wk[0], wk[1]);
    UNS_CHECK(wq[0] == wk[0] && wq[0] > 0, "{}: 'wq' and 'wk' must share d' > 0 (got {} and {})", path, wq[0], wk[0]);
    step.d_c = static_cast<int>(wq[0]);
    step.wq = file->to_f32("wq");
    step.wk = file->to_f32("wk");
  }
  step.validate();
  return step;
}

namespace {
void add_settings(SafetensorsWriter& writer, const StepCase& step) {
  const AttentionConfig& c = step.config;
  writer.set_metadata("mode", std::string(mode_name(c.mode)));
  writer.set_metadata("l_I", std::to_string(c.l_I));
  writer.set_metadata("l_L", std::to_string(c.l_L));
  writer.set_metadata("top_k", std::to_string(c.top_k));
  writer.set_metadata("eps", std::to_string(c.eps));
  writer.set_metadata("w", std::to_string(c.global_query_position()));
  writer.set_metadata("block", std::to_string(c.block));
  writer.set_metadata("lag", std::to_string(c.lag));
  writer.set_metadata("lag_ratio", number_text(c.lag_ratio));
  writer.set_metadata("rope_theta", number_text(step.rope_theta));
}
}  // namespace

void write_result_file(const std::string& path, const StepCase& step, const StepResult& result) {
  SafetensorsWriter writer;
  add_settings(writer, step);
  writer.add_f32("o", {step.l_C, step.H, step.d}, result.o);
  writer.add_i64("selected", {static_cast<int64_t>(result.selected.size())}, result.selected);
  writer.add_i64("evicted", {static_cast<int64_t>(result.evicted.size())}, result.evicted);
  writer.write(path);
}

void write_case_file(const std::string& path, const StepCase& step,
                     const std::vector<std::pair<std::string, std::vector<int64_t>>>& extra) {
  SafetensorsWriter writer;
  add_settings(writer, step);
  writer.add_f32("q", {step.l_C, step.H, step.d}, step.q);
  writer.add_f32("k", {step.p + step.l_C, step.G, step.d}, step.k);
  writer.add_f32("v", {step.p + step.l_C, step.G, step.d}, step.v);
  if (step.d_c > 0) {
    writer.add_f32("wq", {step.d_c, int64_t{step.H} * step.d}, step.wq);
    writer.add_f32("wk", {step.d_c, int64_t{step.G} * step.d}, step.wk);
  }
  for (const auto& [name, values] : extra) writer.add_i64(name, {static_cast<int64_t>(values.size())}, values);
  writer.write(path);
}

}  // namespace unshackle
