// Expert placement: layouts, the EPLB-style balancing, replica choice, files.
#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>
#include <vector>

#include "../mpi/moe_reference.h"
#include "../test_util.h"
#include "moe/placement.h"

using moeserve::moe::ExpertCounts;
using moeserve::moe::Placement;
using moeserve::moe::PlacementTable;
using moeserve::moe::Replica;
using moeserve::testing::expect_error;
using moeserve::testing::Rng;
using moeserve::testing::TempDir;

namespace {

// Structural invariants every placement keeps.
void expect_valid(const Placement& p, int32_t E, int32_t R, int32_t n_redundant) {
  EXPECT_EQ(p.n_experts(), E);
  EXPECT_EQ(p.n_ranks(), R);
  EXPECT_EQ(p.n_physical(), E + n_redundant);
  size_t lo = SIZE_MAX, hi = 0;
  for (int32_t r = 0; r < R; ++r) {
    const auto ex = p.experts_on(r);
    lo = std::min(lo, ex.size()), hi = std::max(hi, ex.size());
    EXPECT_EQ(std::set<int32_t>(ex.begin(), ex.end()).size(), ex.size()) << "rank " << r;
  }
  EXPECT_LE(hi - lo, 1u) << "slots per rank as even as possible";
  for (int32_t e = 0; e < E; ++e) {
    const auto reps = p.replicas(e);
    ASSERT_FALSE(reps.empty());
    for (size_t i = 0; i < reps.size(); ++i) {
      EXPECT_EQ(p.experts_on(reps[i].rank)[reps[i].slot], e);
      if (i) {
        EXPECT_LT(reps[i - 1].rank, reps[i].rank);
      }
    }
  }
}

double imbalance(const Placement& p, const std::vector<double>& load) {
  const auto r = p.rank_loads(load);
  const double mean = std::accumulate(r.begin(), r.end(), 0.0) / r.size();
  return *std::max_element(r.begin(), r.end()) / mean;
}

}  // namespace

