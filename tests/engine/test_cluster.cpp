// The cluster front end and worker in one process (a world of one rank, local mailbox): requests
// routed through typed messages come back with the same tokens as running alone, events in
// order, cancellation frees blocks, and bad layouts are refused with clear messages. The
// multi-rank layouts run under mpirun in tests/serve_mpi.
#include <chrono>
#include <future>
#include <thread>

#include "../test_util.h"
#include "comm/local_comm.h"
#include "engine/cluster.h"
#include "engine/generator.h"
#include "engine/wire.h"
#include "engine_test_util.h"
#include "model/init_model.h"

using namespace moeserve;
using namespace std::chrono_literals;
using namespace moeserve::engine_test;

namespace {

std::vector<int32_t> cluster_prompt(int n, int salt) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = (i * 29 + salt * 13 + 3) % 512;
  return v;
}

}  // namespace

static void one_rank_matches_running_alone(kv::KvDtype dt) {
  SCOPED_TRACE(kv::kv_dtype_name(dt));
  moeserve::testing::TempDir dir;
  model::write_random_model(model::preset_config("tiny"), dir.path(), {});
  ThreadPool pool(2);
  model::Model m(dir.path(), pool);
  comm::LocalCommunicator world;
  auto mb = world.mailbox();
  engine::ClusterConfig cc;
  cc.engine.max_num_seqs = 4;
  cc.engine.kv_blocks = 64;
  cc.engine.max_model_len = 128;
  cc.engine.max_batch_tokens = 16;
  cc.engine.kv_dtype = dt;
  std::vector<std::vector<int32_t>> expected;
  for (int i = 0; i < 8; ++i) {  // before the worker runs: one forward at a time per model
    engine::Generator g(m, 16, dt);
    engine::GenerateOptions o;
    o.max_tokens = 3 + i;
    expected.push_back(g.generate(cluster_prompt(2 + i * 5, i), o));
  }
  engine::ClusterWorker worker(m, world, world, *mb, cc);
  std::thread compute([&] { worker.run(); });
  std::vector<std::unique_ptr<Pending>> reqs;
  {
    engine::ClusterFrontEnd fe(m.config(), *mb, cc);
    for (int i = 0; i < 8; ++i) {
      reqs.push_back(std::make_unique<Pending>(cluster_prompt(2 + i * 5, i), 3 + i));
      uint64_t id;
      std::string err;
      ASSERT_EQ(fe.submit(reqs.back()->req, &id, &err), engine::SubmitResult::Accepted) << err;
    }
    // A long one, cancelled while it runs.
    auto slow = std::make_unique<Pending>(cluster_prompt(60, 9), 60);
    uint64_t slow_id;
    ASSERT_EQ(fe.submit(slow->req, &slow_id, nullptr), engine::SubmitResult::Accepted);
    fe.cancel(slow_id);  // long before its 60 tokens are out
    std::string err;
    EXPECT_EQ(fe.submit(std::make_shared<engine::Request>(), nullptr, &err),
              engine::SubmitResult::Invalid);
    EXPECT_EQ(err, "the prompt is empty");
    for (size_t i = 0; i < reqs.size(); ++i) {
      auto f = reqs[i]->done.get_future();
      ASSERT_EQ(f.wait_for(60s), std::future_status::ready);
      const auto e = f.get();
      EXPECT_EQ(e.reason, engine::FinishReason::Length);
      EXPECT_EQ(reqs[i]->out, expected[i]) << "request " << i;
      for (size_t k = 0; k < reqs[i]->index.size(); ++k) EXPECT_EQ(reqs[i]->index[k], k);
    }
    auto f = slow->done.get_future();
    ASSERT_EQ(f.wait_for(60s), std::future_status::ready);
    EXPECT_EQ(f.get().reason, engine::FinishReason::Cancelled);
    // The same prompts again: their full blocks come from the rank's prefix cache (all but the
    // block of the last token), with the same output.
    int64_t hits = 0;
    for (int i = 0; i < 8; ++i) {
      Pending again(cluster_prompt(2 + i * 5, i), 3 + i);
      ASSERT_EQ(fe.submit(again.req, nullptr, nullptr), engine::SubmitResult::Accepted);
      auto g = again.done.get_future();
      ASSERT_EQ(g.wait_for(60s), std::future_status::ready);
      const int64_t cached = (1 + i * 5) / cc.engine.block_size * cc.engine.block_size;
      EXPECT_EQ(g.get().cached_tokens, cached) << "request " << i;
      EXPECT_EQ(again.out, expected[i]) << "request " << i << " again";
      hits += cached;
    }
    EXPECT_GT(hits, 0);
    for (int t = 0; t < 200 && fe.stats().prefix_hit_tokens < hits; ++t)
      std::this_thread::sleep_for(10ms);
    EXPECT_EQ(fe.stats().prefix_hit_tokens, hits);
    // The worker reports its pool; once idle, every block is back.
    engine::EngineStats st;
    for (int t = 0; t < 200; ++t) {
      st = fe.stats();
      if (st.kv_blocks_total == 64 && st.kv_blocks_used == 0 && st.running == 0) break;
      std::this_thread::sleep_for(10ms);
    }
    EXPECT_EQ(st.kv_blocks_total, 64);
    EXPECT_EQ(st.kv_tokens_total, 64 * cc.engine.block_size);
    EXPECT_EQ(st.kv_dtype, dt);
    EXPECT_EQ(st.kv_bytes_per_token,
              m.config().num_hidden_layers * kv::kv_row_bytes(dt, m.config().kv_cache_dim()));
    EXPECT_EQ(st.kv_blocks_used, 0);
    EXPECT_EQ(st.running, 0);
    EXPECT_EQ(st.rank_lines.size(), 7u);
    EXPECT_GT(st.kv_blocks_cached, 0);
  }  // the front end stops the worker
  compute.join();
}

