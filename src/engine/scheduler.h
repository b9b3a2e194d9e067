// One rank's continuous-batching scheduler over its paged latent KV cache. Each step, running
// sequences decode one token and waiting or partly prefilled ones get prompt chunks, within a
// per-step token budget, so a long prompt never stalls decoding. When KV blocks run out, the
// newest running sequence is preempted (its blocks freed) and later recomputed.
//
// Prefix caching (EngineConfig::prefix_caching): each full block a sequence has computed is
// published in the pool (kv_pool.h); a sequence starting with no blocks (new, or preempted)
// takes the longest published run of its tokens' full blocks, short of its last token (which
// must be computed for its logits), and computes only the rest.
//
// Speculative decoding (EngineConfig::speculative_tokens = k): after each forward, a sequence
// that decodes runs the model's MTP module over its newly computed positions (its KV rows, as
// layer num_hidden_layers of the pool) and drafts up to k tokens. The next step verifies them in
// one chunk of 1 + k tokens: it keeps the longest prefix that the main model's own choice agrees
// with (greedy: equal to its argmax; sampled: rejection sampling, Sampler::verify) and one token
// of the main model after it, so the output is that of decoding without speculation (greedy:
// the same tokens; sampled: the same distribution). The rows of rejected drafts are left past
// `computed` and written over later. Requests whose logits are processed (penalties,
// logit_bias, min_tokens, a constraint) or that ask for logprobs decode without speculation.
// Under expert parallelism the module's MoE layer exchanges tokens with the group like the
// main model's, so a step runs it k times on every rank (the catch-up and k - 1 chained
// drafts), empty where the rank has nothing to draft, unless the group agreed beforehand that
// no rank speculates (may_speculate(), step()'s group_speculates): then none. A prefill-only
// scheduler runs the module too and hands its drafts over with the sequence. With prefix
// caching, a block holds the module's rows as well, and its last row read the token after the
// block, so the pool's keys hold that token too (KvPool::set_key_next_token): only speculating
// sequences publish (after the module's rows), and a hit is exact, to its last matched block.
//
// Single-threaded: the owner (engine::Engine's thread, or a cluster rank's loop) calls
// everything. Request callbacks run inside step() and cancel().
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/request.h"
#include "kv/kv_pool.h"
#include "model/model.h"

namespace moeserve::engine {

// A sequence that finished its prompt and sampled its first token on a prefill rank, handed
// over with its KV blocks (which the scheduler no longer owns).
struct Prefilled {
  uint64_t id = 0;
  std::shared_ptr<Request> req;
  std::vector<int32_t> tokens;  // prompt + the first token
  int64_t n_prompt = 0;         // positions in the KV blocks
  std::vector<int32_t> blocks;
  std::string sampler_state;
  int64_t cached_tokens = 0;  // of the prompt, found in the prefill side's prefix cache
  // Speculative decoding: the drafts the prefill side's MTP module proposed after the first
  // token, and (sampled) the distributions they were drawn from [drafts, vocab]. The blocks
  // hold the module's rows of the prompt positions too (layer num_hidden_layers).
  std::vector<int32_t> drafts;
  std::vector<float> draft_q;
};

class Scheduler {
 public:
  Scheduler(model::Model& m, const EngineConfig& cfg, kv::KvPool& kv);
  ~Scheduler();  // unfinished requests finish as Cancelled

  // A validated request, queued behind the waiting ones.
  void add(uint64_t id, std::shared_ptr<Request> r);
  // The decode side of a handoff: p.blocks (allocated from this pool) hold p.n_prompt positions.
  void add_prefilled(Prefilled p);
  // Finishes the request as Cancelled (no-op for unknown ids); true when it was here.
  bool cancel(uint64_t id);
  // Finishes every request with `r`.
  void finish_all(FinishReason r, const std::string& err = "");

  // One forward over what is runnable. Returns false when nothing was; then, with
  // `force_forward` (the ranks of an expert-parallel group step together), it still runs an
  // empty forward. A failed forward fails the requests in it and rethrows.
  // `group_speculates` (expert parallelism under speculative decoding): whether any rank of the
  // group may_speculate() this step, which the ranks agree on before it (a max over the group):
  // then every rank runs the MTP module k times, else none does. Ignored in one process.
  bool step(bool force_forward = false, bool group_speculates = true);
  // Whether a sequence here (running or waiting) speculates, so that this step may run the MTP
  // module: what a rank brings to the group's agreement before a step.
  bool may_speculate() const;

