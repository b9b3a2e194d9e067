#include "engine/cluster.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "engine/wire.h"

namespace moeserve::engine {

namespace {

using Clock = std::chrono::steady_clock;

constexpr int kToWorker = 1, kToFrontEnd = 2;

enum class Msg : uint8_t { Assign = 1, Cancel, Handoff, Ack, Stop, Events, Stats, Bye };
enum class Ev : uint8_t { Token = 0, Finish = 1 };

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

void put_request(wire::Writer& w, const Request& r) {
  w.put_vec(r.prompt).put(r.max_tokens).put(r.sampling.temperature).put(r.sampling.top_p);
  w.put(r.sampling.top_k).put(r.sampling.seed).put_vec(r.stop_ids).put(r.top_logprobs);
}

// The fields put_request wrote, into `r` (whose callbacks stay as they are).
void read_request(wire::Reader& rd, Request& r) {
  r.prompt = rd.get_vec<int32_t>();
  r.max_tokens = rd.get<int64_t>();
  r.sampling.temperature = rd.get<float>();
  r.sampling.top_p = rd.get<float>();
  r.sampling.top_k = rd.get<int64_t>();
  r.sampling.seed = rd.get<uint64_t>();
  r.stop_ids = rd.get_vec<int32_t>();
  r.top_logprobs = rd.get<int>();
}

// Seconds as milliseconds with at most one decimal.
std::string ms(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", s * 1e3);
  std::string r = b;
  if (r.size() > 2 && r.compare(r.size() - 2, 2, ".0") == 0) r.resize(r.size() - 2);
  return r;
}

std::vector<std::byte> simple(Msg m, uint64_t id = 0) {
  wire::Writer w;
  w.put(m).put(id);
  return w.take();
}

}  // namespace

void ClusterConfig::validate(int world_size) const {
  MS_CHECK(prefill_ranks >= 0 && decode_ranks >= 0,
           "--prefill-ranks and --decode-ranks must be "
           ">= 0");
  MS_CHECK((prefill_ranks == 0) == (decode_ranks == 0),
           "give both --prefill-ranks and --decode-ranks (or neither, to run prefill and decode "
           "on every rank)");
  MS_CHECK(!disaggregated() || prefill_ranks + decode_ranks == world_size, "--prefill-ranks ",
           prefill_ranks, " + --decode-ranks ", decode_ranks, " must equal the ", world_size,
           " ranks of the launch (mpirun -np ", prefill_ranks + decode_ranks, ")");
  MS_CHECK(transfer_timeout_s > 0, "--kv-transfer-timeout-ms must be > 0");
  MS_CHECK(lease_s > 2 * transfer_timeout_s,
           "--kv-lease-ms must be more than twice --kv-transfer-timeout-ms");
}

// ------------------------------------------------------------------------------------------
// Worker

struct ClusterWorker::Handoff {
  uint64_t id = 0;
  int src = -1;
  std::shared_ptr<Request> req;
  std::vector<int32_t> tokens;
  int64_t n_prompt = 0;
  std::vector<int32_t> blocks;  // on the prefill rank
  std::string sampler_state;
  std::vector<std::byte> payload;  // two-sided: the blocks' bytes
  Clock::time_point arrived;
  std::vector<int32_t> mine;  // its blocks here, once allocated
  double seconds = 0;         // the transfer's time
};

struct ClusterWorker::Lease {
  std::vector<int32_t> blocks;
  Clock::time_point until;
};

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
          m.config().num_hidden_layers, m.config().kv_cache_dim()) {
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
  if (xfer_thread_.joinable()) {  // run() was never called
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
    events_.put(Ev::Token).put(id).put(e.index).put(e.token).put(e.logprob);
    events_.put<uint64_t>(e.top.size());
    for (const auto& alt : e.top) events_.put(alt.first);
    events_.put<uint64_t>(e.top.size());
    for (const auto& alt : e.top) events_.put(alt.second);
    ++n_events_;
  };
  r->on_finish = [this, id](const FinishEvent& f) {
    events_.put(Ev::Finish).put(id).put(static_cast<uint8_t>(f.reason)).put_str(f.error);
    events_.put(f.prompt_tokens).put(f.completion_tokens);
    ++n_events_;
    decode_rank_of_.erase(id);
  };
  return r;
}

