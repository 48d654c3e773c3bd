#include "case_file.h"

#include <charconv>
#include <cmath>
#include <fmt/ranges.h>
#include <limits>

#include "unshackle/common/check.h"
#include "unshackle/common/safetensors.h"

namespace unshackle {
namespace {

// Bad input: Error(kInvalidArgument) with the message alone (no source location), since the
// user reads it.
template <typename... Args>
void require(bool condition, fmt::format_string<Args...> format, Args&&... args) {
  if (!condition) fail(ErrorKind::kInvalidArgument, fmt::format(format, std::forward<Args>(args)...));
}

// The whole string must be the number: "12abc", " 12", "" and "1e3" (for an integer) fail.
template <typename T>
T parse_number(const SafetensorsFile& file, const std::string& key, T fallback) {
  const auto it = file.metadata().find(key);
  if (it == file.metadata().end()) return fallback;
  const std::string& text = it->second;
  T value{};
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  require(error == std::errc() && end == text.data() + text.size() && !text.empty(),
          "{}: metadata '{}': expected {}, got '{}'", file.label(), key,
          std::is_integral_v<T> ? "an integer" : "a number", text);
  return value;
}

std::string shape_text(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

// The tensor's shape, checked for rank, dtype and size; its name in every message.
std::vector<int64_t> shape_of(const SafetensorsFile& file, const std::string& name, size_t rank, const char* layout) {
  require(file.contains(name), "{}: missing tensor '{}' {}", file.label(), name, layout);
  const TensorInfo& info = file.info(name);
  require(info.shape.size() == rank, "{}: tensor '{}': expected {} dims {}, got {}", file.label(), name, rank, layout,
          shape_text(info.shape));
  require(info.dtype == DType::kF32 || info.dtype == DType::kBF16 || info.dtype == DType::kF16,
          "{}: tensor '{}': expected F32 (or BF16/F16), got {}", file.label(), name, dtype_name(info.dtype));
  // Head counts and dims are ints downstream.
  for (int64_t dim : info.shape)
    require(dim <= std::numeric_limits<int>::max(), "{}: tensor '{}': shape {} too large", file.label(), name,
            shape_text(info.shape));
  return info.shape;
}

std::string number_text(double value) { return fmt::format("{}", value); }

}  // namespace

StepCase read_case_file(const std::string& path) {
  const auto file = SafetensorsFile::open(path);
  const std::string& label = file->label();
  StepCase step;
  AttentionConfig& cfg = step.config;
  if (const auto it = file->metadata().find("mode"); it != file->metadata().end()) {
    try {
      cfg.mode = parse_mode(it->second);
    } catch (const Error& e) {
      fail(e.kind(), fmt::format("{}: metadata {}", label, e.what()));
    }
  }
  cfg.l_I = parse_number<int64_t>(*file, "l_I", cfg.l_I);
  cfg.l_L = parse_number<int64_t>(*file, "l_L", cfg.l_L);
  cfg.top_k = parse_number<int64_t>(*file, "top_k", cfg.top_k);
  cfg.eps = parse_number<int64_t>(*file, "eps", cfg.eps);
  cfg.w = parse_number<int64_t>(*file, "w", cfg.w);
  cfg.block = parse_number<int64_t>(*file, "block", cfg.block);
  cfg.lag = parse_number<int64_t>(*file, "lag", cfg.lag);
  cfg.lag_ratio = parse_number<double>(*file, "lag_ratio", cfg.lag_ratio);
  step.rope_theta = parse_number<double>(*file, "rope_theta", step.rope_theta);
  require(std::isfinite(step.rope_theta) && step.rope_theta > 0, "{}: metadata 'rope_theta': must be > 0 (got {})",
          label, step.rope_theta);

  const auto q = shape_of(*file, "q", 3, "[l_C, H, d]");
  const auto k = shape_of(*file, "k", 3, "[p + l_C, G, d]");
  const auto v = shape_of(*file, "v", 3, "[p + l_C, G, d]");
  require(k == v, "{}: tensor 'v': expected the shape of 'k' {}, got {}", label, shape_text(k), shape_text(v));
  require(q[0] > 0, "{}: tensor 'q': the chunk holds no query (l_C = 0)", label);
  require(q[2] == k[2], "{}: tensor 'k': head dim d = {} differs from 'q' (d = {})", label, k[2], q[2]);
  require(k[0] >= q[0], "{}: tensor 'k': {} rows, fewer than the chunk's l_C = {} queries", label, k[0], q[0]);
  require(q[1] > 0 && k[1] > 0 && q[1] % k[1] == 0,
          "{}: H: query heads of 'q' ({}) must be a positive multiple of KV heads G of 'k' ({})", label, q[1], k[1]);
  step.l_C = q[0];
  step.H = static_cast<int>(q[1]);
  step.d = static_cast<int>(q[2]);
  step.G = static_cast<int>(k[1]);
  step.p = k[0] - q[0];
  step.q = file->to_f32("q");
  step.k = file->to_f32("k");
  step.v = file->to_f32("v");
  const bool has_wq = file->contains("wq"), has_wk = file->contains("wk");
  require(has_wq == has_wk, "{}: tensor '{}': given without '{}'; give both or neither", label,
          has_wq ? "wq" : "wk", has_wq ? "wk" : "wq");
  if (has_wq) {
    const auto wq = shape_of(*file, "wq", 2, "[d', H*d]");
    const auto wk = shape_of(*file, "wk", 2, "[d', G*d]");
    require(wq[1] == int64_t{step.H} * step.d, "{}: tensor 'wq': expected [d', H*d = {}], got {}", label,
            int64_t{step.H} * step.d, shape_text(wq));
    require(wk[1] == int64_t{step.G} * step.d, "{}: tensor 'wk': expected [d', G*d = {}], got {}", label,
            int64_t{step.G} * step.d, shape_text(wk));
    require(wq[0] == wk[0] && wq[0] > 0, "{}: tensor 'wk': d' = {} differs from d' = {} of 'wq' (or is 0)", label,
            wk[0], wq[0]);
    step.d_c = static_cast<int>(wq[0]);
    step.wq = file->to_f32("wq");
    step.wk = file->to_f32("wk");
  }
  try {
    step.validate();  // the semantic checks (settings against shapes); their messages name the field
  } catch (const Error& e) {
    fail(e.kind(), fmt::format("{}: {}", label, e.what()));
  }
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
