// OpenAI Files and Batch API over the scheduler: /v1/files holds uploaded JSONL (in memory,
// bounded), /v1/batches runs each line as a job (a few at a time per batch, not counted
// against the interactive queue limit) and writes output and error files.
//
// With a state directory, files and batch records are also written there (each write all or
// nothing: temp file, fsync, rename) and read back by the next coordinator: files as they were,
// finished batches as they ended, a batch that was running starts its requests again (its
// output was not written yet) and a cancelling one ends cancelled. A write the disk refuses
// is 507 insufficient_storage and changes nothing.
#pragma once

#include <nlohmann/json.hpp>

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "unshackle/coordinator/scheduler.h"

namespace unshackle::coord {

struct BatchOptions {
  size_t max_store_bytes = size_t{1} << 30;  // all files together
  size_t max_in_flight = 8;                  // jobs per batch at a time
  AttentionConfig default_attention;
  std::string state_dir;  // empty: memory only (a restart loses files and batches)
};

class BatchStore {
 public:
  // Reads back the state directory when there is one (throws Error naming it when unusable).
  BatchStore(Scheduler& scheduler, BatchOptions options);
  ~BatchStore();
  void start();
  void stop();
  bool durable() const { return !options_.state_dir.empty(); }  // files and batches survive a restart

  // Throws ApiError (400 bad purpose/content, 413 store full, 507 the disk refused the write).
  nlohmann::json add_file(const std::string& filename, const std::string& purpose, std::string content);
  std::optional<nlohmann::json> file(const std::string& id) const;
  std::optional<std::string> file_content(const std::string& id) const;
  bool delete_file(const std::string& id);
  nlohmann::json list_files() const;

  // Throws ApiError naming the field (400) or the file (404).
  nlohmann::json create_batch(const nlohmann::json& body);
  std::optional<nlohmann::json> batch(const std::string& id) const;
  std::optional<nlohmann::json> cancel_batch(const std::string& id);
  nlohmann::json list_batches() const;

 private:
  struct File {
    std::string id, filename, purpose, content;
    int64_t created_at = 0;
  };
  struct Line {
    std::string custom_id;
    nlohmann::json body;
  };
  struct Batch {
    std::string id, input_file_id, endpoint, status = "validating";
    std::vector<Line> lines;
    size_t total = 0;  // lines.size(); a batch read back finished has no lines, only this
    size_t next = 0;
    std::vector<std::pair<size_t, std::shared_ptr<Job>>> in_flight;
    std::string output, errors;
    int64_t completed = 0, failed = 0;
    nlohmann::json timestamps = nlohmann::json::object();
    nlohmann::json validation_errors;
    std::string output_file_id, error_file_id;
    nlohmann::json metadata;
  };

  void run();
  void advance(Batch& batch);  // under mutex_
  // The batch's requests from its input file's lines; errors as a list (empty: all valid).
  nlohmann::json parse_lines(const std::string& content, Batch& batch) const;
  // The state directory (under mutex_): read it back at start; write a batch's record
  // (write_batch throws the ApiError of a refused write, save_batch logs it: the batch goes
  // on in memory and a restart finds its previous record).
  void load_state();
  void write_batch(const Batch& batch);
  void save_batch(const Batch& batch);
  nlohmann::json batch_json(const Batch& batch) const;
  nlohmann::json file_json(const File& file) const;
  // Under mutex_; throws ApiError 413 (quota) or 507/500 (the state directory's write failed).
  std::string store_file(const std::string& filename, const std::string& purpose, std::string content);
  std::string new_id(const char* prefix);

  Scheduler& scheduler_;
  BatchOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::map<std::string, File> files_;
  std::map<std::string, Batch> batches_;
  size_t stored_bytes_ = 0;
  uint64_t counter_ = 0;
  uint64_t salt_ = 0;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace unshackle::coord
