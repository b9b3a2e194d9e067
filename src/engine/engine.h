// The serving engine: continuous batching over a paged latent KV cache. Requests are submitted
// from any thread; one engine thread runs steps. Each step, running sequences decode one token
// and waiting or partly prefilled ones get prompt chunks, within a per-step token budget, so a
// long prompt never stalls decoding. When KV blocks run out, the newest running sequence is
// preempted (its blocks freed) and later recomputed; nothing crashes.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/sampler.h"
#include "kv/kv_pool.h"
#include "model/model.h"

namespace moeserve::engine {

// One generated token, as the engine reports it.
struct TokenEvent {
  int32_t token = 0;
  float logprob = 0.0f;                        // log P(token), when the request asked
  std::vector<std::pair<int32_t, float>> top;  // top_logprobs alternatives, most likely first
};

enum class FinishReason { Stop, Length, Cancelled, Error };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "cancelled", "error"

struct FinishEvent {
  FinishReason reason = FinishReason::Stop;
  std::string error;  // for Error
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

struct Request {
  std::vector<int32_t> prompt;
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;  // finish (reason Stop) after emitting one of these
  int top_logprobs = -1;          // -1: no logprobs; 0..20: chosen token's plus that many others
  // Called on the engine thread, in order; on_finish exactly once, last. Keep them short; they
  // may call Engine::cancel and stats but must not block.
  std::function<void(const TokenEvent&)> on_token;
  std::function<void(const FinishEvent&)> on_finish;
};

struct EngineConfig {
  int64_t max_num_seqs = 16;     // running sequences at once
  int64_t max_model_len = 4096;  // prompt + output tokens of one sequence
  int64_t kv_blocks = 0;         // 0: derive from kv_cache_mb
  int64_t kv_cache_mb = 256;
  int64_t block_size = 16;         // token positions per KV block
  int64_t max_batch_tokens = 256;  // tokens per step (chunked prefill budget)
  int64_t max_waiting = 256;       // queued requests before submit() refuses
};

struct EngineStats {
  int64_t running = 0, waiting = 0;
  int64_t kv_blocks_total = 0, kv_blocks_used = 0;
  int64_t preemptions = 0, steps = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;  // totals since start
  std::vector<int64_t> expert_tokens;  // [layers * n_routed_experts] routed token counts
};

enum class SubmitResult { Accepted, QueueFull, Invalid };

class Engine {
 public:
  Engine(model::Model& m, const EngineConfig& cfg);
  ~Engine();  // stops the engine thread; unfinished requests finish as Cancelled

  // Queues a request; returns its id through *id. Invalid: empty prompt, prompt + 1 longer
  // than max_model_len, max_tokens < 1, token ids out of range (message in *error).
  SubmitResult submit(std::shared_ptr<Request> r, uint64_t* id, std::string* error);
  void cancel(uint64_t id);  // finishes it as Cancelled and frees its blocks (asynchronously)
  EngineStats stats() const;
  const EngineConfig& config() const { return cfg_; }
  const model::ModelConfig& model_config() const { return model_.config(); }

 private:
  struct Seq;
  void loop();
  bool step();  // false when there was nothing to do
  void finish(Seq& s, FinishReason r, const std::string& err = "");
  bool ensure_blocks(Seq& s, int64_t n_positions);
  void preempt(Seq& s);
  void publish_stats();

  model::Model& model_;
  EngineConfig cfg_;
  kv::KvPool kv_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Seq>> incoming_;
  std::vector<uint64_t> cancels_;
  std::vector<std::unique_ptr<Seq>> running_;  // admitted, in admission order
  std::deque<std::unique_ptr<Seq>> waiting_;   // not admitted (or preempted), FIFO
  std::atomic<uint64_t> next_id_{1};
  bool stop_ = false;
  EngineStats stats_;
  std::vector<float> logits_;
  std::thread thread_;
};

}  // namespace moeserve::engine