  // On a prefill-only scheduler (a prefill rank), sequences stop after their first token and
  // go here instead of decoding on (unless that token already finished them). Under
  // speculative decoding they go after the MTP module's rows and drafts (step 4), so that the
  // decode side starts where one process would be.
  std::function<void(Prefilled&&)> on_prefilled;
  // Called in step() once the step's batch is chosen (admissions done), before the forward and
  // before any request callback: running() and waiting() are then the step's.
  std::function<void()> on_scheduled;
  void set_prefill_only(bool v) { prefill_only_ = v; }

  bool has_work() const { return !running_.empty() || !waiting_.empty(); }
  int64_t running() const { return static_cast<int64_t>(running_.size()); }
  int64_t waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t preemptions() const { return preemptions_; }
  int64_t steps() const { return steps_; }
  int64_t prompt_tokens() const { return prompt_tokens_; }
  int64_t generated_tokens() const { return generated_tokens_; }
  // Prefix cache: prompt tokens looked up and found, on each request's first admission.
  int64_t prefix_query_tokens() const { return prefix_query_tokens_; }
  int64_t prefix_hit_tokens() const { return prefix_hit_tokens_; }
  // Speculative decoding: draft tokens verified, and those of them accepted.
  int64_t spec_draft_tokens() const { return spec_draft_tokens_; }
  int64_t spec_accepted_tokens() const { return spec_accepted_tokens_; }
  const EngineConfig& config() const { return cfg_; }
  kv::KvPool& kv() { return kv_; }

 private:
  struct Seq;
  void finish(Seq& s, FinishReason r, const std::string& err = "");
  bool ensure_blocks(Seq& s, int64_t n_positions);
  void reuse_prefix(Seq& s);    // a sequence with no blocks takes the cached start of its tokens
  void drop_blocks(Seq& s);     // releases its blocks; it starts again from position 0
  void publish_blocks(Seq& s);  // publishes its computed full blocks
  void preempt(Seq& s);
  void sweep();            // drops finished sequences
  void hand_over(Seq& s);  // prefill-only: to on_prefilled, with its blocks and drafts
  bool speculates(const Request& r) const;
  // This step runs the MTP module k times, rows or not: the group's ranks exchange tokens in
  // its MoE layer (speculative decoding under expert parallelism, some rank speculating).
  bool mtp_lockstep() const {
    return cfg_.speculative_tokens > 0 && model_.expert_parallel() != nullptr && group_spec_;
  }
  // Reports a generated token and finishes the sequence when it ends it; true when it did.
  bool emit(Seq& s, TokenEvent ev, const float* logits_row);
  // Drafts the next tokens of sequences whose MTP rows have just been computed (mtp_logits_ row
  // i, mtp_h_ row rows[i]) by applying the module again to its own output.
  void draft(const std::vector<Seq*>& seqs, const std::vector<int64_t>& rows);
  void trim_blocks(Seq& s, int64_t n_positions);  // releases blocks past n_positions

  model::Model& model_;
  EngineConfig cfg_;
  kv::KvPool& kv_;
  bool prefill_only_ = false;
  bool group_spec_ = true;                     // this step's group_speculates
  std::vector<std::unique_ptr<Seq>> running_;  // admitted, in admission order
  std::deque<std::unique_ptr<Seq>> waiting_;   // not admitted (or preempted), FIFO
  int64_t preemptions_ = 0, steps_ = 0, prompt_tokens_ = 0, generated_tokens_ = 0;
  int64_t prefix_query_tokens_ = 0, prefix_hit_tokens_ = 0;
  int64_t spec_draft_tokens_ = 0, spec_accepted_tokens_ = 0;
  std::vector<float> logits_;
  std::vector<double> lp_;
  std::vector<float> hidden_, mtp_h_, mtp_h2_, mtp_logits_, probs_;
};

// KV blocks for cfg (kv_blocks, or as many as kv_cache_mb holds).
int64_t kv_blocks_for(const model::ModelConfig& c, const EngineConfig& e);
// Layers of the KV pool: the model's, and one for the MTP module under speculative decoding.
int64_t kv_layers_for(const model::ModelConfig& c, const EngineConfig& e);

}  // namespace moeserve::engine
