#include "engine/engine.h"

#include <algorithm>
#include <cmath>

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

// A request inside the engine. Its tokens are prompt + generated; `computed` of them are in the
// KV cache. A preempted sequence keeps its tokens and recomputes them from position 0.
struct Engine::Seq {
  uint64_t id = 0;
  std::shared_ptr<Request> req;
  Sampler sampler;
  std::vector<int32_t> tokens;
  int64_t n_prompt = 0, n_generated = 0, computed = 0;
  std::vector<int32_t> blocks;
  bool done = false;
  Seq(uint64_t i, std::shared_ptr<Request> r)
      : id(i),
        req(std::move(r)),
        sampler(req->sampling),
        tokens(req->prompt),
        n_prompt(static_cast<int64_t>(req->prompt.size())) {}
};

static int64_t blocks_from_mb(const model::ModelConfig& c, const EngineConfig& e) {
  if (e.kv_blocks > 0) return e.kv_blocks;
  const double block_bytes = 4.0 * e.block_size * c.num_hidden_layers * c.kv_cache_dim();
  return std::max<int64_t>(1, static_cast<int64_t>(e.kv_cache_mb * 1048576.0 / block_bytes));
}

Engine::Engine(model::Model& m, const EngineConfig& cfg)
    : model_(m),
      cfg_(cfg),
      kv_(blocks_from_mb(m.config(), cfg), cfg.block_size, m.config().num_hidden_layers,
          m.config().kv_cache_dim()) {
  MS_CHECK(cfg_.max_num_seqs >= 1, "--max-num-seqs must be >= 1");
  MS_CHECK(cfg_.max_model_len >= 2, "--max-model-len must be >= 2");
  MS_CHECK(cfg_.max_batch_tokens >= 1, "--max-batch-tokens must be >= 1");
  MS_CHECK(kv_.n_blocks() * cfg_.block_size >= cfg_.max_model_len, "the KV cache (", kv_.n_blocks(),
           " blocks of ", cfg_.block_size, " tokens) cannot hold one sequence of --max-model-len ",
           cfg_.max_model_len, " tokens; raise --kv-cache-mb or lower --max-model-len");
  stats_.kv_blocks_total = kv_.n_blocks();
  logits_.resize(static_cast<size_t>(cfg_.max_num_seqs) * m.config().vocab_size);
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  for (auto& s : running_) finish(*s, FinishReason::Cancelled);
  for (auto& s : waiting_) finish(*s, FinishReason::Cancelled);
  for (auto& s : incoming_) finish(*s, FinishReason::Cancelled);
}

SubmitResult Engine::submit(std::shared_ptr<Request> r, uint64_t* id, std::string* error) {
  const auto& c = model_.config();
  auto bad = [&](const std::string& m) {
    if (error) *error = m;
    return SubmitResult::Invalid;
  };
  if (r->prompt.empty()) return bad("the prompt is empty");
  for (int32_t t : r->prompt)
    if (t < 0 || t >= c.vocab_size)
      return bad("token id " + std::to_string(t) + " is out of range [0, " +
                 std::to_string(c.vocab_size) + ")");
  if (static_cast<int64_t>(r->prompt.size()) + 1 > cfg_.max_model_len)
    return bad(
        "the prompt has " + std::to_string(r->prompt.size()) +
        " tokens; with at least one generated token that exceeds the maximum context length of " +
        std::to_string(cfg_.max_model_len));
  if (r->max_tokens < 1) return bad("max_tokens must be at least 1");
  std::lock_guard<std::mutex> lk(mu_);
  if (static_cast<int64_t>(incoming_.size() + waiting_.size()) >= cfg_.max_waiting) {
    if (error) *error = "the server is busy: too many requests are waiting";
    return SubmitResult::QueueFull;
  }
  const uint64_t i = next_id_++;
  if (id) *id = i;
  incoming_.push_back(std::make_unique<Seq>(i, std::move(r)));
  cv_.notify_all();
  return SubmitResult::Accepted;
}

void Engine::cancel(uint64_t id) {
  std::lock_guard<std::mutex> lk(mu_);
  cancels_.push_back(id);
  cv_.notify_all();
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  EngineStats s = stats_;
  s.expert_tokens = model_.expert_token_counts();
  return s;
}

void Engine::finish(Seq& s, FinishReason r, const std::string& err) {
  if (s.done) return;
  s.done = true;
  kv_.release(s.blocks);
  s.blocks.clear();
  FinishEvent e;
  e.reason = r;
  e.error = err;
  e.prompt_tokens = s.n_prompt;
  e.completion_tokens = s.n_generated;
  if (s.req->on_finish) s.req->on_finish(e);
}

