// Turning next-token logits into a token: greedy at temperature 0, otherwise temperature,
// top-k and top-p (nucleus) sampling from a seeded generator, so a seed reproduces a run.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace moeserve::engine {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  int64_t top_k = 0;         // 0: all
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {}
  // logits: [vocab] f32.
  int32_t sample(const float* logits, int64_t vocab);
  // The generator's state as text, and back: a sequence that moves to another process keeps
  // its random stream.
  std::string state() const;
  void set_state(const std::string& s);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<int32_t> idx_;
  std::vector<double> prob_;
};

// Index of the largest logit (the lowest index among equals).
int32_t argmax(const float* logits, int64_t vocab);

// log softmax of one row, in double: out[i] = logits[i] - logsumexp(logits).
void log_softmax(const float* logits, int64_t vocab, std::vector<double>* out);

}  // namespace moeserve::engine