void ClusterWorker::handle(const comm::Mailbox::Message& m) {
  wire::Reader rd(m.data);
  const Msg kind = rd.get<Msg>();
  switch (kind) {
    case Msg::Assign: {
      const uint64_t id = rd.get<uint64_t>();
      const int decode_rank = rd.get<int>();
      std::shared_ptr<Request> r = make_request(id);
      read_request(rd, *r);
      if (prefill_) decode_rank_of_[id] = decode_rank;
      sched_->add(id, std::move(r));
      break;
    }
    case Msg::Cancel: {
      const uint64_t id = rd.get<uint64_t>();
      if (sched_->cancel(id)) break;
      if (decode_) {
        auto it = std::find_if(handoffs_.begin(), handoffs_.end(),
                               [&](const Handoff& h) { return h.id == id; });
        if (it != handoffs_.end()) {
          if (!it->blocks.empty() && cfg_.transfer == KvTransferMode::OneSided)
            mb_.post(it->src, kToWorker, simple(Msg::Ack, id));
          make_request(id)->on_finish({FinishReason::Cancelled, "", it->n_prompt,
                                       static_cast<int64_t>(it->tokens.size()) - it->n_prompt});
          handoffs_.erase(it);
        } else {
          tombstones_[id] = Clock::now();  // its handoff may still be on the way
        }
      }
      break;
    }
    case Msg::Handoff: {
      Handoff h;
      h.id = rd.get<uint64_t>();
      h.src = m.source;
      h.req = make_request(h.id);
      read_request(rd, *h.req);
      h.tokens = rd.get_vec<int32_t>();
      h.n_prompt = rd.get<int64_t>();
      h.blocks = rd.get_vec<int32_t>();
      h.sampler_state = rd.get_str();
      const uint64_t payload = rd.get<uint64_t>();
      const std::byte* p = rd.take(payload);
      h.payload.assign(p, p + payload);
      h.arrived = Clock::now();
      auto t = tombstones_.find(h.id);
      if (t != tombstones_.end()) {  // cancelled before it came
        tombstones_.erase(t);
        if (cfg_.transfer == KvTransferMode::OneSided)
          mb_.post(h.src, kToWorker, simple(Msg::Ack, h.id));
        break;
      }
      handoffs_.push_back(std::move(h));
      break;
    }
    case Msg::Ack: {
      const uint64_t id = rd.get<uint64_t>();
      auto it = leases_.find(id);
      if (it != leases_.end()) {
        kv_.release(it->second.blocks);
        leases_.erase(it);
      }
      break;
    }
    case Msg::Stop:
      stop_ = true;
      break;
    default:
      fail("cluster: unexpected message kind ", static_cast<int>(kind), " from rank ", m.source);
  }
}

void ClusterWorker::on_prefilled(Prefilled&& p) {
  // The first token (already in the events) goes out before the handoff, so the front end
  // usually sees it before the decode rank's tokens (it reorders them by index anyway).
  post_events();
  const auto dr = decode_rank_of_.find(p.id);
  MS_ASSERT(dr != decode_rank_of_.end());
  const int dest = dr->second;
  decode_rank_of_.erase(dr);
  wire::Writer w;
  w.put(Msg::Handoff).put(p.id);
  put_request(w, *p.req);
  w.put_vec(p.tokens).put(p.n_prompt).put_vec(p.blocks).put_str(p.sampler_state);
  if (cfg_.transfer == KvTransferMode::TwoSided) {
    // The blocks travel inside the message; ours are free again at once.
    const size_t bb = kv_.block_bytes();
    w.put<uint64_t>(bb * p.blocks.size());
    for (int32_t b : p.blocks) w.raw(kv_.block_data(b), bb);
    kv_.release(p.blocks);
  } else {
    w.put<uint64_t>(0);
    leases_[p.id] = {std::move(p.blocks),
                     Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(cfg_.lease_s))};
  }
  mb_.post(dest, kToWorker, w.take());
}

