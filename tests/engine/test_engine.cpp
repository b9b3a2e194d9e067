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
#include "engine_test_util.h"
#include "model/init_model.h"

using namespace moeserve;
using namespace std::chrono_literals;
using namespace moeserve::engine_test;

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

// Polls `pred` until it holds or `limit` passes; returns whether it held.
template <typename Pred>
bool wait_until(Pred pred, std::chrono::milliseconds limit = 30s) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

// Waits for a request's finish event, failing the test (not hanging) past the deadline.
#define AWAIT_FINISH(pending, event)                                                      \
  do {                                                                                    \
    auto fut_ = (pending).done.get_future();                                              \
    ASSERT_EQ(fut_.wait_for(60s), std::future_status::ready) << "request did not finish"; \
    event = fut_.get();                                                                   \
  } while (0)

std::vector<int32_t> alone(model::Model& m, const std::vector<int32_t>& p, int64_t n,
                           const engine::SamplingParams& sp = {},
                           kv::KvDtype kv_dtype = kv::kDefaultKvDtype) {
  engine::Generator g(m, 16, kv_dtype);
  engine::GenerateOptions o;
  o.max_tokens = n;
  o.sampling = sp;
  return g.generate(p, o);
}

// Runs n_req requests at once; each must give what it gives alone (the Generator, never
// batched or preempted), with the sampling parameters sampling(i) (default: greedy).
struct RunStats {
  int64_t preemptions = 0, steps = 0, prompt_tokens = 0, generated_tokens = 0;
};

void run_many(model::Model& m, const engine::EngineConfig& cfg, int n_req, RunStats* stats,
              const std::function<engine::SamplingParams(int)>& sampling = {},
              std::vector<std::vector<int32_t>>* outputs = nullptr) {
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::vector<int32_t>> expected;
  auto params = [&](int i) { return sampling ? sampling(i) : engine::SamplingParams{}; };
  for (int i = 0; i < n_req; ++i) {
    prompts.push_back(prompt_of(3 + (i * 7) % 40, i));
    expected.push_back(alone(m, prompts.back(), 6 + i % 5, params(i), cfg.kv_dtype));
  }
  engine::Engine eng(m, cfg);
  std::vector<std::unique_ptr<Pending>> reqs;
  for (int i = 0; i < n_req; ++i) {
    reqs.push_back(std::make_unique<Pending>(prompts[i], 6 + i % 5));
    reqs.back()->req->sampling = params(i);
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
    if (outputs) outputs->push_back(reqs[i]->out);
  }
  // Stats are published after each step; wait for the last one.
  EXPECT_TRUE(wait_until([&] { return eng.stats().kv_blocks_used == 0; }))
      << "KV blocks still in use";
  const engine::EngineStats s = eng.stats();
  EXPECT_EQ(s.kv_blocks_used, 0);
  EXPECT_EQ(s.running, 0);
  if (stats) {
    stats->preemptions = s.preemptions;
    stats->steps = s.steps;
    stats->prompt_tokens = s.prompt_tokens;
    stats->generated_tokens = s.generated_tokens;
  }
}

}  // namespace

TEST(Engine, ConcurrentRequestsMatchRunningAlone) {
  Fixture f;
  for (kv::KvDtype dt : kv::kKvDtypes) {
    SCOPED_TRACE(kv::kv_dtype_name(dt));
    engine::EngineConfig cfg;
    cfg.max_num_seqs = 16;
    cfg.kv_cache_mb = 16;
    cfg.kv_dtype = dt;
    RunStats st;
    run_many(*f.m, cfg, 16, &st);
    // They ran together: one at a time would take a step per generated token at least.
    EXPECT_EQ(st.generated_tokens, 126);  // sum of 6 + i % 5
    EXPECT_LT(st.steps, st.generated_tokens / 2) << "the requests were not batched";
  }
}

