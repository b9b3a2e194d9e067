// Server metrics in the Prometheus text exposition format (GET /metrics). Request-level values
// (outcomes, token counts, latencies) are recorded here by the HTTP side; engine-level values
// (running / waiting requests, KV blocks, routed tokens per expert) are read from EngineStats
// when the page is rendered.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "engine/engine.h"

namespace moeserve::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);  // upper bounds, increasing; +Inf is implied
  void observe(double v);
  // Appends the _bucket / _sum / _count lines of metric `name`.
  void render(const std::string& name, std::string& out) const;
  uint64_t count() const { return count_; }

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket (not cumulative); last is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

// How a generation request ended, as counted in moeserve_requests_total{outcome=...}.
enum class Outcome { Stop, Length, Cancelled, Error, Invalid, Rejected };
const char* outcome_name(Outcome o);

class Metrics {
 public:
  Metrics();

  void record_request(const std::string& endpoint, Outcome o);
  void record_tokens(int64_t prompt, int64_t generated);
  void record_ttft(double seconds);
  void record_itl(double seconds);
  void record_e2e(double seconds);
  void record_http_status(int status);

  // The whole /metrics page. st.expert_tokens is [layers * n_routed_experts]; layers with
  // moe_layer[l] false (dense) are left out.
  std::string render(const engine::EngineStats& st, int64_t n_routed_experts,
                     const std::vector<bool>& moe_layer) const;

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, Outcome>, uint64_t> requests_;
  std::map<int, uint64_t> http_status_;
  int64_t prompt_tokens_ = 0, generated_tokens_ = 0;
  Histogram ttft_, itl_, e2e_;
};

}  // namespace moeserve::server