void ClusterWorker::expire_leases() {
  const auto now = Clock::now();
  for (auto it = leases_.begin(); it != leases_.end();) {
    if (now < it->second.until) {
      ++it;
      continue;
    }
    kv_.release(it->second.blocks);
    ++transfer_.leases_expired;
    it = leases_.erase(it);
  }
  for (auto it = tombstones_.begin(); it != tombstones_.end();)
    it = since(it->second) > 2 * cfg_.lease_s ? tombstones_.erase(it) : std::next(it);
}

// Decode side: handoffs in arrival order get blocks, then go to the transfer thread.
void ClusterWorker::start_transfers() {
  const bool one_sided = cfg_.transfer == KvTransferMode::OneSided;
  while (!handoffs_.empty()) {
    Handoff& h = handoffs_.front();
    // One-sided: the prefill rank's lease must not run out while we read.
    if (one_sided && since(h.arrived) > cfg_.lease_s / 2) {
      ++transfer_.failures;
      make_request(h.id)->on_finish(
          {FinishReason::Error,
           "the decode rank had no free KV blocks for this request within half the transfer "
           "lease (" +
               ms(cfg_.lease_s / 2) + " ms); retry later",
           h.n_prompt, static_cast<int64_t>(h.tokens.size()) - h.n_prompt});
      mb_.post(h.src, kToWorker, simple(Msg::Ack, h.id));
      handoffs_.pop_front();
      continue;
    }
    if (!kv_.allocate(static_cast<int64_t>(h.blocks.size()), &h.mine)) return;  // wait
    std::lock_guard<std::mutex> lk(xfer_mu_);
    xfer_in_.push_back(std::move(h));
    handoffs_.pop_front();
    ++xfer_busy_;
    xfer_cv_.notify_all();
  }
}

// The transfer thread: reads (or copies) each handoff's blocks into its new blocks, timed.
void ClusterWorker::transfer_loop() {
  const size_t bb = kv_.block_bytes();
  for (;;) {
    Handoff h;
    {
      std::unique_lock<std::mutex> lk(xfer_mu_);
      xfer_cv_.wait(lk, [&] { return xfer_stop_ || !xfer_in_.empty(); });
      if (xfer_in_.empty()) return;
      h = std::move(xfer_in_.front());
      xfer_in_.pop_front();
    }
    const auto t0 = Clock::now();
    if (cfg_.transfer == KvTransferMode::OneSided) {
      // Runs of consecutive blocks on both sides move as one read.
      for (size_t i = 0; i < h.mine.size();) {
        size_t j = i + 1;
        while (j < h.mine.size() && h.blocks[j] == h.blocks[j - 1] + 1 &&
               h.mine[j] == h.mine[j - 1] + 1)
          ++j;
        window_->get(h.src, bb * static_cast<size_t>(h.blocks[i]), kv_.block_data(h.mine[i]),
                     bb * (j - i));
        i = j;
      }
      window_->flush(h.src);
    } else {
      MS_ASSERT(h.payload.size() == bb * h.mine.size());
      for (size_t i = 0; i < h.mine.size(); ++i)
        std::memcpy(kv_.block_data(h.mine[i]), h.payload.data() + i * bb, bb);
      h.payload = {};
    }
    if (fault_delay_s_ > 0)
      std::this_thread::sleep_for(std::chrono::duration<double>(fault_delay_s_));
    h.seconds = since(t0);
    std::lock_guard<std::mutex> lk(xfer_mu_);
    xfer_out_.push_back(std::move(h));
  }
}

