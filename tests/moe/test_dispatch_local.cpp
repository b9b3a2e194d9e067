// Dispatch plan and run on one process (LocalCommunicator): invariants of the handle and
// bit-identity with the single-process MoE layer. The multi-rank cases run in tests/mpi.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../mpi/moe_reference.h"
#include "../test_util.h"
#include "comm/local_comm.h"
#include "core/aligned.h"
#include "core/dtype.h"
#include "moe/dispatch.h"
#include "moe/fp8_rows.h"

using moeserve::comm::LocalCommunicator;
using moeserve::moe::Dispatcher;
using moeserve::moe::DispatchMode;
using moeserve::moe::DispatchPlan;
using moeserve::moe::Placement;
using moeserve::testing::expect_error;
using moeserve::testing::FakeExperts;
using moeserve::testing::Rng;

namespace {

struct Batch {
  int64_t n, K, H;
  std::vector<int32_t> ex;
  std::vector<float> wt;
  moeserve::AlignedFloats h;  // 64-byte aligned, as the model's activations are
  Batch(int64_t n_, int64_t K_, int64_t H_, int32_t E, uint64_t seed)
      : n(n_), K(K_), H(H_), ex(n_ * K_), wt(n_ * K_), h(n_ * H_) {
    Rng r(seed);
    moeserve::testing::random_routing(r, n, K, E, ex.data(), wt.data());
    for (float& v : h) v = r.uniform(-2.0f, 2.0f);
  }
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  return a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

class DispatchLocal : public ::testing::TestWithParam<DispatchMode> {};

TEST_P(DispatchLocal, PlanInvariants) {
  LocalCommunicator comm;
  Dispatcher d(comm, GetParam());
  const int32_t E = 12;
  const Placement pl = Placement::contiguous(E, 1);
  Batch b(9, 3, 4, E, 1);
  const DispatchPlan p = d.plan(pl, b.n, b.K, b.H, b.ex.data(), b.wt.data());
  ASSERT_EQ(p.pair_offset, (std::vector<int64_t>{0, 27}));
  EXPECT_EQ(p.n_recv(), 27);
  EXPECT_EQ(p.n_slots, E);
  // pair_pos is a permutation, and pair_token follows it.
  std::vector<int> seen(27, 0);
  for (int64_t i = 0; i < 27; ++i) {
    ++seen[p.pair_pos[i]];
    EXPECT_EQ(p.pair_token[p.pair_pos[i]], i / b.K);
  }
  for (int v : seen) EXPECT_EQ(v, 1);
  // Travel order in slot j: the leaders (PerRank: a token's first expert on the rank; PerExpert:
  // every pair) by token, then the others by (leader's slot, token).
  const bool per_rank = GetParam() == DispatchMode::PerRank;
  for (int32_t j = 0; j < E; ++j) {
    std::vector<std::pair<int64_t, int64_t>> order;  // (leader slot or -1, token)
    for (int64_t t = 0; t < b.n; ++t)
      for (int64_t k = 0; k < b.K; ++k)
        if (b.ex[t * b.K + k] == j) order.push_back({per_rank && k > 0 ? b.ex[t * b.K] : -1, t});
    std::stable_sort(order.begin(), order.end(),
                     [](const auto& a, const auto& c) { return a.first < c.first; });
    ASSERT_EQ(p.slot_count(j), static_cast<int64_t>(order.size())) << "slot " << j;
    for (size_t q = 0; q < order.size(); ++q)
      EXPECT_EQ(p.pair_token[p.slot_offset[j] + q], order[q].second) << "slot " << j;
  }
  EXPECT_EQ(p.n_rows_sent(), per_rank ? 9 : 27);  // PerRank: once per token

  // Dispatch: each slot's rows are the hidden rows of its pairs' tokens, in travel order.
  const float* const* x = d.dispatch(p, b.h.data());
  for (int64_t q = 0; q < 27; ++q)
    EXPECT_EQ(std::memcmp(x[q], b.h.data() + p.pair_token[q] * b.H, b.H * sizeof(float)), 0)
        << "row " << q;
}

TEST_P(DispatchLocal, TokenRowsAreSharedNotCopied) {
  // Nothing is copied per (token, expert) pair: a token's slots here point to its one row. With
  // one rank every row is this rank's own, which both transports read in place from `hidden`
  // (shared memory: the source's own rows; messages: own rows do not travel), in either mode.
  for (auto transport : {moeserve::moe::Transport::Auto, moeserve::moe::Transport::Messages}) {
    LocalCommunicator comm;
    Dispatcher d(comm, GetParam(), transport);
    const int32_t E = 12;
    Batch b(9, 3, 16, E, 2);
    const DispatchPlan p =
        d.plan(Placement::contiguous(E, 1), b.n, b.K, b.H, b.ex.data(), b.wt.data());
    const float* const* x = d.dispatch(p, b.h.data());
    int64_t same = 0;
    for (int64_t q = 0; q < 27; ++q) {
      EXPECT_EQ(std::memcmp(x[q], b.h.data() + p.pair_token[q] * b.H, b.H * sizeof(float)), 0);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(x[q]) % 64, 0u) << "row " << q << " not aligned";
      for (int64_t r = q + 1; r < 27; ++r)
        if (p.pair_token[q] == p.pair_token[r]) {
          EXPECT_EQ(x[q], x[r]) << "rows " << q << ", " << r;
          ++same;
        }
    }
    EXPECT_EQ(same, 27);  // 9 tokens x 3 pairs of slots each
    d.combine(p, d.expert_out(p), std::vector<float>(b.n * b.H).data());
  }
}

TEST_P(DispatchLocal, BitIdenticalToSingleProcessLayer) {
  LocalCommunicator comm;
  Dispatcher d(comm, GetParam());
  const int32_t E = 10;
  const FakeExperts fx(E, 48, 16, 3);
  for (int64_t n : {0, 1, 5, 64}) {
    Batch b(n, 4, fx.H, E, 100 + n);
    std::vector<float> want(n * fx.H), got(n * fx.H, std::numeric_limits<float>::quiet_NaN());
    moeserve::testing::reference_moe(fx, n, b.K, b.ex.data(), b.wt.data(), b.h.data(), want.data());
    moeserve::testing::ep_moe(d, Placement::contiguous(E, 1), fx, n, b.K, b.ex.data(), b.wt.data(),
                              b.h.data(), got.data());
    EXPECT_TRUE(same_bits(want, got)) << "n = " << n;
  }
}

TEST(DispatchLocalMessages, BitIdenticalToSingleProcessLayer) {
  LocalCommunicator comm;
  for (DispatchMode mode : {DispatchMode::PerRank, DispatchMode::PerExpert}) {
    Dispatcher d(comm, mode, moeserve::moe::Transport::Messages);
    const int32_t E = 10;
    const FakeExperts fx(E, 48, 16, 3);
    for (int64_t n : {0, 1, 5, 64}) {
      Batch b(n, 4, fx.H, E, 100 + n);
      std::vector<float> want(n * fx.H), got(n * fx.H, std::numeric_limits<float>::quiet_NaN());
      moeserve::testing::reference_moe(fx, n, b.K, b.ex.data(), b.wt.data(), b.h.data(),
                                       want.data());
      moeserve::testing::ep_moe(d, Placement::contiguous(E, 1), fx, n, b.K, b.ex.data(),
                                b.wt.data(), b.h.data(), got.data());
      EXPECT_TRUE(same_bits(want, got)) << "n = " << n;
    }
    EXPECT_FALSE(d.shared());
  }
}

TEST_P(DispatchLocal, InvalidInputThrows) {
  LocalCommunicator comm;
  Dispatcher d(comm, GetParam());
  const Placement pl = Placement::contiguous(8, 1);
  const float w[4] = {0.25f, 0.25f, 0.25f, 0.25f};
  const int32_t descending[4] = {1, 0, 2, 3}, out_of_range[4] = {0, 1, 2, 8};
  expect_error([&] { d.plan(pl, 2, 2, 16, descending, w); },
               {"invalid routing input on rank(s) 0", "token 0", "not strictly ascending"});
  expect_error([&] { d.plan(pl, 1, 4, 16, out_of_range, w); }, {"expert 8, out of range"});
  expect_error([&] { d.plan(Placement::contiguous(8, 2), 1, 4, 16, out_of_range, w); },
               {"placement is for 2 ranks, the communicator has 1"});
}

INSTANTIATE_TEST_SUITE_P(Modes, DispatchLocal,
                         ::testing::Values(DispatchMode::PerRank, DispatchMode::PerExpert),
                         [](const auto& info) {
                           return info.param == DispatchMode::PerRank ? "PerRank" : "PerExpert";
                         });

// The quantized dispatch's encoder is core/dtype.h's f32_to_fp8e4m3 for every value class
// (normal, subnormal, ties, saturation, signs), and a row's round trip stays within half an
// e4m3 step of its amax-scaled value.
TEST(Fp8Rows, EncoderMatchesTheReference) {
  std::vector<float> v = {0.0f,    -0.0f,    448.0f,     -448.0f,  464.0f,
                          480.0f,  1e30f,    -1e30f,     0x1p-6f,  0x1p-7f,
                          0x1p-9f, 0x1p-10f, 0x1.8p-10f, 0x1p-20f, 3.0f * 0x1p-10f};
  for (int e = -12; e <= 9; ++e)  // every mantissa step and the ties between them
    for (int m = 0; m < 32; ++m) {
      const float x = std::ldexp(1.0f + m / 16.0f, e);
      v.push_back(x);
      v.push_back(-x);
    }
  Rng rng(5);
  for (int i = 0; i < 20000; ++i)
    v.push_back(rng.uniform(-500.0f, 500.0f) *
                std::ldexp(1.0f, static_cast<int>(rng.below(20)) - 12));
  for (float x : v) EXPECT_EQ(moeserve::moe::fp8_encode(x), moeserve::f32_to_fp8e4m3(x)) << x;
  EXPECT_EQ(moeserve::moe::fp8_encode(std::numeric_limits<float>::quiet_NaN()) & 0x7f, 0x7f);

  std::vector<float> row(300), back(300);
  for (float& x : row) x = rng.uniform(-3.0f, 3.0f);
  row[7] = -5.0f;  // the amax
  std::vector<uint8_t> q(300);
  const float scale = moeserve::moe::fp8_quantize_row(row.data(), 300, q.data());
  EXPECT_EQ(scale, 5.0f / 448.0f);
  moeserve::moe::fp8_dequantize_row(q.data(), scale, 300, back.data());
  EXPECT_EQ(back[7], -5.0f);
  for (int k = 0; k < 300; ++k) {
    const float a = std::fabs(row[k]) / scale;  // in e4m3 units: step 2^(e-3) at a in [2^e, 2^e+1)
    const float step =
        a < 0x1p-6f ? 0x1p-9f : std::ldexp(1.0f, static_cast<int>(std::floor(std::log2(a))) - 3);
    EXPECT_LE(std::fabs(back[k] - row[k]), 0.5f * step * scale * 1.0001f) << k;
  }
  row[3] = std::numeric_limits<float>::infinity();
  moeserve::moe::fp8_dequantize_row(
      q.data(), moeserve::moe::fp8_quantize_row(row.data(), 300, q.data()), 300, back.data());
  EXPECT_TRUE(std::isnan(back[0]));
}
