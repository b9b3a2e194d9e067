// ClusterFrontEnd: routes requests to ranks, forwards cancellations, puts the ranks' events
// back in order, watches that every rank keeps answering, and stops them all.
#include <algorithm>
#include <cstdio>

#include "core/error.h"
#include "engine/cluster.h"
#include "engine/cluster_protocol.h"

namespace moeserve::engine {

using namespace cluster;

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
    : mc_(mc),
      mb_(mailbox),
      cfg_(cfg),
      n_ranks_(mailbox.size()),
      ranks_(mailbox.size()),
      last_heard_(mailbox.size(), Clock::now()),
      down_(mailbox.size(), 0),
      posted_to_(mailbox.size(), 0),
      said_bye_(mailbox.size(), 0),
      router_(cfg, mailbox.size()) {
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

std::string ClusterFrontEnd::health_problem() const {
  std::lock_guard<std::mutex> lk(mu_);
  return problem_;
}

std::string ClusterFrontEnd::shutdown_problem() const {
  std::lock_guard<std::mutex> lk(mu_);
  return shutdown_problem_;
}

EngineStats ClusterFrontEnd::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  EngineStats st;
  st.disaggregated = cfg_.disaggregated();
  st.waiting = static_cast<int64_t>(queue_.size());
  st.prefix_routed = router_.prefix_routed();
  st.transfer.latency_buckets.assign(kv_transfer_buckets().size() + 1, 0);
  st.kv_dtype = cfg_.engine.kv_dtype;
  st.kv_bytes_per_token =
      kv_layers_for(mc_, cfg_.engine) * kv::kv_row_bytes(cfg_.engine.kv_dtype, mc_.kv_cache_dim());
  for (int r = 0; r < n_ranks_; ++r) {
    const RankState& s = ranks_[r];
    st.running += s.running;
    st.waiting += s.waiting;
    st.kv_blocks_total += s.kv_total;
    st.kv_tokens_total += s.kv_total * cfg_.engine.block_size;
    st.kv_blocks_used += s.kv_used;
    st.preemptions += s.preemptions;
    st.steps += s.steps;
    st.prompt_tokens += s.prompt_tokens;
    st.generated_tokens += s.generated_tokens;
    st.prefix_query_tokens += s.prefix_query_tokens;
    st.prefix_hit_tokens += s.prefix_hit_tokens;
    st.kv_blocks_cached += s.kv_cached;
    st.spec_draft_tokens += s.spec_draft_tokens;
    st.spec_accepted_tokens += s.spec_accepted_tokens;
    if (st.expert_tokens.size() < s.expert_tokens.size())
      st.expert_tokens.resize(s.expert_tokens.size());
    for (size_t i = 0; i < s.expert_tokens.size(); ++i) st.expert_tokens[i] += s.expert_tokens[i];
    st.transfer.add(s.transfer);
    const std::string lbl = "{rank=\"" + std::to_string(r) + "\",role=\"" + cfg_.role_of(r) + "\"}";
    st.rank_lines.push_back("moeserve_rank_running_requests" + lbl + " " +
                            std::to_string(s.running));
    st.rank_lines.push_back("moeserve_rank_waiting_requests" + lbl + " " +
                            std::to_string(s.waiting));
    st.rank_lines.push_back("moeserve_rank_kv_blocks_used" + lbl + " " + std::to_string(s.kv_used));
    st.rank_lines.push_back("moeserve_rank_kv_blocks_total" + lbl + " " +
                            std::to_string(s.kv_total));
    st.rank_lines.push_back("moeserve_rank_kv_blocks_peak" + lbl + " " + std::to_string(s.kv_peak));
    st.rank_lines.push_back("moeserve_rank_kv_blocks_cached" + lbl + " " +
                            std::to_string(s.kv_cached));
    st.rank_lines.push_back("moeserve_rank_waiting_requests_peak" + lbl + " " +
                            std::to_string(s.waiting_peak));
    if (cfg_.engine.speculative_tokens > 0) {
      st.rank_lines.push_back("moeserve_rank_spec_decode_draft_tokens" + lbl + " " +
                              std::to_string(s.spec_draft_tokens));
      st.rank_lines.push_back("moeserve_rank_spec_decode_accepted_tokens" + lbl + " " +
                              std::to_string(s.spec_accepted_tokens));
    }
  }
  return st;
}

// Under mu_ (cluster_router.h).
int ClusterFrontEnd::pick(int first, int count, const std::vector<uint64_t>& keys) {
  std::vector<RankLoad> loads(n_ranks_);
  for (int r = 0; r < n_ranks_; ++r)
    loads[r] = {ranks_[r].assigned, ranks_[r].kv_used, ranks_[r].kv_total};
  return router_.pick(first, count, loads, keys);
}

void ClusterFrontEnd::post_worker(int dest, std::vector<std::byte> msg) {
  ++posted_to_[dest];
  mb_.post(dest, kToWorker, std::move(msg));
}

void ClusterFrontEnd::route(uint64_t id, std::shared_ptr<Request> r) {
  std::string down = down_reason(0);
  if (down.empty() && cfg_.disaggregated()) down = down_reason(1);
  if (!down.empty()) {  // the group it needs waits for a silent rank
    if (r->on_finish)
      r->on_finish({FinishReason::Error, down, static_cast<int64_t>(r->prompt.size()), 0});
    return;
  }
  auto l = std::make_unique<Live>();
  const std::vector<uint64_t> keys = router_.keys_of(r->prompt);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (cfg_.disaggregated()) {
      l->prefill = pick(0, cfg_.prefill_ranks, keys);
      l->decode = pick(cfg_.prefill_ranks, cfg_.decode_ranks, keys);
      ++ranks_[l->decode].assigned;
    } else {
      l->prefill = pick(0, n_ranks_, keys);
    }
    ++ranks_[l->prefill].assigned;
  }
  wire::Writer w;
  w.put(Msg::Assign).put(id).put(l->decode);
  put_request(w, *r);
  l->req = std::move(r);
  post_worker(l->prefill, w.take());
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

void ClusterFrontEnd::on_events(wire::Reader& rd) {
  const int64_t n = rd.get<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const Ev e = rd.get<Ev>();
    const uint64_t id = rd.get<uint64_t>();
    if (e == Ev::Token) {
      TokenEvent ev;
      ev.index = rd.get<int64_t>();
      ev.token = rd.get<int32_t>();
      ev.logprob = rd.get<float>();
      ev.cached_tokens = rd.get<int64_t>();
      const auto ids = rd.get_vec<int32_t>();
      const auto lps = rd.get_vec<float>();
      for (size_t k = 0; k < ids.size() && k < lps.size(); ++k) ev.top.push_back({ids[k], lps[k]});
      deliver_token(id, std::move(ev));
    } else {
      FinishEvent f;
      f.reason = static_cast<FinishReason>(rd.get<uint8_t>());
      f.error = rd.get_str();
      f.prompt_tokens = rd.get<int64_t>();
      f.completion_tokens = rd.get<int64_t>();
      f.cached_tokens = rd.get<int64_t>();
      deliver_finish(id, f);
    }
  }
}

