// /metrics reports speculative decoding's draft and accepted tokens and their ratio.
#include <gtest/gtest.h>

#include <cmath>

#include "server/metrics.h"
#include "server_test_util.h"

using namespace moeserve;
using moeserve::testing::metric_in;

TEST(SpecDecodeMetrics, DraftAndAcceptedTokensAndTheirRate) {
  server::Metrics m;
  engine::EngineStats st;
  std::string page = m.render(st, 0, {});
  EXPECT_EQ(metric_in(page, "moeserve_spec_decode_draft_tokens_total"), 0);
  EXPECT_EQ(metric_in(page, "moeserve_spec_decode_accepted_tokens_total"), 0);
  EXPECT_EQ(metric_in(page, "moeserve_spec_decode_acceptance_rate"), 0);
  st.spec_draft_tokens = 40;
  st.spec_accepted_tokens = 30;
  page = m.render(st, 0, {});
  EXPECT_EQ(metric_in(page, "moeserve_spec_decode_draft_tokens_total"), 40);
  EXPECT_EQ(metric_in(page, "moeserve_spec_decode_accepted_tokens_total"), 30);
  EXPECT_DOUBLE_EQ(metric_in(page, "moeserve_spec_decode_acceptance_rate"), 0.75);
  EXPECT_NE(page.find("# TYPE moeserve_spec_decode_draft_tokens_total counter"), std::string::npos);
}