bool Engine::ensure_blocks(Seq& s, int64_t n_positions) {
  const int64_t need = kv_.blocks_for(n_positions) - static_cast<int64_t>(s.blocks.size());
  return need <= 0 || kv_.allocate(need, &s.blocks);
}

void Engine::preempt(Seq& s) {
  kv_.release(s.blocks);
  s.blocks.clear();
  s.computed = 0;
  ++stats_.preemptions;
}

void Engine::loop() {
  for (;;) {
    bool idle = false;
    try {
      idle = !step();
    } catch (const std::exception& e) {
      // A failed step fails the requests in it, never the server.
      for (auto& s : running_) finish(*s, FinishReason::Error, e.what());
      running_.clear();
    }
    publish_stats();
    std::unique_lock<std::mutex> lk(mu_);
    // Sleep while there is nothing new and nothing runnable.
    cv_.wait(lk, [&] {
      return stop_ || !incoming_.empty() || !cancels_.empty() ||
             (!idle && (!running_.empty() || !waiting_.empty()));
    });
    if (stop_) return;
  }
}

void Engine::publish_stats() {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.running = static_cast<int64_t>(running_.size());
  stats_.waiting = static_cast<int64_t>(waiting_.size() + incoming_.size());
  stats_.kv_blocks_used = kv_.n_used();
}

// running_ and waiting_ belong to the engine thread; only incoming_, cancels_, stop_ and stats_
// are shared (under mu_). Callbacks run without the lock held.
bool Engine::step() {
  // 1. Take in new requests and cancellations.
  std::vector<uint64_t> cancels;
  {
    std::lock_guard<std::mutex> lk(mu_);
    while (!incoming_.empty()) {
      waiting_.push_back(std::move(incoming_.front()));
      incoming_.pop_front();
    }
    cancels.swap(cancels_);
  }
  for (uint64_t id : cancels) {
    for (auto& s : running_)
      if (s->id == id) finish(*s, FinishReason::Cancelled);
    for (auto& s : waiting_)
      if (s->id == id) finish(*s, FinishReason::Cancelled);
  }
  auto gone = [](const std::unique_ptr<Seq>& s) { return s->done; };
  running_.erase(std::remove_if(running_.begin(), running_.end(), gone), running_.end());
  waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(), gone), waiting_.end());

  // 2. Schedule. Running sequences that finished their prompt decode one token each; those
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
    const int64_t n = std::min<int64_t>(static_cast<int64_t>(s.tokens.size()), budget);
    if (!ensure_blocks(s, n)) break;  // admit in order; wait for blocks
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    work.push_back({running_.back().get(), n});
    budget -= n;
  }
  if (work.empty()) return false;

  // 3. One forward over all chunks.
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
  model_.forward(b, kv_, logits_.data());
  for (const Work& w : work) w.s->computed += w.n;

  // 4. Sample, report, finish.
  std::vector<double> lp;
  int64_t new_prompt = 0;
  for (const Work& w : work)
    new_prompt +=
        std::max<int64_t>(0, std::min(w.s->n_prompt, w.s->computed) - (w.s->computed - w.n));
  for (size_t i = 0; i < sampled.size(); ++i) {
    Seq& s = *sampled[i];
    const float* row = logits_.data() + i * V;
    TokenEvent ev;
    ev.token = s.sampler.sample(row, V);
    if (s.req->top_logprobs >= 0) {
      log_softmax(row, V, &lp);
      ev.logprob = static_cast<float>(lp[ev.token]);
      std::vector<int32_t> idx(V);
      for (int64_t j = 0; j < V; ++j) idx[j] = static_cast<int32_t>(j);
      const int64_t k = std::min<int64_t>(s.req->top_logprobs, V);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t c) {
        return lp[a] > lp[c] || (lp[a] == lp[c] && a < c);
      });
      for (int64_t j = 0; j < k; ++j) ev.top.push_back({idx[j], static_cast<float>(lp[idx[j]])});
    }
    s.tokens.push_back(ev.token);
    ++s.n_generated;
    if (s.req->on_token) s.req->on_token(ev);
    const bool stop_tok = std::find(s.req->stop_ids.begin(), s.req->stop_ids.end(), ev.token) !=
                          s.req->stop_ids.end();
    if (stop_tok)
      finish(s, FinishReason::Stop);
    else if (s.n_generated >= s.req->max_tokens ||
             static_cast<int64_t>(s.tokens.size()) >= cfg_.max_model_len)
      finish(s, FinishReason::Length);
  }
  running_.erase(std::remove_if(running_.begin(), running_.end(), gone), running_.end());
  std::lock_guard<std::mutex> lk(mu_);
  ++stats_.steps;
  stats_.prompt_tokens += new_prompt;
  stats_.generated_tokens += static_cast<int64_t>(sampled.size());
  return true;
}

}  // namespace moeserve::engine