TEST(Cluster, OneRankMatchesRunningAlone) {
  for (kv::KvDtype dt : kv::kKvDtypes) one_rank_matches_running_alone(dt);
}

TEST(Cluster, LayoutErrors) {
  engine::ClusterConfig c;
  c.prefill_ranks = 1;
  try {
    c.validate(2);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("give both --prefill-ranks and --decode-ranks"),
              std::string::npos);
  }
  c.decode_ranks = 2;
  try {
    c.validate(2);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("must equal the 2 ranks"), std::string::npos) << e.what();
  }
  c.decode_ranks = 1;
  EXPECT_NO_THROW(c.validate(2));
  EXPECT_EQ(c.group_of(0), 0);
  EXPECT_EQ(c.group_of(1), 1);
}

// Routing by prefix: a prompt goes to the rank it (or a prompt starting like it) was sent to
// before, while that rank's load is within the slack of the least-loaded one; otherwise, and
// for prompts nobody has seen, to the least-loaded rank. Round-robin and caching off ignore
// prefixes.
TEST(Cluster, RouterPrefersTheRankHoldingThePrefixWhileLoadAllows) {
  engine::ClusterConfig cc;
  cc.engine.block_size = 4;
  cc.engine.max_num_seqs = 4;
  engine::Router router(cc, 3);
  std::vector<int32_t> sys(20), a, b, other(20, 7);
  for (int i = 0; i < 20; ++i) sys[i] = 100 + i;
  a = sys, b = sys;
  a.insert(a.end(), {1, 2, 3});
  b.insert(b.end(), {4, 5});
  std::vector<engine::RankLoad> loads(3, {0, 0, 64});
  loads[0].assigned = 1;  // rank 1 is the least loaded
  const auto ka = router.keys_of(a);
  EXPECT_EQ(ka.size(), 5u);                                          // (23 - 1) / 4 full blocks
  EXPECT_EQ(router.keys_of(std::vector<int32_t>(4, 1)).size(), 0u);  // leaves the last token
  EXPECT_EQ(router.pick(0, 3, loads, ka), 1);
  ++loads[1].assigned;
  // b shares a's first 5 blocks: rank 1, although rank 2 is now the least loaded.
  EXPECT_EQ(router.depth(1, router.keys_of(b)), 5);
  EXPECT_EQ(router.pick(0, 3, loads, router.keys_of(b)), 1);
  EXPECT_EQ(router.prefix_routed(), 1);
  ++loads[1].assigned;
  // A prompt nobody has seen: least-loaded (rank 2).
  EXPECT_EQ(router.pick(0, 3, loads, router.keys_of(other)), 2);
  // Rank 1 far above the least-loaded rank: the prefix does not outweigh the load.
  loads[1].assigned = 4;
  loads[1].kv_used = 32;
  EXPECT_EQ(router.pick(0, 3, loads, ka), 2);  // the least loaded
  EXPECT_EQ(router.depth(2, ka), 5);           // which now holds it too
  // Within a group of ranks: ranks outside it are never chosen.
  EXPECT_EQ(router.pick(0, 1, loads, ka), 0);
  EXPECT_EQ(router.pick(1, 1, loads, ka), 1);
  engine::ClusterConfig rr = cc;
  rr.route = engine::RoutePolicy::RoundRobin;
  engine::Router r2(rr, 2);
  EXPECT_TRUE(r2.keys_of(a).empty());
  EXPECT_EQ(r2.pick(0, 2, loads, {}), 0);
  EXPECT_EQ(r2.pick(0, 2, loads, {}), 1);
  engine::ClusterConfig off = cc;
  off.engine.prefix_caching = false;
  EXPECT_TRUE(engine::Router(off, 2).keys_of(a).empty());
}

