// The serving loop every rank of an mpirun launch runs (see cluster.h for the whole picture).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "engine/cluster_config.h"
#include "engine/request.h"
#include "engine/scheduler.h"
#include "engine/wire.h"
#include "kv/kv_pool.h"
#include "model/model.h"

namespace moeserve::engine {

class ClusterWorker {
 public:
  // Collective over `world` (creates the KV window in disaggregated one-sided mode). `group` is
  // this rank's expert-parallel group (the model's), `mailbox` spans `world`.
  ClusterWorker(model::Model& m, comm::Communicator& world, comm::Communicator& group,
                comm::Mailbox& mailbox, const ClusterConfig& cfg);
  ~ClusterWorker();  // collective over world, like the constructor

  // Serves until the front end says stop, then takes every message still meant for this
  // rank; every rank of the launch calls it once.
  void run();

 private:
  using Clock = std::chrono::steady_clock;
  // Decode side: a request handed over by a prefill rank, until its blocks are here.
  struct Handoff {
    uint64_t id = 0;
    int src = -1;  // the prefill rank
    std::shared_ptr<Request> req;
    std::vector<int32_t> tokens;
    int64_t n_prompt = 0;
    std::vector<int32_t> blocks;  // on the prefill rank
    std::string sampler_state;
    int64_t cached_tokens = 0;       // found in the prefill rank's prefix cache
    std::vector<int32_t> drafts;     // speculative decoding: the MTP module's, and (sampled)
    std::vector<float> draft_q;      // their distributions (Prefilled)
    std::vector<std::byte> payload;  // two-sided: the blocks' bytes
    Clock::time_point arrived;
    std::vector<int32_t> mine;  // its blocks here, once allocated
    int64_t n_reused = 0;       // the first of them, from this rank's prefix cache (not moved)
    double seconds = 0;         // the transfer's time
  };
  // Prefill side: blocks lent to a decode rank until it acknowledges, at most until `until`.
  struct Lease {
    std::vector<int32_t> blocks;
    Clock::time_point until;
  };
  void handle(const comm::Mailbox::Message& m);
  std::optional<comm::Mailbox::Message> take();            // the next message for this worker
  void post_worker(int dest, std::vector<std::byte> msg);  // to another rank's worker, counted
  void shut_down();
  void heartbeat_loop();
  void stop_heartbeat();
  void post_events();
  void post_stats(bool force);
  void note_peaks();
  std::shared_ptr<Request> make_request(uint64_t id);
  // KV handoffs (cluster_transfer.cpp): the prefill side hands off and lends its blocks, the
  // decode side reads them on a thread of its own.
  void on_prefilled(Prefilled&& p);
  void on_handoff(wire::Reader& rd, int source);
  void on_ack(uint64_t id);
  bool cancel_handoff(uint64_t id);  // decode side: true when the request was found
  void expire_leases();
  void start_transfers();
  void transfer_loop();
  bool finish_transfers();  // true when one finished
  void check_transfer_deadline();
  void stop_transfers();  // joins the transfer thread; what it had not done is cancelled
  int64_t in_flight();

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
  uint64_t xfer_cur_ = 0;  // under xfer_mu_: the request being read now (0: none)
  int xfer_cur_src_ = -1;  // and its prefill rank, prompt and generated tokens
  int64_t xfer_cur_prompt_ = 0, xfer_cur_generated_ = 0;
  Clock::time_point xfer_start_;  // when its read started
  std::set<uint64_t> abandoned_;  // failed by the deadline while their read went on
  std::map<uint64_t, Clock::time_point> tombstones_;  // cancelled early
  TransferStats transfer_;
  int64_t kv_peak_ = 0, waiting_peak_ = 0;  // high-water marks, for /metrics
  bool stop_ = false;
  Clock::time_point last_stats_;
  std::vector<int64_t> last_sig_;
  // Shutdown bookkeeping (cluster_protocol.h): worker messages posted to each rank, and taken.
  std::vector<int64_t> sent_to_;
  int64_t taken_ = 0;
  // The heartbeat: a thread of its own, so a long step or a wait in a collective does not
  // silence it.
  std::thread beat_thread_;
  std::mutex beat_mu_;
  std::condition_variable beat_cv_;
  bool beat_stop_ = false;
  // Test hooks: MOESERVE_FAULT_KV_DELAY_MS delays each KV read; MOESERVE_FAULT_NO_ACK keeps
  // the decode side from acknowledging transfers (so prefill leases run out).
  double fault_delay_s_ = 0;
  bool fault_no_ack_ = false;
};

}  // namespace moeserve::engine
