// ClusterWorker: the loop every rank runs, its messages, events, statistics and heartbeat.
// The KV handoffs between prefill and decode ranks are in cluster_transfer.cpp.
#include <algorithm>
#include <cstdlib>

#include "core/error.h"
#include "engine/cluster.h"
#include "engine/cluster_protocol.h"

namespace moeserve::engine {

using namespace cluster;

ClusterWorker::ClusterWorker(model::Model& m, comm::Communicator& world, comm::Communicator& group,
                             comm::Mailbox& mailbox, const ClusterConfig& cfg)
    : model_(m),
      world_(world),
      group_(group),
      mb_(mailbox),
      cfg_(cfg),
      prefill_(cfg.disaggregated() && cfg.group_of(world.rank()) == 0),
      decode_(cfg.disaggregated() && cfg.group_of(world.rank()) == 1),
      kv_(kv_blocks_for(m.config(), cfg.engine), cfg.engine.block_size,
          kv_layers_for(m.config(), cfg.engine), m.config().kv_cache_dim(), cfg.engine.kv_dtype),
      sent_to_(mailbox.size(), 0) {
  sched_ = std::make_unique<Scheduler>(m, cfg.engine, kv_);
  // High-water marks, taken once a step's batch is chosen (blocks allocated, admissions done).
  sched_->on_scheduled = [this] { note_peaks(); };
  if (prefill_) {
    sched_->set_prefill_only(true);
    sched_->on_prefilled = [this](Prefilled&& p) { on_prefilled(std::move(p)); };
  }
  if (cfg.disaggregated() && cfg.transfer == KvTransferMode::OneSided)
    window_ = world_.expose(kv_.block_data(0), kv_.block_bytes() * kv_.n_blocks());
  if (const char* d = std::getenv("MOESERVE_FAULT_KV_DELAY_MS"))
    fault_delay_s_ = std::atof(d) / 1e3;
  fault_no_ack_ = std::getenv("MOESERVE_FAULT_NO_ACK") != nullptr;
  if (decode_) xfer_thread_ = std::thread([this] { transfer_loop(); });
  transfer_.latency_buckets.assign(kv_transfer_buckets().size() + 1, 0);
  last_stats_ = Clock::now() - std::chrono::hours(1);
}

ClusterWorker::~ClusterWorker() {
  stop_heartbeat();
  if (xfer_thread_.joinable()) {  // run() was never called, or failed
    {
      std::lock_guard<std::mutex> lk(xfer_mu_);
      xfer_stop_ = true;
    }
    xfer_cv_.notify_all();
    xfer_thread_.join();
  }
}

std::shared_ptr<Request> ClusterWorker::make_request(uint64_t id) {
  auto r = std::make_shared<Request>();
  r->on_token = [this, id](const TokenEvent& e) {
    events_.put(Ev::Token).put(id).put(e.index).put(e.token).put(e.logprob).put(e.cached_tokens);
    events_.put<uint64_t>(e.top.size());
    for (const auto& alt : e.top) events_.put(alt.first);
    events_.put<uint64_t>(e.top.size());
    for (const auto& alt : e.top) events_.put(alt.second);
    ++n_events_;
  };
  r->on_finish = [this, id](const FinishEvent& f) {
    events_.put(Ev::Finish).put(id).put(static_cast<uint8_t>(f.reason)).put_str(f.error);
    events_.put(f.prompt_tokens).put(f.completion_tokens).put(f.cached_tokens);
    ++n_events_;
    decode_rank_of_.erase(id);
  };
  return r;
}

std::optional<comm::Mailbox::Message> ClusterWorker::take() {
  auto m = mb_.poll(kToWorker);
  if (m) ++taken_;
  return m;
}

void ClusterWorker::post_worker(int dest, std::vector<std::byte> msg) {
  ++sent_to_[dest];
  mb_.post(dest, kToWorker, std::move(msg));
}

void ClusterWorker::handle(const comm::Mailbox::Message& m) {
  wire::Reader rd(m.data);
  const Msg kind = rd.get<Msg>();
  switch (kind) {
    case Msg::Assign: {
      const uint64_t id = rd.get<uint64_t>();
      const int decode_rank = rd.get<int>();
      std::shared_ptr<Request> r = make_request(id);
      read_request(rd, *r, cfg_.engine.compile_constraint);
      if (prefill_) decode_rank_of_[id] = decode_rank;
      sched_->add(id, std::move(r));
      break;
    }
    case Msg::Cancel: {
      const uint64_t id = rd.get<uint64_t>();
      if (sched_->cancel(id)) break;
      if (decode_ && !cancel_handoff(id))
        tombstones_[id] = Clock::now();  // its handoff may still be on the way, or moving
      break;
    }
    case Msg::Handoff:
      on_handoff(rd, m.source);
      break;
    case Msg::Ack:
      on_ack(rd.get<uint64_t>());
      break;
    case Msg::Stop:
      stop_ = true;
      break;
    default:
      fail("cluster: unexpected message kind ", static_cast<int>(kind), " from rank ", m.source);
  }
}

void ClusterWorker::post_events() {
  if (!n_events_) return;
  wire::Writer w;
  w.put(Msg::Events).put(n_events_);
  const std::vector<std::byte> body = events_.take();
  w.raw(body.data(), body.size());
  mb_.post(0, kToFrontEnd, w.take());
  n_events_ = 0;
}

void ClusterWorker::note_peaks() {
  kv_peak_ = std::max(kv_peak_, kv_.n_used());
  waiting_peak_ = std::max(
      waiting_peak_, sched_->waiting() + static_cast<int64_t>(handoffs_.size()) + in_flight());
}

void ClusterWorker::post_stats(bool force) {
  note_peaks();
  std::vector<int64_t> sig = {
      sched_->running(),
      sched_->waiting() + static_cast<int64_t>(handoffs_.size()) + in_flight(),
      kv_.n_used(),
      sched_->steps(),
      transfer_.transfers,
      transfer_.failures,
      transfer_.leases_expired,
      kv_peak_,
      waiting_peak_,
      sched_->prefix_query_tokens(),
      kv_.n_cached(),
      sched_->spec_draft_tokens()};
  if (sig == last_sig_ || (!force && since(last_stats_) < 0.02)) return;
  last_sig_ = sig;
  last_stats_ = Clock::now();
  wire::Writer w;
  w.put(Msg::Stats).put(sig[0]).put(sig[1]).put(kv_.n_blocks()).put(sig[2]);
  w.put(kv_peak_).put(waiting_peak_);
  w.put(sched_->preemptions()).put(sched_->steps()).put(sched_->prompt_tokens());
  w.put(sched_->generated_tokens()).put_vec(model_.expert_token_counts());
  w.put(transfer_.transfers).put(transfer_.bytes).put(transfer_.failures);
  w.put(transfer_.leases_expired).put_vec(transfer_.latency_buckets).put(transfer_.latency_sum);
  w.put(sched_->prefix_query_tokens()).put(sched_->prefix_hit_tokens()).put(kv_.n_cached());
  w.put(transfer_.blocks_reused);
  w.put(sched_->spec_draft_tokens()).put(sched_->spec_accepted_tokens());
  mb_.post(0, kToFrontEnd, w.take());
}

void ClusterWorker::heartbeat_loop() {
  std::unique_lock<std::mutex> lk(beat_mu_);
  while (!beat_stop_) {
    mb_.post(0, kToFrontEnd, simple(Msg::Alive));
    beat_cv_.wait_for(lk, seconds(cfg_.heartbeat_s()), [&] { return beat_stop_; });
  }
}

void ClusterWorker::stop_heartbeat() {
  if (!beat_thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lk(beat_mu_);
    beat_stop_ = true;
  }
  beat_cv_.notify_all();
  beat_thread_.join();
}

void ClusterWorker::run() {
  beat_thread_ = std::thread([this] { heartbeat_loop(); });
  bool progressed = false;
  for (;;) {
    bool input = false;
    while (auto m = take()) {
      handle(*m);
      input = true;
    }
    if (decode_) {
      check_transfer_deadline();
      input = finish_transfers() || input;
      start_transfers();
    }
    expire_leases();
    // The group agrees whether to step (and whether to stop), and whether any rank may
    // speculate in the step: every rank of an expert-parallel group must run the same number of
    // forwards of the model and of its MTP module.
    int64_t flags[3] = {sched_->has_work() && (progressed || input) ? 1 : 0, stop_ ? 1 : 0,
                        sched_->may_speculate() ? 1 : 0};
    if (group_.size() > 1) group_.all_reduce(flags, 3, comm::ReduceOp::Max);
    if (flags[1]) break;
    if (!flags[0]) {
      post_events();
      post_stats(true);
      progressed = false;
      std::this_thread::sleep_for(std::chrono::duration<double>(cfg_.idle_sleep_s));
      continue;
    }
    try {
      progressed = sched_->step(group_.size() > 1, flags[2] != 0);
    } catch (const std::exception&) {
      progressed = true;  // its requests failed; go on
    }
    post_events();
    post_stats(false);
  }
  shut_down();
}

// What is left is cancelled and the front end hears it; then the goodbye, and every message
// still meant for this rank is taken (cluster_protocol.h).
void ClusterWorker::shut_down() {
  stop_transfers();
  sched_->finish_all(FinishReason::Cancelled);
  for (Handoff& h : handoffs_) {
    kv_.release(h.mine);
    make_request(h.id)->on_finish({FinishReason::Cancelled, "", h.n_prompt, 0});
    if (cfg_.transfer == KvTransferMode::OneSided) post_worker(h.src, simple(Msg::Ack, h.id));
  }
  handoffs_.clear();
  post_events();
  post_stats(true);
  stop_heartbeat();  // its last beat goes before the goodbye
  wire::Writer bye;
  bye.put(Msg::Bye).put<uint64_t>(0).put_vec(sent_to_);
  mb_.post(0, kToFrontEnd, bye.take());
  int64_t expected = -1;
  while (expected < 0 || taken_ < expected) {
    if (auto m = take()) {
      wire::Reader rd(m->data);
      if (rd.get<Msg>() == Msg::Exit) {
        rd.get<uint64_t>();
        expected = rd.get<int64_t>();
      }
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  mb_.flush();
}

}  // namespace moeserve::engine
