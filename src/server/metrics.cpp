#include "server/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

namespace moeserve::server {

namespace {

std::string num(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, r.ptr);
}

void header(std::string& out, const std::string& name, const char* type, const char* help) {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void sample(std::string& out, const std::string& name, const std::string& labels, double v) {
  out += name;
  if (!labels.empty()) out += "{" + labels + "}";
  out += " " + num(v) + "\n";
}

void gauge(std::string& out, const std::string& name, const char* help, double v) {
  header(out, name, "gauge", help);
  sample(out, name, "", v);
}

void counter(std::string& out, const std::string& name, const char* help, double v) {
  header(out, name, "counter", help);
  sample(out, name, "", v);
}

}  // namespace

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  const size_t i = std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();
  ++counts_[i];
  sum_ += v;
  ++count_;
}

void Histogram::render(const std::string& name, std::string& out) const {
  uint64_t cum = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    cum += counts_[i];
    const std::string le = i < bounds_.size() ? num(bounds_[i]) : "+Inf";
    sample(out, name + "_bucket", "le=\"" + le + "\"", static_cast<double>(cum));
  }
  sample(out, name + "_sum", "", sum_);
  sample(out, name + "_count", "", static_cast<double>(count_));
}

const char* outcome_name(Outcome o) {
  switch (o) {
    case Outcome::Stop:
      return "stop";
    case Outcome::Length:
      return "length";
    case Outcome::Cancelled:
      return "cancelled";
    case Outcome::Error:
      return "error";
    case Outcome::Invalid:
      return "invalid";
    case Outcome::Rejected:
      return "rejected";
  }
  return "unknown";
}

Metrics::Metrics()
    : ttft_({0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
             10.0, 20.0, 40.0, 80.0}),
      itl_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
            1.0, 2.5, 5.0, 10.0, 20.0}),
      e2e_({0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
            600.0}) {}

void Metrics::record_request(const std::string& endpoint, Outcome o) {
  std::lock_guard<std::mutex> lk(mu_);
  ++requests_[{endpoint, o}];
}

void Metrics::record_tokens(int64_t prompt, int64_t generated) {
  std::lock_guard<std::mutex> lk(mu_);
  prompt_tokens_ += prompt;
  generated_tokens_ += generated;
}

void Metrics::record_ttft(double s) {
  std::lock_guard<std::mutex> lk(mu_);
  ttft_.observe(s);
}

void Metrics::record_itl(double s) {
  std::lock_guard<std::mutex> lk(mu_);
  itl_.observe(s);
}

void Metrics::record_e2e(double s) {
  std::lock_guard<std::mutex> lk(mu_);
  e2e_.observe(s);
}

void Metrics::record_http_status(int status) {
  std::lock_guard<std::mutex> lk(mu_);
  ++http_status_[status];
}

