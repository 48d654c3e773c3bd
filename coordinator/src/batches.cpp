#include "unshackle/coordinator/batches.h"

#include <fmt/format.h>

#include <chrono>
#include <random>
#include <sstream>

namespace unshackle::coord {

using nlohmann::json;

namespace {
int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}
}  // namespace

BatchStore::BatchStore(Scheduler& scheduler, BatchOptions options) : scheduler_(scheduler), options_(options) {
  std::random_device rd;
  salt_ = (uint64_t{rd()} << 32) ^ rd();
}

BatchStore::~BatchStore() { stop(); }

void BatchStore::start() { thread_ = std::thread([this] { run(); }); }

void BatchStore::stop() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    cv_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
}

std::string BatchStore::new_id(const char* prefix) {
  uint64_t z = (++counter_) * 0x9E3779B97F4A7C15ull + salt_;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return fmt::format("{}-{:016x}", prefix, z ^ (z >> 31));
}

json BatchStore::file_json(const File& f) const {
  return json{{"id", f.id},         {"object", "file"},         {"bytes", f.content.size()},
              {"created_at", f.created_at}, {"filename", f.filename}, {"purpose", f.purpose}};
}

std::string BatchStore::store_file(const std::string& filename, const std::string& purpose, std::string content) {
  if (stored_bytes_ + content.size() > options_.max_store_bytes) {
    ApiError e(413, fmt::format("The file store is full ({} of {} bytes used)", stored_bytes_, options_.max_store_bytes), "file",
               "file_store_full");
    throw e;
  }
  File f;
  f.id = new_id("file");
  f.filename = filename;
  f.purpose = purpose;
  f.created_at = unix_now();
  stored_bytes_ += content.size();
  f.content = std::move(content);
  const std::string id = f.id;
  files_[id] = std::move(f);
  return id;
}

json BatchStore::add_file(const std::string& filename, const std::string& purpose, std::string content) {
  if (purpose != "batch") throw invalid_field("purpose", fmt::format("purpose: only 'batch' is supported (got '{}')", purpose));
  if (content.empty()) throw invalid_field("file", "file: is empty");
  std::lock_guard lock(mutex_);
  return file_json(files_.at(store_file(filename, purpose, std::move(content))));
}

std::optional<json> BatchStore::file(const std::string& id) const {
  std::lock_guard lock(mutex_);
  auto it = files_.find(id);
  if (it == files_.end()) return std::nullopt;
  return file_json(it->second);
}

std::optional<std::string> BatchStore::file_content(const std::string& id) const {
  std::lock_guard lock(mutex_);
  auto it = files_.find(id);
  if (it == files_.end()) return std::nullopt;
  return it->second.content;
}

bool BatchStore::delete_file(const std::string& id) {
  std::lock_guard lock(mutex_);
  auto it = files_.find(id);
  if (it == files_.end()) return false;
  stored_bytes_ -= it->second.content.size();
  files_.erase(it);
  return true;
}

json BatchStore::list_files() const {
  std::lock_guard lock(mutex_);
  json data = json::array();
  for (const auto& [id, f] : files_) data.push_back(file_json(f));
  return json{{"object", "list"}, {"data", data}};
}