void ClusterFrontEnd::on_stats(wire::Reader& rd, int source) {
  std::lock_guard<std::mutex> lk(mu_);
  RankState& s = ranks_[source];
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
  s.prefix_query_tokens = rd.get<int64_t>();
  s.prefix_hit_tokens = rd.get<int64_t>();
  s.kv_cached = rd.get<int64_t>();
  s.transfer.blocks_reused = rd.get<int64_t>();
  s.spec_draft_tokens = rd.get<int64_t>();
  s.spec_accepted_tokens = rd.get<int64_t>();
}

void ClusterFrontEnd::on_message(const comm::Mailbox::Message& m) {
  last_heard_[m.source] = Clock::now();
  wire::Reader rd(m.data);
  switch (rd.get<Msg>()) {
    case Msg::Events:
      on_events(rd);
      break;
    case Msg::Stats:
      on_stats(rd, m.source);
      break;
    case Msg::Bye: {
      rd.get<uint64_t>();
      const auto sent = rd.get_vec<int64_t>();
      MS_CHECK(static_cast<int>(sent.size()) == n_ranks_, "cluster: a goodbye from rank ", m.source,
               " counts ", sent.size(), " ranks, not ", n_ranks_);
      for (int r = 0; r < n_ranks_; ++r) posted_to_[r] += sent[r];
      said_bye_[m.source] = 1;
      break;
    }
    default:  // Alive: being heard is all it says
      break;
  }
}

std::string ClusterFrontEnd::who(int rank) const {
  const std::string r = "rank " + std::to_string(rank);
  return cfg_.disaggregated() ? r + " (" + cfg_.role_of(rank) + ")" : r;
}

std::string ClusterFrontEnd::down_reason(int group) const {
  for (int r = 0; r < n_ranks_; ++r)
    if (down_[r] && cfg_.group_of(r) == group)
      return who(r) + " has not answered for " + ms(cfg_.peer_timeout_s) +
             " ms (--peer-timeout-ms); requests that need it fail until it answers again";
  return {};
}

