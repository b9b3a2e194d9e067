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

int64_t kv_layers_for(const model::ModelConfig& c, const EngineConfig& e) {
  return c.num_hidden_layers + (e.speculative_tokens > 0 ? 1 : 0);
}

int64_t kv_blocks_for(const model::ModelConfig& c, const EngineConfig& e) {
  if (e.kv_blocks > 0) return e.kv_blocks;
  const double block_bytes = static_cast<double>(e.block_size) * kv_layers_for(c, e) *
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
  bool spec = false;            // drafts with the MTP module
  bool hand_over = false;       // prefill-only: leaves after this step's MTP rows and drafts
  std::vector<int32_t> drafts;  // proposed to follow tokens.back()
  std::vector<float> draft_q;   // sampled: the distribution each draft was drawn from [n, vocab]
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
  MS_CHECK(cfg_.speculative_tokens >= 0, "--speculative-tokens must be >= 0");
  if (cfg_.speculative_tokens > 0) {
    model_.load_mtp();
    MS_CHECK(kv_.n_layers() > m.config().num_hidden_layers,
             "speculative decoding needs a KV pool with a layer for the MTP module");
    // A block's MTP row at its last position read the token after the block: part of its key.
    kv_.set_key_next_token(true);
    MS_CHECK(kv_.n_blocks() * kv_.block_size() >= cfg_.max_model_len + cfg_.speculative_tokens,
             "the KV cache (", kv_.n_blocks(), " blocks of ", kv_.block_size(),
             " tokens) cannot hold one sequence of --max-model-len ", cfg_.max_model_len,
             " tokens and its ", cfg_.speculative_tokens,
             " draft tokens; raise --kv-cache-mb or lower --max-model-len");
  }
}

bool Scheduler::speculates(const Request& r) const {
  return cfg_.speculative_tokens > 0 && !r.sampling.processes_logits() && r.top_logprobs < 0;
}

Scheduler::~Scheduler() {
  finish_all(FinishReason::Cancelled);
}

void Scheduler::add(uint64_t id, std::shared_ptr<Request> r) {
  waiting_.push_back(std::make_unique<Seq>(id, std::move(r)));
  waiting_.back()->spec = speculates(*waiting_.back()->req);
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
  s->spec = speculates(*s->req);
  if (s->spec) {
    s->drafts = std::move(p.drafts);
    s->draft_q = std::move(p.draft_q);
  }
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
  s.drafts.clear();
  s.draft_q.clear();
}

void Scheduler::trim_blocks(Seq& s, int64_t n_positions) {
  const int64_t keep = kv_.blocks_for(n_positions);
  if (static_cast<int64_t>(s.blocks.size()) <= keep) return;
  // Past `computed` (n_positions > computed), so never published.
  std::vector<int32_t> extra(s.blocks.begin() + keep, s.blocks.end());
  s.blocks.resize(keep);
  kv_.release(extra);
}

void Scheduler::preempt(Seq& s) {
  drop_blocks(s);
  ++preemptions_;
}

void Scheduler::reuse_prefix(Seq& s) {
  if (!cfg_.prefix_caching || !s.blocks.empty()) return;
  const int64_t n_tokens = static_cast<int64_t>(s.tokens.size());
  // (Under speculative decoding the keys also hold the token after each block, which the
  // sequence has: its last token is never in a matched block.)
  const int64_t k = kv_.match(s.tokens.data(), (n_tokens - 1) / kv_.block_size(), &s.blocks);
  s.computed = k * kv_.block_size();
  s.n_published = k;
}