json BatchStore::create_batch(const json& body) {
  auto string_field = [&](const char* name) {
    if (!body.contains(name)) throw ApiError(400, fmt::format("{}: this field is required", name), name, "missing_required_parameter");
    if (!body[name].is_string()) throw invalid_field(name, fmt::format("{}: expected a string", name));
    return body[name].get<std::string>();
  };
  const std::string input = string_field("input_file_id");
  const std::string endpoint = string_field("endpoint");
  const std::string window = string_field("completion_window");
  if (endpoint != "/v1/completions")
    throw invalid_field("endpoint", fmt::format("endpoint: only /v1/completions is supported (got '{}')", endpoint));
  if (window != "24h") throw invalid_field("completion_window", "completion_window: must be '24h'");
  // OpenAI's metadata: at most 16 pairs of strings (keys up to 64 characters, values up to 512).
  const json metadata = body.value("metadata", json());
  if (!metadata.is_null()) {
    if (!metadata.is_object()) throw invalid_field("metadata", "metadata: expected an object of strings");
    if (metadata.size() > 16) throw invalid_field("metadata", fmt::format("metadata: at most 16 pairs (got {})", metadata.size()));
    for (const auto& [key, value] : metadata.items())
      if (key.size() > 64 || !value.is_string() || value.get<std::string>().size() > 512)
        throw invalid_field("metadata", "metadata: keys are strings of at most 64 characters, values strings of at most 512");
  }
  std::lock_guard lock(mutex_);
  auto f = files_.find(input);
  if (f == files_.end()) throw ApiError(404, fmt::format("No file with id '{}'", input), "input_file_id", "file_not_found");
  if (f->second.purpose != "batch")
    throw invalid_field("input_file_id", fmt::format("input_file_id: file '{}' has purpose '{}', not 'batch'", input, f->second.purpose));
  Batch b;
  b.id = new_id("batch");
  b.input_file_id = input;
  b.endpoint = endpoint;
  b.metadata = metadata;
  b.timestamps["created_at"] = unix_now();
  b.timestamps["expires_at"] = unix_now() + 24 * 3600;
  // Validate every line: custom_id, method, url, body (its fields are checked per request).
  json errors = json::array();
  std::istringstream in(f->second.content);
  std::string text;
  size_t number = 0;
  std::map<std::string, size_t> seen;
  while (std::getline(in, text)) {
    ++number;
    if (text.empty() || text == "\r") continue;
    auto add = [&](const std::string& message, const json& param) {
      if (errors.size() < 100)
        errors.push_back(json{{"code", "invalid_request"}, {"message", message}, {"param", param}, {"line", number}});
    };
    std::string why;
    const std::optional<json> parsed = parse_json_bounded(text, &why);
    if (!parsed || !parsed->is_object()) {
      add(parsed ? "the line is not a JSON object" : "the line is not a JSON object: " + why, nullptr);
      continue;
    }
    const json& line = *parsed;
    if (!line.contains("custom_id") || !line["custom_id"].is_string()) {
      add("custom_id: a string is required", "custom_id");
      continue;
    }
    const std::string custom_id = line["custom_id"].get<std::string>();
    if (seen.count(custom_id)) {
      add(fmt::format("custom_id: '{}' repeats line {}", custom_id, seen[custom_id]), "custom_id");
      continue;
    }
    seen[custom_id] = number;
    if (line.value("method", json()) != "POST") add("method: must be POST", "method");
    else if (line.value("url", json()) != endpoint) add(fmt::format("url: must be the batch's endpoint {}", endpoint), "url");
    else if (!line.contains("body") || !line["body"].is_object()) add("body: an object is required", "body");
    else b.lines.push_back(Line{custom_id, line["body"]});
  }
  if (errors.empty() && b.lines.empty()) errors.push_back(json{{"code", "empty_file"}, {"message", "the input file has no requests"}, {"param", nullptr}, {"line", nullptr}});
  if (!errors.empty()) {
    b.status = "failed";
    b.validation_errors = json{{"object", "list"}, {"data", errors}};
    b.timestamps["failed_at"] = unix_now();
  } else {
    b.status = "in_progress";
    b.timestamps["in_progress_at"] = unix_now();
  }
  const std::string id = b.id;
  batches_[id] = std::move(b);
  cv_.notify_all();
  return batch_json(batches_.at(id));
}

json BatchStore::batch_json(const Batch& b) const {
  auto ts = [&](const char* name) { return b.timestamps.contains(name) ? b.timestamps[name] : json(); };
  return json{{"id", b.id},
              {"object", "batch"},
              {"endpoint", b.endpoint},
              {"errors", b.validation_errors.is_null() ? json() : b.validation_errors},
              {"input_file_id", b.input_file_id},
              {"completion_window", "24h"},
              {"status", b.status},
              {"output_file_id", b.output_file_id.empty() ? json() : json(b.output_file_id)},
              {"error_file_id", b.error_file_id.empty() ? json() : json(b.error_file_id)},
              {"created_at", ts("created_at")},
              {"in_progress_at", ts("in_progress_at")},
              {"expires_at", ts("expires_at")},
              {"finalizing_at", ts("finalizing_at")},
              {"completed_at", ts("completed_at")},
              {"failed_at", ts("failed_at")},
              {"expired_at", ts("expired_at")},
              {"cancelling_at", ts("cancelling_at")},
              {"cancelled_at", ts("cancelled_at")},
              {"request_counts", {{"total", b.lines.size()}, {"completed", b.completed}, {"failed", b.failed}}},
              {"metadata", b.metadata}};
}

std::optional<json> BatchStore::batch(const std::string& id) const {
  std::lock_guard lock(mutex_);
  auto it = batches_.find(id);
  if (it == batches_.end()) return std::nullopt;
  return batch_json(it->second);
}

