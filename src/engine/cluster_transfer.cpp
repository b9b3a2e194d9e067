// ClusterWorker, disaggregated: a prefill rank hands each prefilled request to its decode rank
// and lends it the KV blocks (one-sided) or sends their bytes (two-sided); the decode rank
// takes the prompt's leading full blocks it holds already from its own prefix cache, allocates
// the rest, moves only those on a thread of its own and acknowledges.
#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "engine/cluster.h"
#include "engine/cluster_protocol.h"

namespace moeserve::engine {

using namespace cluster;

// Prefill side.
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
  w.put(p.cached_tokens).put_vec(p.drafts).put_vec(p.draft_q);
  if (cfg_.transfer == KvTransferMode::TwoSided) {
    // The blocks travel inside the message; ours are free again at once.
    const size_t bb = kv_.block_bytes();
    w.put<uint64_t>(bb * p.blocks.size());
    for (int32_t b : p.blocks) w.raw(kv_.block_data(b), bb);
    kv_.release(p.blocks);
  } else {
    w.put<uint64_t>(0);
    leases_[p.id] = {std::move(p.blocks), Clock::now() + seconds(cfg_.lease_s)};
  }
  post_worker(dest, w.take());
}

void ClusterWorker::on_ack(uint64_t id) {
  auto it = leases_.find(id);
  if (it == leases_.end()) return;
  kv_.release(it->second.blocks);
  leases_.erase(it);
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

// Decode side.
void ClusterWorker::on_handoff(wire::Reader& rd, int source) {
  Handoff h;
  h.id = rd.get<uint64_t>();
  h.src = source;
  h.req = make_request(h.id);
  read_request(rd, *h.req, cfg_.engine.compile_constraint);
  h.tokens = rd.get_vec<int32_t>();
  h.n_prompt = rd.get<int64_t>();
  h.blocks = rd.get_vec<int32_t>();
  h.sampler_state = rd.get_str();
  h.cached_tokens = rd.get<int64_t>();
  h.drafts = rd.get_vec<int32_t>();
  h.draft_q = rd.get_vec<float>();
  const uint64_t payload = rd.get<uint64_t>();
  const std::byte* p = rd.take(payload);
  h.payload.assign(p, p + payload);
  h.arrived = Clock::now();
  auto t = tombstones_.find(h.id);
  if (t != tombstones_.end()) {  // cancelled before it came
    tombstones_.erase(t);
    if (cfg_.transfer == KvTransferMode::OneSided) post_worker(h.src, simple(Msg::Ack, h.id));
    return;
  }
  handoffs_.push_back(std::move(h));
}

bool ClusterWorker::cancel_handoff(uint64_t id) {
  auto it = std::find_if(handoffs_.begin(), handoffs_.end(),
                         [&](const Handoff& h) { return h.id == id; });
  if (it == handoffs_.end()) return false;
  if (!it->blocks.empty() && cfg_.transfer == KvTransferMode::OneSided)
    post_worker(it->src, simple(Msg::Ack, id));
  make_request(id)->on_finish({FinishReason::Cancelled, "", it->n_prompt,
                               static_cast<int64_t>(it->tokens.size()) - it->n_prompt});
  handoffs_.erase(it);
  return true;
}

// Handoffs in arrival order get blocks, then go to the transfer thread.
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
      post_worker(h.src, simple(Msg::Ack, h.id));
      handoffs_.pop_front();
      continue;
    }
    // The start of the prompt this rank holds already (its prefix cache) is not moved.
    if (cfg_.engine.prefix_caching) {
      // (Under speculative decoding the keys also hold the token after each block: the
      // handoff's tokens go on past the prompt, with the first generated one.)
      h.n_reused = kv_.match(h.tokens.data(), h.n_prompt / kv_.block_size(), &h.mine);
    }
    if (!kv_.allocate(static_cast<int64_t>(h.blocks.size()) - h.n_reused, &h.mine)) {
      kv_.release(h.mine);  // wait, holding nothing
      h.mine.clear();
      h.n_reused = 0;
      return;
    }
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
      xfer_cur_ = h.id;
      xfer_cur_src_ = h.src;
      xfer_cur_prompt_ = h.n_prompt;
      xfer_cur_generated_ = static_cast<int64_t>(h.tokens.size()) - h.n_prompt;
      xfer_start_ = Clock::now();
    }
    const auto t0 = Clock::now();
    if (cfg_.transfer == KvTransferMode::OneSided) {
      // Runs of consecutive blocks on both sides move as one read.
      for (size_t i = h.n_reused; i < h.mine.size();) {
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
      for (size_t i = h.n_reused; i < h.mine.size(); ++i)
        std::memcpy(kv_.block_data(h.mine[i]), h.payload.data() + i * bb, bb);
      h.payload = {};
    }
    if (fault_delay_s_ > 0)
      std::this_thread::sleep_for(std::chrono::duration<double>(fault_delay_s_));
    h.seconds = since(t0);
    std::lock_guard<std::mutex> lk(xfer_mu_);
    xfer_cur_ = 0;
    xfer_out_.push_back(std::move(h));
  }
}