// --kv-cache-mb buys twice the tokens in bf16 as in f32, and about four times in fp8; the
// stats give the capacity in tokens and the dtype.
TEST(Engine, CacheCapacityFollowsTheDtype) {
  Fixture f;
  const model::ModelConfig& c = f.m->config();
  int64_t tokens[3] = {};
  for (kv::KvDtype dt : kv::kKvDtypes) {
    engine::EngineConfig cfg;
    cfg.kv_cache_mb = 2;
    cfg.max_model_len = 256;
    cfg.kv_dtype = dt;
    const int64_t blocks = engine::kv_blocks_for(c, cfg);
    const int64_t row = kv::kv_row_bytes(dt, c.kv_cache_dim());
    EXPECT_EQ(blocks, (2 << 20) / (cfg.block_size * c.num_hidden_layers * row));
    engine::Engine eng(*f.m, cfg);
    const engine::EngineStats st = eng.stats();
    EXPECT_EQ(st.kv_blocks_total, blocks);
    EXPECT_EQ(st.kv_tokens_total, blocks * cfg.block_size);
    EXPECT_EQ(st.kv_dtype, dt);
    EXPECT_EQ(st.kv_bytes_per_token, c.num_hidden_layers * row);
    tokens[static_cast<int>(dt)] = st.kv_tokens_total;
  }
  EXPECT_NEAR(static_cast<double>(tokens[1]) / tokens[0], 2.0, 0.01);
  EXPECT_GT(static_cast<double>(tokens[2]) / tokens[0], 3.5);
}

TEST(Engine, ChunkedPrefillWithSmallBudget) {
  Fixture f;
  engine::EngineConfig cfg;
  cfg.max_batch_tokens = 7;  // prompts of up to 42 tokens take several steps
  cfg.max_num_seqs = 4;
  RunStats st;
  run_many(*f.m, cfg, 10, &st);
  // At most 7 tokens per step: the prompts alone need this many steps.
  EXPECT_GT(st.prompt_tokens, 100);
  EXPECT_GE(st.steps, (st.prompt_tokens + 6) / 7);
}

TEST(Engine, PreemptsWhenBlocksRunOutAndStillMatches) {
  Fixture f;
  for (kv::KvDtype dt : kv::kKvDtypes) {
    SCOPED_TRACE(kv::kv_dtype_name(dt));
    engine::EngineConfig cfg;
    cfg.block_size = 4;
    cfg.kv_blocks = 16;  // 64 positions for 8 sequences of up to ~50: must preempt
    cfg.max_model_len = 64;
    cfg.max_num_seqs = 8;
    cfg.kv_dtype = dt;
    RunStats st;
    run_many(*f.m, cfg, 8, &st);
    EXPECT_GT(st.preemptions, 0);
  }
}

// Sampled requests keep their random stream through preemption: a preempted sequence recomputes
// its KV cache and goes on drawing from the same generator, so its tokens equal those of the
// same request never preempted (and, with 8 requests of 6 to 10 tokens, sampling is visibly not
// greedy).
TEST(Engine, SampledRequestsSurvivePreemptionUnchanged) {
  Fixture f;
  engine::EngineConfig cfg;
  cfg.block_size = 4;
  cfg.kv_blocks = 16;
  cfg.max_model_len = 64;
  cfg.max_num_seqs = 8;
  auto sampling = [](int i) {
    engine::SamplingParams p;
    p.temperature = 0.7f + 0.2f * static_cast<float>(i % 3);
    p.top_p = i % 2 ? 0.95f : 1.0f;
    p.top_k = i % 4 == 3 ? 40 : 0;
    p.seed = 1000 + i;
    return p;
  };
  RunStats st;
  std::vector<std::vector<int32_t>> outs;
  run_many(*f.m, cfg, 8, &st, sampling, &outs);
  EXPECT_GT(st.preemptions, 0);
  int differ_from_greedy = 0;
  for (int i = 0; i < static_cast<int>(outs.size()); ++i)
    differ_from_greedy += outs[i] != alone(*f.m, prompt_of(3 + (i * 7) % 40, i), 6 + i % 5);
  EXPECT_GE(differ_from_greedy, 4);
}

