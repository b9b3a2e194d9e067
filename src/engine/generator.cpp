#include "engine/generator.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"
#include "engine/scheduler.h"

namespace moeserve::engine {

namespace {
double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void check_prompt(const std::vector<int32_t>& ids, const model::ModelConfig& c) {
  MS_CHECK(!ids.empty(), "the prompt is empty");
  for (int32_t id : ids)
    MS_CHECK(id >= 0 && id < c.vocab_size, "token id ", id, " is out of range [0, ", c.vocab_size,
             ")");
}
}  // namespace

std::vector<int32_t> Generator::generate(const std::vector<int32_t>& prompt,
                                         const GenerateOptions& opt,
                                         const std::function<void(int32_t)>& on_token,
                                         GenerateStats* stats) {
  const model::ModelConfig& c = m_.config();
  check_prompt(prompt, c);
  MS_CHECK(opt.max_tokens >= 0, "max tokens must be >= 0");
  if (opt.speculative_tokens > 0 && opt.max_tokens > 0)
    return generate_speculative(prompt, opt, on_token, stats);
  const int64_t total = static_cast<int64_t>(prompt.size()) + opt.max_tokens;
  kv::KvPool pool((total + block_size_ - 1) / block_size_, block_size_, c.num_hidden_layers,
                  c.kv_cache_dim(), kv_dtype_);
  std::vector<int32_t> blocks;
  MS_ASSERT(pool.allocate(pool.n_blocks(), &blocks));
  std::vector<float> logits(c.vocab_size);
  Sampler sampler(opt.sampling);
  std::vector<int32_t> out;
  if (opt.max_tokens == 0) return out;

  const double t0 = now(), x0 = m_.exchange_seconds();
  model::Batch b;
  int64_t past = 0;
  const int64_t P = static_cast<int64_t>(prompt.size());
  while (past < P) {
    const int64_t n = std::min(opt.prefill_chunk, P - past);
    b.tokens.assign(prompt.begin() + past, prompt.begin() + past + n);
    b.seqs = {{0, n, past, blocks.data()}};
    b.logit_rows.clear();
    if (past + n == P) b.logit_rows = {n - 1};
    forward(b, pool, logits.data());
    past += n;
  }
  const double t1 = now(), x1 = m_.exchange_seconds();
  std::vector<int32_t> seq = prompt;  // what the sampler's penalties and constraint look at
  int32_t tok = sampler.sample(logits.data(), c.vocab_size, seq, P);
  for (;;) {
    out.push_back(tok);
    seq.push_back(tok);
    if (on_token) on_token(tok);
    if (static_cast<int64_t>(out.size()) >= opt.max_tokens) break;
    if (std::find(opt.stop_ids.begin(), opt.stop_ids.end(), tok) != opt.stop_ids.end()) break;
    b.tokens = {tok};
    b.seqs = {{0, 1, past, blocks.data()}};
    b.logit_rows = {0};
    forward(b, pool, logits.data());
    ++past;
    tok = sampler.sample(logits.data(), c.vocab_size, seq, P);
  }
  if (stats) {
    stats->prompt_tokens = P;
    stats->output_tokens = static_cast<int64_t>(out.size());
    stats->prefill_seconds = t1 - t0;
    stats->decode_seconds = now() - t1;
    stats->prefill_exchange_seconds = x1 - x0;
    stats->decode_exchange_seconds = m_.exchange_seconds() - x1;
  }
  return out;
}

std::vector<int32_t> Generator::generate_speculative(const std::vector<int32_t>& prompt,
                                                     const GenerateOptions& opt,
                                                     const std::function<void(int32_t)>& on_token,
                                                     GenerateStats* stats) {
  const int64_t P = static_cast<int64_t>(prompt.size()), k = opt.speculative_tokens;
  EngineConfig ec;
  ec.max_num_seqs = 1;
  ec.max_model_len = P + opt.max_tokens + 1;  // max_tokens ends it first
  ec.block_size = block_size_;
  ec.kv_blocks = (ec.max_model_len + k + block_size_ - 1) / block_size_ + 1;
  ec.kv_dtype = kv_dtype_;
  ec.max_batch_tokens = std::max(opt.prefill_chunk, k + 1);
  ec.prefix_caching = false;
  ec.speculative_tokens = k;
  m_.load_mtp();
  kv::KvPool pool(ec.kv_blocks, block_size_, kv_layers_for(m_.config(), ec),
                  m_.config().kv_cache_dim(), kv_dtype_);
  Scheduler sched(m_, ec, pool);
  auto r = std::make_shared<Request>();
  r->prompt = prompt;
  r->max_tokens = opt.max_tokens;
  r->sampling = opt.sampling;
  r->stop_ids = opt.stop_ids;
  std::vector<int32_t> out;
  const double t0 = now();
  double t1 = t0;
  FinishEvent fin;
  r->on_token = [&](const TokenEvent& ev) {
    out.push_back(ev.token);
    if (on_token) on_token(ev.token);
  };
  r->on_finish = [&](const FinishEvent& e) { fin = e; };
  sched.add(1, r);
  // The prefill's time ends with the step that gave the first token (the MTP module's pass over
  // the prompt and the first drafts included). Under expert parallelism each step is agreed on
  // with the group (the other ranks follow it in drain(), or step their own sequences).
  const bool ep = m_.expert_parallel() != nullptr;
  while (sched.has_work()) {
    const Agreement g = agree(true, sched.may_speculate() ? k : 0);
    MS_CHECK(g.mtp_forwards == 0 || g.mtp_forwards == k,
             "the ranks disagree on --speculative-tokens (", k, " here, ", g.mtp_forwards,
             " on another)");
    const bool first = out.empty();
    sched.step(/*force_forward=*/ep, g.mtp_forwards > 0);
    if (first && !out.empty()) t1 = now();
  }
  MS_CHECK(fin.reason != FinishReason::Error, fin.error);
  if (stats) {
    stats->prompt_tokens = P;
    stats->output_tokens = static_cast<int64_t>(out.size());
    stats->prefill_seconds = t1 - t0;
    stats->decode_seconds = now() - t1;
    stats->draft_tokens = sched.spec_draft_tokens();
    stats->accepted_tokens = sched.spec_accepted_tokens();
  }
  return out;
}

Generator::Agreement Generator::agree(bool mine, int64_t mtp) {
  const model::ExpertParallel* ep = m_.expert_parallel();
  if (!ep) return {mine, mtp};
  int64_t v[2] = {mine ? 1 : 0, mtp};
  ep->comm->all_reduce(v, 2, comm::ReduceOp::Max);
  return {v[0] != 0, v[1]};
}

void Generator::forward(const model::Batch& b, kv::KvPool& kv, float* logits) {
  agree(true, 0);
  m_.forward(b, kv, logits);
}

void Generator::drain() {
  if (!m_.expert_parallel()) return;
  const model::ModelConfig& c = m_.config();
  // (A layer for the MTP module's rows, which the empty forwards write none of.)
  kv::KvPool kv(1, 1, c.num_hidden_layers + (m_.has_mtp() ? 1 : 0), c.kv_cache_dim(), kv_dtype_);
  const model::Batch empty;
  for (;;) {
    const Agreement g = agree(false, 0);
    if (!g.active) break;
    m_.forward(empty, kv, nullptr);
    MS_CHECK(g.mtp_forwards == 0 || m_.has_mtp(),
             "another rank decodes speculatively, and this one has not loaded the MTP module");
    for (int64_t j = 0; j < g.mtp_forwards; ++j)
      m_.forward_mtp(empty, nullptr, kv, nullptr, nullptr);
  }
}

std::vector<double> Generator::score(const std::vector<int32_t>& ids, int64_t chunk) {
  const model::ModelConfig& c = m_.config();
  check_prompt(ids, c);
  const int64_t N = static_cast<int64_t>(ids.size());
  kv::KvPool pool((N + block_size_ - 1) / block_size_, block_size_, c.num_hidden_layers,
                  c.kv_cache_dim(), kv_dtype_);
  std::vector<int32_t> blocks;
  MS_ASSERT(pool.allocate(pool.n_blocks(), &blocks));
  std::vector<double> lp(N, NAN), row;
  std::vector<float> logits;
  model::Batch b;
  for (int64_t past = 0; past < N; past += chunk) {
    const int64_t n = std::min(chunk, N - past);
    b.tokens.assign(ids.begin() + past, ids.begin() + past + n);
    b.seqs = {{0, n, past, blocks.data()}};
    b.logit_rows.clear();
    for (int64_t i = 0; i < n; ++i)
      if (past + i + 1 < N) b.logit_rows.push_back(i);
    logits.resize(std::max<size_t>(1, b.logit_rows.size()) * c.vocab_size);
    forward(b, pool, logits.data());
    for (size_t r = 0; r < b.logit_rows.size(); ++r) {
      log_softmax(logits.data() + r * c.vocab_size, c.vocab_size, &row);
      const int64_t next = past + b.logit_rows[r] + 1;
      lp[next] = row[ids[next]];
    }
  }
  return lp;
}

}  // namespace moeserve::engine
