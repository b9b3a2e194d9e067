// The serving engine: continuous batching, chunked prefill, preemption and cancellation keep
// every request's greedy output equal to running it alone, and every KV block comes back.
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <random>

#include "../test_util.h"
#include "engine/engine.h"
#include "engine/generator.h"
#include "engine/sampler.h"
#include "model/init_model.h"

using namespace moeserve;
using namespace std::chrono_literals;

namespace {

struct Fixture {
  moeserve::testing::TempDir dir;
  ThreadPool pool{2};
  std::unique_ptr<model::Model> m;
  Fixture() {
    model::write_random_model(model::preset_config("tiny"), dir.path(), {});
    m = std::make_unique<model::Model>(dir.path(), pool);
  }
};

// A request whose result can be awaited.
struct Pending {
  std::shared_ptr<engine::Request> req = std::make_shared<engine::Request>();
  std::vector<int32_t> out;
  std::promise<engine::FinishEvent> done;
  Pending(std::vector<int32_t> prompt, int64_t max_tokens) {
    req->prompt = std::move(prompt);
    req->max_tokens = max_tokens;
    req->on_token = [this](const engine::TokenEvent& e) { out.push_back(e.token); };
    req->on_finish = [this](const engine::FinishEvent& e) { done.set_value(e); };
  }
};

std::vector<int32_t> prompt_of(int n, int salt) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = (i * 31 + salt * 17 + 5) % 512;
  return v;
}

std::vector<int32_t> alone(model::Model& m, const std::vector<int32_t>& p, int64_t n) {
  engine::Generator g(m);
  engine::GenerateOptions o;
  o.max_tokens = n;
  return g.generate(p, o);
}

void run_many(model::Model& m, const engine::EngineConfig& cfg, int n_req, int64_t* preemptions) {
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::vector<int32_t>> expected;
  for (int i = 0; i < n_req; ++i) {
    prompts.push_back(prompt_of(3 + (i * 7) % 40, i));
    expected.push_back(alone(m, prompts.back(), 6 + i % 5));
  }
  engine::Engine eng(m, cfg);
  std::vector<std::unique_ptr<Pending>> reqs;
  for (int i = 0; i < n_req; ++i) {
    reqs.push_back(std::make_unique<Pending>(prompts[i], 6 + i % 5));
    uint64_t id;
    std::string err;
    ASSERT_EQ(eng.submit(reqs.back()->req, &id, &err), engine::SubmitResult::Accepted) << err;
  }
  for (int i = 0; i < n_req; ++i) {
    auto f = reqs[i]->done.get_future();
    ASSERT_EQ(f.wait_for(60s), std::future_status::ready);
    const engine::FinishEvent e = f.get();
    EXPECT_EQ(e.reason, engine::FinishReason::Length);
    EXPECT_EQ(e.completion_tokens, static_cast<int64_t>(expected[i].size()));
    EXPECT_EQ(reqs[i]->out, expected[i]) << "request " << i;
  }
  // Stats are published after each step; wait for the last one.
  for (int i = 0; i < 100 && eng.stats().kv_blocks_used != 0; ++i)
    std::this_thread::sleep_for(10ms);
  const engine::EngineStats s = eng.stats();
  EXPECT_EQ(s.kv_blocks_used, 0);
  EXPECT_EQ(s.running, 0);
  if (preemptions) *preemptions = s.preemptions;
}

}  // namespace

TEST(Engine, ConcurrentRequestsMatchRunningAlone) {
  Fixture f;
  engine::EngineConfig cfg;
  cfg.max_num_seqs = 16;
  cfg.kv_cache_mb = 16;
  run_many(*f.m, cfg, 16, nullptr);
}

TEST(Engine, ChunkedPrefillWithSmallBudget) {
  Fixture f;
  engine::EngineConfig cfg;
  cfg.max_batch_tokens = 7;  // prompts of up to 42 tokens take several steps
  cfg.max_num_seqs = 4;
  run_many(*f.m, cfg, 10, nullptr);
}

TEST(Engine, PreemptsWhenBlocksRunOutAndStillMatches) {
  Fixture f;
  engine::EngineConfig cfg;
  cfg.block_size = 4;
  cfg.kv_blocks = 16;  // 64 positions for 8 sequences of up to ~50: must preempt
  cfg.max_model_len = 64;
  cfg.max_num_seqs = 8;
  int64_t preemptions = 0;
  run_many(*f.m, cfg, 8, &preemptions);
  EXPECT_GT(preemptions, 0);
}

