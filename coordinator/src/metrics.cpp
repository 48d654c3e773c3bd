#include "unshackle/coordinator/metrics.h"

#include <prometheus/text_serializer.h>

#include <sstream>

namespace unshackle::coord {

using prometheus::Histogram;

namespace {
// vLLM v1 defaults (vllm/v1/metrics/loggers.py).
const Histogram::BucketBoundaries kTtftBuckets = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25, 0.5, 0.75,
                                                  1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
const Histogram::BucketBoundaries kItlBuckets = {0.01, 0.025, 0.05, 0.075, 0.1,  0.15, 0.2,  0.3,  0.4, 0.5,
                                                 0.75, 1.0,   2.5,  5.0,   7.5,  10.0, 20.0, 40.0, 80.0};
const Histogram::BucketBoundaries kRequestBuckets = {0.3,  0.5,  0.8,  1.0,  1.5,   2.0,   2.5,   5.0,    10.0,   15.0, 20.0,
                                                     30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
const Histogram::BucketBoundaries kCollectiveBuckets = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                        0.05,   0.1,     0.25,   0.5,   1.0,    2.5,   5.0,  10.0};
const Histogram::BucketBoundaries kRatioBuckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0};

template <typename Builder>
auto& family(Builder builder, const char* name, const char* help, prometheus::Registry& registry) {
  return builder.Name(name).Help(help).Register(registry);
}
}  // namespace

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
  auto& r = *registry_;
  waiting = &family(prometheus::BuildGauge(), "unshackle_num_requests_waiting",
                    "Requests accepted and waiting for a worker group", r).Add({});
  running = &family(prometheus::BuildGauge(), "unshackle_num_requests_running",
                    "Requests admitted to a worker group (prefilling or decoding)", r).Add({});
  kv_usage = &family(prometheus::BuildGauge(), "unshackle_kv_cache_usage_ratio",
                     "KV tokens reserved over KV capacity of the groups that are up (0-1)", r).Add({});
  ttft = &family(prometheus::BuildHistogram(), "unshackle_time_to_first_token_seconds",
                 "Arrival to first generated token", r).Add({}, kTtftBuckets);
  itl = &family(prometheus::BuildHistogram(), "unshackle_inter_token_latency_seconds",
                "Time between consecutive generated tokens", r).Add({}, kItlBuckets);
  e2e = &family(prometheus::BuildHistogram(), "unshackle_e2e_request_latency_seconds",
                "Arrival to finish, every outcome", r).Add({}, kRequestBuckets);
  queue_time = &family(prometheus::BuildHistogram(), "unshackle_request_queue_time_seconds",
                       "Arrival to admission by a worker group", r).Add({}, kRequestBuckets);
  prefill_time = &family(prometheus::BuildHistogram(), "unshackle_request_prefill_time_seconds",
                         "Admission to the end of the prompt's prefill", r).Add({}, kRequestBuckets);
  decode_time = &family(prometheus::BuildHistogram(), "unshackle_request_decode_time_seconds",
                        "End of prefill to the last generated token", r).Add({}, kRequestBuckets);
  collective = &family(prometheus::BuildHistogram(), "unshackle_collective_seconds",
                       "Time inside collectives per prefill chunk or decode step (rank 0, all layers)", r)
                    .Add({}, kCollectiveBuckets);
  layer_collective = &family(prometheus::BuildHistogram(), "unshackle_layer_collective_seconds",
                             "Time inside collectives per layer step: a step's time over its layers (rank 0)", r)
                          .Add({}, kCollectiveBuckets);
  selected_ratio = &family(prometheus::BuildHistogram(), "unshackle_selection_ratio",
                           "Selected middle tokens over middle tokens per step (selection modes)", r)
                        .Add({}, kRatioBuckets);
  auto& share = family(prometheus::BuildHistogram(), "unshackle_attention_share_ratio",
                       "Softmax mass of a step's queries on the initial tokens, the selected middle tokens and the "
                       "local window (part), mean over queries, heads and layers; sampled steps (worker "
                       "--attention-share-every), not in full mode",
                       r);
  share_initial_ = &share.Add({{"part", "initial"}}, kRatioBuckets);
  share_selected_ = &share.Add({{"part", "selected"}}, kRatioBuckets);
  share_window_ = &share.Add({{"part", "window"}}, kRatioBuckets);
  selected_tokens = &family(prometheus::BuildCounter(), "unshackle_selected_tokens_total",
                            "Middle tokens selected, summed over layers and steps", r).Add({});
  prompt_tokens = &family(prometheus::BuildCounter(), "unshackle_prompt_tokens_total", "Prompt tokens prefilled", r).Add({});
  generation_tokens =
      &family(prometheus::BuildCounter(), "unshackle_generation_tokens_total", "Tokens generated", r).Add({});
  auto& rejected = family(prometheus::BuildCounter(), "unshackle_requests_rejected_total",
                          "Requests refused at admission, by reason", r);
  rejected_queue_full = &rejected.Add({{"reason", "queue_full"}});
  rejected_unavailable = &rejected.Add({{"reason", "no_ready_group"}});
  finished_family_ = &family(prometheus::BuildCounter(), "unshackle_request_finished_total",
                             "Requests finished, by reason (stop, length, cancelled, error)", r);
  for (const char* reason : {"stop", "length", "cancelled", "error"}) finished_[reason] = &finished_family_->Add({{"reason", reason}});
  group_up_family_ = &family(prometheus::BuildGauge(), "unshackle_worker_group_up",
                             "1 while the worker group is registered and heartbeating", r);
  rank_bytes_family_ = &family(prometheus::BuildGauge(), "unshackle_worker_kv_bytes", "KV bytes held per rank", r);
  rank_tokens_family_ = &family(prometheus::BuildGauge(), "unshackle_worker_kv_tokens", "KV tokens held per rank", r);
  group_down_family_ = &family(prometheus::BuildCounter(), "unshackle_worker_group_down_total",
                               "Worker groups marked down, by cause", r);
  // Every cause exists from the start so increase() sees the first one.
  for (const char* cause : {"step_timeout", "collective_failed", "heartbeat_lost", "link_closed", "health_failed", "protocol", "shutdown"})
    group_down_family_->Add({{"cause", cause}});
}