void Scheduler::publish_blocks(Seq& s) {
  // Under speculative decoding a published block holds the MTP module's rows too, which only
  // speculating sequences write, and its key the token after it (which a full block's sequence
  // has: `computed` stays short of its last token).
  if (!cfg_.prefix_caching || (cfg_.speculative_tokens > 0 && !s.spec)) return;
  const int64_t bs = kv_.block_size();
  while ((s.n_published + 1) * bs <= s.computed) {
    const int64_t i = s.n_published;
    if (!kv_.is_published(s.blocks[i])) {
      const int32_t parent = i > 0 ? s.blocks[i - 1] : -1;
      if (parent >= 0 && !kv_.is_published(parent)) return;  // after a collision: stop here
      MS_ASSERT(!kv_.key_next_token() || static_cast<int64_t>(s.tokens.size()) > (i + 1) * bs);
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

bool Scheduler::emit(Seq& s, TokenEvent ev, const float* row) {
  const int64_t V = model_.config().vocab_size;
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
  const bool stop_tok =
      std::find(s.req->stop_ids.begin(), s.req->stop_ids.end(), ev.token) != s.req->stop_ids.end();
  if (stop_tok || s.n_generated >= s.req->max_tokens ||
      static_cast<int64_t>(s.tokens.size()) >= cfg_.max_model_len) {
    if (!s.spec) publish_blocks(s);  // (a speculating one: not this step's, without MTP rows)
    finish(s, stop_tok ? FinishReason::Stop : FinishReason::Length);
    return true;
  }
  if (prefill_only_ && on_prefilled) {
    if (s.spec)
      s.hand_over = true;  // after the module's rows and drafts (step 4)
    else
      hand_over(s);
    return true;
  }
  return false;
}

void Scheduler::hand_over(Seq& s) {
  Prefilled p;
  p.id = s.id;
  p.req = s.req;
  p.tokens = s.tokens;
  p.n_prompt = s.computed;
  p.blocks = std::move(s.blocks);
  s.blocks.clear();
  p.sampler_state = s.sampler.state();
  p.cached_tokens = s.cached_tokens;
  p.drafts = std::move(s.drafts);
  p.draft_q = std::move(s.draft_q);
  s.done = true;  // leaves this scheduler without a finish event
  on_prefilled(std::move(p));
}

void Scheduler::draft(const std::vector<Seq*>& seqs, const std::vector<int64_t>& rows) {
  const model::ModelConfig& c = model_.config();
  const int64_t V = c.vocab_size, H = c.hidden_size;
  // How many each may draft: k, short of its remaining tokens and the context length.
  std::vector<int64_t> want(seqs.size());
  int64_t most = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    Seq& s = *seqs[i];
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    want[i] = std::min(
        {cfg_.speculative_tokens, s.req->max_tokens - s.n_generated - 1, cfg_.max_model_len - n});
    // The chained drafts write MTP rows at positions n - 1 .. n + want - 3 (the step reserved
    // the blocks).
    if (want[i] > 1 && !ensure_blocks(s, n + want[i] - 2)) want[i] = 1;
    s.drafts.clear();
    s.draft_q.clear();
    most = std::max(most, want[i]);
  }
  if (mtp_lockstep()) most = cfg_.speculative_tokens;  // the group's k - 1 chained forwards
  auto pick = [&](Seq& s, const float* row) {
    if (s.req->sampling.temperature <= 0.0f) {
      s.drafts.push_back(argmax(row, V));
      return;
    }
    s.sampler.distribution(row, V, &probs_);
    const int64_t pos = static_cast<int64_t>(s.tokens.size() + s.drafts.size());
    s.drafts.push_back(Sampler::draw(probs_.data(), V, s.sampler.uniform_at(pos, 0)));
    s.draft_q.insert(s.draft_q.end(), probs_.begin(), probs_.end());
  };
  std::vector<int64_t> h_row(rows);  // each sequence's input row of the next chained forward
  for (size_t i = 0; i < seqs.size(); ++i)
    if (want[i] >= 1) pick(*seqs[i], mtp_logits_.data() + i * V);
  for (int64_t j = 1; j < most; ++j) {
    // Draft j + 1: the module at position n + j - 2 (n tokens), on its own output at the
    // position before and draft j.
    model::Batch b;
    std::vector<size_t> who;
    const std::vector<float>& src = j == 1 ? mtp_h_ : mtp_h2_;
    std::vector<float> h_in;
    for (size_t i = 0; i < seqs.size(); ++i) {
      Seq& s = *seqs[i];
      if (want[i] <= j) continue;
      const int64_t row = static_cast<int64_t>(b.tokens.size());
      b.tokens.push_back(s.drafts.back());
      b.seqs.push_back({row, 1, static_cast<int64_t>(s.tokens.size()) + j - 2, s.blocks.data()});
      b.logit_rows.push_back(row);
      h_in.insert(h_in.end(), src.begin() + h_row[i] * H, src.begin() + (h_row[i] + 1) * H);
      h_row[i] = row;
      who.push_back(i);
    }
    if (mtp_logits_.size() < who.size() * V) mtp_logits_.resize(who.size() * V);
    mtp_h2_.resize(who.size() * H);
    model_.forward_mtp(b, h_in.data(), kv_, mtp_logits_.data(), mtp_h2_.data());
    for (size_t r = 0; r < who.size(); ++r) pick(*seqs[who[r]], mtp_logits_.data() + r * V);
  }
  // What the next step's verification needs; the rest (rows of rejected drafts) goes back.
  for (Seq* s : seqs) trim_blocks(*s, static_cast<int64_t>(s->tokens.size() + s->drafts.size()));
}

bool Scheduler::may_speculate() const {
  for (const auto& s : running_)
    if (s->spec && !s->done) return true;
  for (const auto& s : waiting_)
    if (s->spec && !s->done) return true;
  return false;
}

bool Scheduler::step(bool force_forward, bool group_speculates) {
  sweep();
  // (Where the group agreed that nobody speculates, this rank does not either.)
  MS_ASSERT(group_speculates || !model_.expert_parallel() || !may_speculate());
  group_spec_ = group_speculates;
  const int64_t V = model_.config().vocab_size, H = model_.config().hidden_size;
  // 1. Schedule. Running sequences that finished their prompt decode one token each (with their
  // drafts, under speculative decoding); those still prefilling, then newly admitted ones, share
  // the rest of the token budget.
  struct Work {
    Seq* s;
    int64_t n;
    int64_t nd = 0;  // of the n tokens, drafts to verify
    int64_t row = 0, past = 0;
    bool sampled = false;  // reaches the sequence's last token: gives the next one
  };
  auto pending_of = [](const Work& w) { return w.n - w.nd; };
  std::vector<Work> work;
  int64_t budget = cfg_.max_batch_tokens;
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Seq& s = *running_[i];
    const int64_t pending = static_cast<int64_t>(s.tokens.size()) - s.computed;
    int64_t n = std::min(pending, budget);
    // Drafts are verified whole (the budget may be passed by them), so that where they are cut
    // never depends on the other sequences.
    const int64_t nd = pending == 1
                           ? std::min<int64_t>(static_cast<int64_t>(s.drafts.size()),
                                               std::max<int64_t>(0, cfg_.max_batch_tokens - 1))
                           : 0;
    n += nd;
    // A speculating sequence that reaches its end also holds the blocks of its next drafts.
    const int64_t extra = s.spec && s.computed + n - nd == static_cast<int64_t>(s.tokens.size())
                              ? std::max<int64_t>(0, cfg_.speculative_tokens - 1)
                              : 0;
    // Out of blocks: preempt the newest running sequences until this one fits.
    while (!ensure_blocks(s, s.computed + n + extra)) {
      Seq& victim = *running_.back();
      if (&victim == &s) break;
      preempt(victim);
      waiting_.push_front(std::move(running_.back()));
      running_.pop_back();
    }
    if (static_cast<int64_t>(s.blocks.size()) < kv_.blocks_for(s.computed + n + extra)) {
      preempt(s);  // even alone it does not fit now; wait for blocks
      waiting_.push_front(std::move(running_[i]));
      running_.erase(running_.begin() + i);
      break;
    }
    s.drafts.resize(nd);
    s.draft_q.resize(s.draft_q.empty() ? 0 : nd * V);
    work.push_back({&s, n, nd});
    budget -= n;
  }
  while (budget > 0 && !waiting_.empty() &&
         static_cast<int64_t>(running_.size()) < cfg_.max_num_seqs) {
    Seq& s = *waiting_.front();
    const bool fresh = s.blocks.empty();
    reuse_prefix(s);
    const int64_t pending = static_cast<int64_t>(s.tokens.size()) - s.computed;
    // (Only a handed-over sequence waits with drafts: it verifies them all, as when running.)
    const int64_t nd = pending == 1
                           ? std::min<int64_t>(static_cast<int64_t>(s.drafts.size()),
                                               std::max<int64_t>(0, cfg_.max_batch_tokens - 1))
                           : 0;
    const int64_t n = std::min<int64_t>(pending, budget) + nd;
    const int64_t extra = s.spec && s.computed + n - nd == static_cast<int64_t>(s.tokens.size())
                              ? std::max<int64_t>(0, cfg_.speculative_tokens - 1)
                              : 0;
    if (!ensure_blocks(s, s.computed + n + extra)) {  // admit in order; wait for blocks
      if (fresh) drop_blocks(s);  // what it matched waits in the cache, not held
      break;
    }
    s.drafts.resize(nd);
    s.draft_q.resize(s.draft_q.empty() ? 0 : nd * V);
    if (!s.admitted) {
      s.admitted = true;
      s.cached_tokens = std::min(s.computed, s.n_prompt);
      if (cfg_.prefix_caching) prefix_query_tokens_ += s.n_prompt;
      prefix_hit_tokens_ += s.cached_tokens;
    }
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    work.push_back({running_.back().get(), n, nd});
    budget -= n;
  }
  if (on_scheduled) on_scheduled();
  if (work.empty() && !force_forward) return false;

  // 2. One forward over all chunks.
  model::Batch b;
  struct Sampled {
    Work* w;
    int64_t logit_row;
  };
  std::vector<Sampled> sampled;
  bool any_spec = false;
  for (Work& w : work) {
    const int64_t row = static_cast<int64_t>(b.tokens.size());
    w.row = row;
    w.past = w.s->computed;
    const int64_t pending = w.n - w.nd;
    b.tokens.insert(b.tokens.end(), w.s->tokens.begin() + w.s->computed,
                    w.s->tokens.begin() + w.s->computed + pending);
    b.tokens.insert(b.tokens.end(), w.s->drafts.begin(), w.s->drafts.end());
    b.seqs.push_back({row, w.n, w.s->computed, w.s->blocks.data()});
    any_spec = any_spec || w.s->spec;
    if (w.s->computed + pending == static_cast<int64_t>(w.s->tokens.size())) {
      w.sampled = true;
      sampled.push_back({&w, static_cast<int64_t>(b.logit_rows.size())});
      for (int64_t r = pending - 1; r < w.n; ++r) b.logit_rows.push_back(row + r);
    }
  }
  if (logits_.size() < b.logit_rows.size() * V) logits_.resize(b.logit_rows.size() * V);
  if (any_spec) hidden_.resize(b.tokens.size() * H);
  try {
    model_.forward(b, kv_, logits_.data(), any_spec ? hidden_.data() : nullptr);
  } catch (const std::exception& e) {
    for (const Work& w : work) finish(*w.s, FinishReason::Error, e.what());
    sweep();
    throw;
  }
  if (work.empty()) {
    if (mtp_lockstep()) {  // the group's k forwards of the module, empty here
      model::Batch none;
      for (int64_t j = 0; j < cfg_.speculative_tokens; ++j)
        model_.forward_mtp(none, nullptr, kv_, nullptr, nullptr);
    }
    return false;
  }
  for (const Work& w : work) {
    if (w.nd > 0) continue;  // advanced by what it accepts
    w.s->computed += w.n;
    prompt_tokens_ += std::max<int64_t>(0, std::min(w.s->n_prompt, w.s->computed) - w.past);
    if (!w.s->spec) publish_blocks(*w.s);  // (a speculating one after its MTP rows)
  }

  // 3. Sample (verify the drafts), report, finish.
  for (const Sampled& sm : sampled) {
    Work& w = *sm.w;
    Seq& s = *w.s;
    const float* row = logits_.data() + sm.logit_row * V;
    const bool greedy = s.req->sampling.temperature <= 0.0f;
    const int64_t pos = w.past + pending_of(w);  // of the first token this step gives
    if (w.nd == 0) {
      TokenEvent ev;
      if (s.spec && !greedy) {  // (its draws by position, as when it verifies drafts)
        s.sampler.distribution(row, V, &probs_);
        ev.token = Sampler::draw(probs_.data(), V, s.sampler.uniform_at(pos, 2));
      } else {
        ev.token = s.sampler.sample(row, V, s.tokens, s.n_prompt);
      }
      emit(s, ev, row);
      continue;
    }
    // Verify: row i holds the main model's logits after the pending token and drafts [0, i).
    std::vector<int32_t> out;
    for (int64_t i = 0; i <= w.nd; ++i) {
      const float* r = row + i * V;
      int32_t t;
      bool agree;
      if (greedy) {
        t = argmax(r, V);
        agree = i < w.nd && t == s.drafts[i];
      } else {
        s.sampler.distribution(r, V, &probs_);
        const double u_resample = s.sampler.uniform_at(pos + i, 2);
        if (i == w.nd) {
          t = Sampler::draw(probs_.data(), V, u_resample);
          agree = false;
        } else {
          agree = s.sampler.verify(probs_.data(), s.draft_q.data() + i * V, V, s.drafts[i],
                                   s.sampler.uniform_at(pos + i, 1), u_resample, &t);
        }
      }
      out.push_back(t);
      if (!agree) break;
    }
    spec_draft_tokens_ += w.nd;
    spec_accepted_tokens_ += static_cast<int64_t>(out.size()) - 1;
    s.computed = w.past + static_cast<int64_t>(out.size());
    s.drafts.clear();
    s.draft_q.clear();
    for (size_t i = 0; i < out.size(); ++i) {
      TokenEvent ev;
      ev.token = out[i];
      if (emit(s, ev, row + i * V)) break;
    }
  }

  // 4. The MTP module over the positions each speculating sequence computed, then its drafts.
  // Under expert parallelism every rank runs it, with or without rows of its own, unless the
  // group agreed that nobody speculates.
  if (any_spec || mtp_lockstep()) {
    model::Batch mb;
    std::vector<float> h_in;
    std::vector<Seq*> drafting;
    std::vector<int64_t> draft_rows;
    for (Work& w : work) {
      Seq& s = *w.s;
      if (!s.spec || s.done) continue;
      // Position p reads the main model's hidden state there and token p + 1.
      const int64_t n = s.computed - w.past;
      const int64_t row = static_cast<int64_t>(mb.tokens.size());
      mb.tokens.insert(mb.tokens.end(), s.tokens.begin() + w.past + 1,
                       s.tokens.begin() + s.computed + 1);
      mb.seqs.push_back({row, n, w.past, s.blocks.data()});
      h_in.insert(h_in.end(), hidden_.begin() + w.row * H, hidden_.begin() + (w.row + n) * H);
      // Drafts follow a token this step gave (not a prompt chunk that happens to end one
      // short of the last token: how the prompt was cut must not change what is drafted).
      if (w.sampled && s.computed + 1 == static_cast<int64_t>(s.tokens.size())) {
        mb.logit_rows.push_back(row + n - 1);
        drafting.push_back(&s);
        draft_rows.push_back(row + n - 1);
      }
    }
    if (!mb.tokens.empty() || mtp_lockstep()) {
      if (mtp_logits_.size() < mb.logit_rows.size() * V)
        mtp_logits_.resize(mb.logit_rows.size() * V);
      mtp_h_.resize(mb.tokens.size() * H);
      try {
        model_.forward_mtp(mb, h_in.data(), kv_, mtp_logits_.data(), mtp_h_.data());
        draft(drafting, draft_rows);
      } catch (const std::exception& e) {
        for (const Work& w : work) finish(*w.s, FinishReason::Error, e.what());
        sweep();
        throw;
      }
    }
    for (Work& w : work)
      if (w.s->spec && !w.s->done) publish_blocks(*w.s);
    for (Work& w : work)
      if (w.s->hand_over && !w.s->done) hand_over(*w.s);
  }
  sweep();
  ++steps_;
  return true;
}

}  // namespace moeserve::engine
