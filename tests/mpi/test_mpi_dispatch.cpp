// Expert-parallel dispatch + combine on N processes, bit-identical to the single-process MoE
// layer (moe_reference.h) that every rank computes over the whole global batch.
#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "harness.h"
#include "moe/fp8_rows.h"
#include "moe_reference.h"

using moeserve::comm::Communicator;
using moeserve::comm::ReduceOp;
using moeserve::moe::Dispatcher;
using moeserve::moe::DispatchMode;
using moeserve::moe::DispatchPlan;
using moeserve::moe::Placement;
using moeserve::moe::Transport;
using moeserve::mpitest::Checker;
using moeserve::testing::FakeExperts;
using moeserve::testing::Rng;

namespace {

enum class Routing { Random, AllToExpert5, AllToFirstK, Zipf };

struct Case {
  std::string name;
  int32_t E;
  int64_t K, H;
  std::function<int64_t(int rank, int n)> tokens;  // tokens on each rank
  Routing routing = Routing::Random;
  // The placement, from the size and the global routing (for balanced ones).
  std::function<Placement(int n, const std::vector<int32_t>& ex)> placement;
};

Placement contiguous(int32_t E, int n) {
  return Placement::contiguous(E, n);
}

// The global batch, the same on every rank: [N, K] routing, [N, H] hidden.
struct Global {
  int64_t N = 0;
  std::vector<int64_t> first;  // [n + 1] first global token of each rank
  std::vector<int32_t> ex;
  std::vector<float> wt, h;
};

Global make_batch(const Case& c, int n, uint64_t seed) {
  Global g;
  g.first.assign(n + 1, 0);
  for (int r = 0; r < n; ++r) g.first[r + 1] = g.first[r] + c.tokens(r, n);
  g.N = g.first[n];
  g.ex.resize(g.N * c.K);
  g.wt.resize(g.N * c.K);
  g.h.resize(g.N * c.H);
  Rng rng(seed);
  moeserve::testing::random_routing(rng, g.N, c.K, c.E, g.ex.data(), g.wt.data());
  for (int64_t t = 0; t < g.N; ++t)
    for (int64_t k = 0; k < c.K; ++k) {
      int32_t& e = g.ex[t * c.K + k];
      if (c.routing == Routing::AllToFirstK) e = static_cast<int32_t>(k);
      if (c.routing == Routing::AllToExpert5) e = 5;  // K == 1
      if (c.routing == Routing::Zipf) {               // expert k of a token: skewed towards low ids
        const int32_t lo = k ? g.ex[t * c.K + k - 1] + 1 : 0;
        const int32_t room = c.E - static_cast<int32_t>(c.K - k) - lo;
        e = lo + static_cast<int32_t>(rng.below(rng.below(4) ? 1 + room / 8 : room + 1));
      }
    }
  for (float& v : g.h) v = rng.uniform(-2.0f, 2.0f);
  return g;
}

// One case on this rank: the global batch, the experts, the placement, and the reference over
// the whole batch; run() and run_overlapped() give this rank's rows, same() compares them.
struct RankCase {
  const Case& cs;
  const Global g;
  const FakeExperts fx;
  const Placement pl;
  const int64_t t0, nt;

