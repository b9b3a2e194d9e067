// The router against hand-worked cases that tell the official behaviour from near misses.
#include <cmath>
#include <vector>

#include "../test_util.h"
#include "moe/router.h"

using moeserve::model::ScoringFunc;
using moeserve::model::TopkMethod;
using moeserve::moe::route;
using moeserve::moe::RouterParams;

namespace {
float logit(float p) {
  return std::log(p / (1.0f - p));
}  // sigmoid^-1
}  // namespace

TEST(Router, V3GroupsUseSumOfTop2BiasedScores) {
  // 8 experts in 4 groups of 2, keep 2 groups, choose 2 experts.
  RouterParams p;
  p.n_experts = 8, p.top_k = 2, p.n_group = 4, p.topk_group = 2;
  p.norm_topk_prob = true, p.routed_scaling_factor = 2.0f;
  const float s[8] = {0.9f, 0.1f, 0.6f, 0.55f, 0.5f, 0.5f, 0.2f, 0.3f};
  std::vector<float> l(8);
  for (int i = 0; i < 8; ++i) l[i] = logit(s[i]);
  // Group sums: g0 1.0, g1 1.15, g2 1.0 + bias, g3 0.5. A bias of +0.1 on expert 4 lifts g2
  // to 1.1: groups 1 and 2 win although expert 0 has the highest score.
  std::vector<float> bias(8, 0.0f);
  bias[4] = 0.1f;
  int32_t e[2];
  float w[2];
  route(p, l.data(), bias.data(), 1, e, w);
  EXPECT_EQ(e[0], 2);
  EXPECT_EQ(e[1], 4);
  // Weights from the unbiased scores, normalized, times the scaling factor.
  EXPECT_NEAR(w[0], 0.6f / 1.1f * 2.0f, 1e-6);
  EXPECT_NEAR(w[1], 0.5f / 1.1f * 2.0f, 1e-6);
}

TEST(Router, V3DroppedGroupsAreMinusInfinityNotZero) {
  // A large negative bias makes every biased score negative; a mask of 0.0 would then prefer
  // experts of dropped groups. With -inf they can never be chosen.
  RouterParams p;
  p.n_experts = 4, p.top_k = 2, p.n_group = 2, p.topk_group = 1;
  p.norm_topk_prob = false, p.routed_scaling_factor = 1.0f;
  const float s[4] = {0.2f, 0.3f, 0.6f, 0.7f};
  std::vector<float> l(4), bias(4, -5.0f);
  for (int i = 0; i < 4; ++i) l[i] = logit(s[i]);
  int32_t e[2];
  float w[2];
  route(p, l.data(), bias.data(), 1, e, w);
  EXPECT_EQ(e[0], 2);
  EXPECT_EQ(e[1], 3);
  EXPECT_NEAR(w[0], 0.6f, 1e-6);
  EXPECT_NEAR(w[1], 0.7f, 1e-6);
}

TEST(Router, V2GreedySoftmaxScalesWhenNotNormalized) {
  RouterParams p;
  p.scoring = ScoringFunc::Softmax, p.method = TopkMethod::Greedy;
  p.n_experts = 4, p.top_k = 2, p.norm_topk_prob = false, p.routed_scaling_factor = 3.0f;
  const float l[4] = {0.0f, 1.0f, 2.0f, -1.0f};
  int32_t e[2];
  float w[2];
  route(p, l, nullptr, 1, e, w);
  const double z = 1 + std::exp(1.0) + std::exp(2.0) + std::exp(-1.0);
  EXPECT_EQ(e[0], 1);
  EXPECT_EQ(e[1], 2);
  EXPECT_NEAR(w[0], std::exp(1.0) / z * 3.0, 1e-6);
  EXPECT_NEAR(w[1], std::exp(2.0) / z * 3.0, 1e-6);
  p.norm_topk_prob = true;  // normalized: the scaling factor is not applied
  route(p, l, nullptr, 1, e, w);
  EXPECT_NEAR(w[0] + w[1], 1.0, 1e-6);
}

TEST(Router, V2GroupLimitedUsesGroupMax) {
  RouterParams p;
  p.scoring = ScoringFunc::Softmax, p.method = TopkMethod::GroupLimitedGreedy;
  p.n_experts = 6, p.top_k = 2, p.n_group = 3, p.topk_group = 1, p.routed_scaling_factor = 1.0f;
  // Group maxima: g0 has the single best expert; g1 has two good ones (higher sum, lower max).
  const float l[6] = {3.0f, -5.0f, 2.5f, 2.5f, 0.0f, 0.0f};
  int32_t e[2];
  float w[2];
  route(p, l, nullptr, 1, e, w);
  EXPECT_EQ(e[0], 0);
  EXPECT_EQ(e[1], 1);  // only group 0 survives
}

TEST(Router, ExpertsComeOutAscending) {
  RouterParams p;
  p.n_experts = 16, p.top_k = 4, p.n_group = 1, p.topk_group = 1;
  std::vector<float> l(16);
  for (int i = 0; i < 16; ++i) l[i] = static_cast<float>((i * 7) % 16);
  int32_t e[4];
  float w[4];
  route(p, l.data(), nullptr, 1, e, w);
  for (int k = 1; k < 4; ++k) EXPECT_LT(e[k - 1], e[k]);
}
