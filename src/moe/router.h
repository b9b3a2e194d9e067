// The MoE router (gating top-k), as the official DeepSeek models compute it:
//   V3 (noaux_tc): s = sigmoid(logits); choose with s + bias: group score = sum of the top-2
//     biased scores of the group, keep the best topk_group groups (others -inf), top-k experts;
//     weights are the unbiased s of the chosen experts, divided by their sum (+1e-20) when
//     norm_topk_prob, times routed_scaling_factor.
//   V2 (softmax): s = softmax(logits); greedy: top-k of s; group_limited_greedy: group score =
//     max of the group, keep the best topk_group groups, top-k. Weights: normalized when
//     norm_topk_prob and k > 1, otherwise times routed_scaling_factor.
#pragma once

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace moeserve::moe {

struct RouterParams {
  model::ScoringFunc scoring = model::ScoringFunc::Sigmoid;
  model::TopkMethod method = model::TopkMethod::NoauxTc;
  int64_t n_experts = 0, top_k = 0, n_group = 1, topk_group = 1;
  bool norm_topk_prob = false;
  float routed_scaling_factor = 1.0f;

  static RouterParams from_config(const model::ModelConfig& c);
};

// logits: [n_tokens, n_experts] f32; bias: [n_experts] f32 or null (noaux_tc only).
// experts: [n_tokens, top_k] expert ids, ascending within each token (the combine order);
// weights: [n_tokens, top_k] f32, aligned with experts.
void route(const RouterParams& p, const float* logits, const float* bias, int64_t n_tokens,
           int32_t* experts, float* weights);

}  // namespace moeserve::moe
