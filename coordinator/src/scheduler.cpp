#include "unshackle/coordinator/scheduler.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <limits>
#include <random>

#include "unshackle/service/engine_ops.h"

namespace unshackle::coord {

using nlohmann::json;

namespace {
void log_line(const std::string& line) { std::fprintf(stderr, "unshackle-coordinator: %s\n", line.c_str()); }
double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }
int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// context + prompt + max_tokens, saturating: max_tokens may be any positive int64 from the
// request, and a wrapped sum would pass the length checks.
int64_t total_tokens(int64_t context, int64_t prompt, int64_t max_tokens) {
  int64_t sum = 0;
  if (__builtin_add_overflow(context, prompt, &sum) || __builtin_add_overflow(sum, max_tokens, &sum))
    return std::numeric_limits<int64_t>::max();
  return sum;
}

std::string token_parts(int64_t context, int64_t prompt, int64_t max_tokens) {
  return context > 0 ? fmt::format("{} in the stored context, {} in the prompt, {} in the completion", context, prompt, max_tokens)
                     : fmt::format("{} in the prompt, {} in the completion", prompt, max_tokens);
}

ApiError context_length_error(int64_t limit, int64_t context, int64_t prompt, int64_t max_tokens, const char* what) {
  ApiError e(400,
             fmt::format("This model's {} is {} tokens. However, you requested {} tokens ({}). Please reduce the "
                         "length of the prompt or max_tokens.",
                         what, limit, total_tokens(context, prompt, max_tokens), token_parts(context, prompt, max_tokens)),
             "prompt", "context_length_exceeded");
  e.should_retry = false;
  return e;
}

// A job that fits the group's KV capacity but not what its stored contexts leave free: they
// keep their KV until deleted, so waiting would be forever.
ApiError stored_contexts_error(int64_t capacity, int64_t stored, int64_t context, int64_t prompt, int64_t max_tokens) {
  ApiError e(400,
             fmt::format("This worker group's KV capacity is {} tokens and its stored contexts hold {} of them until "
                         "deleted. However, you requested {} tokens ({}; a request on a stored context works on a copy "
                         "of it). Delete a stored context (DELETE /v1/contexts/{{id}}) or reduce the length of the "
                         "prompt or max_tokens.",
                         capacity, stored, total_tokens(context, prompt, max_tokens), token_parts(context, prompt, max_tokens)),
             "prompt", "context_length_exceeded");
  e.should_retry = false;
  return e;
}

ApiError group_lost_error(const std::string& message) {
  ApiError e(500, message, "", "worker_group_lost");
  e.should_retry = false;
  return e;
}

// The field an engine message starts with ("attention.mode: ..." -> "attention.mode"), or "".
std::string message_param(const std::string& message) {
  const size_t colon = message.find(": ");
  if (colon == std::string::npos || colon == 0 || colon > 64) return "";
  for (size_t i = 0; i < colon; ++i) {
    const char c = message[i];
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '[' || c == ']')) return "";
  }
  return message.substr(0, colon);
}

ApiError engine_error(const Error& error) {
  const std::string message = wire::plain_message(error);
  switch (error.kind()) {
    case ErrorKind::kInvalidArgument: return ApiError(400, message, message_param(message), "invalid_value");
    case ErrorKind::kNotFound: return ApiError(404, message, "", "not_found");
    case ErrorKind::kCapacity: {
      ApiError e(400, message, "prompt", "context_length_exceeded");
      e.should_retry = false;
      return e;
    }
    default: {
      ApiError e(500, message, "", "worker_error");
      e.should_retry = false;
      return e;
    }
  }
}
}  // namespace

const char* phase_name(JobPhase phase) {
  switch (phase) {
    case JobPhase::kQueued: return "queued";
    case JobPhase::kPrefill: return "prefill";
    case JobPhase::kDecode: return "decode";
    case JobPhase::kCompleted: return "completed";
    case JobPhase::kFailed: return "failed";
    case JobPhase::kCancelled: return "cancelled";
  }
  return "unknown";
}

const char* kind_name(JobKind kind) {
  switch (kind) {
    case JobKind::kCompletion: return "completion";
    case JobKind::kJob: return "job";
    case JobKind::kContext: return "context";
    case JobKind::kBatchRequest: return "batch_request";
  }
  return "unknown";
}

// ---- Job ----

