#include "unshackle/coordinator/batches.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string_view>

#include "unshackle/common/error.h"

namespace unshackle::coord {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {
int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void log_line(const std::string& line) { std::fprintf(stderr, "unshackle-coordinator: %s\n", line.c_str()); }

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A write the state directory refused: 507 when the disk (or a disk quota) is full, else 500.
ApiError storage_error(const std::string& what, int error) {
  const bool full = error == ENOSPC || error == EDQUOT;
  return ApiError(full ? 507 : 500, fmt::format("{}: {}", what, std::strerror(error)), "",
                  full ? "insufficient_storage" : "storage_error");
}

// `bytes` as `path`, all or nothing: a temp file beside it, fsync, rename, fsync of the
// directory (so the rename survives a crash). On failure the temp file is removed and an
// older `path` is as it was.
void write_atomically(const fs::path& path, std::initializer_list<std::string_view> pieces, const std::string& what) {
  const std::string tmp = path.string() + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) throw storage_error(what, errno);
  int error = 0;
  for (const std::string_view bytes : pieces)
    for (size_t done = 0; done < bytes.size() && error == 0;) {
      const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
      if (n > 0) done += static_cast<size_t>(n);
      else if (n == 0) error = EIO;
      else if (errno != EINTR) error = errno;
    }
  if (error == 0 && ::fsync(fd) != 0) error = errno;
  if (::close(fd) != 0 && error == 0) error = errno;
  if (error == 0 && std::rename(tmp.c_str(), path.c_str()) != 0) error = errno;
  if (error != 0) {
    ::unlink(tmp.c_str());
    throw storage_error(what, error);
  }
  const int dir = ::open(path.parent_path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

std::string read_whole(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
}  // namespace

BatchStore::BatchStore(Scheduler& scheduler, BatchOptions options) : scheduler_(scheduler), options_(options) {
  std::random_device rd;
  salt_ = (uint64_t{rd()} << 32) ^ rd();
  if (!options_.state_dir.empty()) {
    std::lock_guard lock(mutex_);
    load_state();
  }
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
  if (!options_.state_dir.empty()) {
    // One file: a line of metadata, then the bytes (the next coordinator checks their count).
    json line = file_json(f);
    line["bytes"] = content.size();  // f holds no content yet
    write_atomically(fs::path(options_.state_dir) / "files" / f.id,
                     {line.dump(-1, ' ', false, json::error_handler_t::replace) + "\n", content},
                     fmt::format("Could not store the file ({} bytes) in the state directory", content.size()));
  }
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
  if (!options_.state_dir.empty()) {
    std::error_code ec;
    fs::remove(fs::path(options_.state_dir) / "files" / id, ec);
    if (ec) log_line(fmt::format("state: could not remove files/{}: {}", id, ec.message()));
  }
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
  const json errors = parse_lines(f->second.content, b);
  if (!errors.empty()) {
    b.status = "failed";
    b.validation_errors = json{{"object", "list"}, {"data", errors}};
    b.timestamps["failed_at"] = unix_now();
  } else {
    b.status = "in_progress";
    b.timestamps["in_progress_at"] = unix_now();
  }
  write_batch(b);  // 507/500 when the state directory refuses it: no batch then
  const std::string id = b.id;
  batches_[id] = std::move(b);
  cv_.notify_all();
  return batch_json(batches_.at(id));
}

json BatchStore::parse_lines(const std::string& content, Batch& b) const {
  // Validate every line: custom_id, method, url, body (its fields are checked per request).
  json errors = json::array();
  std::istringstream in(content);
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
    else if (line.value("url", json()) != b.endpoint) add(fmt::format("url: must be the batch's endpoint {}", b.endpoint), "url");
    else if (!line.contains("body") || !line["body"].is_object()) add("body: an object is required", "body");
    else b.lines.push_back(Line{custom_id, line["body"]});
  }
  b.total = b.lines.size();
  if (errors.empty() && b.lines.empty()) errors.push_back(json{{"code", "empty_file"}, {"message", "the input file has no requests"}, {"param", nullptr}, {"line", nullptr}});
  return errors;
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
              {"request_counts", {{"total", b.total}, {"completed", b.completed}, {"failed", b.failed}}},
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
      save_batch(b);
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
    save_batch(b);
  }
  const bool all_done = b.in_flight.empty() && (b.next >= b.lines.size() || b.status == "cancelling");
  if (!all_done) return;
  b.timestamps["finalizing_at"] = now;
  try {
    if (!b.output.empty()) b.output_file_id = store_file(b.id + "_output.jsonl", "batch_output", std::move(b.output));
    if (!b.errors.empty()) b.error_file_id = store_file(b.id + "_errors.jsonl", "batch_output", std::move(b.errors));
  } catch (const ApiError& e) {
    // Over the store's quota, or the state directory's disk refused the write.
    const std::string code = e.code == "file_store_full" ? "output_too_large" : e.code;
    b.status = "failed";
    b.timestamps["failed_at"] = now;
    b.validation_errors = json{{"object", "list"}, {"data", json::array({json{{"code", code}, {"message", e.message}, {"param", nullptr}, {"line", nullptr}}})}};
    save_batch(b);
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
  save_batch(b);
}

// ---- the state directory ----

void BatchStore::write_batch(const Batch& b) {
  if (options_.state_dir.empty()) return;
  // The record is the batch object itself: everything but the requests, which the input
  // file holds, and the output not yet written.
  write_atomically(fs::path(options_.state_dir) / "batches" / (b.id + ".json"),
                   {batch_json(b).dump(-1, ' ', false, json::error_handler_t::replace)},
                   "Could not store the batch in the state directory");
}

void BatchStore::save_batch(const Batch& b) {
  try {
    write_batch(b);
  } catch (const ApiError& e) {
    log_line(fmt::format("state: batch {} is {} but its record was not written ({}); a restart finds the one before",
                         b.id, b.status, e.message));
  }
}

void BatchStore::load_state() {
  const fs::path root(options_.state_dir);
  for (const char* sub : {"files", "batches"}) {
    std::error_code ec;
    fs::create_directories(root / sub, ec);
    if (ec || !fs::is_directory(root / sub))
      throw Error(ErrorKind::kInvalidArgument,
                  fmt::format("--state-dir: cannot use {}: {}", (root / sub).string(), ec ? ec.message() : "not a directory"));
    if (::access((root / sub).c_str(), W_OK | X_OK) != 0)
      throw Error(ErrorKind::kInvalidArgument, fmt::format("--state-dir: {} is not writable: {}", (root / sub).string(), std::strerror(errno)));
  }
  // A temp file is a write that did not finish (the process died in it): never part of the state.
  auto unfinished = [](const fs::path& path) {
    if (!ends_with(path.filename().string(), ".tmp")) return false;
    std::error_code ec;
    fs::remove(path, ec);
    log_line(fmt::format("state: removed {}, a write that did not finish", path.string()));
    return true;
  };
  size_t skipped = 0;
  for (const auto& entry : fs::directory_iterator(root / "files")) {
    if (!entry.is_regular_file() || unfinished(entry.path())) continue;
    const std::string name = entry.path().filename().string();
    const std::string text = read_whole(entry.path());
    const size_t newline = text.find('\n');
    const json meta = newline == std::string::npos ? json() : json::parse(text.substr(0, newline), nullptr, false);
    const size_t bytes = newline == std::string::npos ? 0 : text.size() - newline - 1;
    if (!meta.is_object() || meta.value("id", "") != name || !meta["bytes"].is_number_unsigned() ||
        meta["bytes"].get<size_t>() != bytes || !meta["filename"].is_string() || !meta["purpose"].is_string() ||
        !meta["created_at"].is_number_integer()) {
      log_line(fmt::format("state: files/{} is not a complete stored file: left out (and left on disk)", name));
      ++skipped;
      continue;
    }
    File f{name, meta["filename"].get<std::string>(), meta["purpose"].get<std::string>(), text.substr(newline + 1),
           meta["created_at"].get<int64_t>()};
    stored_bytes_ += f.content.size();
    files_[name] = std::move(f);
  }
  size_t restarted = 0;
  for (const auto& entry : fs::directory_iterator(root / "batches")) {
    if (!entry.is_regular_file() || unfinished(entry.path())) continue;
    const std::string name = entry.path().filename().string();
    const json r = json::parse(read_whole(entry.path()), nullptr, false);
    if (!r.is_object() || !ends_with(name, ".json") || r.value("id", "") + ".json" != name || !r["status"].is_string() ||
        !r["input_file_id"].is_string() || !r["endpoint"].is_string()) {
      log_line(fmt::format("state: batches/{} is not a batch record: left out (and left on disk)", name));
      ++skipped;
      continue;
    }
    Batch b;
    b.id = r["id"].get<std::string>();
    b.input_file_id = r["input_file_id"].get<std::string>();
    b.endpoint = r["endpoint"].get<std::string>();
    b.status = r["status"].get<std::string>();
    b.metadata = r.value("metadata", json());
    b.validation_errors = r.value("errors", json());
    if (r["output_file_id"].is_string()) b.output_file_id = r["output_file_id"].get<std::string>();
    if (r["error_file_id"].is_string()) b.error_file_id = r["error_file_id"].get<std::string>();
    for (const char* t : {"created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                          "expired_at", "cancelling_at", "cancelled_at"})
      if (r.contains(t) && r[t].is_number_integer()) b.timestamps[t] = r[t];
    const json counts = r.value("request_counts", json::object());
    b.total = counts.value("total", size_t{0});
    b.completed = counts.value("completed", int64_t{0});
    b.failed = counts.value("failed", int64_t{0});
    const int64_t now = unix_now();
    if (b.status == "validating" || b.status == "in_progress") {
      // Its output lived in memory: the requests run again from the first (the files are
      // written only when a batch ends, so nothing of the first run was visible).
      auto input = files_.find(b.input_file_id);
      b.completed = b.failed = 0;
      b.timestamps.erase("finalizing_at");
      if (input == files_.end()) {
        b.status = "failed";
        b.timestamps["failed_at"] = now;
        b.validation_errors = json{{"object", "list"}, {"data", json::array({json{{"code", "input_file_missing"},
            {"message", fmt::format("the coordinator restarted while the batch ran and its input file '{}' is gone", b.input_file_id)},
            {"param", nullptr}, {"line", nullptr}}})}};
      } else {
        const json errors = parse_lines(input->second.content, b);
        b.status = errors.empty() ? "in_progress" : "failed";
        b.timestamps[errors.empty() ? "in_progress_at" : "failed_at"] = now;
        if (!errors.empty()) b.validation_errors = json{{"object", "list"}, {"data", errors}};
        ++restarted;
      }
      log_line(fmt::format("state: batch {} was running when the coordinator stopped: {}", b.id,
                           b.status == "in_progress" ? fmt::format("its {} requests run again", b.total) : "failed"));
    } else if (b.status == "cancelling") {
      b.status = b.timestamps.contains("expired_at") ? "expired" : "cancelled";
      if (b.status == "cancelled") b.timestamps["cancelled_at"] = now;
    }
    save_batch(b);
    batches_[b.id] = std::move(b);
  }
  log_line(fmt::format("state: {} file(s) ({} bytes) and {} batch(es) read back from {} ({} running again, {} left out)",
                       files_.size(), stored_bytes_, batches_.size(), root.string(), restarted, skipped));
}

}  // namespace unshackle::coord
