#include "engine/scheduler.h"

#include <algorithm>

#include "core/error.h"

namespace moeserve::engine {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Stop:
      return "stop";
    case FinishReason::Length:
      return "length";
    case FinishReason::Cancelled:
      return "cancelled";
    case FinishReason::Error:
      return "error";
  }
  return "?";
}

void TransferStats::add(const TransferStats& o) {
  transfers += o.transfers;
  bytes += o.bytes;
  failures += o.failures;
  leases_expired += o.leases_expired;
  blocks_reused += o.blocks_reused;
  latency_sum += o.latency_sum;
  if (latency_buckets.size() < o.latency_buckets.size())
    latency_buckets.resize(o.latency_buckets.size());
  for (size_t i = 0; i < o.latency_buckets.size(); ++i) latency_buckets[i] += o.latency_buckets[i];
}

std::string validate_request(const Request& r, const model::ModelConfig& c,
                             const EngineConfig& cfg) {
  if (r.prompt.empty()) return "the prompt is empty";
  for (int32_t t : r.prompt)
    if (t < 0 || t >= c.vocab_size)
      return "token id " + std::to_string(t) + " is out of range [0, " +
             std::to_string(c.vocab_size) + ")";
  if (static_cast<int64_t>(r.prompt.size()) + 1 > cfg.max_model_len)
    return "the prompt has " + std::to_string(r.prompt.size()) +
           " tokens; with at least one generated token that exceeds the maximum context length "
           "of " +
           std::to_string(cfg.max_model_len);
  if (r.max_tokens < 1) return "max_tokens must be at least 1";
  return "";
}

int64_t kv_blocks_for(const model::ModelConfig& c, const EngineConfig& e) {
  if (e.kv_blocks > 0) return e.kv_blocks;
  const double block_bytes = static_cast<double>(e.block_size) * c.num_hidden_layers *
                             kv::kv_row_bytes(e.kv_dtype, c.kv_cache_dim());
  return std::max<int64_t>(1, static_cast<int64_t>(e.kv_cache_mb * 1048576.0 / block_bytes));
}

// A request inside the scheduler. Its tokens are prompt + generated; `computed` of them are in
// the KV cache. A preempted sequence keeps its tokens and recomputes them from position 0.
struct Scheduler::Seq {
  uint64_t id = 0;
  std::shared_ptr<Request> req;
  Sampler sampler;
  std::vector<int32_t> tokens;
  int64_t n_prompt = 0, n_generated = 0, computed = 0;
  std::vector<int32_t> blocks;
  int64_t n_published = 0;    // leading blocks published (or given up on: publishing stopped)
  int64_t cached_tokens = 0;  // prompt tokens found in the cache on the first admission
  bool admitted = false;      // once: counted in the prefix cache's statistics
  bool done = false;
  Seq(uint64_t i, std::shared_ptr<Request> r)
      : id(i),
        req(std::move(r)),
        sampler(req->sampling),
        tokens(req->prompt),
        n_prompt(static_cast<int64_t>(req->prompt.size())) {}
};

Scheduler::Scheduler(model::Model& m, const EngineConfig& cfg, kv::KvPool& kv)
    : model_(m), cfg_(cfg), kv_(kv) {
  MS_CHECK(cfg_.max_num_seqs >= 1, "--max-num-seqs must be >= 1");
  MS_CHECK(cfg_.max_model_len >= 2, "--max-model-len must be >= 2");
  MS_CHECK(cfg_.max_batch_tokens >= 1, "--max-batch-tokens must be >= 1");
  MS_CHECK(kv_.n_blocks() * kv_.block_size() >= cfg_.max_model_len, "the KV cache (",
           kv_.n_blocks(), " blocks of ", kv_.block_size(),
           " tokens) cannot hold one sequence of --max-model-len ", cfg_.max_model_len,
           " tokens; raise --kv-cache-mb or lower --max-model-len");
  logits_.resize(static_cast<size_t>(cfg_.max_num_seqs) * m.config().vocab_size);
}

Scheduler::~Scheduler() {
  finish_all(FinishReason::Cancelled);
}

void Scheduler::add(uint64_t id, std::shared_ptr<Request> r) {
  waiting_.push_back(std::make_unique<Seq>(id, std::move(r)));
}