  RankCase(const Case& c, int n, int me, uint64_t batch_seed, uint64_t expert_seed)
      : cs(c),
        g(make_batch(c, n, batch_seed)),
        fx(c.E, c.H, 8, expert_seed),
        pl(c.placement(n, g.ex)),
        t0(g.first[me]),
        nt(g.first[me + 1] - g.first[me]) {}
  const int32_t* ex() const { return g.ex.data() + t0 * cs.K; }
  const float* wt() const { return g.wt.data() + t0 * cs.K; }
  // The single-process layer over every token, of hidden rows h (g.h unless given).
  std::vector<float> reference(const float* h = nullptr) const {
    std::vector<float> out(g.N * cs.H);
    moeserve::testing::reference_moe(fx, g.N, cs.K, g.ex.data(), g.wt.data(), h ? h : g.h.data(),
                                     out.data());
    return out;
  }
  std::vector<float> run(Dispatcher& d) const {
    std::vector<float> got(nt * cs.H, std::numeric_limits<float>::quiet_NaN());
    moeserve::testing::ep_moe(d, pl, fx, nt, cs.K, ex(), wt(), g.h.data() + t0 * cs.H, got.data());
    return got;
  }
  std::vector<float> run_overlapped(Dispatcher& d0, Dispatcher& d1) const {
    std::vector<float> got(nt * cs.H, std::numeric_limits<float>::quiet_NaN());
    moeserve::testing::ep_moe_overlapped(d0, d1, pl, fx, nt, cs.K, ex(), wt(),
                                         g.h.data() + t0 * cs.H, got.data());
    return got;
  }
  // This rank's rows of `all` (a reference over every token), bit for bit.
  bool same(const std::vector<float>& got, const std::vector<float>& all) const {
    return std::memcmp(got.data(), all.data() + t0 * cs.H, got.size() * sizeof(float)) == 0;
  }
};

void run_case(Communicator& c, Checker& ck, const Case& cs, DispatchMode mode, Dispatcher& d) {
  const int n = c.size(), me = c.rank();
  const RankCase rc(cs, n, me, 1000 + cs.E * 7 + cs.K, 42 + cs.E);
  CHECK_MSG(ck, rc.same(rc.run(d), rc.reference()),
            cs.name + (mode == DispatchMode::PerRank ? " PerRank" : " PerExpert"));

  // Plan invariants across ranks: what is sent arrives, each row once per pair or per rank.
  const int64_t nt = rc.nt;
  const DispatchPlan p = d.plan(rc.pl, nt, cs.K, cs.H, rc.ex(), rc.wt());
  int64_t sums[3] = {p.n_pairs_sent(), p.n_recv(), nt * cs.K};
  c.all_reduce(sums, 3, ReduceOp::Sum);
  CHECK(ck, sums[0] == sums[1] && sums[0] == sums[2]);
  CHECK(ck, p.n_rows_sent() <= p.n_pairs_sent() && p.n_rows_sent() >= (nt ? 1 : 0));
  CHECK(ck, p.n_slots == static_cast<int32_t>(rc.pl.experts_on(me).size()));
}

std::vector<Case> cases() {
  auto each = [](int64_t t) { return [t](int, int) { return t; }; };
  std::vector<Case> v;
  v.push_back({"random", 16, 4, 64, each(7), Routing::Random,
               [](int n, auto&) { return contiguous(16, n); }});
  v.push_back({"experts not divisible by ranks", 13, 3, 32, [](int r, int) { return 3 + r; },
               Routing::Random, [](int n, auto&) { return contiguous(13, n); }});
  v.push_back({"every token to one expert", 16, 1, 32, each(6), Routing::AllToExpert5,
               [](int n, auto&) { return contiguous(16, n); }});
  v.push_back({"every token to the same experts", 16, 4, 32, each(5), Routing::AllToFirstK,
               [](int n, auto&) { return contiguous(16, n); }});
  v.push_back({"ranks without tokens", 16, 4, 32, [](int r, int) { return r % 2 ? 0 : 4; },
               Routing::Random, [](int n, auto&) { return contiguous(16, n); }});
  v.push_back({"no tokens anywhere", 16, 4, 32, each(0), Routing::Random,
               [](int n, auto&) { return contiguous(16, n); }});
  v.push_back({"one token in the batch", 16, 4, 32, [](int r, int n) { return r == n - 1 ? 1 : 0; },
               Routing::Random, [](int n, auto&) { return contiguous(16, n); }});
  v.push_back({"redundant experts (EPLB from the batch)", 16, 4, 48, each(9), Routing::Zipf,
               [](int n, const std::vector<int32_t>& ex) {
                 std::vector<double> load(16, 0.0);
                 for (int32_t e : ex) load[e] += 1;
                 return Placement::balanced(load, n, std::min(8, 16 * (n - 1)));
               }});
  v.push_back({"hot expert copied on every rank", 12, 3, 32, each(5), Routing::AllToFirstK,
               [](int n, auto&) {
                 std::vector<std::vector<int32_t>> ranks(n);
                 for (int32_t e = 0; e < 12; ++e) ranks[e * n / 12].push_back(e);
                 for (int r = 1; r < n; ++r) ranks[r].push_back(0);
                 return Placement(12, ranks);
               }});
  v.push_back({"wide: 64 experts, top-8, hidden 256", 64, 8, 256, each(24), Routing::Random,
               [](int n, auto&) { return contiguous(64, n); }});
  return v;
}

void test_dispatch(Communicator& c, Checker& ck, DispatchMode mode,
                   Transport transport = Transport::Auto) {
  // One dispatcher for all cases: buffers (and shared segments) grow between them.
  Dispatcher d(c, mode, transport);
  for (const Case& cs : cases()) run_case(c, ck, cs, mode, d);
  // All ranks of a test share a node: Auto goes through shared memory.
  CHECK(ck, d.shared() == (transport == Transport::Auto));
}

// Two micro-batches on two Dispatchers, one's exchange in flight while the other's experts
// run: the reference's bits, with every transport (Auto: shared memory, where the *_start and
// *_finish halves run back to back).
void test_overlapped(Communicator& c, Checker& ck, DispatchMode mode, Transport transport) {
  const int n = c.size(), me = c.rank();
  Dispatcher d0(c, mode, transport), d1(c, mode, transport);
  for (const Case& cs : cases()) {
    const RankCase rc(cs, n, me, 2000 + cs.E * 3 + cs.K, 7 + cs.E);
    CHECK_MSG(ck, rc.same(rc.run_overlapped(d0, d1), rc.reference()), cs.name + " overlapped");
  }
  // A finish without its start, or a second start while one is in flight: an error.
  const Placement pl = contiguous(16, n);
  const int32_t ex[4] = {1, 4, 9, 12};
  const float wt[4] = {0.25f, 0.25f, 0.25f, 0.25f};
  std::vector<float> h(32, 1.0f), out(32);
  const DispatchPlan p = d0.plan(pl, 1, 4, 32, ex, wt);
  CHECK_THROWS(ck, [&] { d0.dispatch_finish(p); }, {"without its dispatch_start"});
  d0.dispatch_start(p, h.data());
  CHECK_THROWS(ck, [&] { d0.dispatch_start(p, h.data()); }, {"in flight"});
  const float* const* x = d0.dispatch_finish(p);
  float* y = d0.expert_out(p);
  for (int64_t i = 0; i < p.n_recv(); ++i) std::memcpy(y + i * 32, x[i], 32 * sizeof(float));
  d0.combine(p, y, out.data());
  CHECK(ck, out[0] == 1.0f && out[31] == 1.0f);
}

// fp8 dispatch (messages): the reference's bits over rows round-tripped through fp8 (every
// row, a rank's own too), plain and overlapped; not the f32 result.
void test_fp8(Communicator& c, Checker& ck, DispatchMode mode) {
  const int n = c.size(), me = c.rank();
  Dispatcher d0(c, mode, Transport::Messages), d1(c, mode, Transport::Messages);
  d0.set_fp8_dispatch(true);
  d1.set_fp8_dispatch(true);
  int64_t differs = 0;
  for (const Case& cs : cases()) {
    const RankCase rc(cs, n, me, 3000 + cs.E * 5 + cs.K, 11 + cs.E);
    std::vector<float> h8(rc.g.h.size());
    std::vector<uint8_t> q(cs.H);
    for (int64_t t = 0; t < rc.g.N; ++t) {
      const float scale = moeserve::moe::fp8_quantize_row(&rc.g.h[t * cs.H], cs.H, q.data());
      moeserve::moe::fp8_dequantize_row(q.data(), scale, cs.H, &h8[t * cs.H]);
    }
    const std::vector<float> want = rc.reference(h8.data()), exact = rc.reference();
    for (const bool overlapped : {false, true}) {
      const std::vector<float> got = overlapped ? rc.run_overlapped(d0, d1) : rc.run(d0);
      CHECK_MSG(ck, rc.same(got, want), cs.name + (overlapped ? " fp8 overlapped" : " fp8"));
      differs += !rc.same(got, exact);
    }
  }
  c.all_reduce(&differs, 1, ReduceOp::Sum);
  CHECK(ck, differs > 0);
  // Ranks that disagree on it: an error on every rank.
  const Placement pl = contiguous(8, n);
  const int32_t good[2] = {1, 6};
  const float w[2] = {0.5f, 0.5f};
  Dispatcher mixed(c, mode, Transport::Messages);
  mixed.set_fp8_dispatch(me == 0);
  if (n > 1)
    CHECK_THROWS(ck, [&] { mixed.plan(pl, 1, 2, 16, good, w); }, {"disagree on the dispatch mode"});
}

// Shared memory: a dispatch repeated without a new plan, and expert outputs passed in another
// buffer than expert_out(), still give the reference's bits.
void test_shared_reuse(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  const Case cs{"reuse", 16, 4, 64, [](int r, int) { return 5 + r; }, Routing::Random, nullptr};
  const Global g = make_batch(cs, n, 99);
  const FakeExperts fx(cs.E, cs.H, 8, 5);
  const Placement pl = contiguous(cs.E, n);
  std::vector<float> want(g.N * cs.H);
  moeserve::testing::reference_moe(fx, g.N, cs.K, g.ex.data(), g.wt.data(), g.h.data(),
                                   want.data());
  const int64_t t0 = g.first[me], nt = g.first[me + 1] - t0;
  Dispatcher d(c);
  const DispatchPlan p =
      d.plan(pl, nt, cs.K, cs.H, g.ex.data() + t0 * cs.K, g.wt.data() + t0 * cs.K);
  for (int round = 0; round < 2; ++round) {
    const float* const* x = d.dispatch(p, g.h.data() + t0 * cs.H);
    std::vector<float> y(p.n_recv() * cs.H), got(nt * cs.H);
    for (int32_t j = 0; j < p.n_slots; ++j)
      fx.run(p.slot_expert[j], x + p.slot_offset[j], p.slot_count(j),
             y.data() + p.slot_offset[j] * cs.H);
    d.combine(p, y.data(), got.data());
    CHECK(ck, std::memcmp(got.data(), want.data() + t0 * cs.H, got.size() * sizeof(float)) == 0);
  }
  CHECK_THROWS(ck, [&] { d.combine(p, d.expert_out(p), want.data()); }, {"not the last one"});
}

// A bad input on one rank, or ranks that disagree, end the layer on every rank with an error,
// and the communicator still works afterwards.
void test_failures(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  Dispatcher d(c);
  const Placement pl = Placement::contiguous(8, n);
  const int32_t good[2] = {1, 6}, bad[2] = {6, 1};
  const float w[2] = {0.5f, 0.5f};
  CHECK_THROWS(ck, [&] { d.plan(pl, 1, 2, 16, me == n - 1 ? bad : good, w); },
               {"invalid routing input on rank(s) " + std::to_string(n - 1)});
  if (n >= 2) {
    std::vector<std::vector<int32_t>> swapped(n);
    for (int r = 0; r < n; ++r) {
      const auto e = pl.experts_on(r);
      swapped[n - 1 - r].assign(e.begin(), e.end());
    }
    const Placement other =
        pl.max_slots() == Placement(8, swapped).max_slots() ? Placement(8, swapped) : pl;
    if (!(other == pl))
      CHECK_THROWS(ck, [&] { d.plan(me == 0 ? other : pl, 1, 2, 16, good, w); },
                   {"disagree on the placement"});
    CHECK_THROWS(ck, [&] { d.plan(pl, 1, 2, me == 0 ? 32 : 16, good, w); },
                 {"disagree on the hidden size"});
  }
  std::vector<float> h(16, 1.0f), out(16);
  const DispatchPlan p = d.plan(pl, 1, 2, 16, good, w);
  const float* const* x = d.dispatch(p, h.data());
  float* y = d.expert_out(p);
  for (int64_t i = 0; i < p.n_recv(); ++i) std::memcpy(y + i * 16, x[i], 16 * sizeof(float));
  d.combine(p, y, out.data());
  CHECK(ck, out[0] == 1.0f && out[15] == 1.0f);
}

// Counts recorded per rank sum to the global batch's counts; rebalancing from them gives the
// same table on every rank.
void test_expert_counts(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  Case cs{"counts", 16, 4, 8, [](int r, int) { return 5 + r; }, Routing::Zipf, nullptr};
  const Global g = make_batch(cs, n, 77);
  moeserve::moe::ExpertCounts counts(3, 16);
  counts.record(2, g.ex.data() + g.first[me] * cs.K, (g.first[me + 1] - g.first[me]) * cs.K);
  counts.reduce(c);
  std::vector<int64_t> want(16, 0);
  for (int32_t e : g.ex) ++want[e];
  CHECK(ck, std::equal(want.begin(), want.end(), counts.layer(2).begin()));
  const auto table = counts.rebalance(n, std::min(4, 16 * (n - 1)));
  int64_t fp = static_cast<int64_t>(table.at(2).fingerprint()), fp_max = fp;
  c.all_reduce(&fp_max, 1, ReduceOp::Max);
  CHECK(ck, fp == fp_max);
}

// The same cases with pieces staged through contiguous copies instead of derived datatypes.
void test_dispatch_staging(Communicator& c, Checker& ck) {
  auto dt = moeserve::comm::mpi_world({moeserve::comm::PiecesVia::Staging});
  test_dispatch(*dt, ck, DispatchMode::PerRank, Transport::Messages);
  test_dispatch(*dt, ck, DispatchMode::PerExpert, Transport::Messages);
}

// Messages with every combine cell sent as a message of its own (none packed) and with all of
// them packed: the same bits either way.
void test_dispatch_direct(Communicator& c, Checker& ck) {
  for (size_t direct : {size_t(1), size_t(1) << 40}) {
    moeserve::comm::MpiOptions opt;
    opt.direct_bytes = direct;
    auto dt = moeserve::comm::mpi_world(opt);
    test_dispatch(*dt, ck, DispatchMode::PerRank, Transport::Messages);
    test_dispatch(*dt, ck, DispatchMode::PerExpert, Transport::Messages);
  }
}

}  // namespace