// A read still going past the transfer timeout (a prefill rank that stopped answering, a slow
// link) fails its request now; its blocks stay taken until the read returns.
void ClusterWorker::check_transfer_deadline() {
  uint64_t id = 0;
  int src = -1;
  int64_t n_prompt = 0, n_generated = 0;
  {
    std::lock_guard<std::mutex> lk(xfer_mu_);
    if (!xfer_cur_ || abandoned_.count(xfer_cur_) || since(xfer_start_) <= cfg_.transfer_timeout_s)
      return;
    id = xfer_cur_;
    src = xfer_cur_src_;
    n_prompt = xfer_cur_prompt_;
    n_generated = xfer_cur_generated_;
  }
  abandoned_.insert(id);
  ++transfer_.failures;
  make_request(id)->on_finish({FinishReason::Error,
                               "the KV cache transfer from prefill rank " + std::to_string(src) +
                                   " did not finish within the " + ms(cfg_.transfer_timeout_s) +
                                   " ms limit (--kv-transfer-timeout-ms)",
                               n_prompt, n_generated});
}

// Finished transfers are acknowledged and join the scheduler (or fail).
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
      post_worker(h.src, simple(Msg::Ack, h.id));
    const int64_t n_generated = static_cast<int64_t>(h.tokens.size()) - h.n_prompt;
    if (abandoned_.erase(h.id)) {  // failed already, by the deadline
      tombstones_.erase(h.id);
      kv_.release(h.mine);
      continue;
    }
    auto t = tombstones_.find(h.id);
    if (t != tombstones_.end()) {  // cancelled while it moved
      tombstones_.erase(t);
      kv_.release(h.mine);
      make_request(h.id)->on_finish({FinishReason::Cancelled, "", h.n_prompt, n_generated});
      continue;
    }
    if (h.seconds > cfg_.transfer_timeout_s) {  // over the limit, and done before we looked
      kv_.release(h.mine);
      ++transfer_.failures;
      make_request(h.id)->on_finish({FinishReason::Error,
                                     "the KV cache transfer from prefill rank " +
                                         std::to_string(h.src) + " took " + ms(h.seconds) +
                                         " ms, over the " + ms(cfg_.transfer_timeout_s) +
                                         " ms limit (--kv-transfer-timeout-ms)",
                                     h.n_prompt, n_generated});
      continue;
    }
    ++transfer_.transfers;
    transfer_.bytes += static_cast<int64_t>(bb * (h.mine.size() - h.n_reused));
    transfer_.blocks_reused += h.n_reused;
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
    p.cached_tokens = h.cached_tokens;
    p.drafts = std::move(h.drafts);
    p.draft_q = std::move(h.draft_q);
    sched_->add_prefilled(std::move(p));
  }
  return !done.empty();
}

int64_t ClusterWorker::in_flight() {
  std::lock_guard<std::mutex> lk(xfer_mu_);
  return xfer_busy_;
}

// Stopping: the transfer thread ends after its current read; what it had not started, or
// finished unseen, is cancelled with the rest (ClusterWorker::shut_down).
void ClusterWorker::stop_transfers() {
  if (!xfer_thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lk(xfer_mu_);
    xfer_stop_ = true;
    for (Handoff& h : xfer_in_) handoffs_.push_back(std::move(h));  // not started
    xfer_in_.clear();
  }
  xfer_cv_.notify_all();
  xfer_thread_.join();
  for (Handoff& h : xfer_out_) {
    if (abandoned_.erase(h.id)) {  // its request failed already
      kv_.release(h.mine);
      if (cfg_.transfer == KvTransferMode::OneSided) post_worker(h.src, simple(Msg::Ack, h.id));
      continue;
    }
    handoffs_.push_back(std::move(h));
  }
  xfer_out_.clear();
}

}  // namespace moeserve::engine