std::string Metrics::serialize() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, registry_->Collect());
  return out.str();
}

void Metrics::observe_step(const StepStats& stats, int layers) {
  collective->Observe(stats.collective_seconds);
  if (layers > 0) layer_collective->Observe(stats.collective_seconds / layers);
  if (stats.middle_tokens > 0) selected_ratio->Observe(double(stats.selected_tokens) / double(stats.middle_tokens));
  selected_tokens->Increment(double(stats.selected_tokens));
  if (stats.share_layers > 0) {
    const auto n = double(stats.share_layers);
    share_initial_->Observe(stats.share_initial / n);
    share_selected_->Observe(stats.share_selected / n);
    share_window_->Observe(stats.share_local / n);
  }
}

void Metrics::finished(const std::string& reason) {
  std::lock_guard lock(mutex_);
  auto it = finished_.find(reason);
  if (it == finished_.end()) it = finished_.emplace(reason, &finished_family_->Add({{"reason", reason}})).first;
  it->second->Increment();
}

void Metrics::set_group_up(const std::string& group, bool up) {
  std::lock_guard lock(mutex_);
  group_up_family_->Add({{"group", group}}).Set(up ? 1 : 0);
}

void Metrics::group_down(const std::string& cause) {
  std::lock_guard lock(mutex_);
  group_down_family_->Add({{"cause", cause}}).Increment();
}

void Metrics::set_rank_kv(const std::string& group, int rank, double bytes, double tokens) {
  std::lock_guard lock(mutex_);
  const prometheus::Labels labels{{"group", group}, {"rank", std::to_string(rank)}};
  rank_bytes_family_->Add(labels).Set(bytes);
  rank_tokens_family_->Add(labels).Set(tokens);
}

}  // namespace unshackle::coord
