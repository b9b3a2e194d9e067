// The front end on world rank 0 of an mpirun launch (see cluster.h for the whole picture).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "engine/cluster_config.h"
#include "engine/cluster_router.h"
#include "engine/request.h"
#include "engine/wire.h"
#include "model/config.h"

namespace moeserve::engine {

class ClusterFrontEnd final : public Service {
 public:
  ClusterFrontEnd(const model::ModelConfig& mc, comm::Mailbox& mailbox, const ClusterConfig& cfg);
  ~ClusterFrontEnd() override;  // stop()s

  SubmitResult submit(std::shared_ptr<Request> r, uint64_t* id, std::string* error) override;
  void cancel(uint64_t id) override;
  EngineStats stats() const override;
  const EngineConfig& config() const override { return cfg_.engine; }
  const model::ModelConfig& model_config() const override { return mc_; }
  // Names the ranks that stopped answering (nothing from them for cfg.peer_timeout_s), or "".
  std::string health_problem() const override;

  // Tells every rank to stop, waits until all have, finishes what is left as Cancelled.
  // Idempotent. A rank that stays silent is not waited for past the peer timeout (nor a live
  // one past a few times that): then shutdown_problem() says which, and the caller must end
  // the job (comm::Communicator::abort), since the ranks cannot meet again.
  void stop();
  // After stop(): "" when every rank stopped cleanly, else one line naming those that did not.
  std::string shutdown_problem() const;

 private:
  using Clock = std::chrono::steady_clock;
  struct Live;
  struct RankState {
    int64_t running = 0, waiting = 0, kv_total = 0, kv_used = 0, preemptions = 0, steps = 0;
    int64_t kv_peak = 0, waiting_peak = 0;  // high-water marks since start
    int64_t prompt_tokens = 0, generated_tokens = 0;
    int64_t prefix_query_tokens = 0, prefix_hit_tokens = 0, kv_cached = 0;
    int64_t spec_draft_tokens = 0, spec_accepted_tokens = 0;
    std::vector<int64_t> expert_tokens;
    TransferStats transfer;
    int64_t assigned = 0;  // unfinished requests routed here (prefill side: not yet handed off)
  };
  void loop();
  bool finish_stopping(Clock::time_point stop_sent_at);  // true: leave the loop
  void route(uint64_t id, std::shared_ptr<Request> r);
  int pick(int first, int count, const std::vector<uint64_t>& keys);
  void on_message(const comm::Mailbox::Message& m);
  void on_events(wire::Reader& rd);
  void on_stats(wire::Reader& rd, int source);
  void deliver_token(uint64_t id, TokenEvent ev);
  void deliver_finish(uint64_t id, FinishEvent f);  // by value: it may come from the Live erased
  void release(Live& l);
  void post_worker(int dest, std::vector<std::byte> msg);  // counted, for the shutdown
  // Peers: which ranks went silent (or answer again); fails the requests that need them.
  void check_peers();
  std::string down_reason(int group) const;
  std::string who(int rank)
      const;  // "rank 1", or "rank 1 (decode)"  // FE thread: why `group` cannot run, or ""

  model::ModelConfig mc_;
  comm::Mailbox& mb_;
  ClusterConfig cfg_;
  int n_ranks_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<uint64_t, std::shared_ptr<Request>>> queue_;
  std::vector<uint64_t> cancels_;
  uint64_t next_id_ = 1;
  bool stopping_ = false;
  std::vector<RankState> ranks_;                    // under mu_
  std::string problem_;                             // under mu_: health_problem()
  std::string shutdown_problem_;                    // under mu_
  std::map<uint64_t, std::unique_ptr<Live>> live_;  // FE thread only
  // FE thread only: when each rank was last heard from, whether it counts as down, and the
  // shutdown bookkeeping (worker messages posted to each rank, by any rank).
  std::vector<Clock::time_point> last_heard_;
  std::vector<char> down_;
  std::vector<int64_t> posted_to_;
  std::vector<char> said_bye_;
  Router router_;  // under mu_
  std::thread thread_;
  bool stopped_ = false;
};

}  // namespace moeserve::engine
