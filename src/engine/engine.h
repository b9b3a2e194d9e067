// The serving engine of one process: a Scheduler (continuous batching over a paged latent KV
// cache) driven by its own thread. Requests are submitted from any thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "engine/request.h"
#include "engine/scheduler.h"
#include "kv/kv_pool.h"
#include "model/model.h"

namespace moeserve::engine {

class Engine final : public Service {
 public:
  Engine(model::Model& m, const EngineConfig& cfg);
  ~Engine() override;  // stops the engine thread; unfinished requests finish as Cancelled

  // Queues a request; returns its id through *id. Invalid: see validate_request (message in
  // *error); QueueFull: max_waiting requests already wait.
  SubmitResult submit(std::shared_ptr<Request> r, uint64_t* id, std::string* error) override;
  void cancel(uint64_t id) override;
  EngineStats stats() const override;
  const EngineConfig& config() const override { return cfg_; }
  const model::ModelConfig& model_config() const override { return model_.config(); }

 private:
  void loop();
  void publish_stats();

  model::Model& model_;
  EngineConfig cfg_;
  kv::KvPool kv_;
  Scheduler sched_;  // engine thread only
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<uint64_t, std::shared_ptr<Request>>> incoming_;
  std::vector<uint64_t> cancels_;
  std::atomic<uint64_t> next_id_{1};
  bool stop_ = false;
  EngineStats stats_;
  std::thread thread_;
};

}  // namespace moeserve::engine
