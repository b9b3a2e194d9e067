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
#include "model/init_model.h"

using namespace moeserve;
using namespace std::chrono_literals;

namespace {

struct Pending {
  std::shared_ptr<engine::Request> req = std::make_shared<engine::Request>();
  std::vector<int32_t> out;
  std::vector<int64_t> index;
  std::promise<engine::FinishEvent> done;
  Pending(std::vector<int32_t> prompt, int64_t max_tokens) {
    req->prompt = std::move(prompt);
    req->max_tokens = max_tokens;
    req->on_token = [this](const engine::TokenEvent& e) {
      out.push_back(e.token);
      index.push_back(e.index);
    };
    req->on_finish = [this](const engine::FinishEvent& e) { done.set_value(e); };
  }
};

std::vector<int32_t> prompt_of(int n, int salt) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = (i * 29 + salt * 13 + 3) % 512;
  return v;
}

}  // namespace

TEST(Cluster, OneRankMatchesRunningAlone) {
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
  std::vector<std::vector<int32_t>> expected;
  for (int i = 0; i < 8; ++i) {  // before the worker runs: one forward at a time per model
    engine::Generator g(m);
    engine::GenerateOptions o;
    o.max_tokens = 3 + i;
    expected.push_back(g.generate(prompt_of(2 + i * 5, i), o));
  }
  engine::ClusterWorker worker(m, world, world, *mb, cc);
  std::thread compute([&] { worker.run(); });
  std::vector<std::unique_ptr<Pending>> reqs;
  {
    engine::ClusterFrontEnd fe(m.config(), *mb, cc);
    for (int i = 0; i < 8; ++i) {
      reqs.push_back(std::make_unique<Pending>(prompt_of(2 + i * 5, i), 3 + i));
      uint64_t id;
      std::string err;
      ASSERT_EQ(fe.submit(reqs.back()->req, &id, &err), engine::SubmitResult::Accepted) << err;
    }
    // A long one, cancelled while it runs.
    auto slow = std::make_unique<Pending>(prompt_of(60, 9), 60);
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
    // The worker reports its pool; once idle, every block is back.
    engine::EngineStats st;
    for (int t = 0; t < 200; ++t) {
      st = fe.stats();
      if (st.kv_blocks_total == 64 && st.kv_blocks_used == 0 && st.running == 0) break;
      std::this_thread::sleep_for(10ms);
    }
    EXPECT_EQ(st.kv_blocks_total, 64);
    EXPECT_EQ(st.kv_blocks_used, 0);
    EXPECT_EQ(st.running, 0);
    EXPECT_EQ(st.rank_lines.size(), 4u);
  }  // the front end stops the worker
  compute.join();
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