Job::Job(std::string id_, JobKind kind_, JobSpec spec_)
    : id(std::move(id_)), kind(kind_), spec(std::move(spec_)), created(Clock::now()), created_unix(unix_now()) {
  if (!spec.prompt_is_text) state_.prompt_tokens = static_cast<int64_t>(spec.prompt_tokens.size());
}

Job::State Job::snapshot() const {
  std::lock_guard lock(mutex_);
  return state_;
}

bool Job::done() const {
  std::lock_guard lock(mutex_);
  return state_.finished.has_value();
}

void Job::update(const std::function<void(State&)>& f) {
  std::function<void()> listener;
  {
    std::lock_guard lock(mutex_);
    f(state_);
    listener = listener_;
  }
  if (listener) listener();
}

void Job::set_listener(std::function<void()> listener) {
  bool finished = false;
  {
    std::lock_guard lock(mutex_);
    listener_ = std::move(listener);
    finished = state_.finished.has_value();
    if (!finished) return;
    listener = listener_;
  }
  if (listener) listener();  // it finished before the listener was set
}

void Job::request_cancel() {
  update([](State& s) { s.cancel_requested = true; });
}

json Job::to_json() const {
  const State s = snapshot();
  const auto since = [&](const std::optional<Clock::time_point>& a, const std::optional<Clock::time_point>& b) -> json {
    if (!a || !b) return nullptr;
    return seconds(*b - *a);
  };
  const std::optional<Clock::time_point> created_at = created;
  const auto now = std::optional<Clock::time_point>(Clock::now());
  json progress{{"prompt_tokens", s.prompt_tokens >= 0 ? json(s.prompt_tokens) : json()},
                {"prefilled_tokens", s.prefilled},
                {"generated_tokens", s.generated},
                {"max_tokens", spec.max_tokens},
                {"prefill_fraction", s.prompt_tokens > 0 ? json(double(s.prefilled) / double(s.prompt_tokens)) : json()}};
  json timings{{"queue_seconds", since(created_at, s.admitted ? s.admitted : (s.finished ? s.finished : now))},
               {"prefill_seconds", since(s.admitted, s.prefill_done ? s.prefill_done : (s.admitted && !s.finished ? now : s.finished))},
               {"decode_seconds", since(s.prefill_done, s.last_token ? s.last_token : s.prefill_done)},
               {"time_to_first_token_seconds", since(created_at, s.first_token)},
               {"total_seconds", since(created_at, s.finished ? s.finished : now)}};
  return json{{"id", id},
              {"object", "job"},
              {"kind", kind_name(kind)},
              {"status", phase_name(s.phase)},
              {"model", s.model.empty() ? json() : json(s.model)},
              {"group", s.group.empty() ? json() : json(s.group)},
              {"created_at", created_unix},
              {"progress", progress},
              {"timings", timings},
              {"finish_reason", s.finish_reason.empty() ? json() : json(s.finish_reason)},
              {"error", s.error ? error_json(*s.error)["error"] : json()}};
}

json completion_json(const Job& job, const Job::State& s) {
  const int64_t prompt = std::max<int64_t>(s.prompt_tokens, 0);
  return json{{"id", "cmpl-" + job.id},
              {"object", "text_completion"},
              {"created", job.created_unix},
              {"model", s.model},
              {"choices", json::array({json{{"index", 0}, {"text", s.text}, {"logprobs", nullptr}, {"finish_reason", s.finish_reason}}})},
              {"usage", {{"prompt_tokens", prompt}, {"completion_tokens", s.generated}, {"total_tokens", prompt + s.generated}}}};
}

ApiError job_error(const Job::State& s) {
  if (s.error) return *s.error;
  if (s.phase == JobPhase::kCancelled) return ApiError(409, "The job was cancelled", "", "job_cancelled");
  return ApiError(409, fmt::format("The job is not finished (status {})", phase_name(s.phase)), "", "job_not_finished");
}

// ---- Scheduler ----

struct Scheduler::Run {
  std::shared_ptr<Job> job;
  std::vector<int32_t> prompt;  // tokens still to prefill (a reused context's are not here)
  bool tokenized = false, reserved = false, created = false, keep_context = false;
  bool requeued = false;  // given back to the queue: another group has room for it
  int64_t need = 0;
  ContextId engine_id = 0;
  bool fork = false;
  ContextId fork_source = 0;
  int64_t context_tokens = 0;
  size_t prefilled = 0;
  std::string raw_text;  // generated text before stop handling
  std::vector<int32_t> tokens;  // generated ids (an end-of-sequence token excluded)
  size_t visible = 0;
  size_t max_stop = 0;
  int64_t generated = 0;
  Clock::time_point last_token;
};