TEST(Engine, CancelFreesBlocks) {
  Fixture f;
  engine::EngineConfig cfg;
  engine::Engine eng(*f.m, cfg);
  // Long enough that it cannot finish on its own between the third token and the cancel, however
  // slowly this thread runs.
  Pending p(prompt_of(20, 1), 4000);
  std::atomic<int> seen{0};
  p.req->on_token = [&](const engine::TokenEvent&) { ++seen; };
  uint64_t id;
  ASSERT_EQ(eng.submit(p.req, &id, nullptr), engine::SubmitResult::Accepted);
  ASSERT_TRUE(wait_until([&] { return seen >= 3; })) << "no tokens came";
  eng.cancel(id);
  auto fut = p.done.get_future();
  ASSERT_EQ(fut.wait_for(30s), std::future_status::ready);
  EXPECT_EQ(fut.get().reason, engine::FinishReason::Cancelled);
  EXPECT_LT(seen, 4000);
  EXPECT_TRUE(wait_until([&] { return eng.stats().kv_blocks_used == 0; }))
      << eng.stats().kv_blocks_used << " KV blocks still in use";
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
  engine::FinishEvent ea, eb;
  AWAIT_FINISH(a, ea);
  AWAIT_FINISH(b, eb);
  EXPECT_EQ(ea.reason, engine::FinishReason::Length);
  EXPECT_EQ(a.out, std::vector<int32_t>(ref.begin(), ref.begin() + 4));
  EXPECT_EQ(eb.reason, engine::FinishReason::Stop);
  EXPECT_EQ(b.out.back(), ref[1]);
  EXPECT_LE(b.out.size(), 2u);
}

// Prefix caching. Prompts that share a start: `shared` tokens of one system prompt, then a
// part of their own.
namespace {

std::vector<int32_t> with_prefix(int shared, int own, int salt) {
  std::vector<int32_t> p = prompt_of(shared, 99);
  const std::vector<int32_t> tail = prompt_of(own, salt);
  p.insert(p.end(), tail.begin(), tail.end());
  return p;
}

// Submits one request, waits for it, returns its tokens and finish event.
std::pair<std::vector<int32_t>, engine::FinishEvent> run_one(engine::Engine& eng,
                                                             const std::vector<int32_t>& prompt,
                                                             int64_t n,
                                                             const engine::SamplingParams& sp) {
  Pending p(prompt, n);
  p.req->sampling = sp;
  uint64_t id;
  std::string err;
  EXPECT_EQ(eng.submit(p.req, &id, &err), engine::SubmitResult::Accepted) << err;
  auto fut = p.done.get_future();
  EXPECT_EQ(fut.wait_for(60s), std::future_status::ready) << "request did not finish";
  return {p.out, fut.get()};
}

engine::SamplingParams seeded(uint64_t seed) {
  engine::SamplingParams sp;
  sp.temperature = 0.9f;
  sp.top_p = 0.95f;
  sp.seed = seed;
  return sp;
}

}  // namespace

// The same request gives the same tokens with a cold cache, after a request that shared its
// first blocks (now taken from the cache), after its own exact prompt, and after enough other
// traffic to evict them; greedy and seeded sampling alike, and equal to caching off.
TEST(PrefixCache, OutputIsIdenticalWithAndWithoutAHit) {
  Fixture f;
  for (kv::KvDtype dt : {kv::KvDtype::BF16, kv::KvDtype::FP8}) {
    for (const engine::SamplingParams& sp : {engine::SamplingParams{}, seeded(77)}) {
      SCOPED_TRACE(std::string(kv::kv_dtype_name(dt)) + (sp.temperature > 0 ? " sampled" : ""));
      engine::EngineConfig cfg;
      cfg.block_size = 4;
      cfg.kv_blocks = 40;
      cfg.max_model_len = 80;
      cfg.kv_dtype = dt;
      cfg.max_batch_tokens = 16;  // a cold 45-token prompt takes several chunks
      const std::vector<int32_t> x = with_prefix(37, 8, 1), y = with_prefix(37, 5, 2);
      const std::vector<int32_t> expected = alone(*f.m, x, 10, sp, dt);

      engine::EngineConfig off = cfg;
      off.prefix_caching = false;
      {
        engine::Engine eng(*f.m, off);
        auto [out, fin] = run_one(eng, y, 10, sp);
        auto [out2, fin2] = run_one(eng, x, 10, sp);
        EXPECT_EQ(out2, expected);
        EXPECT_EQ(fin2.cached_tokens, 0);
        EXPECT_EQ(eng.stats().prefix_hit_tokens, 0);
        EXPECT_EQ(eng.stats().prefix_query_tokens, 0);  // nothing looked up
        EXPECT_EQ(eng.stats().kv_blocks_cached, 0);
      }

      engine::Engine eng(*f.m, cfg);
      auto [cold, fc] = run_one(eng, x, 10, sp);  // cold
      EXPECT_EQ(cold, expected);
      EXPECT_EQ(fc.cached_tokens, 0);
      {
        engine::Engine eng2(*f.m, cfg);
        auto [oy, fy] = run_one(eng2, y, 10, sp);
        EXPECT_EQ(fy.cached_tokens, 0);
        auto [shared, fs] = run_one(eng2, x, 10, sp);  // its first 36 tokens from the cache
        EXPECT_EQ(fs.cached_tokens, 36);
        EXPECT_EQ(shared, expected);
        const engine::EngineStats st = eng2.stats();
        EXPECT_EQ(st.prefix_query_tokens, static_cast<int64_t>(x.size() + y.size()));
        EXPECT_EQ(st.prefix_hit_tokens, 36);
        EXPECT_GT(st.kv_blocks_cached, 0);
      }
      // The exact prompt again: all its full blocks but the one its last token is in (the
      // last token must be computed for the logits); 45 tokens -> 44 = 11 blocks.
      auto [again, fa] = run_one(eng, x, 10, sp);
      EXPECT_EQ(fa.cached_tokens, 44);
      EXPECT_EQ(again, expected);
      // Other traffic fills the pool (40 blocks): the least recent blocks are evicted.
      for (int i = 0; i < 6; ++i) run_one(eng, prompt_of(50, 10 + i), 8, sp);
      auto [evicted, fe] = run_one(eng, x, 10, sp);
      EXPECT_LT(fe.cached_tokens, 44);
      EXPECT_EQ(evicted, expected);
      EXPECT_TRUE(wait_until([&] { return eng.stats().kv_blocks_used == 0; }))
          << eng.stats().kv_blocks_used << " KV blocks still held";
    }
  }
}