void ClusterFrontEnd::check_peers() {
  bool changed = false;
  for (int r = 0; r < n_ranks_; ++r) {
    const bool silent = since(last_heard_[r]) > cfg_.peer_timeout_s;
    if (silent == static_cast<bool>(down_[r])) continue;
    down_[r] = silent;
    changed = true;
    if (silent)
      std::fprintf(stderr,
                   "moeserve: %s has not answered for %s ms; failing the requests that need it\n",
                   who(r).c_str(), ms(cfg_.peer_timeout_s).c_str());
    else
      std::fprintf(stderr, "moeserve: %s answers again\n", who(r).c_str());
  }
  if (!changed) return;
  std::string problem;
  for (int g = 0; g < (cfg_.disaggregated() ? 2 : 1); ++g) {
    const std::string why = down_reason(g);
    if (!why.empty()) problem += (problem.empty() ? "" : "; ") + why;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    problem_ = problem;
  }
  // Open requests whose group waits for a silent rank fail now; their ranks drop them when
  // they run again.
  std::vector<std::pair<uint64_t, std::string>> failed;
  for (const auto& [id, l] : live_) {
    std::string why = l->prefill_done ? "" : down_reason(cfg_.group_of(l->prefill));
    if (why.empty() && l->decode >= 0) why = down_reason(cfg_.group_of(l->decode));
    if (!why.empty()) failed.emplace_back(id, why);
  }
  for (auto& [id, why] : failed) {
    Live& l = *live_.at(id);
    post_worker(l.prefill, simple(Msg::Cancel, id));
    if (l.decode >= 0) post_worker(l.decode, simple(Msg::Cancel, id));
    deliver_finish(id,
                   {FinishReason::Error, why, static_cast<int64_t>(l.req->prompt.size()), l.next});
  }
}

// Stopping: once every rank said goodbye, each is told how many worker messages it must still
// take (cluster_protocol.h). A rank that stays silent (or one still busy long after) is not
// waited for: the caller ends the job.
bool ClusterFrontEnd::finish_stopping(Clock::time_point stop_sent_at) {
  if (std::count(said_bye_.begin(), said_bye_.end(), 1) == n_ranks_) {
    for (int r = 0; r < n_ranks_; ++r) {
      wire::Writer w;
      w.put(Msg::Exit).put<uint64_t>(0).put<int64_t>(posted_to_[r] + 1);
      post_worker(r, w.take());
    }
    return true;
  }
  std::vector<int> silent, busy;
  for (int r = 0; r < n_ranks_; ++r)
    if (!said_bye_[r]) (down_[r] ? silent : busy).push_back(r);
  auto ranks = [](const std::vector<int>& v) {  // "rank 1", "ranks 1, 3"
    std::string s = v.size() == 1 ? "rank " : "ranks ";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s;
  };
  const double limit = std::max(10.0, 3 * cfg_.peer_timeout_s);
  if (silent.empty() && since(stop_sent_at) < limit) return false;
  std::lock_guard<std::mutex> lk(mu_);
  shutdown_problem_ =
      !silent.empty() ? ranks(silent) + " did not answer the stop (silent for " +
                            ms(cfg_.peer_timeout_s) + " ms, --peer-timeout-ms)"
                      : ranks(busy) + " did not stop within " + ms(limit) + " ms of being asked";
  return true;
}

void ClusterFrontEnd::loop() {
  bool stop_sent = false;
  Clock::time_point stop_sent_at;
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
      post_worker(it->second->prefill, simple(Msg::Cancel, id));
      if (it->second->decode >= 0) post_worker(it->second->decode, simple(Msg::Cancel, id));
    }
    if (stopping && !stop_sent) {
      for (int r = 0; r < n_ranks_; ++r) post_worker(r, simple(Msg::Stop));
      stop_sent = true;
      stop_sent_at = Clock::now();
    }
    while (auto m = mb_.poll(kToFrontEnd)) on_message(*m);
    check_peers();
    if (stop_sent && finish_stopping(stop_sent_at)) break;
  }
  // Every rank said goodbye after its last events (or is given up); anything still live never
  // finished.
  for (auto& [id, l] : live_)
    if (l->req && l->req->on_finish)
      l->req->on_finish(
          {FinishReason::Cancelled, "", static_cast<int64_t>(l->req->prompt.size()), l->next});
  live_.clear();
  if (shutdown_problem().empty()) mb_.flush();
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