// Decode side: finished transfers are acknowledged and join the scheduler (or fail).
bool ClusterWorker::finish_transfers() {
  std::deque<Handoff> done;
  {
    std::lock_guard<std::mutex> lk(xfer_mu_);
    done.swap(xfer_out_);
    xfer_busy_ -= static_cast<int64_t>(done.size());
  }
  const size_t bb = kv_.block_bytes();
  for (Handoff& h : done) {
    if (cfg_.transfer == KvTransferMode::OneSided && !fault_no_ack_)
      mb_.post(h.src, kToWorker, simple(Msg::Ack, h.id));
    const int64_t n_generated = static_cast<int64_t>(h.tokens.size()) - h.n_prompt;
    auto t = tombstones_.find(h.id);
    if (t != tombstones_.end()) {  // cancelled while it moved
      tombstones_.erase(t);
      kv_.release(h.mine);
      make_request(h.id)->on_finish({FinishReason::Cancelled, "", h.n_prompt, n_generated});
      continue;
    }
    if (h.seconds > cfg_.transfer_timeout_s) {
      kv_.release(h.mine);
      ++transfer_.failures;
      make_request(h.id)->on_finish(
          {FinishReason::Error,
           "the KV cache transfer from the prefill rank took " + ms(h.seconds) + " ms, over the " +
               ms(cfg_.transfer_timeout_s) + " ms limit (--kv-transfer-timeout-ms)",
           h.n_prompt, n_generated});
      continue;
    }
    ++transfer_.transfers;
    transfer_.bytes += static_cast<int64_t>(bb * h.mine.size());
    transfer_.latency_sum += h.seconds;
    const auto& bounds = kv_transfer_buckets();
    ++transfer_.latency_buckets[std::lower_bound(bounds.begin(), bounds.end(), h.seconds) -
                                bounds.begin()];
    Prefilled p;
    p.id = h.id;
    p.req = std::move(h.req);
    p.tokens = std::move(h.tokens);
    p.n_prompt = h.n_prompt;
    p.blocks = std::move(h.mine);
    p.sampler_state = std::move(h.sampler_state);
    sched_->add_prefilled(std::move(p));
  }
  return !done.empty();
}

int64_t ClusterWorker::in_flight() {
  std::lock_guard<std::mutex> lk(xfer_mu_);
  return xfer_busy_;
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
      waiting_peak_};
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
  mb_.post(0, kToFrontEnd, w.take());
}