std::optional<json> BatchStore::cancel_batch(const std::string& id) {
  std::vector<std::string> to_cancel;
  json out;
  {
    std::lock_guard lock(mutex_);
    auto it = batches_.find(id);
    if (it == batches_.end()) return std::nullopt;
    Batch& b = it->second;
    if (b.status == "in_progress" || b.status == "validating") {
      b.status = "cancelling";
      b.timestamps["cancelling_at"] = unix_now();
      for (auto& [index, job] : b.in_flight) to_cancel.push_back(job->id);
    } else if (b.status != "cancelling") {
      throw ApiError(409, fmt::format("Batch '{}' is {} and cannot be cancelled", id, b.status), "", "batch_not_cancellable");
    }
    out = batch_json(b);
    cv_.notify_all();
  }
  for (const auto& job : to_cancel) scheduler_.cancel_job(job);
  return out;
}

json BatchStore::list_batches() const {
  std::lock_guard lock(mutex_);
  json data = json::array();
  for (const auto& [id, b] : batches_) data.push_back(batch_json(b));
  return json{{"object", "list"}, {"data", data}, {"has_more", false}};
}

void BatchStore::run() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    for (auto& [id, b] : batches_) advance(b);
    cv_.wait_for(lock, std::chrono::milliseconds(50));
  }
}

void BatchStore::advance(Batch& b) {
  if (b.status != "in_progress" && b.status != "cancelling") return;
  auto record = [&](size_t index, int status, const json& body, const std::string& request_id) {
    const json line{{"id", "batch_req_" + (request_id.empty() ? fmt::format("{}_{}", b.id, index) : request_id)},
                    {"custom_id", b.lines[index].custom_id},
                    {"response", {{"status_code", status}, {"request_id", request_id}, {"body", body}}},
                    {"error", nullptr}};
    (status == 200 ? b.output : b.errors) += line.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
    ++(status == 200 ? b.completed : b.failed);
  };
  // Collect finished jobs.
  for (auto it = b.in_flight.begin(); it != b.in_flight.end();) {
    if (!it->second->done()) {
      ++it;
      continue;
    }
    const Job::State s = it->second->snapshot();
    if (s.phase == JobPhase::kCompleted) record(it->first, 200, completion_json(*it->second, s), it->second->id);
    else {
      const ApiError e = job_error(s);
      record(it->first, e.status, error_json(e), it->second->id);
    }
    it = b.in_flight.erase(it);
  }
  // Submit more.
  while (b.status == "in_progress" && b.in_flight.size() < options_.max_in_flight && b.next < b.lines.size()) {
    const size_t index = b.next;
    try {
      CompletionRequest request = parse_completion(b.lines[index].body, options_.default_attention);
      if (request.stream) throw invalid_field("stream", "stream: not allowed in a batch");
      auto job = scheduler_.submit(JobKind::kBatchRequest, std::move(request.spec), true);
      b.in_flight.emplace_back(index, job);
    } catch (const ApiError& e) {
      if (e.status == 503) break;  // no group yet: the batch waits (up to its window)
      record(index, e.status, error_json(e), "");
    }
    ++b.next;
  }
  const int64_t now = unix_now();
  if (b.status == "in_progress" && b.timestamps.value("expires_at", now + 1) <= now) {
    b.status = "cancelling";  // expiry: stop like a cancel, then mark expired
    b.timestamps["expired_at"] = now;
  }
  const bool all_done = b.in_flight.empty() && (b.next >= b.lines.size() || b.status == "cancelling");
  if (!all_done) return;
  b.timestamps["finalizing_at"] = now;
  try {
    if (!b.output.empty()) b.output_file_id = store_file(b.id + "_output.jsonl", "batch_output", std::move(b.output));
    if (!b.errors.empty()) b.error_file_id = store_file(b.id + "_errors.jsonl", "batch_output", std::move(b.errors));
  } catch (const ApiError& e) {
    b.status = "failed";
    b.timestamps["failed_at"] = now;
    b.validation_errors = json{{"object", "list"}, {"data", json::array({json{{"code", "output_too_large"}, {"message", e.message}, {"param", nullptr}, {"line", nullptr}}})}};
    return;
  }
  b.output.clear();
  b.errors.clear();
  if (b.status == "cancelling") {
    b.status = b.timestamps.contains("expired_at") ? "expired" : "cancelled";
    if (b.status == "cancelled") b.timestamps["cancelled_at"] = now;
  } else {
    b.status = "completed";
    b.timestamps["completed_at"] = now;
  }
}

}  // namespace unshackle::coord