TEST(Placement, ContiguousBlocksEvenWhenNotDivisible) {
  const Placement p = Placement::contiguous(256, 8);
  expect_valid(p, 256, 8, 0);
  for (int32_t r = 0; r < 8; ++r) EXPECT_EQ(p.experts_on(r)[0], 32 * r);

  const Placement q = Placement::contiguous(13, 4);  // 4, 3, 3, 3
  expect_valid(q, 13, 4, 0);
  EXPECT_EQ(std::vector<int32_t>(q.experts_on(0).begin(), q.experts_on(0).end()),
            (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(std::vector<int32_t>(q.experts_on(3).begin(), q.experts_on(3).end()),
            (std::vector<int32_t>{10, 11, 12}));
  EXPECT_EQ(q.max_slots(), 4);
  EXPECT_EQ(q.replicas(11)[0], (Replica{3, 1}));

  const Placement few = Placement::contiguous(3, 4);  // the last rank holds nothing
  expect_valid(few, 3, 4, 0);
  EXPECT_TRUE(few.experts_on(3).empty());
}

TEST(Placement, ConstructorRejectsBadMaps) {
  expect_error([] { Placement(4, {{0, 1}, {2, 9}}); }, {"rank 1 holds expert 9", "[0, 4)"});
  expect_error([] { Placement(4, {{0, 1}, {2}}); }, {"expert 3 is on no rank"});
  expect_error([] { Placement(4, {{0, 1, 1}, {2, 3}}); }, {"rank 0 holds expert 1 twice"});
}

TEST(Placement, BalancedGivesCopiesToTheHottestExperts) {
  std::vector<double> load(16, 1.0);
  load[5] = 100.0;
  load[9] = 30.0;
  // Per copy: expert 5 goes 100 -> 50 -> 33.3 -> 25 (below 30: expert 9 gets the 4th).
  const Placement p = Placement::balanced(load, 4, 4);
  expect_valid(p, 16, 4, 4);
  EXPECT_EQ(p.replicas(5).size(), 4u);
  EXPECT_EQ(p.replicas(9).size(), 2u);
  EXPECT_LT(imbalance(p, load), imbalance(Placement::contiguous(16, 4), load));
}

TEST(Placement, BalancedNeverPutsTwoCopiesOnOneRankAndBalancesRandomLoads) {
  Rng rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int32_t R = 1 + static_cast<int32_t>(rng.below(8));
    const int32_t E = 1 + static_cast<int32_t>(rng.below(40));
    const int32_t n_red = static_cast<int32_t>(rng.below(int64_t{E} * (R - 1) + 1));
    std::vector<double> load(E);
    for (double& l : load) l = rng.below(4) == 0 ? rng.below(5000) : rng.below(50);
    const Placement p = Placement::balanced(load, R, n_red);  // the constructor checks twins
    expect_valid(p, E, R, n_red);
    EXPECT_EQ(Placement::balanced(load, R, n_red), p) << "deterministic";
  }
  // Skewed but balanceable: 64 experts, one 40x hotter, 8 ranks with 8 spare slots.
  std::vector<double> load(64, 10.0);
  load[3] = 400.0;
  const Placement p = Placement::balanced(load, 8, 8);
  EXPECT_LT(imbalance(p, load), 1.1);
  EXPECT_GT(imbalance(Placement::contiguous(64, 8), load), 2.0);
}

TEST(Placement, BalancedChecksItsArguments) {
  const std::vector<double> load(4, 1.0);
  expect_error([&] { Placement::balanced(load, 2, 5); }, {"5 redundant copies", "at most 4"});
  const std::vector<double> neg = {1.0, -1.0};
  expect_error([&] { Placement::balanced(neg, 2, 0); }, {"load of expert 1"});
}

TEST(Placement, ChoosePrefersOwnRankElseSpreadsByToken) {
  // Expert 0 on ranks 0 and 2; expert 1 on rank 1 only.
  const Placement p(3, {{0}, {1, 2}, {0}});
  EXPECT_EQ(p.choose(0, 0, 5), (Replica{0, 0}));
  EXPECT_EQ(p.choose(0, 2, 5), (Replica{2, 0}));
  EXPECT_EQ(p.choose(1, 0, 5), (Replica{1, 0}));
  // Rank 1 has no copy of expert 0: copy (token + 1) mod 2.
  EXPECT_EQ(p.choose(0, 1, 0), (Replica{2, 0}));
  EXPECT_EQ(p.choose(0, 1, 1), (Replica{0, 0}));
}

TEST(Placement, JsonRoundTripAndFingerprint) {
  const Placement p(5, {{4, 0}, {1, 2, 3}, {0}});
  EXPECT_EQ(Placement::from_json(p.to_json()), p);
  EXPECT_EQ(Placement::from_json(p.to_json()).fingerprint(), p.fingerprint());
  EXPECT_NE(Placement(5, {{0, 4}, {1, 2, 3}, {0}}).fingerprint(), p.fingerprint());
}

TEST(PlacementTable, SaveLoadRoundTripAndValidation) {
  TempDir dir;
  PlacementTable t;
  t.set_default(Placement::contiguous(8, 2));
  t.set(3, Placement(8, {{0, 1, 2, 7}, {3, 4, 5, 6, 7}}));
  t.save(dir / "placement.json");
  const PlacementTable u = PlacementTable::load(dir / "placement.json");
  EXPECT_EQ(u.at(3), t.at(3));
  EXPECT_EQ(u.at(4), Placement::contiguous(8, 2));
  u.validate(8, 2);
  expect_error([&] { u.validate(16, 2); }, {"placement is for 8 experts, the model has 16"});
  expect_error([&] { u.validate(8, 4); }, {"for 2 expert-parallel ranks, this instance has 4"});
  PlacementTable none;
  none.set(1, Placement::contiguous(8, 2));
  expect_error([&] { none.at(2); }, {"no placement for layer 2"});
  expect_error([&] { t.set(1, Placement::contiguous(8, 4)); }, {"8 experts on 4 ranks"});
}

TEST(PlacementTable, BadFilesGiveClearMessages) {
  TempDir dir;
  auto write = [&](const std::string& text) {
    std::ofstream(dir / "p.json") << text;
    return dir / "p.json";
  };
  expect_error([&] { PlacementTable::load(dir / "missing.json"); }, {"cannot open"});
  expect_error([&] { PlacementTable::load(write("{")); }, {"not valid JSON"});
  expect_error([&] { PlacementTable::load(write(R"({"format": "x"})")); },
               {"\"format\": \"moeserve-placement\""});
  const std::string head = R"({"format": "moeserve-placement", "version": 1, "n_experts": 4, )";
  expect_error([&] { PlacementTable::load(write(head + R"("n_ranks": 2, "default": [[0, 1]]})")); },
               {"default", "expert 2 is on no rank"});
  expect_error(
      [&] { PlacementTable::load(write(head + R"("n_ranks": 3, "default": [[0, 1], [2, 3]]})")); },
      {"default", "2 ranks, the file says 3"});
  expect_error(
      [&] {
        PlacementTable::load(write(head + R"("n_ranks": 2, "layers": {"x": [[0, 1], [2, 3]]}})"));
      },
      {"layer key \"x\""});
}

TEST(ExpertCounts, RecordSaveLoadRebalance) {
  ExpertCounts c(4, 8);  // layer 0 dense: never recorded
  const int32_t a[] = {0, 1, 0, 2, 0, 7};
  c.record(1, a, 6);
  c.record(2, a, 2);
  EXPECT_EQ(c.layer(1)[0], 3);
  EXPECT_EQ(c.layer(2)[1], 1);
  TempDir dir;
  c.save(dir / "counts.json");
  const ExpertCounts d = ExpertCounts::load(dir / "counts.json");
  for (int64_t l = 0; l < 4; ++l)
    EXPECT_TRUE(std::ranges::equal(c.layer(l), d.layer(l))) << "layer " << l;
  const PlacementTable t = d.rebalance(2, 2);
  EXPECT_EQ(t.layers().size(), 2u);
  EXPECT_EQ(t.at(1).replicas(0).size(), 2u);  // the hot expert got a copy
  EXPECT_EQ(t.at(0), Placement::contiguous(8, 2));
  std::ofstream(dir / "bad.json") << R"({"format": "moeserve-expert-counts", "version": 1,
    "n_experts": 8, "n_layers": 2, "layers": {"5": [0, 0, 0, 0, 0, 0, 0, 0]}})";
  expect_error([&] { ExpertCounts::load(dir / "bad.json"); }, {"layer \"5\" out of range"});
}
