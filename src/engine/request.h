// What the serving engine takes and reports: requests, their token and finish events, the
// engine's settings and statistics, and the interface every engine front (one process, or a
// cluster of ranks under mpirun) offers to the HTTP server.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "kv/kv_pool.h"
#include "model/config.h"

namespace moeserve::engine {

// One generated token, as the engine reports it.
struct TokenEvent {
  int32_t token = 0;
  int64_t index = 0;                           // 0 for the first generated token
  float logprob = 0.0f;                        // log P(token), when the request asked
  std::vector<std::pair<int32_t, float>> top;  // top_logprobs alternatives, most likely first
  int64_t cached_tokens = 0;  // prompt tokens taken from the prefix cache (FinishEvent's)
};

enum class FinishReason { Stop, Length, Cancelled, Error };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "cancelled", "error"

struct FinishEvent {
  FinishReason reason = FinishReason::Stop;
  std::string error;  // for Error
  int64_t prompt_tokens = 0, completion_tokens = 0;
  int64_t cached_tokens = 0;  // prompt tokens taken from the prefix cache, not computed
};

struct Request {
  std::vector<int32_t> prompt;
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;  // finish (reason Stop) after emitting one of these
  int top_logprobs = -1;          // -1: no logprobs; 0..20: chosen token's plus that many others
  // Called on an engine thread, in order; on_finish exactly once, last. Keep them short; they
  // may call cancel and stats but must not block.
  std::function<void(const TokenEvent&)> on_token;
  std::function<void(const FinishEvent&)> on_finish;
};

// Compiles a structured-output constraint from its spec (TokenConstraint::spec()); throws
// moeserve::Error when the spec is invalid.
using ConstraintCompiler =
    std::function<std::shared_ptr<const TokenConstraint>(const std::string& spec)>;

struct EngineConfig {
  int64_t max_num_seqs = 16;     // running sequences at once
  int64_t max_model_len = 4096;  // prompt + output tokens of one sequence
  int64_t kv_blocks = 0;         // 0: derive from kv_cache_mb
  int64_t kv_cache_mb = 256;
  kv::KvDtype kv_dtype = kv::kDefaultKvDtype;  // how the cache stores its rows
  int64_t block_size = 16;                     // token positions per KV block
  int64_t max_batch_tokens = 256;              // tokens per step (chunked prefill budget)
  int64_t max_waiting = 256;                   // queued requests before submit() refuses
  bool prefix_caching = true;  // share computed full KV blocks across requests (kv_pool.h)
  // Speculative decoding: tokens the model's MTP module drafts per step, which one forward of
  // the main model verifies (0: off). Needs the module (Model::load_mtp) and a KV pool of
  // kv_layers_for() layers.
  int64_t speculative_tokens = 0;
  // How a rank compiles the constraints of the requests it receives (under mpirun); unset, a
  // constrained request fails there.
  ConstraintCompiler compile_constraint;
};

// Upper bounds (seconds) of the KV transfer latency histogram buckets; +Inf is implied.
inline const std::vector<double>& kv_transfer_buckets() {
  static const std::vector<double> b = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                        0.05,   0.1,   0.25,   0.5,   1.0,  2.5};
  return b;
}

// Prefill/decode disaggregation counters (zero when colocated).
struct TransferStats {
  int64_t transfers = 0, bytes = 0, failures = 0, leases_expired = 0;
  int64_t blocks_reused = 0;             // prompt blocks the decode rank held already (not moved)
  std::vector<int64_t> latency_buckets;  // [kv_transfer_buckets().size() + 1], not cumulative
  double latency_sum = 0;
  void add(const TransferStats& o);
};

struct EngineStats {
  int64_t running = 0, waiting = 0;
  int64_t kv_blocks_total = 0, kv_blocks_used = 0;
  // The cache's capacity in token positions (all ranks' pools), its row dtype and its bytes per
  // token (all layers, one rank's pool).
  int64_t kv_tokens_total = 0, kv_bytes_per_token = 0;
  kv::KvDtype kv_dtype = kv::kDefaultKvDtype;
  int64_t preemptions = 0, steps = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;  // totals since start
  // Prefix cache: prompt tokens looked up and found (on each request's first admission),
  // and the blocks published now (held or evictable).
  int64_t prefix_query_tokens = 0, prefix_hit_tokens = 0, kv_blocks_cached = 0;
  int64_t prefix_routed = 0;  // under mpirun: requests routed to a rank for its cached prefix
  // Speculative decoding: draft tokens verified, and those of them accepted.
  int64_t spec_draft_tokens = 0, spec_accepted_tokens = 0;
  std::vector<int64_t> expert_tokens;  // [layers * n_routed_experts] routed token counts
  bool disaggregated = false;
  TransferStats transfer;
  std::vector<std::string> rank_lines;  // per-rank gauges, Prometheus lines (under mpirun)
};

enum class SubmitResult { Accepted, QueueFull, Invalid };

// Why `r` cannot run (empty prompt, prompt + 1 longer than max_model_len, max_tokens < 1, token
// ids out of range), or "" when it can.
std::string validate_request(const Request& r, const model::ModelConfig& m,
                             const EngineConfig& cfg);

// What the HTTP server needs of an engine.
class Service {
 public:
  virtual ~Service() = default;
  // Queues a request; returns its id through *id (message in *error unless Accepted).
  virtual SubmitResult submit(std::shared_ptr<Request> r, uint64_t* id, std::string* error) = 0;
  // Finishes it as Cancelled and frees its blocks (asynchronously); unknown ids are ignored.
  virtual void cancel(uint64_t id) = 0;
  virtual EngineStats stats() const = 0;
  virtual const EngineConfig& config() const = 0;
  virtual const model::ModelConfig& model_config() const = 0;
  // Empty while the service can serve; otherwise one line saying what is wrong (for example a
  // rank that stopped answering). /health answers 503 with it.
  virtual std::string health_problem() const { return {}; }
};

}  // namespace moeserve::engine
