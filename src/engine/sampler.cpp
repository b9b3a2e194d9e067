#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

#include "core/error.h"

namespace moeserve::engine {

namespace {

// Nucleus: the smallest prefix of the candidates prob[0..k) (in sampling order, summing to sum)
// whose probability reaches top_p.
int64_t nucleus(const std::vector<double>& prob, int64_t k, double sum, float top_p) {
  double acc = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    acc += prob[i] / sum;
    if (acc >= top_p) return i + 1;
  }
  return k;
}

}  // namespace

int32_t argmax(const float* logits, int64_t vocab) {
  // The first index of the largest value, NaNs never winning (unless logits[0] is one: then 0),
  // as a plain `>` scan gives; in two passes that vectorize: the maximum, then its first index.
  if (vocab <= 0 || std::isnan(logits[0])) return 0;
  constexpr int kLanes = 16;
  float lane[kLanes];
  std::fill(lane, lane + kLanes, logits[0]);
  int64_t i = 0;
  for (; i + kLanes <= vocab; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] = logits[i + l] > lane[l] ? logits[i + l] : lane[l];
  float mx = lane[0];
  for (int l = 1; l < kLanes; ++l) mx = lane[l] > mx ? lane[l] : mx;
  for (; i < vocab; ++i) mx = logits[i] > mx ? logits[i] : mx;
  for (int64_t j = 0; j < vocab; ++j)
    if (logits[j] == mx) return static_cast<int32_t>(j);
  return 0;
}

void log_softmax(const float* logits, int64_t vocab, std::vector<double>* out) {
  double mx = logits[0];
  for (int64_t i = 1; i < vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(logits[i] - mx);
  const double lse = mx + std::log(sum);
  out->resize(vocab);
  for (int64_t i = 0; i < vocab; ++i) (*out)[i] = logits[i] - lse;
}

std::string Sampler::state() const {
  std::ostringstream o;
  o << rng_;
  return o.str();
}

void Sampler::set_state(const std::string& s) {
  std::istringstream i(s);
  i >> rng_;
  MS_CHECK(!i.fail(), "sampler: invalid generator state");
}

bool SamplingParams::processes_logits() const {
  return presence_penalty != 0.0f || frequency_penalty != 0.0f || repetition_penalty != 1.0f ||
         !logit_bias.empty() || (min_tokens > 0 && !min_tokens_stop_ids.empty()) ||
         constraint != nullptr;
}

void Sampler::observe(std::span<const int32_t> tokens, int64_t n_prompt) {
  const bool counts = p_.presence_penalty != 0.0f || p_.frequency_penalty != 0.0f;
  const bool present = p_.repetition_penalty != 1.0f;
  if (p_.constraint && !constraint_) constraint_ = p_.constraint->start();
  for (; seen_ < tokens.size(); ++seen_) {
    const int32_t t = tokens[seen_];
    if (present) present_.insert(t);
    if (static_cast<int64_t>(seen_) < n_prompt) continue;
    if (counts) ++out_counts_[t];
    if (constraint_ && !constraint_broken_ && !constraint_->advance(t)) constraint_broken_ = true;
  }
}

void Sampler::process(float* l, int64_t vocab, int64_t n_generated) {
  for (const auto& [id, bias] : p_.logit_bias)
    if (id >= 0 && id < vocab) l[id] += bias;
  if (p_.repetition_penalty != 1.0f) {
    const float r = p_.repetition_penalty;
    for (int32_t t : present_)
      if (t >= 0 && t < vocab) l[t] = l[t] > 0 ? l[t] / r : l[t] * r;
  }
  if (p_.presence_penalty != 0.0f || p_.frequency_penalty != 0.0f)
    for (const auto& [t, n] : out_counts_)
      if (t >= 0 && t < vocab) l[t] -= p_.frequency_penalty * n + p_.presence_penalty;
  if (n_generated < p_.min_tokens)
    for (int32_t t : p_.min_tokens_stop_ids)
      if (t >= 0 && t < vocab) l[t] = -INFINITY;
  if (constraint_ && !constraint_broken_) constraint_->mask(l, vocab);
}

int32_t Sampler::sample(const float* logits, int64_t vocab, std::span<const int32_t> tokens,
                        int64_t n_prompt) {
  if (!p_.processes_logits()) return sample(logits, vocab);
  observe(tokens, n_prompt);
  work_.assign(logits, logits + vocab);
  process(work_.data(), vocab, static_cast<int64_t>(tokens.size()) - n_prompt);
  return sample(work_.data(), vocab);
}

int32_t Sampler::sample(const float* logits, int64_t vocab) {
  if (p_.temperature <= 0.0f) return argmax(logits, vocab);
  // Candidates sorted by logit (descending, ties to the lower id), cut to top_k. A NaN logit
  // counts as -inf (never drawn, and the order stays a strict weak one).
  auto key = [&](int32_t i) { return std::isnan(logits[i]) ? -INFINITY : logits[i]; };
  if ((p_.top_k <= 0 || p_.top_k >= vocab) && p_.top_p >= 1.0f) {
    // No cut: the whole softmax, drawn in id order without sorting the vocabulary.
    float mx = -INFINITY;
    for (int64_t i = 0; i < vocab; ++i) mx = std::max(mx, key(static_cast<int32_t>(i)));
    if (std::isinf(mx)) {  // +inf takes all (the first such id); all -inf: the first id
      for (int64_t i = 0; i < vocab; ++i)
        if (key(static_cast<int32_t>(i)) == mx) return static_cast<int32_t>(i);
    }
    const double inv_t = 1.0 / p_.temperature;
    prob_.resize(vocab);
    double total = 0.0;
    for (int64_t i = 0; i < vocab; ++i)
      total += (prob_[i] = std::exp((key(static_cast<int32_t>(i)) - mx) * inv_t));
    const double u = std::uniform_real_distribution<double>(0.0, total)(rng_);
    double acc = 0.0;
    int32_t last = 0;
    for (int64_t i = 0; i < vocab; ++i) {
      if (prob_[i] <= 0.0) continue;
      acc += prob_[i];
      last = static_cast<int32_t>(i);
      if (u < acc) return last;
    }
    return last;
  }
  idx_.resize(vocab);
  std::iota(idx_.begin(), idx_.end(), 0);
  const int64_t k = (p_.top_k > 0 && p_.top_k < vocab) ? p_.top_k : vocab;
  auto cmp = [&](int32_t a, int32_t b) {
    const float ka = key(a), kb = key(b);
    return ka > kb || (ka == kb && a < b);
  };
  std::partial_sort(idx_.begin(), idx_.begin() + k, idx_.end(), cmp);
  idx_.resize(k);
  const double inv_t = 1.0 / p_.temperature, mx = key(idx_[0]);
  // An infinite largest logit: +inf takes all the probability (the first such id, as argmax);
  // -inf means every candidate is masked.
  if (std::isinf(mx)) return idx_[0];
  prob_.resize(k);
  double sum = 0.0;
  for (int64_t i = 0; i < k; ++i) sum += (prob_[i] = std::exp((key(idx_[i]) - mx) * inv_t));
  const int64_t n = p_.top_p < 1.0f ? nucleus(prob_, k, sum, p_.top_p) : k;
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += prob_[i];
  const double u = std::uniform_real_distribution<double>(0.0, total)(rng_);
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    acc += prob_[i];
    if (u < acc) return idx_[i];
  }
  return idx_[n - 1];
}

