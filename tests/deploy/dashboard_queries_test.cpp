// Every query of the Grafana dashboard (deploy/grafana/unshackle.json) returns data: a real
// Prometheus scrapes the real coordinator while a workload runs on a real 2-rank worker group
// (the tests/service LiveService fixture), then each panel's PromQL, with Grafana's
// $__rate_interval set to 1m, must return at least one series with a finite value. A panel
// that reads a metric the service does not feed, or feeds only as NaN, fails here.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "live_service.h"

namespace unshackle::live {
namespace {

struct PanelQuery {
  std::string panel, ref, expr;
};

std::vector<PanelQuery> dashboard_queries() {
  std::ifstream in(std::string(UNS_REPO_ROOT) + "/deploy/grafana/unshackle.json");
  const json dashboard = json::parse(in);
  std::vector<PanelQuery> out;
  for (const json& panel : dashboard.at("panels")) {
    for (const json& target : panel.value("targets", json::array())) {
      std::string expr = target.at("expr").get<std::string>();
      for (size_t at; (at = expr.find("$__rate_interval")) != std::string::npos;) expr.replace(at, 16, "1m");
      out.push_back({panel.at("title").get<std::string>(), target.value("refId", "?"), expr});
    }
  }
  return out;
}

// Finite values of an instant query's result ("" when it had none).
std::string finite_values(const json& data) {
  std::string values;
  if (!data.is_object() || !data["result"].is_array()) return values;
  for (const json& series : data["result"]) {
    const double v = std::stod(series["value"][1].get<std::string>());
    if (std::isfinite(v)) values += (values.empty() ? "" : ", ") + series["value"][1].get<std::string>();
  }
  return values;
}

TEST(Dashboard, EveryPanelQueryReturnsDataFromTheLiveService) {
  if (!LivePrometheus::available()) GTEST_SKIP() << "prometheus is not installed (Debian package prometheus; ./deploy/install_deps.sh)";
  const std::vector<PanelQuery> queries = dashboard_queries();
  ASSERT_GE(queries.size(), 20u) << "the dashboard lost its panels";

  LiveService service;
  ASSERT_FALSE(::testing::Test::HasFailure());
  LivePrometheus prometheus(service);
  ASSERT_TRUE(eventually([&] { return prometheus.target_up(); }, 30s, 200ms)) << "Prometheus never scraped /metrics";

  // The workload: prompts longer than l_I + l_L (the fixture's exact-topk settings), so steps
  // select middle tokens; several generated tokens, so inter-token and decode times exist.
  std::string prompt;
  for (int i = 0; prompt.size() < 300; ++i) prompt += "Sentence " + std::to_string(i) + " of the haystack. ";
  for (int i = 0; i < 4; ++i) {
    const HttpResult r = service.post("/v1/completions",
                                      {{"prompt", prompt + std::to_string(i)}, {"max_tokens", 4}, {"temperature", 0}});
    ASSERT_EQ(r.status, 200) << r.body;
  }
  const HttpResult streamed = service.post(
      "/v1/completions", {{"prompt", prompt}, {"max_tokens", 4}, {"stream", true}, {"temperature", 0}});
  ASSERT_EQ(streamed.status, 200) << streamed.body;

  // Each query gets up to 20 s: rate() needs two scrapes (every second) after the workload.
  std::vector<std::string> empty;
  for (const PanelQuery& q : queries) {
    std::string values;
    eventually([&] { return !(values = finite_values(prometheus.query(q.expr))).empty(); }, 20s, 250ms);
    if (values.empty()) empty.push_back("'" + q.panel + "' " + q.ref + ": " + q.expr + "  ->  " + prometheus.query(q.expr).dump());
    else std::printf("ok  %-32s %s  = %s\n", q.panel.c_str(), q.ref.c_str(), values.substr(0, 60).c_str());
  }
  for (const std::string& e : empty) ADD_FAILURE() << "no data: " << e;
}

}  // namespace
}  // namespace unshackle::live