void ClusterWorker::run() {
  bool progressed = false;
  for (;;) {
    bool input = false;
    while (auto m = mb_.poll(kToWorker)) {
      handle(*m);
      input = true;
    }
    if (decode_) {
      input = finish_transfers() || input;
      start_transfers();
    }
    expire_leases();
    // The group agrees whether to step (and whether to stop): every rank of an
    // expert-parallel group must run the same number of forwards.
    int64_t flags[2] = {sched_->has_work() && (progressed || input) ? 1 : 0, stop_ ? 1 : 0};
    if (group_.size() > 1) group_.all_reduce(flags, 2, comm::ReduceOp::Max);
    if (flags[1]) break;
    if (!flags[0]) {
      post_events();
      post_stats(true);
      progressed = false;
      std::this_thread::sleep_for(std::chrono::duration<double>(cfg_.idle_sleep_s));
      continue;
    }
    try {
      progressed = sched_->step(group_.size() > 1);
    } catch (const std::exception&) {
      progressed = true;  // its requests failed; go on
    }
    post_events();
    post_stats(false);
  }
  // Stopping: what is left is cancelled, the front end hears it, then a goodbye.
  if (xfer_thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lk(xfer_mu_);
      xfer_stop_ = true;
      for (Handoff& h : xfer_in_) handoffs_.push_back(std::move(h));  // not started
      xfer_in_.clear();
    }
    xfer_cv_.notify_all();
    xfer_thread_.join();
    for (Handoff& h : xfer_out_) handoffs_.push_back(std::move(h));
    xfer_out_.clear();
  }
  sched_->finish_all(FinishReason::Cancelled);
  for (Handoff& h : handoffs_) {
    kv_.release(h.mine);
    make_request(h.id)->on_finish({FinishReason::Cancelled, "", h.n_prompt, 0});
    if (cfg_.transfer == KvTransferMode::OneSided)
      mb_.post(h.src, kToWorker, simple(Msg::Ack, h.id));
  }
  handoffs_.clear();
  post_events();
  post_stats(true);
  mb_.post(0, kToFrontEnd, simple(Msg::Bye));
  while (!stop_) {  // the group may have stopped on another rank's word
    if (auto m = mb_.poll(kToWorker)) {
      wire::Reader rd(m->data);
      stop_ = rd.get<Msg>() == Msg::Stop;
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  mb_.flush();
}

// ------------------------------------------------------------------------------------------
// Front end

struct ClusterFrontEnd::Live {
  std::shared_ptr<Request> req;
  int prefill = -1, decode = -1;  // ranks (decode -1 when colocated)
  int64_t next = 0;               // index of the next token to deliver
  std::map<int64_t, TokenEvent> early;
  std::optional<FinishEvent> finish;  // arrived before all its tokens
  bool prefill_done = false;
};

ClusterFrontEnd::ClusterFrontEnd(const model::ModelConfig& mc, comm::Mailbox& mailbox,
                                 const ClusterConfig& cfg)
    : mc_(mc), mb_(mailbox), cfg_(cfg), n_ranks_(mailbox.size()), ranks_(mailbox.size()) {
  cfg_.validate(n_ranks_);
  thread_ = std::thread([this] { loop(); });
}

ClusterFrontEnd::~ClusterFrontEnd() {
  stop();
}

SubmitResult ClusterFrontEnd::submit(std::shared_ptr<Request> r, uint64_t* id, std::string* error) {
  const std::string bad = validate_request(*r, mc_, cfg_.engine);
  if (!bad.empty()) {
    if (error) *error = bad;
    return SubmitResult::Invalid;
  }
  std::lock_guard<std::mutex> lk(mu_);
  if (stopping_) {
    if (error) *error = "the server is shutting down";
    return SubmitResult::QueueFull;
  }
  int64_t waiting = static_cast<int64_t>(queue_.size());
  for (const RankState& s : ranks_) waiting += s.waiting;
  if (waiting >= cfg_.engine.max_waiting * n_ranks_) {
    if (error) *error = "the server is busy: too many requests are waiting";
    return SubmitResult::QueueFull;
  }
  const uint64_t i = next_id_++;
  if (id) *id = i;
  queue_.emplace_back(i, std::move(r));
  cv_.notify_all();
  return SubmitResult::Accepted;
}

void ClusterFrontEnd::cancel(uint64_t id) {
  std::lock_guard<std::mutex> lk(mu_);
  cancels_.push_back(id);
  cv_.notify_all();
}

EngineStats ClusterFrontEnd::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  EngineStats st;
  st.disaggregated = cfg_.disaggregated();
  st.waiting = static_cast<int64_t>(queue_.size());
  st.transfer.latency_buckets.assign(kv_transfer_buckets().size() + 1, 0);
  for (int r = 0; r < n_ranks_; ++r) {
    const RankState& s = ranks_[r];
    st.running += s.running;
    st.waiting += s.waiting;
    st.kv_blocks_total += s.kv_total;
    st.kv_blocks_used += s.kv_used;
    st.preemptions += s.preemptions;
    st.steps += s.steps;
    st.prompt_tokens += s.prompt_tokens;
    st.generated_tokens += s.generated_tokens;
    if (st.expert_tokens.size() < s.expert_tokens.size())
      st.expert_tokens.resize(s.expert_tokens.size());
    for (size_t i = 0; i < s.expert_tokens.size(); ++i) st.expert_tokens[i] += s.expert_tokens[i];
    st.transfer.add(s.transfer);
    const std::string role =
        !cfg_.disaggregated() ? "colocated" : (cfg_.group_of(r) == 0 ? "prefill" : "decode");
    const std::string lbl = "{rank=\"" + std::to_string(r) + "\",role=\"" + role + "\"}";
    st.rank_lines.push_back("moeserve_rank_running_requests" + lbl + " " +
                            std::to_string(s.running));
    st.rank_lines.push_back("moeserve_rank_waiting_requests" + lbl + " " +
                            std::to_string(s.waiting));
    st.rank_lines.push_back("moeserve_rank_kv_blocks_used" + lbl + " " + std::to_string(s.kv_used));
    st.rank_lines.push_back("moeserve_rank_kv_blocks_total" + lbl + " " +
                            std::to_string(s.kv_total));
    st.rank_lines.push_back("moeserve_rank_kv_blocks_peak" + lbl + " " + std::to_string(s.kv_peak));
    st.rank_lines.push_back("moeserve_rank_waiting_requests_peak" + lbl + " " +
                            std::to_string(s.waiting_peak));
  }
  return st;
}