Scheduler::Scheduler(Registry& registry, Metrics& metrics, SchedulerOptions options)
    : registry_(registry), metrics_(metrics), options_(options) {
  std::random_device rd;
  id_salt_ = (uint64_t{rd()} << 32) ^ rd();
}

Scheduler::~Scheduler() { stop(); }

void Scheduler::attach() {
  registry_.on_group_up([this](std::shared_ptr<WorkerGroup> group) {
    std::lock_guard lock(mutex_);
    if (stopping_) return;
    capacity_[group->id()] = group->model().kv_capacity_tokens;
    reserved_[group->id()] = 0;
    drivers_.emplace_back([this, group] { drive(group); });
  });
}

void Scheduler::stop() {
  std::vector<std::thread> drivers;
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    drivers.swap(drivers_);
    cv_.notify_all();
  }
  for (auto& t : drivers) t.join();
}

std::string Scheduler::new_id(const char* prefix) {
  // Unguessable and unique: a counter mixed with a per-process salt (splitmix64).
  uint64_t z = (++id_counter_) * 0x9E3779B97F4A7C15ull + id_salt_;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return fmt::format("{}-{:016x}", prefix, z);
}

size_t Scheduler::waiting() const {
  std::lock_guard lock(mutex_);
  return queue_.size() + pending_;
}

void Scheduler::publish_gauges() {
  metrics_.waiting->Set(double(queue_.size() + pending_));
  metrics_.running->Set(double(running_));
  int64_t reserved = 0, capacity = 0;
  for (const auto& group : registry_.groups()) {
    auto c = capacity_.find(group->id());
    auto r = reserved_.find(group->id());
    if (c != capacity_.end()) capacity += c->second;
    if (r != reserved_.end()) reserved += r->second;
  }
  metrics_.kv_usage->Set(capacity > 0 ? double(reserved) / double(capacity) : 0.0);
}

bool Scheduler::room_elsewhere(const WorkerGroup& g, const Job& job, int64_t need, bool ever) const {
  for (const auto& other : registry_.groups()) {
    if (other.get() == &g || !other->ready()) continue;
    if (!job.spec.model.empty() && other->model().name != job.spec.model) continue;
    if (need > other->model().max_context_tokens) continue;
    auto c = capacity_.find(other->id());
    auto r = reserved_.find(other->id());
    if (c == capacity_.end() || r == reserved_.end()) continue;
    if (c->second - (ever ? stored_tokens(other->id()) : r->second) >= need) return true;
  }
  return false;
}

int64_t Scheduler::stored_tokens(const std::string& group) const {
  int64_t tokens = 0;
  for (const auto& [id, c] : contexts_)
    if (c.group == group && c.state == "ready") tokens += c.tokens;
  return tokens;
}