void Sampler::distribution(const float* logits, int64_t vocab, std::vector<float>* out) {
  MS_ASSERT(p_.temperature > 0.0f);
  std::vector<float>& p = *out;
  p.assign(vocab, 0.0f);
  auto key = [&](int32_t i) { return std::isnan(logits[i]) ? -INFINITY : logits[i]; };
  // The candidates sample() keeps, in its order: all, or the top_k then the top_p prefix.
  const bool cut = !((p_.top_k <= 0 || p_.top_k >= vocab) && p_.top_p >= 1.0f);
  idx_.resize(vocab);
  std::iota(idx_.begin(), idx_.end(), 0);
  int64_t k = vocab;
  if (cut) {
    k = (p_.top_k > 0 && p_.top_k < vocab) ? p_.top_k : vocab;
    std::partial_sort(idx_.begin(), idx_.begin() + k, idx_.end(), [&](int32_t a, int32_t b) {
      const float ka = key(a), kb = key(b);
      return ka > kb || (ka == kb && a < b);
    });
  }
  float mx = -INFINITY;
  for (int64_t i = 0; i < k; ++i) mx = std::max(mx, key(idx_[i]));
  if (std::isinf(mx)) {  // +inf takes all (the first such id); all -inf: the first id
    for (int64_t i = 0; i < vocab; ++i)
      if (key(static_cast<int32_t>(i)) == mx) {
        p[i] = 1.0f;
        return;
      }
  }
  const double inv_t = 1.0 / p_.temperature;
  prob_.resize(k);
  double sum = 0.0;
  for (int64_t i = 0; i < k; ++i) sum += (prob_[i] = std::exp((key(idx_[i]) - mx) * inv_t));
  const int64_t n = cut && p_.top_p < 1.0f ? nucleus(prob_, k, sum, p_.top_p) : k;
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += prob_[i];
  for (int64_t i = 0; i < n; ++i) p[idx_[i]] = static_cast<float>(prob_[i] / total);
}

double Sampler::uniform_at(int64_t position, int stream) const {
  uint64_t z = p_.seed ^ (static_cast<uint64_t>(position) * 0xd1b54a32d192ed03ull) ^
               (static_cast<uint64_t>(stream + 1) * 0x9e3779b97f4a7c15ull);
  for (int r = 0; r < 2; ++r) {  // splitmix64's finalizer, twice
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
  }
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

int32_t Sampler::draw(const float* p, int64_t vocab, double u) {
  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i) total += p[i];
  const double target = u * total;
  double acc = 0.0;
  int32_t last = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    if (p[i] <= 0.0f) continue;
    acc += p[i];
    last = static_cast<int32_t>(i);
    if (target < acc) return last;
  }
  return last;
}

bool Sampler::verify(const float* p, const float* q, int64_t vocab, int32_t x, double u_accept,
                     double u_resample, int32_t* out) {
  if (u_accept * q[x] < p[x]) {
    *out = x;
    return true;
  }
  std::vector<float>& r = work_;
  r.resize(vocab);
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += (r[i] = std::max(0.0f, p[i] - q[i]));
  *out = draw(sum > 0.0 ? r.data() : p, vocab, u_resample);
  return false;
}

}  // namespace moeserve::engine