std::string Metrics::render(const engine::EngineStats& st, int64_t n_experts,
                            const std::vector<bool>& moe_layer) const {
  std::string out;
  out.reserve(8192);
  {
    std::lock_guard<std::mutex> lk(mu_);
    header(out, "moeserve_requests_total", "counter",
           "Generation requests by endpoint and outcome (stop, length, cancelled, error, "
           "invalid, rejected).");
    for (const char* ep : {"chat", "completions"})
      for (Outcome o : {Outcome::Stop, Outcome::Length, Outcome::Cancelled, Outcome::Error,
                        Outcome::Invalid, Outcome::Rejected}) {
        auto it = requests_.find({ep, o});
        sample(out, "moeserve_requests_total",
               std::string("endpoint=\"") + ep + "\",outcome=\"" + outcome_name(o) + "\"",
               it == requests_.end() ? 0.0 : static_cast<double>(it->second));
      }
    header(out, "moeserve_http_responses_total", "counter", "HTTP responses by status code.");
    for (const auto& [code, n] : http_status_)
      sample(out, "moeserve_http_responses_total", "status=\"" + std::to_string(code) + "\"",
             static_cast<double>(n));
    counter(out, "moeserve_prompt_tokens_total", "Prompt tokens of accepted requests.",
            static_cast<double>(prompt_tokens_));
    counter(out, "moeserve_generation_tokens_total", "Tokens generated for clients.",
            static_cast<double>(generated_tokens_));
    header(out, "moeserve_time_to_first_token_seconds", "histogram",
           "Time from request arrival to its first generated token.");
    ttft_.render("moeserve_time_to_first_token_seconds", out);
    header(out, "moeserve_inter_token_latency_seconds", "histogram",
           "Time between consecutive generated tokens of a request.");
    itl_.render("moeserve_inter_token_latency_seconds", out);
    header(out, "moeserve_e2e_request_latency_seconds", "histogram",
           "Time from request arrival to its last token.");
    e2e_.render("moeserve_e2e_request_latency_seconds", out);
  }
  gauge(out, "moeserve_num_requests_running", "Sequences in the running batch.",
        static_cast<double>(st.running));
  gauge(out, "moeserve_num_requests_waiting", "Requests queued or preempted, not running.",
        static_cast<double>(st.waiting));
  gauge(out, "moeserve_kv_blocks_total", "KV cache blocks in the pool.",
        static_cast<double>(st.kv_blocks_total));
  gauge(out, "moeserve_kv_capacity_tokens", "Token positions the KV cache holds.",
        static_cast<double>(st.kv_tokens_total));
  gauge(out, "moeserve_kv_bytes_per_token", "KV cache bytes per token position (all layers).",
        static_cast<double>(st.kv_bytes_per_token));
  header(out, "moeserve_kv_cache_dtype", "gauge", "How the KV cache stores its rows (the label).");
  sample(out, "moeserve_kv_cache_dtype",
         std::string("dtype=\"") + kv::kv_dtype_name(st.kv_dtype) + "\"", 1);
  gauge(out, "moeserve_kv_blocks_used", "KV cache blocks held by sequences.",
        static_cast<double>(st.kv_blocks_used));
  gauge(out, "moeserve_kv_blocks_free", "KV cache blocks free.",
        static_cast<double>(st.kv_blocks_total - st.kv_blocks_used));
  counter(out, "moeserve_engine_preemptions_total", "Sequences preempted for lack of KV blocks.",
          static_cast<double>(st.preemptions));
  counter(out, "moeserve_engine_steps_total", "Engine steps (forward passes).",
          static_cast<double>(st.steps));
  counter(out, "moeserve_engine_prompt_tokens_total",
          "Prompt tokens computed by the engine (including recomputation after preemption).",
          static_cast<double>(st.prompt_tokens));
  counter(out, "moeserve_engine_generated_tokens_total", "Tokens sampled by the engine.",
          static_cast<double>(st.generated_tokens));
  counter(out, "moeserve_prefix_cache_queries_total",
          "Prompt tokens looked up in the prefix cache (once per request).",
          static_cast<double>(st.prefix_query_tokens));
  counter(out, "moeserve_prefix_cache_hits_total",
          "Prompt tokens found in the prefix cache (their KV blocks were reused, not computed).",
          static_cast<double>(st.prefix_hit_tokens));
  counter(out, "moeserve_spec_decode_draft_tokens_total",
          "Speculative decoding: tokens the MTP module drafted that the main model verified.",
          static_cast<double>(st.spec_draft_tokens));
  counter(out, "moeserve_spec_decode_accepted_tokens_total",
          "Speculative decoding: drafted tokens the main model accepted.",
          static_cast<double>(st.spec_accepted_tokens));
  gauge(out, "moeserve_spec_decode_acceptance_rate",
        "Speculative decoding: accepted draft tokens over those verified, since start.",
        st.spec_draft_tokens > 0 ? static_cast<double>(st.spec_accepted_tokens) /
                                       static_cast<double>(st.spec_draft_tokens)
                                 : 0.0);
  gauge(out, "moeserve_prefix_cache_hit_rate",
        "Prompt tokens found in the prefix cache over those looked up, since start.",
        st.prefix_query_tokens > 0 ? static_cast<double>(st.prefix_hit_tokens) /
                                         static_cast<double>(st.prefix_query_tokens)
                                   : 0.0);
  if (!st.rank_lines.empty())
    counter(out, "moeserve_prefix_routed_requests_total",
            "Requests sent to a rank for the prompt prefix it caches, not the least-loaded one.",
            static_cast<double>(st.prefix_routed));
  gauge(out, "moeserve_kv_blocks_cached",
        "KV cache blocks in the prefix cache (held by sequences or kept for reuse).",
        static_cast<double>(st.kv_blocks_cached));
  header(out, "moeserve_expert_routed_tokens_total", "counter",
         "Tokens routed to each routed expert of each MoE layer.");
  if (n_experts > 0) {
    const int64_t layers = static_cast<int64_t>(st.expert_tokens.size()) / n_experts;
    for (int64_t l = 0; l < layers; ++l) {
      if (l < static_cast<int64_t>(moe_layer.size()) && !moe_layer[l]) continue;
      for (int64_t e = 0; e < n_experts; ++e)
        sample(out, "moeserve_expert_routed_tokens_total",
               "layer=\"" + std::to_string(l) + "\",expert=\"" + std::to_string(e) + "\"",
               static_cast<double>(st.expert_tokens[l * n_experts + e]));
    }
  }
  if (!st.rank_lines.empty()) {
    // Grouped by metric name, each group after its header.
    std::vector<std::string> lines = st.rank_lines;
    auto name = [](const std::string& l) { return l.substr(0, l.find_first_of("{ ")); };
    std::stable_sort(lines.begin(), lines.end(),
                     [&](const std::string& x, const std::string& y) { return name(x) < name(y); });
    std::string last;
    for (const std::string& l : lines) {
      if (name(l) != last) {
        last = name(l);
        header(out, last, "gauge", "Per-rank engine state (rank, role) under mpirun.");
      }
      out += l + "\n";
    }
  }
  if (st.disaggregated) {
    const engine::TransferStats& t = st.transfer;
    counter(out, "moeserve_kv_transfers_total",
            "Prompt KV caches moved from a prefill rank to a decode rank.",
            static_cast<double>(t.transfers));
    counter(out, "moeserve_kv_transfer_bytes_total", "Bytes of KV cache moved.",
            static_cast<double>(t.bytes));
    counter(out, "moeserve_kv_transfer_blocks_reused_total",
            "Prompt KV blocks a decode rank found in its own prefix cache, so not moved.",
            static_cast<double>(t.blocks_reused));
    counter(out, "moeserve_kv_transfer_failures_total",
            "KV transfers that failed their request (timed out, or no decode blocks in time).",
            static_cast<double>(t.failures));
    counter(out, "moeserve_kv_leases_expired_total",
            "Handed-off prefill blocks freed because no acknowledgement came in time.",
            static_cast<double>(t.leases_expired));
    header(out, "moeserve_kv_transfer_seconds", "histogram",
           "Time to move one request's KV cache (decode side).");
    const auto& bounds = engine::kv_transfer_buckets();
    double cum = 0;
    int64_t count = 0;
    for (int64_t c : t.latency_buckets) count += c;
    for (size_t i = 0; i <= bounds.size(); ++i) {
      cum += i < t.latency_buckets.size() ? static_cast<double>(t.latency_buckets[i]) : 0.0;
      char le[32];
      if (i < bounds.size())
        std::snprintf(le, sizeof le, "%g", bounds[i]);
      else
        std::snprintf(le, sizeof le, "+Inf");
      sample(out, "moeserve_kv_transfer_seconds_bucket", std::string("le=\"") + le + "\"", cum);
    }
    sample(out, "moeserve_kv_transfer_seconds_sum", "", t.latency_sum);
    sample(out, "moeserve_kv_transfer_seconds_count", "", static_cast<double>(count));
  }
  return out;
}

}  // namespace moeserve::server
