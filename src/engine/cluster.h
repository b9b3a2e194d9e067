// Serving across the ranks of an mpirun launch.
//
// Every rank runs a ClusterWorker: a Scheduler over its own KV pool, stepping in lockstep with
// the other ranks of its expert-parallel group (each step every rank of the group runs one
// forward, an empty one when it has nothing to do, because the MoE exchanges need all of them).
// World rank 0 also runs the ClusterFrontEnd, the engine::Service the HTTP server talks to: it
// routes each request to a rank, forwards cancellations, and puts the ranks' token events back
// in order. Control traffic goes through a comm::Mailbox; nothing waits for another rank's
// compute loop.
//
// Colocated (default): one group of all ranks; each request runs on one rank (attention is
// data-parallel), chosen least-loaded (KV blocks in use and unfinished requests) or round-robin.
//
// Disaggregated (prefill_ranks + decode_ranks = world size): ranks [0, P) form the prefill
// group, [P, P + D) the decode group, each its own expert-parallel group. A request is prefilled
// on a prefill rank, which samples and streams the first token, then hands it to a decode rank:
// request, block list, token count, first token and sampler state. With one-sided transfer
// (default) the KV pools are exposed as a window once at start-up; the decode rank allocates
// blocks, reads the prefill rank's blocks with passive-target gets and acknowledges, and the
// prefill rank frees its blocks on the acknowledgement (or when their lease runs out). With
// two-sided transfer the prefill rank copies the blocks into the handoff message and frees them
// at once.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "engine/request.h"
#include "engine/scheduler.h"
#include "engine/wire.h"
#include "kv/kv_pool.h"
#include "model/model.h"

namespace moeserve::engine {

enum class RoutePolicy { LeastLoaded, RoundRobin };
enum class KvTransferMode { OneSided, TwoSided };

struct ClusterConfig {
  EngineConfig engine;    // per rank
  int prefill_ranks = 0;  // 0 and 0: colocated
  int decode_ranks = 0;
  RoutePolicy route = RoutePolicy::LeastLoaded;
  KvTransferMode transfer = KvTransferMode::OneSided;
  double transfer_timeout_s = 10;  // a started KV read that takes longer fails its request
  double lease_s = 60;             // a prefill rank keeps handed-off blocks at most this long
  double idle_sleep_s = 0.0005;    // a group with nothing to run checks again after this

  bool disaggregated() const { return prefill_ranks > 0; }
  // The group (0: prefill or colocated, 1: decode) of a world rank.
  int group_of(int world_rank) const {
    return disaggregated() && world_rank >= prefill_ranks ? 1 : 0;
  }
  // Throws moeserve::Error unless the layout fits a world of `world_size` ranks.
  void validate(int world_size) const;
};

// The ranks of one launch and their roles.
class ClusterWorker {
 public:
  // Collective over `world` (creates the KV window in disaggregated one-sided mode). `group` is
  // this rank's expert-parallel group (the model's), `mailbox` spans `world`.
  ClusterWorker(model::Model& m, comm::Communicator& world, comm::Communicator& group,
                comm::Mailbox& mailbox, const ClusterConfig& cfg);
  ~ClusterWorker();  // collective over world, like the constructor

  // Serves until the front end says stop; every rank of the launch calls it once.
  void run();

 private:
  struct Handoff;
  struct Lease;
  void handle(const comm::Mailbox::Message& m);
  void on_prefilled(Prefilled&& p);
  void start_transfers();
  void transfer_loop();
  bool finish_transfers();  // true when one finished
  int64_t in_flight();
  void expire_leases();
  void post_events();
  void post_stats(bool force);
  void note_peaks();
  std::shared_ptr<Request> make_request(uint64_t id);

  model::Model& model_;
  comm::Communicator& world_;
  comm::Communicator& group_;
  comm::Mailbox& mb_;
  ClusterConfig cfg_;
  bool prefill_ = false, decode_ = false;
  kv::KvPool kv_;
  std::unique_ptr<comm::Window> window_;
  std::unique_ptr<Scheduler> sched_;
  wire::Writer events_;  // encoded events of this step
  int64_t n_events_ = 0;
  std::map<uint64_t, int> decode_rank_of_;  // prefill side: request -> its decode rank
  std::map<uint64_t, Lease> leases_;        // prefill side: blocks lent to a decode rank
  std::deque<Handoff> handoffs_;            // decode side: waiting for blocks
  // Decode side: transfers run on their own thread, so decoding goes on meanwhile.
  std::thread xfer_thread_;
  std::mutex xfer_mu_;
  std::condition_variable xfer_cv_;
  std::deque<Handoff> xfer_in_, xfer_out_;  // under xfer_mu_
  int64_t xfer_busy_ = 0;                   // handed to the thread, not yet collected
  bool xfer_stop_ = false;
  std::map<uint64_t, std::chrono::steady_clock::time_point> tombstones_;  // cancelled early
  TransferStats transfer_;
  int64_t kv_peak_ = 0, waiting_peak_ = 0;  // high-water marks, for /metrics
  bool stop_ = false;
  std::chrono::steady_clock::time_point last_stats_;
  std::vector<int64_t> last_sig_;
  // Test hooks: MOESERVE_FAULT_KV_DELAY_MS delays each KV read; MOESERVE_FAULT_NO_ACK keeps
  // the decode side from acknowledging transfers (so prefill leases run out).
  double fault_delay_s_ = 0;
  bool fault_no_ack_ = false;
};

// The front end on world rank 0.
class ClusterFrontEnd final : public Service {
 public:
  ClusterFrontEnd(const model::ModelConfig& mc, comm::Mailbox& mailbox, const ClusterConfig& cfg);
  ~ClusterFrontEnd() override;  // stop()s

  SubmitResult submit(std::shared_ptr<Request> r, uint64_t* id, std::string* error) override;
  void cancel(uint64_t id) override;
  EngineStats stats() const override;
  const EngineConfig& config() const override { return cfg_.engine; }
  const model::ModelConfig& model_config() const override { return mc_; }

  // Tells every rank to stop, waits until all have, finishes what is left as Cancelled.
  // Idempotent.
  void stop();

 private:
  struct Live;
  struct RankState {
    int64_t running = 0, waiting = 0, kv_total = 0, kv_used = 0, preemptions = 0, steps = 0;
    int64_t kv_peak = 0, waiting_peak = 0;  // high-water marks since start
    int64_t prompt_tokens = 0, generated_tokens = 0;
    std::vector<int64_t> expert_tokens;
    TransferStats transfer;
    int64_t assigned = 0;  // unfinished requests routed here (prefill side: not yet handed off)
  };
  void loop();
  void route(uint64_t id, std::shared_ptr<Request> r);
  int pick(int first, int count);
  void on_message(const comm::Mailbox::Message& m);
  void deliver_token(uint64_t id, TokenEvent ev);
  void deliver_finish(uint64_t id, FinishEvent f);  // by value: it may come from the Live erased
  void release(Live& l);

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
  std::map<uint64_t, std::unique_ptr<Live>> live_;  // FE thread only
  int rr_[2] = {0, 0};
  std::thread thread_;
  bool stopped_ = false;
};

}  // namespace moeserve::engine