TEST(Wire, RoundTripAndTruncation) {
  engine::wire::Writer w;
  w.put<int32_t>(7).put_vec(std::vector<int64_t>{1, 2, 3}).put_str("hé");
  const auto bytes = w.take();
  engine::wire::Reader r(bytes);
  EXPECT_EQ(r.get<int32_t>(), 7);
  EXPECT_EQ(r.get_vec<int64_t>(), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(r.get_str(), "hé");
  EXPECT_EQ(r.left(), 0u);
  EXPECT_THROW(r.get<int32_t>(), Error);
  // A length that overruns the message is refused, not trusted.
  engine::wire::Writer bad;
  bad.put<uint64_t>(1u << 30);
  const auto b = bad.take();
  engine::wire::Reader rb(b);
  EXPECT_THROW(rb.get_vec<int64_t>(), Error);
}

// The front end against a scripted rank (this test plays rank 0's worker through the mailbox):
// tokens that arrive out of order, and a finish that arrives before them, come out in order with
// the finish last and intact. The byte layout written here is the cluster's message format.
TEST(Cluster, FrontEndReordersEventsFromSeveralRanks) {
  comm::LocalCommunicator world;
  auto mb = world.mailbox();
  engine::ClusterConfig cc;
  cc.engine.max_model_len = 64;
  const model::ModelConfig mc = model::preset_config("tiny");
  std::vector<int64_t> index;
  std::vector<int32_t> tokens;
  std::promise<engine::FinishEvent> done;
  auto req = std::make_shared<engine::Request>();
  req->prompt = {1, 2, 3};
  req->max_tokens = 3;
  req->on_token = [&](const engine::TokenEvent& e) {
    EXPECT_EQ(e.cached_tokens, 16);
    index.push_back(e.index);
    tokens.push_back(e.token);
  };
  req->on_finish = [&](const engine::FinishEvent& f) { done.set_value(f); };
  static constexpr int kToWorker = 1, kToFrontEnd = 2;
  static constexpr uint8_t kAssign = 1, kStop = 5, kEvents = 6, kBye = 8, kExit = 10, kToken = 0,
                           kFinish = 1;
  auto next_to_worker = [&] {
    for (int i = 0; i < 5000; ++i) {
      if (auto m = mb->poll(kToWorker)) return *m;
      std::this_thread::sleep_for(1ms);
    }
    ADD_FAILURE() << "no message for the worker";
    return comm::Mailbox::Message{};
  };
  auto token = [](engine::wire::Writer& w, uint64_t id, int64_t i, int32_t t) {
    w.put(kToken).put(id).put(i).put(t).put(-0.5f).put<int64_t>(16);  // 16 cached tokens
    w.put_vec(std::vector<int32_t>{}).put_vec(std::vector<float>{});
  };
  {
    engine::ClusterFrontEnd fe(mc, *mb, cc);
    uint64_t id = 0;
    ASSERT_EQ(fe.submit(req, &id, nullptr), engine::SubmitResult::Accepted);
    const auto assign = next_to_worker();
    engine::wire::Reader rd(assign.data);
    ASSERT_EQ(rd.get<uint8_t>(), kAssign);
    ASSERT_EQ(rd.get<uint64_t>(), id);
    // Tokens 1 and 2 and the finish (from a decode rank) before token 0 (from the prefill rank).
    engine::wire::Writer later;
    later.put(kEvents).put<int64_t>(3);
    token(later, id, 1, 11);
    token(later, id, 2, 12);
    later.put(kFinish).put(id).put<uint8_t>(1).put_str("").put<int64_t>(3).put<int64_t>(3);
    later.put<int64_t>(16);
    mb->post(0, kToFrontEnd, later.take());
    engine::wire::Writer first;
    first.put(kEvents).put<int64_t>(1);
    token(first, id, 0, 10);
    std::this_thread::sleep_for(20ms);
    mb->post(0, kToFrontEnd, first.take());
    auto f = done.get_future();
    ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
    const engine::FinishEvent fin = f.get();
    EXPECT_EQ(fin.reason, engine::FinishReason::Length);
    EXPECT_EQ(fin.completion_tokens, 3);
    EXPECT_EQ(fin.prompt_tokens, 3);
    EXPECT_EQ(fin.cached_tokens, 16);
    EXPECT_EQ(index, (std::vector<int64_t>{0, 1, 2}));
    EXPECT_EQ(tokens, (std::vector<int32_t>{10, 11, 12}));
    // Shutting down: the front end says stop and waits for every rank's goodbye.
    std::thread bye([&] {
      const auto stop = next_to_worker();
      engine::wire::Reader r(stop.data);
      EXPECT_EQ(r.get<uint8_t>(), kStop);
      engine::wire::Writer w;
      w.put(kBye).put<uint64_t>(0).put_vec(std::vector<int64_t>{0});  // posted to no worker
      mb->post(0, kToFrontEnd, w.take());
      // Then the front end says how many worker messages were posted here in all: the assign,
      // the stop and this exit.
      const auto exit = next_to_worker();
      engine::wire::Reader e(exit.data);
      EXPECT_EQ(e.get<uint8_t>(), kExit);
      EXPECT_EQ(e.get<uint64_t>(), 0u);
      EXPECT_EQ(e.get<int64_t>(), 3);
    });
    fe.stop();
    bye.join();
    EXPECT_EQ(fe.shutdown_problem(), "");
  }
}

// A rank that stops answering: the front end (against a scripted rank that sends nothing, then
// a heartbeat) fails the open request and new ones with an error naming the rank, reports it
// in health_problem(), and recovers when the rank is heard from again. A shutdown that it does
// not answer is given up, not waited for.
TEST(Cluster, FrontEndReportsASilentRank) {
  comm::LocalCommunicator world;
  auto mb = world.mailbox();
  engine::ClusterConfig cc;
  cc.engine.max_model_len = 64;
  cc.peer_timeout_s = 0.3;
  const model::ModelConfig mc = model::preset_config("tiny");
  static constexpr int kToWorker = 1, kToFrontEnd = 2;
  static constexpr uint8_t kAssign = 1, kCancel = 2, kAlive = 9;
  struct Seen {
    std::promise<engine::FinishEvent> done;
    std::shared_ptr<engine::Request> req = std::make_shared<engine::Request>();
    Seen() {
      req->prompt = {1, 2, 3};
      req->max_tokens = 3;
      req->on_finish = [this](const engine::FinishEvent& f) { done.set_value(f); };
    }
  };
  auto wait_until = [](auto&& cond) {
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (!cond() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
    return cond();
  };
  std::vector<uint8_t> to_worker;  // kinds of the messages the scripted rank was sent
  auto drain = [&] {
    while (auto m = mb->poll(kToWorker)) to_worker.push_back(static_cast<uint8_t>(m->data[0]));
  };
  engine::ClusterFrontEnd fe(mc, *mb, cc);
  EXPECT_EQ(fe.health_problem(), "");
  Seen open;
  ASSERT_EQ(fe.submit(open.req, nullptr, nullptr), engine::SubmitResult::Accepted);
  auto f = open.done.get_future();
  ASSERT_EQ(f.wait_for(10s), std::future_status::ready) << "the open request never failed";
  const engine::FinishEvent fin = f.get();
  EXPECT_EQ(fin.reason, engine::FinishReason::Error);
  EXPECT_NE(fin.error.find("rank 0 has not answered for 300 ms (--peer-timeout-ms)"),
            std::string::npos)
      << fin.error;
  EXPECT_NE(fe.health_problem().find("rank 0 has not answered"), std::string::npos);
  drain();
  EXPECT_EQ(to_worker, (std::vector<uint8_t>{kAssign, kCancel}));  // dropped on the rank too
  Seen later;
  ASSERT_EQ(fe.submit(later.req, nullptr, nullptr), engine::SubmitResult::Accepted);
  auto g = later.done.get_future();
  ASSERT_EQ(g.wait_for(10s), std::future_status::ready);
  EXPECT_NE(g.get().error.find("rank 0 has not answered"), std::string::npos);
  // Heard from again: healthy, and requests are routed again.
  mb->post(0, kToFrontEnd, engine::wire::Writer().put(kAlive).put<uint64_t>(0).take());
  EXPECT_TRUE(wait_until([&] { return fe.health_problem().empty(); }));
  Seen again;
  ASSERT_EQ(fe.submit(again.req, nullptr, nullptr), engine::SubmitResult::Accepted);
  EXPECT_TRUE(wait_until([&] {
    drain();
    return to_worker.size() == 3;
  }));
  EXPECT_EQ(to_worker.back(), kAssign);
  // The scripted rank never says goodbye: stop gives up once it is silent, and says why.
  const auto t0 = std::chrono::steady_clock::now();
  fe.stop();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_NE(fe.shutdown_problem().find("rank 0 did not answer the stop"), std::string::npos)
      << fe.shutdown_problem();
  auto h = again.done.get_future();
  ASSERT_EQ(h.wait_for(1s), std::future_status::ready);
  EXPECT_EQ(h.get().reason, engine::FinishReason::Error);  // failed when it went silent again
}