// Least-loaded: the fewest unfinished requests for its size, then the emptiest KV pool, then
// the lowest rank. Under mu_.
int ClusterFrontEnd::pick(int first, int count) {
  const int g = cfg_.group_of(first);
  if (cfg_.route == RoutePolicy::RoundRobin) return first + (rr_[g]++ % count);
  int best = first;
  double best_score = 0;
  for (int r = first; r < first + count; ++r) {
    const RankState& s = ranks_[r];
    const double kv = s.kv_total > 0 ? static_cast<double>(s.kv_used) / s.kv_total : 0.0;
    const double score = static_cast<double>(s.assigned) / cfg_.engine.max_num_seqs + kv;
    if (r == first || score < best_score) best = r, best_score = score;
  }
  return best;
}

void ClusterFrontEnd::route(uint64_t id, std::shared_ptr<Request> r) {
  auto l = std::make_unique<Live>();
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (cfg_.disaggregated()) {
      l->prefill = pick(0, cfg_.prefill_ranks);
      l->decode = pick(cfg_.prefill_ranks, cfg_.decode_ranks);
      ++ranks_[l->decode].assigned;
    } else {
      l->prefill = pick(0, n_ranks_);
    }
    ++ranks_[l->prefill].assigned;
  }
  wire::Writer w;
  w.put(Msg::Assign).put(id).put(l->decode);
  put_request(w, *r);
  l->req = std::move(r);
  mb_.post(l->prefill, kToWorker, w.take());
  live_[id] = std::move(l);
}

void ClusterFrontEnd::release(Live& l) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!l.prefill_done) --ranks_[l.prefill].assigned;
  l.prefill_done = true;
  if (l.decode >= 0) --ranks_[l.decode].assigned, l.decode = -1;
}

void ClusterFrontEnd::deliver_token(uint64_t id, TokenEvent ev) {
  auto it = live_.find(id);
  if (it == live_.end()) return;  // finished (cancelled) already
  Live& l = *it->second;
  if (ev.index == 0 && cfg_.disaggregated() && !l.prefill_done) {
    std::lock_guard<std::mutex> lk(mu_);
    --ranks_[l.prefill].assigned;
    l.prefill_done = true;
  }
  if (ev.index != l.next) {  // from another rank, ahead of an earlier token
    l.early.emplace(ev.index, std::move(ev));
    return;
  }
  if (l.req->on_token) l.req->on_token(ev);
  ++l.next;
  for (auto e = l.early.begin(); e != l.early.end() && e->first == l.next;
       e = l.early.erase(e), ++l.next)
    if (l.req->on_token) l.req->on_token(e->second);
  if (l.finish && l.next >= l.finish->completion_tokens) deliver_finish(id, *l.finish);
}

void ClusterFrontEnd::deliver_finish(uint64_t id, FinishEvent f) {
  auto it = live_.find(id);
  if (it == live_.end()) return;
  Live& l = *it->second;
  const bool normal = f.reason == FinishReason::Stop || f.reason == FinishReason::Length;
  if (normal && l.next < f.completion_tokens) {  // tokens still on their way
    l.finish = f;
    return;
  }
  release(l);
  std::shared_ptr<Request> r = std::move(l.req);
  live_.erase(it);
  if (r->on_finish) r->on_finish(f);
}