int main() {
  return moeserve::mpitest::run_all({
      {"dispatch PerRank", [](auto& c, auto& ck) { test_dispatch(c, ck, DispatchMode::PerRank); }},
      {"dispatch PerExpert",
       [](auto& c, auto& ck) { test_dispatch(c, ck, DispatchMode::PerExpert); }},
      {"dispatch via messages PerRank",
       [](auto& c, auto& ck) { test_dispatch(c, ck, DispatchMode::PerRank, Transport::Messages); }},
      {"dispatch via messages PerExpert",
       [](auto& c, auto& ck) {
         test_dispatch(c, ck, DispatchMode::PerExpert, Transport::Messages);
       }},
      {"overlapped micro-batches via messages",
       [](auto& c, auto& ck) {
         test_overlapped(c, ck, DispatchMode::PerRank, Transport::Messages);
         test_overlapped(c, ck, DispatchMode::PerExpert, Transport::Messages);
       }},
      {"overlapped micro-batches, auto transport",
       [](auto& c, auto& ck) { test_overlapped(c, ck, DispatchMode::PerRank, Transport::Auto); }},
      {"fp8 dispatch",
       [](auto& c, auto& ck) {
         test_fp8(c, ck, DispatchMode::PerRank);
         test_fp8(c, ck, DispatchMode::PerExpert);
       }},
      {"dispatch via staging", test_dispatch_staging},
      {"dispatch via messages, cells direct or packed", test_dispatch_direct},
      {"shared memory: repeated dispatch, outputs elsewhere", test_shared_reuse},
      {"expert counts", test_expert_counts},
      {"failures", test_failures},
  });
}