void Scheduler::add_prefilled(Prefilled p) {
  auto s = std::make_unique<Seq>(p.id, std::move(p.req));
  s->tokens = std::move(p.tokens);
  s->n_prompt = p.n_prompt;
  s->n_generated = static_cast<int64_t>(s->tokens.size()) - p.n_prompt;
  s->computed = p.n_prompt;
  s->blocks = std::move(p.blocks);
  s->cached_tokens = p.cached_tokens;
  s->admitted = true;
  publish_blocks(*s);
  if (!p.sampler_state.empty()) s->sampler.set_state(p.sampler_state);
  // It joins the running set at once when there is room, else waits (keeping its blocks).
  if (static_cast<int64_t>(running_.size()) < cfg_.max_num_seqs)
    running_.push_back(std::move(s));
  else
    waiting_.push_back(std::move(s));
}

bool Scheduler::cancel(uint64_t id) {
  bool found = false;
  for (auto& s : running_)
    if (s->id == id && !s->done) finish(*s, FinishReason::Cancelled), found = true;
  for (auto& s : waiting_)
    if (s->id == id && !s->done) finish(*s, FinishReason::Cancelled), found = true;
  sweep();
  return found;
}

void Scheduler::finish_all(FinishReason r, const std::string& err) {
  for (auto& s : running_) finish(*s, r, err);
  for (auto& s : waiting_) finish(*s, r, err);
  running_.clear();
  waiting_.clear();
}

void Scheduler::finish(Seq& s, FinishReason r, const std::string& err) {
  if (s.done) return;
  s.done = true;
  drop_blocks(s);
  FinishEvent e;
  e.reason = r;
  e.error = err;
  e.prompt_tokens = s.n_prompt;
  e.completion_tokens = s.n_generated;
  e.cached_tokens = s.cached_tokens;
  if (s.req->on_finish) s.req->on_finish(e);
}

bool Scheduler::ensure_blocks(Seq& s, int64_t n_positions) {
  const int64_t need = kv_.blocks_for(n_positions) - static_cast<int64_t>(s.blocks.size());
  return need <= 0 || kv_.allocate(need, &s.blocks);
}

void Scheduler::drop_blocks(Seq& s) {
  kv_.release(s.blocks);
  s.blocks.clear();
  s.computed = 0;
  s.n_published = 0;
}

void Scheduler::preempt(Seq& s) {
  drop_blocks(s);
  ++preemptions_;
}

void Scheduler::reuse_prefix(Seq& s) {
  if (!cfg_.prefix_caching || !s.blocks.empty()) return;
  const int64_t n_tokens = static_cast<int64_t>(s.tokens.size());
  const int64_t k = kv_.match(s.tokens.data(), (n_tokens - 1) / kv_.block_size(), &s.blocks);
  s.computed = k * kv_.block_size();
  s.n_published = k;
}

void Scheduler::publish_blocks(Seq& s) {
  if (!cfg_.prefix_caching) return;
  const int64_t bs = kv_.block_size();
  while ((s.n_published + 1) * bs <= s.computed) {
    const int64_t i = s.n_published;
    if (!kv_.is_published(s.blocks[i])) {
      const int32_t parent = i > 0 ? s.blocks[i - 1] : -1;
      if (parent >= 0 && !kv_.is_published(parent)) return;  // after a collision: stop here
      s.blocks[i] = kv_.publish(s.blocks[i], parent, s.tokens.data() + i * bs);
    }
    ++s.n_published;
  }
}

void Scheduler::sweep() {
  auto gone = [](const std::unique_ptr<Seq>& s) { return s->done; };
  running_.erase(std::remove_if(running_.begin(), running_.end(), gone), running_.end());
  waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(), gone), waiting_.end());
}

