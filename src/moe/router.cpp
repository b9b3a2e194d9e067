#include "moe/router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace moeserve::moe {

using model::ScoringFunc;
using model::TopkMethod;

RouterParams RouterParams::from_config(const model::ModelConfig& c) {
  RouterParams p;
  p.scoring = c.scoring_func;
  p.method = c.topk_method;
  p.n_experts = c.n_routed_experts;
  p.top_k = c.num_experts_per_tok;
  p.n_group = c.n_group;
  p.topk_group = c.topk_group;
  p.norm_topk_prob = c.norm_topk_prob;
  p.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
  return p;
}

namespace {

// Indices of the k largest values (largest first; ties to the lower index).
void top_k_indices(const float* v, int64_t n, int64_t k, std::vector<int32_t>* idx) {
  idx->resize(n);
  std::iota(idx->begin(), idx->end(), 0);
  std::partial_sort(idx->begin(), idx->begin() + k, idx->end(),
                    [&](int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  idx->resize(k);
}

}  // namespace

void route(const RouterParams& p, const float* logits, const float* bias, int64_t n_tokens,
           int32_t* experts, float* weights) {
  const int64_t E = p.n_experts, K = p.top_k, G = p.n_group, per_group = E / G;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> scores(E), choice(E), group_score(G);
  std::vector<int32_t> idx, groups;
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* l = logits + t * E;
    if (p.scoring == ScoringFunc::Sigmoid) {
      for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-l[e]));
    } else {
      float mx = l[0];
      for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
      float sum = 0.0f;
      for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(l[e] - mx));
      for (int64_t e = 0; e < E; ++e) scores[e] = scores[e] / sum;
    }
    for (int64_t e = 0; e < E; ++e) choice[e] = scores[e] + (bias ? bias[e] : 0.0f);

    const bool grouped = p.method != TopkMethod::Greedy && G > 1;
    if (grouped) {
      for (int64_t g = 0; g < G; ++g) {
        const float* s = choice.data() + g * per_group;
        if (p.method == TopkMethod::NoauxTc) {
          top_k_indices(s, per_group, 2, &idx);
          group_score[g] = s[idx[0]] + s[idx[1]];
        } else {
          group_score[g] = *std::max_element(s, s + per_group);
        }
      }
      top_k_indices(group_score.data(), G, p.topk_group, &groups);
      std::vector<uint8_t> keep(G, 0);
      for (int32_t g : groups) keep[g] = 1;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per_group]) choice[e] = neg_inf;
    }
    top_k_indices(choice.data(), E, K, &idx);

    int32_t* ex = experts + t * K;
    float* w = weights + t * K;
    std::sort(idx.begin(), idx.end());  // combine order: ascending expert id
    float sum = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      ex[k] = idx[k];
      w[k] = scores[idx[k]];
      sum += w[k];
    }
    if (p.scoring == ScoringFunc::Sigmoid) {
      if (p.norm_topk_prob)
        for (int64_t k = 0; k < K; ++k) w[k] = w[k] / (sum + 1e-20f);
      for (int64_t k = 0; k < K; ++k) w[k] = w[k] * p.routed_scaling_factor;
    } else if (K > 1 && p.norm_topk_prob) {
      for (int64_t k = 0; k < K; ++k) w[k] = w[k] / (sum + 1e-20f);
    } else {
      for (int64_t k = 0; k < K; ++k) w[k] = w[k] * p.routed_scaling_factor;
    }
  }
}

}  // namespace moeserve::moe