std::shared_ptr<Job> Scheduler::submit(JobKind kind, JobSpec spec, bool bypass_queue_limit) {
  std::lock_guard lock(mutex_);
  const auto groups = registry_.groups();
  std::vector<std::shared_ptr<WorkerGroup>> serving;
  for (const auto& g : groups)
    if (spec.model.empty() || g->model().name == spec.model) serving.push_back(g);
  if (!spec.model.empty() && serving.empty() && !groups.empty())
    throw ApiError(404, fmt::format("The model '{}' does not exist", spec.model), "model", "model_not_found");

  std::shared_ptr<WorkerGroup> pinned;
  int64_t context_tokens = 0;
  if (!spec.context_id.empty()) {
    auto it = contexts_.find(spec.context_id);
    if (it == contexts_.end() || it->second.delete_requested)
      throw ApiError(404, fmt::format("No context with id '{}'", spec.context_id), "context", "context_not_found");
    const StoredContext& c = it->second;
    if (c.state != "ready")
      throw ApiError(409, fmt::format("Context '{}' is {}, not ready", c.id, c.state), "context", "context_not_ready");
    for (const auto& g : serving)
      if (g->id() == c.group) pinned = g;
    if (!pinned) {
      ApiError e(503, fmt::format("The worker group holding context '{}' is not available", c.id), "context", "context_unavailable");
      e.should_retry = false;
      throw e;
    }
    context_tokens = c.tokens;
  }
  bool ready = false;
  int64_t limit = 0;
  for (const auto& g : serving) {
    if (pinned && g != pinned) continue;
    ready = ready || g->ready();
    limit = std::max(limit, g->model().max_context_tokens);
  }
  if (!ready) {
    metrics_.rejected_unavailable->Increment();
    ApiError e(503, "No worker group is ready to serve this request; try again later", "", "no_ready_group");
    e.retry_after_s = 5;
    throw e;
  }
  if (!spec.prompt_is_text) {
    const auto prompt = static_cast<int64_t>(spec.prompt_tokens.size());
    if (total_tokens(context_tokens, prompt, spec.max_tokens) > limit)
      throw context_length_error(limit, context_tokens, prompt, spec.max_tokens, "maximum context length");
  }
  if (!bypass_queue_limit && queue_.size() + pending_ >= options_.max_queued) {
    metrics_.rejected_queue_full->Increment();
    ApiError e(429, fmt::format("The queue is full ({} requests waiting); try again later", queue_.size() + pending_), "",
               "queue_full");
    e.retry_after_s = 1;
    throw e;
  }
  const bool store = spec.store_context;
  auto job = std::make_shared<Job>(new_id(kind == JobKind::kContext ? "ctxjob" : "job"), kind, std::move(spec));
  jobs_[job->id] = job;
  if (store) {
    StoredContext c;
    c.id = new_id("ctx");
    c.job = job;
    contexts_[c.id] = c;
    context_by_job_[job->id] = c.id;
  }
  queue_.push_back(job);
  publish_gauges();
  cv_.notify_all();
  return job;
}

std::shared_ptr<Job> Scheduler::find_job(const std::string& id) const {
  std::lock_guard lock(mutex_);
  auto it = jobs_.find(id);
  return it == jobs_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<Job>> Scheduler::list_jobs(size_t limit) const {
  std::vector<std::shared_ptr<Job>> out;
  {
    std::lock_guard lock(mutex_);
    for (const auto& [id, job] : jobs_)
      if (!context_by_job_.count(id)) out.push_back(job);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a->created > b->created; });
  if (out.size() > limit) out.resize(limit);
  return out;
}