// Many requests sharing a system prompt at once, with too few blocks for all (preemption, and
// cached blocks evicted and recomputed), each matching its run alone; every reference comes
// back, including those of cancelled requests.
TEST(PrefixCache, SharedPrefixesUnderPreemptionAndCancelLeakNothing) {
  Fixture f;
  engine::EngineConfig cfg;
  cfg.block_size = 4;
  cfg.kv_blocks = 24;  // 96 positions for 8 requests of 30-40 + 8 tokens: must preempt
  cfg.max_model_len = 64;
  cfg.max_num_seqs = 8;
  cfg.max_batch_tokens = 32;
  engine::Engine eng(*f.m, cfg);
  std::vector<std::vector<int32_t>> prompts, expected;
  std::vector<std::unique_ptr<Pending>> reqs;
  for (int i = 0; i < 8; ++i) {
    prompts.push_back(with_prefix(26, 4 + i % 5 * 2, i));
    const engine::SamplingParams sp = i % 2 ? seeded(500 + i) : engine::SamplingParams{};
    expected.push_back(alone(*f.m, prompts[i], 8, sp));
    reqs.push_back(std::make_unique<Pending>(prompts[i], 8));
    reqs.back()->req->sampling = sp;
  }
  // Two long ones to cancel midway. The first token of either holds the engine until both
  // cancellations are sent, so that neither can end on its own first (max_model_len), however
  // fast the step.
  std::vector<std::unique_ptr<Pending>> cancelled;
  std::atomic<int> seen{0};
  std::atomic<bool> cancels_sent{false};
  for (int i = 0; i < 2; ++i) {
    cancelled.push_back(std::make_unique<Pending>(with_prefix(26, 3, 50 + i), 4000));
    cancelled.back()->req->on_token = [&](const engine::TokenEvent&) {
      ++seen;
      wait_until([&] { return cancels_sent.load(); });
    };
  }
  std::vector<uint64_t> cancel_ids;
  for (auto& c : cancelled) {
    uint64_t id;
    ASSERT_EQ(eng.submit(c->req, &id, nullptr), engine::SubmitResult::Accepted);
    cancel_ids.push_back(id);
  }
  for (auto& r : reqs) {
    uint64_t id;
    ASSERT_EQ(eng.submit(r->req, &id, nullptr), engine::SubmitResult::Accepted);
  }
  const bool came = wait_until([&] { return seen >= 1; });
  for (uint64_t id : cancel_ids) eng.cancel(id);
  cancels_sent = true;
  ASSERT_TRUE(came) << "no tokens came";
  for (size_t i = 0; i < reqs.size(); ++i) {
    engine::FinishEvent e;
    AWAIT_FINISH(*reqs[i], e);
    EXPECT_EQ(reqs[i]->out, expected[i]) << "request " << i;
  }
  for (auto& c : cancelled) {
    engine::FinishEvent e;
    AWAIT_FINISH(*c, e);
    EXPECT_EQ(e.reason, engine::FinishReason::Cancelled);
  }
  EXPECT_TRUE(wait_until([&] { return eng.stats().kv_blocks_used == 0; }))
      << eng.stats().kv_blocks_used << " KV blocks still held";
  const engine::EngineStats st = eng.stats();
  EXPECT_GT(st.preemptions, 0);
  EXPECT_GT(st.prefix_hit_tokens, 0);
  EXPECT_LE(st.kv_blocks_cached, st.kv_blocks_total);
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

// ---------------------------------------------------------------------------------------------
// The sampler's distribution. Each test draws many tokens from fixed logits with a fixed seed and
// compares the frequencies with the distribution the parameters define, written out here: the
// softmax of logits / temperature over the k largest logits (ties to the lower id), cut to the
// smallest prefix (most likely first) whose probability reaches top_p, renormalized. A chi-square
// test accepts it; the same test must reject the distribution of a nearby wrong parameter, so a
// sampler that ignored or misread temperature, top-k or top-p would fail.
namespace {

std::vector<double> intended(const std::vector<float>& logits, double temperature, int64_t top_k,
                             double top_p) {
  const int64_t V = static_cast<int64_t>(logits.size());
  std::vector<int64_t> order(V);
  for (int64_t i = 0; i < V; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
  const int64_t k = top_k > 0 && top_k < V ? top_k : V;
  std::vector<double> w(k);
  double sum = 0;
  for (int64_t j = 0; j < k; ++j)
    sum += w[j] = std::exp((logits[order[j]] - logits[order[0]]) / temperature);
  int64_t n = k;
  double acc = 0;
  for (int64_t j = 0; j < k && top_p < 1.0; ++j) {
    acc += w[j] / sum;
    if (acc >= top_p) {
      n = j + 1;
      break;
    }
  }
  double kept = 0;
  for (int64_t j = 0; j < n; ++j) kept += w[j];
  std::vector<double> p(V, 0.0);
  for (int64_t j = 0; j < n; ++j) p[order[j]] = w[j] / kept;
  return p;
}

std::vector<int64_t> draw(const engine::SamplingParams& sp, const std::vector<float>& logits,
                          int64_t n) {
  engine::Sampler s(sp);
  std::vector<int64_t> counts(logits.size(), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = s.sample(logits.data(), static_cast<int64_t>(logits.size()));
    EXPECT_GE(t, 0);
    EXPECT_LT(t, static_cast<int32_t>(logits.size()));
    if (t >= 0 && t < static_cast<int32_t>(logits.size())) ++counts[t];
  }
  return counts;
}

// Draws n tokens with `sp` and checks them against `want`; each of `wrong` (the distribution of a
// mistaken parameter) must be rejected, by a wide margin (3 times the limit).
void check_distribution(const engine::SamplingParams& sp, const std::vector<float>& logits,
                        int64_t n, const std::vector<double>& want,
                        const std::vector<std::pair<std::string, std::vector<double>>>& wrong) {
  const auto counts = draw(sp, logits, n);
  int df = 0;
  const double x = chi_square(counts, want, &df);
  const std::string what = "T=" + std::to_string(sp.temperature) +
                           " top_k=" + std::to_string(sp.top_k) +
                           " top_p=" + std::to_string(sp.top_p);
  EXPECT_LT(x, chi_square_limit(df)) << what << ": chi-square " << x << " with " << df << " df";
  for (const auto& [name, p] : wrong) {
    int dfw = 0;
    const double xw = chi_square(counts, p, &dfw);
    EXPECT_GT(xw, 3 * chi_square_limit(dfw))
        << what << ": the draws do not tell it from " << name << " (chi-square " << xw << ")";
  }
}

const std::vector<float> kLogits8 = {1.2f, 0.3f, 2.0f, -0.5f, 0.9f, -2.0f, 1.7f, 0.0f};

std::vector<float> random_logits(int64_t V, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> v(V);
  for (float& x : v) x = nd(rng);
  return v;
}

}  // namespace

TEST(Sampler, TemperatureZeroIsArgmaxWhateverTheOtherSettings) {
  for (uint32_t seed = 0; seed < 20; ++seed) {
    auto logits = random_logits(300, seed);
    if (seed % 2) logits[seed * 7] = logits[seed * 11] = 50.0f;  // a tie: the lower id wins
    engine::SamplingParams sp;
    sp.temperature = seed % 4 == 3 ? -1.0f : 0.0f;
    sp.top_k = seed % 3;
    sp.top_p = seed % 5 == 0 ? 0.1f : 1.0f;
    sp.seed = seed;
    engine::Sampler s(sp);
    const int32_t want = engine::argmax(logits.data(), 300);
    if (seed % 2) {
      EXPECT_EQ(want, static_cast<int32_t>(seed * 7));
    }
    for (int i = 0; i < 50; ++i) ASSERT_EQ(s.sample(logits.data(), 300), want) << "seed " << seed;
  }
}

TEST(Sampler, FrequenciesFollowTheSoftmaxAtTheTemperature) {
  for (float t : {0.35f, 0.7f, 1.0f, 1.6f}) {
    engine::SamplingParams sp;
    sp.temperature = t;
    sp.seed = 17;
    std::vector<std::pair<std::string, std::vector<double>>> wrong = {
        {"temperature * 1.1", intended(kLogits8, t * 1.1, 0, 1.0)},
        {"temperature / 1.1", intended(kLogits8, t / 1.1, 0, 1.0)},
        {"uniform", std::vector<double>(8, 1.0 / 8)}};
    if (t != 1.0f) wrong.push_back({"temperature 1", intended(kLogits8, 1.0, 0, 1.0)});
    check_distribution(sp, kLogits8, 200000, intended(kLogits8, t, 0, 1.0), wrong);
  }
  // Logits far from 0 (as real models give): only differences count.
  std::vector<float> shifted = kLogits8;
  for (float& x : shifted) x += 1000.0f;
  engine::SamplingParams sp;
  sp.temperature = 0.8f;
  sp.seed = 5;
  check_distribution(sp, shifted, 100000, intended(kLogits8, 0.8, 0, 1.0),
                     {{"temperature 1", intended(kLogits8, 1.0, 0, 1.0)}});
}

TEST(Sampler, TopKDrawsOnlyTheKLargestInSoftmaxProportions) {
  const auto logits = random_logits(1000, 3);
  for (int64_t k : {1, 2, 5, 40}) {
    engine::SamplingParams sp;
    sp.temperature = 1.3f;
    sp.top_k = k;
    sp.seed = static_cast<uint64_t>(k);
    const auto want = intended(logits, 1.3, k, 1.0);
    const auto counts = draw(sp, logits, 40000);
    int64_t outside = 0;
    for (size_t i = 0; i < counts.size(); ++i) outside += want[i] == 0.0 ? counts[i] : 0;
    EXPECT_EQ(outside, 0) << "top_k " << k << ": tokens outside the " << k << " largest";
    if (k > 1) {
      check_distribution(sp, logits, 40000, want,
                         {{"top_k + 1", intended(logits, 1.3, k + 1, 1.0)},
                          {"temperature 1", intended(logits, 1.0, k, 1.0)}});
    }
  }
  // Ties at the cut: the lower ids are kept.
  const std::vector<float> tied = {0.0f, 5.0f, 5.0f, 5.0f, 1.0f};
  engine::SamplingParams sp;
  sp.temperature = 1.0f;
  sp.top_k = 2;
  const auto counts = draw(sp, tied, 20000);
  EXPECT_EQ(counts[0] + counts[3] + counts[4], 0);
  EXPECT_GT(counts[1], 9000);
  EXPECT_GT(counts[2], 9000);
}

TEST(Sampler, TopPDrawsOnlyTheNucleusInSoftmaxProportions) {
  for (float t : {0.5f, 1.0f, 1.5f}) {
    for (float top_p : {0.3f, 0.6f, 0.9f, 0.99f}) {
      // The cut must not sit on a cumulative sum, where float rounding could go either way.
      const auto full = intended(kLogits8, t, 0, 1.0);
      std::vector<double> sorted = full;
      std::sort(sorted.rbegin(), sorted.rend());
      double acc = 0;
      for (double q : sorted) {
        acc += q;
        ASSERT_GT(std::fabs(acc - top_p), 1e-4) << "test set-up: T=" << t << " top_p=" << top_p;
      }
      engine::SamplingParams sp;
      sp.temperature = t;
      sp.top_p = top_p;
      sp.seed = 99;
      const auto want = intended(kLogits8, t, 0, top_p);
      int kept = 0;
      for (double q : want) kept += q > 0;
      // Wrong nuclei: one token more or less, or none at all.
      std::vector<std::pair<std::string, std::vector<double>>> wrong = {
          {"one token fewer", intended(kLogits8, t, kept - 1, 1.0)}};
      if (kept < 8) {
        wrong.push_back({"one token more", intended(kLogits8, t, kept + 1, 1.0)});
        wrong.push_back({"no top_p", full});
      }
      if (kept > 1) {
        check_distribution(sp, kLogits8, 100000, want, wrong);
      } else {
        const auto counts = draw(sp, kLogits8, 1000);
        EXPECT_EQ(counts[2], 1000) << "T=" << t << " top_p=" << top_p << ": only the argmax";
      }
    }
  }
}

TEST(Sampler, TopKThenTopPOfTheRenormalizedRest) {
  const auto logits = random_logits(500, 8);
  engine::SamplingParams sp;
  sp.temperature = 0.9f;
  sp.top_k = 12;
  sp.top_p = 0.8f;
  sp.seed = 4;
  const auto want = intended(logits, 0.9, 12, 0.8);
  int kept = 0;
  for (double q : want) kept += q > 0;
  ASSERT_GT(kept, 2);
  ASSERT_LT(kept, 12);
  check_distribution(sp, logits, 60000, want,
                     {{"top_k only", intended(logits, 0.9, 12, 1.0)},
                      {"top_p over the whole vocabulary", intended(logits, 0.9, 0, 0.8)}});
}

// Masked (-inf) and NaN logits are never drawn and leave the others' proportions alone; a +inf
// logit is certain, as at temperature 0 (it used to make every probability NaN, and the draw
// fell through to the least likely candidate).
TEST(Sampler, InfiniteAndNanLogits) {
  const float inf = INFINITY, nan = std::nanf("");
  const std::vector<float> masked = {1.2f, -inf, 0.3f, nan, 2.0f, -inf, 0.9f, nan};
  const std::vector<float> finite = {1.2f, 0.3f, 2.0f, 0.9f};
  const std::vector<int> where = {0, 2, 4, 6};
  for (int64_t top_k : {0, 3, 6}) {
    engine::SamplingParams sp;
    sp.temperature = 0.8f;
    sp.top_k = top_k;
    sp.seed = 21;
    const auto f = intended(finite, 0.8, top_k > 4 ? 0 : top_k, 1.0);
    std::vector<double> want(masked.size(), 0.0);
    for (size_t j = 0; j < where.size(); ++j) want[where[j]] = f[j];
    check_distribution(sp, masked, 50000, want, {});
  }
  const std::vector<float> with_inf = {1.0f, 3.0f, inf, nan, -inf, inf};
  for (float t : {0.5f, 1.0f, 3.0f}) {
    engine::SamplingParams sp;
    sp.temperature = t;
    sp.top_p = 0.9f;
    engine::Sampler s(sp);
    for (int i = 0; i < 100; ++i) ASSERT_EQ(s.sample(with_inf.data(), 6), 2) << "T=" << t;
  }
  EXPECT_EQ(engine::argmax(with_inf.data(), 6), 2);
}

TEST(Sampler, SeedsReproduceDifferAndTheStateCarriesOver) {
  const auto logits = random_logits(64, 1);
  auto run = [&](engine::Sampler& s, int n) {
    std::vector<int32_t> v;
    for (int i = 0; i < n; ++i) v.push_back(s.sample(logits.data(), 64));
    return v;
  };
  engine::SamplingParams sp;
  sp.temperature = 1.0f;
  sp.seed = 42;
  engine::Sampler a(sp), b(sp);
  EXPECT_EQ(run(a, 200), run(b, 200));
  sp.seed = 43;
  engine::Sampler c(sp);
  EXPECT_NE(run(c, 200), run(b, 200));
  // A sampler restored from another's state continues its stream, not its seed's.
  engine::Sampler d(sp);
  d.set_state(a.state());
  EXPECT_EQ(run(d, 500), run(a, 500));
  moeserve::testing::expect_error([&] { d.set_state("not a state"); }, {"sampler"});
}
