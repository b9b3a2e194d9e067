// Turning next-token logits into a token: greedy at temperature 0, otherwise temperature,
// top-k and top-p (nucleus) sampling from a seeded generator, so a seed reproduces a run.
//
// Before that, a request may process the logits (vLLM's order): logit_bias is added; the
// repetition penalty scales the logits of every token of the prompt or output (positive ones
// divided, negative ones multiplied); the frequency and presence penalties subtract per
// occurrence in the output and once per token present in it; end tokens are masked while fewer
// than min_tokens were generated; and a constraint (structured output) masks every token it
// does not allow. Everything this needs is a function of the sequence's own tokens, which the
// caller passes at every step, so the result never depends on the batch, on preemption
// (recomputation) or on the rank the sequence moved to; only the random generator has state.
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace moeserve::engine {

// Structured output: which tokens may come next. A TokenConstraint is compiled once per request
// (immutable, shared); each sequence walks it with a ConstraintState of its own.
class ConstraintState {
 public:
  virtual ~ConstraintState() = default;
  // Sets the logits of the tokens not allowed next to -inf.
  virtual void mask(float* logits, int64_t vocab) = 0;
  // Takes a generated token; false when the constraint did not allow it.
  virtual bool advance(int32_t token) = 0;
};

class TokenConstraint {
 public:
  virtual ~TokenConstraint() = default;
  virtual std::unique_ptr<ConstraintState> start() const = 0;
  // What the constraint was compiled from, to send it to another process and compile it there.
  virtual const std::string& spec() const = 0;
};

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  int64_t top_k = 0;         // 0: all
  uint64_t seed = 0;
  float presence_penalty = 0.0f;    // subtracted from every token present in the output
  float frequency_penalty = 0.0f;   // subtracted per occurrence in the output
  float repetition_penalty = 1.0f;  // > 0; tokens of the prompt or the output
  std::vector<std::pair<int32_t, float>> logit_bias;  // added to the logits
  int64_t min_tokens = 0;
  std::vector<int32_t> min_tokens_stop_ids;  // masked while fewer than min_tokens were generated
  std::shared_ptr<const TokenConstraint> constraint;  // none: any token
  // Whether any of the above processing applies (otherwise the logits are sampled as they are).
  bool processes_logits() const;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {}
  // logits: [vocab] f32, sampled as they are (no penalties, bias or constraint).
  int32_t sample(const float* logits, int64_t vocab);
  // The same after the request's logit processing; `tokens` are the sequence's tokens so far,
  // the first n_prompt of them the prompt. The logits are not modified.
  int32_t sample(const float* logits, int64_t vocab, std::span<const int32_t> tokens,
                 int64_t n_prompt);
  // Speculative decoding, for requests whose logits are not processed (processes_logits()
  // false) and that sample (temperature > 0). Its draws take their randomness from
  // uniform_at(position, stream): a function of the seed, the token's position and the stream
  // (a counter-based generator), not from a running stream, so that they do not depend on how
  // the steps fell (batching, preemption). distribution(): the probabilities sample() draws
  // from (temperature, top-k, top-p), into p[0, vocab). draw(): the token of p at uniform u
  // (inverse CDF over the ids). verify(): the rejection step that keeps the output distributed
  // as the target p when the draft token x was drawn from q: x is kept when u_accept * q(x) <
  // p(x), i.e. with probability min(1, p(x) / q(x)) (returns true); otherwise *out is drawn at
  // u_resample from max(0, p - q), normalized (from p when that is all zero), and it returns
  // false.
  void distribution(const float* logits, int64_t vocab, std::vector<float>* p);
  double uniform_at(int64_t position, int stream) const;
  static int32_t draw(const float* p, int64_t vocab, double u);
  bool verify(const float* p, const float* q, int64_t vocab, int32_t x, double u_accept,
              double u_resample, int32_t* out);
  // The generator's state as text, and back: a sequence that moves to another process keeps
  // its random stream (the rest is rebuilt from its tokens).
  std::string state() const;
  void set_state(const std::string& s);

 private:
  void observe(std::span<const int32_t> tokens, int64_t n_prompt);
  void process(float* logits, int64_t vocab, int64_t n_generated);

  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<int32_t> idx_;
  std::vector<double> prob_;
  // Per-sequence history, caught up from the tokens passed to sample().
  size_t seen_ = 0;
  std::unordered_set<int32_t> present_;              // prompt or output (repetition penalty)
  std::unordered_map<int32_t, int32_t> out_counts_;  // output occurrences
  std::unique_ptr<ConstraintState> constraint_;
  bool constraint_broken_ = false;  // a token it did not allow was taken: no more masking
  std::vector<float> work_;
};

// Index of the largest logit (the lowest index among equals).
int32_t argmax(const float* logits, int64_t vocab);

// log softmax of one row, in double: out[i] = logits[i] - logsumexp(logits).
void log_softmax(const float* logits, int64_t vocab, std::vector<double>* out);

}  // namespace moeserve::engine