std::shared_ptr<Job> Scheduler::cancel_job(const std::string& id) {
  std::shared_ptr<Job> job;
  bool was_queued = false;
  {
    std::lock_guard lock(mutex_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return nullptr;
    job = it->second;
    auto q = std::find(queue_.begin(), queue_.end(), job);
    if (q != queue_.end()) {
      queue_.erase(q);
      was_queued = true;
      auto c = context_by_job_.find(job->id);
      if (c != context_by_job_.end()) contexts_[c->second].state = "failed";
      remember_finished(job->id);
      publish_gauges();
    }
  }
  if (was_queued) {
    job->update([](Job::State& s) {
      s.cancel_requested = true;
      s.phase = JobPhase::kCancelled;
      s.finished = Clock::now();
    });
    metrics_.finished("cancelled");
    metrics_.e2e->Observe(seconds(Clock::now() - job->created));
  } else {
    job->request_cancel();  // the driver stops it at its next step
  }
  return job;
}

std::optional<json> Scheduler::context_json(const std::string& id) const {
  std::lock_guard lock(mutex_);
  auto it = contexts_.find(id);
  if (it == contexts_.end()) return std::nullopt;
  const StoredContext& c = it->second;
  const Job::State s = c.job->snapshot();
  json out{{"id", c.id},
           {"object", "context"},
           {"status", c.state},
           {"job", c.job->id},
           {"group", c.group.empty() ? json() : json(c.group)},
           {"model", s.model.empty() ? json() : json(s.model)},
           {"tokens", s.prompt_tokens >= 0 ? json(s.prompt_tokens) : json()},
           {"prefilled_tokens", s.prefilled},
           {"created_at", c.job->created_unix},
           {"attention", wire::attention_to_json(c.job->spec.attention)},
           {"error", s.error ? error_json(*s.error)["error"] : json()}};
  return out;
}

std::string Scheduler::context_of_job(const std::string& job_id) const {
  std::lock_guard lock(mutex_);
  auto it = context_by_job_.find(job_id);
  return it == context_by_job_.end() ? std::string() : it->second;
}

bool Scheduler::delete_context(const std::string& id) {
  std::shared_ptr<Job> job;
  {
    std::lock_guard lock(mutex_);
    auto it = contexts_.find(id);
    if (it == contexts_.end() || it->second.delete_requested) return false;
    it->second.delete_requested = true;
    job = it->second.job;
    cv_.notify_all();  // the driver of its group releases it
  }
  if (!job->done()) cancel_job(job->id);
  return true;
}

void Scheduler::remember_finished(const std::string& id) {
  finished_order_.push_back(id);
  while (finished_order_.size() > options_.keep_finished) {
    const std::string old = finished_order_.front();
    finished_order_.pop_front();
    if (context_by_job_.count(old)) continue;  // a stored context's job lives as long as the context
    jobs_.erase(old);
  }
}

// ---- the driver of one group ----

void Scheduler::drive(std::shared_ptr<WorkerGroup> group) {
  WorkerGroup& g = *group;
  try {
    g.call("health", json::object(), options_.step_timeout);
    g.set_ready(true);
    log_line(fmt::format("worker group '{}' is ready (health step passed)", g.id()));
  } catch (const std::exception& e) {
    g.mark_down(fmt::format("health step failed: {}", wire::plain_message(e)), "health_failed");
  }
  std::vector<std::shared_ptr<Run>> running;
  size_t next = 0;
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      if (stopping_) break;
    }
    if (!g.up()) {
      group_lost(g, running);
      return;
    }
    // Stored contexts of this group that were deleted: release them.
    std::vector<std::pair<std::string, ContextId>> to_release;
    {
      std::lock_guard lock(mutex_);
      for (auto& [id, c] : contexts_)
        if (c.delete_requested && c.group == g.id() && c.state == "ready") {
          to_release.emplace_back(id, c.engine_id);
          c.state = "deleted";
        }
    }
    for (const auto& [id, engine_id] : to_release) {
      try {
        g.call("release", json{{"context", engine_id}}, options_.step_timeout);
      } catch (const std::exception& e) {
        log_line(fmt::format("releasing context {} on '{}': {}", id, g.id(), wire::plain_message(e)));
      }
      std::lock_guard lock(mutex_);
      auto it = contexts_.find(id);
      if (it != contexts_.end()) {
        reserved_[g.id()] -= it->second.tokens;
        context_by_job_.erase(it->second.job->id);
        remember_finished(it->second.job->id);
        contexts_.erase(it);
      }
      publish_gauges();
    }
    admit(g, running);
    bool progressed = false;
    for (size_t tried = 0; tried < running.size() && !progressed; ++tried) {
      next = next % running.size();
      auto run = running[next];
      step(g, *run);
      progressed = run->reserved || run->job->done() || run->requeued;  // else it waits for KV room
      if (run->job->done() || run->requeued) running.erase(running.begin() + static_cast<std::ptrdiff_t>(next));
      else ++next;
      if (!g.up()) break;
    }
    if (!progressed) {
      std::unique_lock lock(mutex_);
      cv_.wait_for(lock, std::chrono::milliseconds(100));
    }
  }
  // Shutting down.
  for (auto& run : running)
    if (!run->job->done()) finish(g, *run, JobPhase::kFailed, "error", group_lost_error("The coordinator is shutting down"));
}

void Scheduler::admit(WorkerGroup& g, std::vector<std::shared_ptr<Run>>& running) {
  std::lock_guard lock(mutex_);
  // One unreserved job at a time: while it waits for room, later jobs may go to other groups.
  for (const auto& r : running)
    if (!r->reserved) return;
  if (running.size() >= options_.max_running_per_group) return;
  for (auto it = queue_.begin(); it != queue_.end(); ++it) {
    const auto& job = *it;
    if (!job->spec.model.empty() && job->spec.model != g.model().name) continue;
    if (job->spec.context_id.empty()) {
      // Its size is known (token ids, or tokenized by a group that gave it back): leave it to
      // a group with room when it does not fit here.
      const int64_t prompt = job->snapshot().prompt_tokens;
      const int64_t need = total_tokens(0, prompt, job->spec.max_tokens);
      if (prompt >= 0 && capacity_[g.id()] - reserved_[g.id()] < need) {
        const bool never_here = need > capacity_[g.id()] - stored_tokens(g.id());
        if (room_elsewhere(g, *job, need, false) || (never_here && room_elsewhere(g, *job, need, true))) continue;
      }
    }
    auto run = std::make_shared<Run>();
    if (!job->spec.context_id.empty()) {
      auto c = contexts_.find(job->spec.context_id);
      if (c == contexts_.end() || c->second.group != g.id()) continue;
      run->fork = true;
      run->fork_source = c->second.engine_id;
      run->context_tokens = c->second.tokens;
    }
    run->job = job;
    run->keep_context = job->spec.store_context;
    for (const auto& s : job->spec.stop) run->max_stop = std::max(run->max_stop, s.size());
    queue_.erase(it);
    ++pending_;
    running.push_back(run);
    publish_gauges();
    return;
  }
}

