// The coordinator's Prometheus metrics (prefix unshackle_, vLLM's meanings and long-tail
// buckets; see docs/api.md). Served as text at /metrics on the API port.
//
// Thread-safe: prometheus-cpp metrics are; the label handles below are resolved once, and
// the per-group/per-rank ones under a mutex.
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "unshackle/worker/engine.h"

namespace unshackle::coord {

class Metrics {
 public:
  Metrics();
  std::string serialize() const;  // Prometheus text format 0.0.4

  prometheus::Gauge* waiting;         // unshackle_num_requests_waiting
  prometheus::Gauge* running;         // unshackle_num_requests_running
  prometheus::Gauge* kv_usage;        // unshackle_kv_cache_usage_ratio
  prometheus::Histogram* ttft;        // unshackle_time_to_first_token_seconds
  prometheus::Histogram* itl;         // unshackle_inter_token_latency_seconds
  prometheus::Histogram* e2e;         // unshackle_e2e_request_latency_seconds
  prometheus::Histogram* queue_time;  // unshackle_request_queue_time_seconds
  prometheus::Histogram* prefill_time;
  prometheus::Histogram* decode_time;
  prometheus::Histogram* collective;       // unshackle_collective_seconds (per step, rank 0)
  prometheus::Histogram* layer_collective; // unshackle_layer_collective_seconds (per step / layers)
  prometheus::Histogram* selected_ratio;   // unshackle_selection_ratio: |M_k| / |M| per step
  prometheus::Counter* selected_tokens;    // unshackle_selected_tokens_total
  prometheus::Counter* prompt_tokens;      // unshackle_prompt_tokens_total
  prometheus::Counter* generation_tokens;  // unshackle_generation_tokens_total
  prometheus::Counter* rejected_queue_full;  // unshackle_requests_rejected_total{reason="queue_full"}
  prometheus::Counter* rejected_unavailable; // ...{reason="no_ready_group"}

  // What one prefill chunk or decode step reported (rank 0's StepStats): collective time
  // (per step and per layer step), selection ratio and count, attention share by part.
  void observe_step(const StepStats& stats, int layers);

  // unshackle_request_finished_total{reason}: stop, length, cancelled, error.
  void finished(const std::string& reason);
  void set_group_up(const std::string& group, bool up);
  void set_rank_kv(const std::string& group, int rank, double bytes, double tokens);
  // unshackle_worker_group_down_total{cause}: step_timeout (a call, i.e. a collective, hung),
  // collective_failed (the group sent fatal), heartbeat_lost, link_closed, health_failed,
  // protocol, shutdown. The alert on collective timeouts reads the first two.
  void group_down(const std::string& cause);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* finished_family_;
  prometheus::Family<prometheus::Gauge>* group_up_family_;
  prometheus::Family<prometheus::Gauge>* rank_bytes_family_;
  prometheus::Family<prometheus::Gauge>* rank_tokens_family_;
  prometheus::Family<prometheus::Counter>* group_down_family_;
  prometheus::Histogram* share_initial_;   // unshackle_attention_share_ratio{part="initial"}
  prometheus::Histogram* share_selected_;  // {part="selected"}
  prometheus::Histogram* share_window_;    // {part="window"}: local window and chunk
  std::mutex mutex_;
  std::map<std::string, prometheus::Counter*> finished_;
};

}  // namespace unshackle::coord
