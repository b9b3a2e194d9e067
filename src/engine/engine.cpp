#include "engine/engine.h"

#include <algorithm>

#include "core/error.h"

namespace moeserve::engine {

Engine::Engine(model::Model& m, const EngineConfig& cfg)
    : model_(m),
      cfg_(cfg),
      kv_(kv_blocks_for(m.config(), cfg), cfg.block_size, kv_layers_for(m.config(), cfg),
          m.config().kv_cache_dim(), cfg.kv_dtype),
      sched_(m, cfg, kv_) {
  stats_.kv_blocks_total = kv_.n_blocks();
  stats_.kv_tokens_total = kv_.capacity_tokens();
  stats_.kv_dtype = kv_.dtype();
  stats_.kv_bytes_per_token = kv_.n_layers() * kv_.row_bytes();
  // The queue length submit() checks must be current before any token of the step goes out.
  sched_.on_scheduled = [this] { publish_stats(); };
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  sched_.finish_all(FinishReason::Cancelled);
  for (auto& [id, r] : incoming_)
    if (r->on_finish) r->on_finish({FinishReason::Cancelled, "", 0, 0});
}

SubmitResult Engine::submit(std::shared_ptr<Request> r, uint64_t* id, std::string* error) {
  const std::string bad = validate_request(*r, model_.config(), cfg_);
  if (!bad.empty()) {
    if (error) *error = bad;
    return SubmitResult::Invalid;
  }
  std::lock_guard<std::mutex> lk(mu_);
  if (static_cast<int64_t>(incoming_.size()) + stats_.waiting >= cfg_.max_waiting) {
    if (error) *error = "the server is busy: too many requests are waiting";
    return SubmitResult::QueueFull;
  }
  const uint64_t i = next_id_++;
  if (id) *id = i;
  incoming_.emplace_back(i, std::move(r));
  cv_.notify_all();
  return SubmitResult::Accepted;
}

void Engine::cancel(uint64_t id) {
  std::lock_guard<std::mutex> lk(mu_);
  cancels_.push_back(id);
  cv_.notify_all();
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  EngineStats s = stats_;
  s.waiting += static_cast<int64_t>(incoming_.size());
  s.expert_tokens = model_.expert_token_counts();
  return s;
}

void Engine::publish_stats() {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.running = sched_.running();
  stats_.waiting = sched_.waiting();
  stats_.kv_blocks_used = kv_.n_used();
  stats_.preemptions = sched_.preemptions();
  stats_.steps = sched_.steps();
  stats_.prompt_tokens = sched_.prompt_tokens();
  stats_.generated_tokens = sched_.generated_tokens();
  stats_.prefix_query_tokens = sched_.prefix_query_tokens();
  stats_.prefix_hit_tokens = sched_.prefix_hit_tokens();
  stats_.kv_blocks_cached = kv_.n_cached();
  stats_.spec_draft_tokens = sched_.spec_draft_tokens();
  stats_.spec_accepted_tokens = sched_.spec_accepted_tokens();
}

// Only incoming_, cancels_, stop_ and stats_ are shared (under mu_); the scheduler belongs to
// this thread, and request callbacks run without the lock held.
void Engine::loop() {
  for (;;) {
    std::vector<uint64_t> cancels;
    {
      // Moved under the lock, so that submit() always sees them counted as waiting.
      std::lock_guard<std::mutex> lk(mu_);
      for (auto& [id, r] : incoming_) sched_.add(id, std::move(r));
      incoming_.clear();
      stats_.waiting = sched_.waiting();
      cancels.swap(cancels_);
    }
    for (uint64_t id : cancels) sched_.cancel(id);
    bool progressed = false;
    try {
      progressed = sched_.step();
    } catch (const std::exception&) {
      progressed = true;  // the requests in the failed step were failed; the engine goes on
    }
    publish_stats();
    std::unique_lock<std::mutex> lk(mu_);
    // Sleep while there is nothing new and nothing runnable.
    cv_.wait(lk, [&] {
      return stop_ || !incoming_.empty() || !cancels_.empty() || (progressed && sched_.has_work());
    });
    if (stop_) return;
  }
}

}  // namespace moeserve::engine