void Scheduler::step(WorkerGroup& g, Run& run) {
  Job& job = *run.job;
  const JobSpec& spec = job.spec;
  const ModelInfo& model = g.model();
  const auto timeout = options_.step_timeout;
  try {
    if (job.snapshot().cancel_requested) {
      finish(g, run, JobPhase::kCancelled, "cancelled", std::nullopt);
      return;
    }
    if (!run.tokenized) {
      if (spec.prompt_is_text) {
        // A prompt that continues a stored context gets no BOS of its own.
        const json r = g.call("tokenize", json{{"text", spec.prompt_text}, {"continuation", run.fork}}, timeout);
        run.prompt = r.at("tokens").get<std::vector<int32_t>>();
      } else {
        run.prompt = spec.prompt_tokens;
      }
      run.tokenized = true;
      const auto prompt = static_cast<int64_t>(run.prompt.size());
      job.update([&](Job::State& s) {
        s.prompt_tokens = run.context_tokens + prompt;
        s.context_tokens = run.context_tokens;
        s.prefilled = run.context_tokens;
        s.model = model.name;
        s.group = g.id();
      });
      if (run.prompt.empty() && run.context_tokens == 0) {
        finish(g, run, JobPhase::kFailed, "error", invalid_field("prompt", "prompt: tokenizes to no tokens"));
        return;
      }
      if (total_tokens(run.context_tokens, prompt, spec.max_tokens) > model.max_context_tokens) {
        finish(g, run, JobPhase::kFailed, "error",
               context_length_error(model.max_context_tokens, run.context_tokens, prompt, spec.max_tokens, "maximum context length"));
        return;
      }
      run.need = total_tokens(run.context_tokens, prompt, spec.max_tokens);  // <= max_context_tokens
    }
    if (!run.reserved) {
      std::unique_lock lock(mutex_);
      if (reserved_[g.id()] + run.need > capacity_[g.id()]) {
        // No room here now. Room that running jobs hold comes back when they end; room that
        // stored contexts hold only when they are deleted. Another group runs it if it has
        // room now, or, when this group can never hold it, if it ever can (a stored context's
        // job stays with its context). A job nothing can ever hold fails now instead of
        // waiting forever; any other waits here.
        const int64_t stored = stored_tokens(g.id());
        const bool never_here = run.need > capacity_[g.id()] - stored;
        const bool elsewhere = !run.fork && (room_elsewhere(g, job, run.need, false) ||
                                             (never_here && room_elsewhere(g, job, run.need, true)));
        if (!elsewhere) {
          if (!never_here) return;
          const int64_t capacity = capacity_[g.id()];
          lock.unlock();
          const auto prompt = static_cast<int64_t>(run.prompt.size());
          finish(g, run, JobPhase::kFailed, "error",
                 run.need > capacity ? context_length_error(capacity, run.context_tokens, prompt, spec.max_tokens,
                                                            "worker group's KV capacity")
                                     : stored_contexts_error(capacity, stored, run.context_tokens, prompt, spec.max_tokens));
          return;
        }
        const int64_t free = capacity_[g.id()] - reserved_[g.id()];
        lock.unlock();
        log_line(fmt::format("job {} needs {} KV tokens, {} free on '{}': queued again for a group with room", job.id,
                             run.need, free, g.id()));
        job.update([](Job::State& s) { s.group.clear(); });  // queued again, on no group yet
        lock.lock();
        run.requeued = true;
        --pending_;
        queue_.push_front(run.job);
        publish_gauges();
        cv_.notify_all();
        return;
      }
      reserved_[g.id()] += run.need;
      run.reserved = true;
      --pending_;
      ++running_;
      if (run.keep_context) {
        auto c = contexts_.find(context_by_job_[job.id]);
        if (c != contexts_.end()) c->second.group = g.id();
      }
      publish_gauges();
      const auto now = Clock::now();
      metrics_.queue_time->Observe(seconds(now - job.created));
      job.update([&](Job::State& s) {
        s.admitted = now;
        s.phase = JobPhase::kPrefill;
      });
    }
    if (!run.created) {
      run.engine_id = next_engine_id_++;
      if (run.fork)
        g.call("fork_context", json{{"source", run.fork_source}, {"context", run.engine_id}, {"reserve", run.need}}, timeout);
      else
        g.call("create_context",
               json{{"context", run.engine_id}, {"attention", wire::attention_to_json(spec.attention)}, {"reserve", run.need}},
               timeout);
      run.created = true;
      return;
    }
    if (run.prefilled < run.prompt.size()) {
      const size_t n = std::min(run.prompt.size() - run.prefilled, static_cast<size_t>(options_.prefill_chunk));
      const std::vector<int32_t> chunk(run.prompt.begin() + static_cast<std::ptrdiff_t>(run.prefilled),
                                       run.prompt.begin() + static_cast<std::ptrdiff_t>(run.prefilled + n));
      const json r = g.call("prefill", json{{"context", run.engine_id}, {"tokens", chunk}}, timeout);
      const StepStats stats = wire::stats_from_json(r.value("stats", json::object()));
      metrics_.observe_step(stats, model.layers);
      metrics_.prompt_tokens->Increment(double(n));
      run.prefilled += n;
      const bool done = run.prefilled == run.prompt.size();
      const auto now = Clock::now();
      job.update([&](Job::State& s) {
        s.prefilled = run.context_tokens + static_cast<int64_t>(run.prefilled);
        if (done) {
          s.prefill_done = now;
          if (!run.keep_context) s.phase = JobPhase::kDecode;
        }
      });
      if (done) {
        metrics_.prefill_time->Observe(seconds(now - *job.snapshot().admitted));
        if (run.keep_context) finish(g, run, JobPhase::kCompleted, "", std::nullopt);
      }
      return;
    }
    // Decode one token.
    const json r = g.call("decode", json{{"context", run.engine_id}, {"sampling", wire::sampling_to_json(spec.sampling)}}, timeout);
    const auto now = Clock::now();
    const StepStats stats = wire::stats_from_json(r.value("stats", json::object()));
    metrics_.observe_step(stats, model.layers);
    // The generation ends: the bytes the worker held back (a character whose tokens did not
    // all arrive) become U+FFFD, as the tokenizer decodes them; the text stays a prefix.
    const auto flush_text = [&] {
      if (run.tokens.empty()) return;
      const json d = g.call("detokenize", json{{"tokens", run.tokens}}, timeout);
      const std::string full = d.value("text", std::string());
      if (full.size() > run.raw_text.size() && full.compare(0, run.raw_text.size(), run.raw_text) == 0) run.raw_text = full;
    };
    const bool eos = r.value("eos", false);
    if (!eos) {
      if (run.generated == 0) metrics_.ttft->Observe(seconds(now - job.created));
      else metrics_.itl->Observe(seconds(now - run.last_token));
      run.last_token = now;
      ++run.generated;
      run.tokens.push_back(r.at("token").get<int32_t>());
      metrics_.generation_tokens->Increment();
      run.raw_text += r.value("text", std::string());
    }
    const bool length = !eos && run.generated >= spec.max_tokens;
    if (eos || length) flush_text();
    // Stop sequences: cut at the earliest one; otherwise hold back what could begin one.
    size_t stop_at = std::string::npos;
    for (const auto& s : spec.stop) stop_at = std::min(stop_at, run.raw_text.find(s));
    size_t visible;
    if (stop_at != std::string::npos) visible = stop_at;
    else if (eos || length || run.max_stop == 0) visible = run.raw_text.size();
    else visible = std::max(run.visible, run.raw_text.size() >= run.max_stop - 1 ? run.raw_text.size() - (run.max_stop - 1) : 0);
    run.visible = std::max(run.visible, visible);
    job.update([&](Job::State& s) {
      s.generated = run.generated;
      s.text = run.raw_text.substr(0, run.visible);
      if (eos) return;
      if (!s.first_token) s.first_token = now;
      s.last_token = now;
    });
    if (stop_at != std::string::npos || eos) finish(g, run, JobPhase::kCompleted, "stop", std::nullopt);
    else if (length) finish(g, run, JobPhase::kCompleted, "length", std::nullopt);
  } catch (const Error& e) {
    if (!g.up()) return;  // the driver fails every job of the group
    finish(g, run, JobPhase::kFailed, "error", engine_error(e));
  } catch (const std::exception& e) {
    if (!g.up()) return;
    ApiError error(500, fmt::format("malformed answer from worker group '{}': {}", g.id(), e.what()), "", "worker_error");
    error.should_retry = false;
    finish(g, run, JobPhase::kFailed, "error", error);
  }
}