bool Scheduler::step(bool force_forward) {
  sweep();
  // 1. Schedule. Running sequences that finished their prompt decode one token each; those
  // still prefilling, then newly admitted ones, share the rest of the token budget.
  struct Work {
    Seq* s;
    int64_t n;
  };
  std::vector<Work> work;
  int64_t budget = cfg_.max_batch_tokens;
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Seq& s = *running_[i];
    const int64_t pending = static_cast<int64_t>(s.tokens.size()) - s.computed;
    const int64_t n = std::min(pending, budget);
    // Out of blocks: preempt the newest running sequences until this one fits.
    while (!ensure_blocks(s, s.computed + n)) {
      Seq& victim = *running_.back();
      if (&victim == &s) break;
      preempt(victim);
      waiting_.push_front(std::move(running_.back()));
      running_.pop_back();
    }
    if (static_cast<int64_t>(s.blocks.size()) < kv_.blocks_for(s.computed + n)) {
      preempt(s);  // even alone it does not fit now; wait for blocks
      waiting_.push_front(std::move(running_[i]));
      running_.erase(running_.begin() + i);
      break;
    }
    work.push_back({&s, n});
    budget -= n;
  }
  while (budget > 0 && !waiting_.empty() &&
         static_cast<int64_t>(running_.size()) < cfg_.max_num_seqs) {
    Seq& s = *waiting_.front();
    const bool fresh = s.blocks.empty();
    reuse_prefix(s);
    const int64_t n = std::min<int64_t>(static_cast<int64_t>(s.tokens.size()) - s.computed, budget);
    if (!ensure_blocks(s, s.computed + n)) {  // admit in order; wait for blocks
      if (fresh) drop_blocks(s);              // what it matched waits in the cache, not held
      break;
    }
    if (!s.admitted) {
      s.admitted = true;
      s.cached_tokens = std::min(s.computed, s.n_prompt);
      if (cfg_.prefix_caching) prefix_query_tokens_ += s.n_prompt;
      prefix_hit_tokens_ += s.cached_tokens;
    }
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    work.push_back({running_.back().get(), n});
    budget -= n;
  }
  if (on_scheduled) on_scheduled();
  if (work.empty() && !force_forward) return false;

  // 2. One forward over all chunks.
  model::Batch b;
  std::vector<Seq*> sampled;
  for (const Work& w : work) {
    const int64_t row = static_cast<int64_t>(b.tokens.size());
    b.tokens.insert(b.tokens.end(), w.s->tokens.begin() + w.s->computed,
                    w.s->tokens.begin() + w.s->computed + w.n);
    b.seqs.push_back({row, w.n, w.s->computed, w.s->blocks.data()});
    if (w.s->computed + w.n == static_cast<int64_t>(w.s->tokens.size())) {
      b.logit_rows.push_back(row + w.n - 1);
      sampled.push_back(w.s);
    }
  }
  const int64_t V = model_.config().vocab_size;
  if (logits_.size() < sampled.size() * V) logits_.resize(sampled.size() * V);
  try {
    model_.forward(b, kv_, logits_.data());
  } catch (const std::exception& e) {
    for (const Work& w : work) finish(*w.s, FinishReason::Error, e.what());
    sweep();
    throw;
  }
  if (work.empty()) return false;
  for (const Work& w : work) {
    w.s->computed += w.n;
    publish_blocks(*w.s);
  }

  // 3. Sample, report, finish.
  for (const Work& w : work)
    prompt_tokens_ +=
        std::max<int64_t>(0, std::min(w.s->n_prompt, w.s->computed) - (w.s->computed - w.n));
  for (size_t i = 0; i < sampled.size(); ++i) {
    Seq& s = *sampled[i];
    const float* row = logits_.data() + i * V;
    TokenEvent ev;
    ev.token = s.sampler.sample(row, V, s.tokens, s.n_prompt);
    ev.index = s.n_generated;
    ev.cached_tokens = s.cached_tokens;
    if (s.req->top_logprobs >= 0) {
      log_softmax(row, V, &lp_);
      ev.logprob = static_cast<float>(lp_[ev.token]);
      std::vector<int32_t> idx(V);
      for (int64_t j = 0; j < V; ++j) idx[j] = static_cast<int32_t>(j);
      const int64_t k = std::min<int64_t>(s.req->top_logprobs, V);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t c) {
        return lp_[a] > lp_[c] || (lp_[a] == lp_[c] && a < c);
      });
      for (int64_t j = 0; j < k; ++j) ev.top.push_back({idx[j], static_cast<float>(lp_[idx[j]])});
    }
    s.tokens.push_back(ev.token);
    ++s.n_generated;
    ++generated_tokens_;
    if (s.req->on_token) s.req->on_token(ev);
    const bool stop_tok = std::find(s.req->stop_ids.begin(), s.req->stop_ids.end(), ev.token) !=
                          s.req->stop_ids.end();
    if (stop_tok) {
      finish(s, FinishReason::Stop);
    } else if (s.n_generated >= s.req->max_tokens ||
               static_cast<int64_t>(s.tokens.size()) >= cfg_.max_model_len) {
      finish(s, FinishReason::Length);
    } else if (prefill_only_ && on_prefilled) {
      Prefilled p;
      p.id = s.id;
      p.req = s.req;
      p.tokens = s.tokens;
      p.n_prompt = s.computed;
      p.blocks = std::move(s.blocks);
      s.blocks.clear();
      p.sampler_state = s.sampler.state();
      p.cached_tokens = s.cached_tokens;
      s.done = true;  // leaves this scheduler without a finish event
      on_prefilled(std::move(p));
    }
  }
  sweep();
  ++steps_;
  return true;
}

}  // namespace moeserve::engine