TEST(Engine, CancelFreesBlocks) {
  Fixture f;
  engine::EngineConfig cfg;
  engine::Engine eng(*f.m, cfg);
  Pending p(prompt_of(20, 1), 100000);
  p.req->max_tokens = 200;
  std::atomic<int> seen{0};
  p.req->on_token = [&](const engine::TokenEvent&) { ++seen; };
  uint64_t id;
  ASSERT_EQ(eng.submit(p.req, &id, nullptr), engine::SubmitResult::Accepted);
  while (seen < 3) std::this_thread::sleep_for(1ms);
  eng.cancel(id);
  auto fut = p.done.get_future();
  ASSERT_EQ(fut.wait_for(30s), std::future_status::ready);
  EXPECT_EQ(fut.get().reason, engine::FinishReason::Cancelled);
  for (int i = 0; i < 100 && eng.stats().kv_blocks_used != 0; ++i)
    std::this_thread::sleep_for(10ms);
  EXPECT_EQ(eng.stats().kv_blocks_used, 0);
}

TEST(Engine, RejectsInvalidRequests) {
  Fixture f;
  engine::EngineConfig cfg;
  cfg.max_model_len = 32;
  engine::Engine eng(*f.m, cfg);
  std::string err;
  uint64_t id;
  auto submit = [&](std::vector<int32_t> p, int64_t max_tokens) {
    auto r = std::make_shared<engine::Request>();
    r->prompt = std::move(p);
    r->max_tokens = max_tokens;
    return eng.submit(r, &id, &err);
  };
  EXPECT_EQ(submit({}, 4), engine::SubmitResult::Invalid);
  EXPECT_NE(err.find("empty"), std::string::npos);
  EXPECT_EQ(submit(prompt_of(32, 0), 4), engine::SubmitResult::Invalid);
  EXPECT_NE(err.find("maximum context length of 32"), std::string::npos);
  EXPECT_EQ(submit({1, 2}, 0), engine::SubmitResult::Invalid);
  EXPECT_EQ(submit({1, 99999}, 4), engine::SubmitResult::Invalid);
  EXPECT_NE(err.find("99999"), std::string::npos);
}

TEST(Engine, StopsAtStopTokenAndAtMaxModelLen) {
  Fixture f;
  const auto p = prompt_of(10, 3);
  const auto ref = alone(*f.m, p, 8);
  engine::EngineConfig cfg;
  cfg.max_model_len = 14;  // room for 4 generated tokens
  engine::Engine eng(*f.m, cfg);
  Pending a(p, 8), b(p, 8);
  b.req->stop_ids = {ref[1]};
  uint64_t id;
  ASSERT_EQ(eng.submit(a.req, &id, nullptr), engine::SubmitResult::Accepted);
  ASSERT_EQ(eng.submit(b.req, &id, nullptr), engine::SubmitResult::Accepted);
  const auto ea = a.done.get_future().get(), eb = b.done.get_future().get();
  EXPECT_EQ(ea.reason, engine::FinishReason::Length);
  EXPECT_EQ(a.out, std::vector<int32_t>(ref.begin(), ref.begin() + 4));
  EXPECT_EQ(eb.reason, engine::FinishReason::Stop);
  EXPECT_EQ(b.out.back(), ref[1]);
  EXPECT_LE(b.out.size(), 2u);
}

namespace {
// The plain scan argmax must agree with: first index of the largest value, NaN never winning.
int32_t argmax_plain(const float* x, int64_t n) {
  int32_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (x[i] > x[best]) best = static_cast<int32_t>(i);
  return best;
}
}  // namespace

TEST(Sampler, ArgmaxIsTheFirstLargestLikeAPlainScan) {
  std::mt19937 rng(5);
  const float nan = std::nanf("");
  for (int64_t n : {1, 2, 15, 16, 17, 31, 33, 100, 129280}) {
    for (int trial = 0; trial < 40; ++trial) {
      std::vector<float> x(n);
      // Few distinct values, so the largest is often tied; some NaNs and signed zeros.
      for (auto& v : x) {
        const uint32_t r = rng() % 16;
        v = r == 0 ? nan : r == 1 ? -0.0f : r == 2 ? 0.0f : static_cast<float>(rng() % 5) - 3.0f;
      }
      if (trial % 4 == 1) x[n - 1] = 10.0f;      // largest at the very end (a tail element)
      if (trial % 4 == 2) x[rng() % n] = 10.0f;  // a single largest anywhere
      if (trial % 4 == 3) x[0] = trial % 8 == 3 ? nan : 10.0f;  // NaN first: answer 0
      ASSERT_EQ(engine::argmax(x.data(), n), argmax_plain(x.data(), n))
          << "n=" << n << " trial " << trial;
    }
  }
  std::vector<float> zeros{-0.0f, 0.0f, -0.0f};
  EXPECT_EQ(engine::argmax(zeros.data(), 3), 0);
  std::vector<float> all_nan_but_one(40, nan);
  all_nan_but_one[0] = -1.0f;
  all_nan_but_one[37] = 2.0f;
  EXPECT_EQ(engine::argmax(all_nan_but_one.data(), 40), 37);
}