void Scheduler::finish(WorkerGroup& g, Run& run, JobPhase phase, const std::string& reason, std::optional<ApiError> error) {
  Job& job = *run.job;
  const bool keep = run.keep_context && phase == JobPhase::kCompleted;
  if (run.created && !keep && g.up()) {
    try {
      g.call("release", json{{"context", run.engine_id}}, options_.step_timeout);
    } catch (const std::exception& e) {
      log_line(fmt::format("releasing a context of job {} on '{}': {}", job.id, g.id(), wire::plain_message(e)));
    }
  }
  const auto now = Clock::now();
  {
    std::lock_guard lock(mutex_);
    if (run.reserved) {
      --running_;
      if (!keep) reserved_[g.id()] -= run.need;
    } else {
      --pending_;
    }
    auto c = context_by_job_.find(job.id);
    if (c != context_by_job_.end()) {
      StoredContext& ctx = contexts_[c->second];
      ctx.group = g.id();
      if (keep) {
        ctx.state = "ready";
        ctx.engine_id = run.engine_id;
        ctx.tokens = static_cast<int64_t>(run.prompt.size());
        if (run.need != ctx.tokens) reserved_[g.id()] -= run.need - ctx.tokens;  // max_tokens is 0: equal
      } else {
        ctx.state = phase == JobPhase::kCancelled ? "cancelled" : "failed";
      }
    } else {
      remember_finished(job.id);
    }
    publish_gauges();
  }
  const Job::State before = job.snapshot();
  if (before.prefill_done && run.generated > 0) metrics_.decode_time->Observe(seconds(run.last_token - *before.prefill_done));
  metrics_.e2e->Observe(seconds(now - job.created));
  metrics_.finished(phase == JobPhase::kCancelled ? "cancelled" : (phase == JobPhase::kFailed ? "error" : (reason.empty() ? "stop" : reason)));
  job.update([&](Job::State& s) {
    s.phase = phase;
    s.finish_reason = phase == JobPhase::kCompleted ? reason : "";
    if (phase == JobPhase::kCompleted) s.text = run.raw_text.substr(0, run.visible);
    s.error = std::move(error);
    s.finished = now;
  });
}