void ClusterFrontEnd::on_message(const comm::Mailbox::Message& m) {
  wire::Reader rd(m.data);
  const Msg kind = rd.get<Msg>();
  if (kind == Msg::Events) {
    const int64_t n = rd.get<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      const Ev e = rd.get<Ev>();
      const uint64_t id = rd.get<uint64_t>();
      if (e == Ev::Token) {
        TokenEvent ev;
        ev.index = rd.get<int64_t>();
        ev.token = rd.get<int32_t>();
        ev.logprob = rd.get<float>();
        const auto ids = rd.get_vec<int32_t>();
        const auto lps = rd.get_vec<float>();
        for (size_t k = 0; k < ids.size() && k < lps.size(); ++k)
          ev.top.push_back({ids[k], lps[k]});
        deliver_token(id, std::move(ev));
      } else {
        FinishEvent f;
        f.reason = static_cast<FinishReason>(rd.get<uint8_t>());
        f.error = rd.get_str();
        f.prompt_tokens = rd.get<int64_t>();
        f.completion_tokens = rd.get<int64_t>();
        deliver_finish(id, f);
      }
    }
  } else if (kind == Msg::Stats) {
    std::lock_guard<std::mutex> lk(mu_);
    RankState& s = ranks_[m.source];
    s.running = rd.get<int64_t>();
    s.waiting = rd.get<int64_t>();
    s.kv_total = rd.get<int64_t>();
    s.kv_used = rd.get<int64_t>();
    s.kv_peak = rd.get<int64_t>();
    s.waiting_peak = rd.get<int64_t>();
    s.preemptions = rd.get<int64_t>();
    s.steps = rd.get<int64_t>();
    s.prompt_tokens = rd.get<int64_t>();
    s.generated_tokens = rd.get<int64_t>();
    s.expert_tokens = rd.get_vec<int64_t>();
    s.transfer.transfers = rd.get<int64_t>();
    s.transfer.bytes = rd.get<int64_t>();
    s.transfer.failures = rd.get<int64_t>();
    s.transfer.leases_expired = rd.get<int64_t>();
    s.transfer.latency_buckets = rd.get_vec<int64_t>();
    s.transfer.latency_sum = rd.get<double>();
  }
}

void ClusterFrontEnd::loop() {
  int byes = 0;
  bool stop_sent = false;
  for (;;) {
    std::deque<std::pair<uint64_t, std::shared_ptr<Request>>> q;
    std::vector<uint64_t> cancels;
    bool stopping;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait_for(lk, std::chrono::microseconds(200),
                   [&] { return !queue_.empty() || !cancels_.empty() || stopping_; });
      q.swap(queue_);
      cancels.swap(cancels_);
      stopping = stopping_;
    }
    for (auto& [id, r] : q) {
      if (stopping) {
        if (r->on_finish)
          r->on_finish({FinishReason::Cancelled, "", static_cast<int64_t>(r->prompt.size()), 0});
        continue;
      }
      route(id, std::move(r));
    }
    for (uint64_t id : cancels) {
      auto it = live_.find(id);
      if (it == live_.end()) continue;
      mb_.post(it->second->prefill, kToWorker, simple(Msg::Cancel, id));
      if (it->second->decode >= 0) mb_.post(it->second->decode, kToWorker, simple(Msg::Cancel, id));
    }
    if (stopping && !stop_sent) {
      for (int r = 0; r < n_ranks_; ++r) mb_.post(r, kToWorker, simple(Msg::Stop));
      stop_sent = true;
    }
    while (auto m = mb_.poll(kToFrontEnd)) {
      wire::Reader rd(m->data);
      if (rd.get<Msg>() == Msg::Bye)
        ++byes;
      else
        on_message(*m);
    }
    if (stop_sent && byes == n_ranks_) break;
  }
  // Every rank said goodbye after its last events; anything still live never finished.
  for (auto& [id, l] : live_)
    if (l->req && l->req->on_finish)
      l->req->on_finish(
          {FinishReason::Cancelled, "", static_cast<int64_t>(l->req->prompt.size()), l->next});
  live_.clear();
  mb_.flush();
}

void ClusterFrontEnd::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopped_) return;
    stopped_ = true;
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

}  // namespace moeserve::engine
