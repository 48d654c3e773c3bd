// The scheduler: one bounded queue of jobs, admitted by worker groups with KV room.
//
// Each group that registers gets a driver thread. It runs the health step (the group is then
// ready), then loops: admit queued jobs that fit the group's KV capacity (prompt + max_tokens
// reserved per job, stored contexts keep theirs), and step the admitted jobs round-robin, one
// worker call each: tokenize, create (or fork a stored context), prefill one chunk, or decode
// one token. A job that does not fit a group's free KV while another group has room for it is
// left to that group (given back to the queue if its size was only known once tokenized); when
// no group has room it waits on the one that took it, unless that group can never hold it
// (its capacity, less what its stored contexts keep until deleted): then another group that
// could takes it, or it fails at once (400 context_length_exceeded). A group that goes down
// fails its jobs (x-should-retry: false); when no group is up, queued jobs fail with 503.
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "unshackle/coordinator/api.h"
#include "unshackle/coordinator/metrics.h"
#include "unshackle/coordinator/registry.h"

namespace unshackle::coord {

using Clock = std::chrono::steady_clock;

enum class JobKind { kCompletion, kJob, kContext, kBatchRequest };
enum class JobPhase { kQueued, kPrefill, kDecode, kCompleted, kFailed, kCancelled };
const char* phase_name(JobPhase phase);
const char* kind_name(JobKind kind);

class Job {
 public:
  struct State {
    JobPhase phase = JobPhase::kQueued;
    std::string group;
    std::string model;
    int64_t prompt_tokens = -1;   // known once tokenized (ids given: at once); includes a reused context
    int64_t context_tokens = 0;   // of those, from the reused context (not prefilled again)
    int64_t prefilled = 0;        // prompt tokens in the KV so far (reused ones included)
    int64_t generated = 0;
    std::string text;             // generated text visible so far (stop sequences never appear)
    std::string finish_reason;    // "stop", "length" (completions), "" otherwise
    std::optional<ApiError> error;
    bool cancel_requested = false;
    std::optional<Clock::time_point> admitted, prefill_done, first_token, last_token, finished;
  };

  Job(std::string id, JobKind kind, JobSpec spec);

  const std::string id;
  const JobKind kind;
  const JobSpec spec;
  const Clock::time_point created;
  const int64_t created_unix;

  State snapshot() const;
  bool done() const;
  // Runs f(state) under the job's lock, then notifies the listener.
  void update(const std::function<void(State&)>& f);
  // Called (from a driver thread) after every change; set by a streaming/waiting HTTP session.
  void set_listener(std::function<void()> listener);
  void request_cancel();

  nlohmann::json to_json() const;  // the /v1/jobs object

 private:
  mutable std::mutex mutex_;
  State state_;
  std::function<void()> listener_;
};

// The OpenAI text_completion object of a finished job.
nlohmann::json completion_json(const Job& job, const Job::State& state);
// The error a failed or cancelled job reports.
ApiError job_error(const Job::State& state);

struct SchedulerOptions {
  size_t max_queued = 64;          // waiting jobs before 429
  size_t max_running_per_group = 64;
  int64_t prefill_chunk = 512;     // tokens per prefill call
  std::chrono::milliseconds step_timeout{600000};  // one worker call; past it the group is marked down
  size_t keep_finished = 10000;    // finished jobs kept for GET
};

class Scheduler {
 public:
  Scheduler(Registry& registry, Metrics& metrics, SchedulerOptions options);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Takes a driver for every group that registers from now on.
  void attach();
  void stop();

  // Admission. Throws ApiError: 404 unknown model or context, 400 context_length_exceeded
  // (token ids known), 503 no ready group, 429 queue full (unless bypass_queue_limit).
  std::shared_ptr<Job> submit(JobKind kind, JobSpec spec, bool bypass_queue_limit = false);
  std::shared_ptr<Job> find_job(const std::string& id) const;
  // The newest `limit` jobs of kind job or completion (stored contexts' prefills excluded), newest first.
  std::vector<std::shared_ptr<Job>> list_jobs(size_t limit) const;
  // The job, with cancel requested; nullptr for an unknown id.
  std::shared_ptr<Job> cancel_job(const std::string& id);

  // Stored contexts (/v1/contexts): the object, or nullopt for an unknown id.
  std::optional<nlohmann::json> context_json(const std::string& id) const;
  std::string context_of_job(const std::string& job_id) const;
  bool delete_context(const std::string& id);

  size_t waiting() const;

 private:
  struct StoredContext {
    std::string id;
    std::shared_ptr<Job> job;  // the prefill
    std::string group;
    ContextId engine_id = 0;
    int64_t tokens = 0;
    std::string state = "prefilling";  // prefilling, ready, failed, lost, deleted
    bool delete_requested = false;
  };
  struct Run;

  void drive(std::shared_ptr<WorkerGroup> group);
  void admit(WorkerGroup& group, std::vector<std::shared_ptr<Run>>& running);
  void step(WorkerGroup& group, Run& run);
  void finish(WorkerGroup& group, Run& run, JobPhase phase, const std::string& reason, std::optional<ApiError> error);
  void group_lost(WorkerGroup& group, std::vector<std::shared_ptr<Run>>& running);
  void publish_gauges();  // under mutex_
  // Whether a ready group other than `g` that serves the job's model has `need` KV tokens free
  // now, or with `ever` could have once its running jobs end (all but its stored contexts'
  // tokens; under mutex_): a job that does not fit `g` then goes there instead of waiting on `g`.
  bool room_elsewhere(const WorkerGroup& g, const Job& job, int64_t need, bool ever) const;
  // KV tokens the group's ready stored contexts hold until deleted (under mutex_).
  int64_t stored_tokens(const std::string& group) const;
  std::string new_id(const char* prefix);
  void remember_finished(const std::string& id);

  Registry& registry_;
  Metrics& metrics_;
  SchedulerOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::map<std::string, std::shared_ptr<Job>> jobs_;
  std::deque<std::string> finished_order_;
  std::map<std::string, StoredContext> contexts_;
  std::map<std::string, std::string> context_by_job_;
  std::map<std::string, int64_t> reserved_;   // per group: tokens reserved
  std::map<std::string, int64_t> capacity_;   // per group that is up
  size_t running_ = 0, pending_ = 0;          // pending: taken by a driver, not yet admitted
  std::atomic<ContextId> next_engine_id_{1};
  uint64_t id_counter_ = 0;
  uint64_t id_salt_;
  bool stopping_ = false;
  std::vector<std::thread> drivers_;
};

}  // namespace unshackle::coord