void Scheduler::group_lost(WorkerGroup& g, std::vector<std::shared_ptr<Run>>& running) {
  const std::string message = fmt::format("worker group '{}' lost: {}", g.id(), g.down_reason());
  for (auto& run : running)
    if (!run->job->done()) finish(g, *run, JobPhase::kFailed, "error", group_lost_error(message));
  running.clear();
  std::vector<std::shared_ptr<Job>> failed;
  std::vector<std::shared_ptr<Job>> unavailable;
  {
    std::lock_guard lock(mutex_);
    reserved_.erase(g.id());
    capacity_.erase(g.id());
    for (auto& [id, c] : contexts_)
      if (c.group == g.id() && c.state == "ready") c.state = "lost";
    // Queued jobs that can only run here, or anywhere when no group is left.
    const bool none_left = registry_.groups().empty();
    for (auto it = queue_.begin(); it != queue_.end();) {
      const auto& job = *it;
      bool pinned_here = false;
      if (!job->spec.context_id.empty()) {
        auto c = contexts_.find(job->spec.context_id);
        pinned_here = c == contexts_.end() || c->second.group == g.id();
      }
      if (pinned_here) failed.push_back(job);
      else if (none_left) unavailable.push_back(job);
      else {
        ++it;
        continue;
      }
      remember_finished(job->id);
      it = queue_.erase(it);
    }
    publish_gauges();
  }
  const auto now = Clock::now();
  for (auto& job : failed)
    job->update([&](Job::State& s) {
      s.phase = JobPhase::kFailed;
      s.error = group_lost_error(message + " (it held the job's context)");
      s.finished = now;
    });
  for (auto& job : unavailable)
    job->update([&](Job::State& s) {
      s.phase = JobPhase::kFailed;
      ApiError e(503, message + "; no worker group is left to run the job", "", "no_ready_group");
      e.retry_after_s = 5;
      s.error = e;
      s.finished = now;
    });
  for (size_t i = 0; i < failed.size() + unavailable.size(); ++i) metrics_.finished("error");
}

}  // namespace unshackle::coord
