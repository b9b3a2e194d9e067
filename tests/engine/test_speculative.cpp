// Speculative decoding with the MTP module: greedy output equal to decoding without it, the
// rejection sampler keeping the target distribution, batches of mixed requests equal to their
// requests alone, no KV block left behind, and the MTP forward against PyTorch's.
#include <chrono>
#include <cmath>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <random>

#include "../test_util.h"
#include "engine/engine.h"
#include "engine/generator.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"
#include "engine_test_util.h"
#include "model/init_model.h"

using namespace moeserve;
using namespace std::chrono_literals;
using namespace moeserve::engine_test;

namespace {

std::string trained_dir() {
  return moeserve::testing::source_dir() + "/data/models/shakespeare-v3-tiny";
}

// The tiny preset with an MTP module of random weights.
struct RandomMtp {
  moeserve::testing::TempDir dir;
  ThreadPool pool{2};
  std::unique_ptr<model::Model> m;
  RandomMtp() {
    model::ModelConfig c = model::preset_config("tiny");
    c.num_nextn_predict_layers = 1;
    model::write_random_model(c, dir.path(), {});
    m = std::make_unique<model::Model>(dir.path(), pool);
  }
};

std::vector<int32_t> generate(model::Model& m, const std::vector<int32_t>& prompt, int64_t n,
                              int64_t k, const engine::SamplingParams& sp = {},
                              engine::GenerateStats* st = nullptr) {
  engine::Generator g(m);
  engine::GenerateOptions o;
  o.max_tokens = n;
  o.sampling = sp;
  o.speculative_tokens = k;
  return g.generate(prompt, o, {}, st);
}

// Starts of lines in the style of the training text, as `moeserve tokenize` gives them (with the
// begin-of-sequence id 0): "KING HENRY:\nNow, my good lords", "ROMEO:\nWhat light is" and
// "First Citizen:\nBefore we proceed".
const std::vector<std::vector<int32_t>>& trained_prompts() {
  static const std::vector<std::vector<int32_t>> p = {{0, 471, 1141, 286, 817, 29, 329, 479, 1032},
                                                      {0, 843, 286, 495, 1307, 347},
                                                      {0, 668, 1151, 286, 2248, 353, 2673}};
  return p;
}

}  // namespace

TEST(Speculative, LoadsTheMtpModuleAndRefusesAModelWithout) {
  ThreadPool pool(2);
  model::Model m(trained_dir(), pool);
  EXPECT_FALSE(m.has_mtp());
  m.load_mtp();
  ASSERT_TRUE(m.has_mtp());
  // The trained checkpoint stores the shared head and embedding under the module's name too.
  EXPECT_NE(m.weights().mtp.head.data, nullptr);
  EXPECT_NE(m.weights().mtp.embed.data, nullptr);
  EXPECT_TRUE(m.weights().mtp.layer.is_moe);

  moeserve::testing::TempDir dir;
  model::write_random_model(model::preset_config("tiny"), dir.path(), {});
  model::Model plain(dir.path(), pool);
  try {
    plain.load_mtp();
    FAIL() << "loaded an MTP module from a model without one";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("num_nextn_predict_layers"), std::string::npos)
        << e.what();
  }
  try {
    generate(plain, {1, 2, 3}, 4, 1);
    FAIL() << "speculated without an MTP module";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("multi-token-prediction"), std::string::npos) << e.what();
  }
}

// The verify forward of k + 1 positions gives each position the logits that decoding them one
// at a time gives (the numerical contract), bit for bit, with every cache dtype.
TEST(Speculative, VerifyChunkLogitsEqualOneAtATime) {
  ThreadPool pool(2);
  model::Model m(trained_dir(), pool);
  const auto& c = m.config();
  const int64_t V = c.vocab_size;
  const std::vector<int32_t> prompt = prompt_of(37, 3, static_cast<int>(V));
  const std::vector<int32_t> next = {17, 230, 4000, 9};
  for (kv::KvDtype dt : kv::kKvDtypes) {
    std::vector<float> chunk(next.size() * V), one(next.size() * V);
    for (int pass = 0; pass < 2; ++pass) {
      kv::KvPool kv(8, 16, c.num_hidden_layers, c.kv_cache_dim(), dt);
      std::vector<int32_t> blocks;
      ASSERT_TRUE(kv.allocate(8, &blocks));
      model::Batch b;
      b.tokens = prompt;
      b.seqs = {{0, 37, 0, blocks.data()}};
      std::vector<float> scratch(V);
      b.logit_rows = {36};
      m.forward(b, kv, scratch.data());
      if (pass == 0) {
        b.tokens = next;
        b.seqs = {{0, 4, 37, blocks.data()}};
        b.logit_rows = {0, 1, 2, 3};
        m.forward(b, kv, chunk.data());
      } else {
        for (int64_t i = 0; i < 4; ++i) {
          b.tokens = {next[i]};
          b.seqs = {{0, 1, 37 + i, blocks.data()}};
          b.logit_rows = {0};
          m.forward(b, kv, one.data() + i * V);
        }
      }
    }
    EXPECT_EQ(0, std::memcmp(chunk.data(), one.data(), chunk.size() * sizeof(float)))
        << kv::kv_dtype_name(dt);
  }
}

TEST(Speculative, GreedyOutputEqualsPlainDecodingOnTheTrainedModel) {
  ThreadPool pool(2);
  model::Model m(trained_dir(), pool);
  int64_t drafted = 0, accepted = 0;
  for (const auto& p : trained_prompts()) {
    const std::vector<int32_t> want = generate(m, p, 40, 0);
    for (int64_t k : {1, 2, 3}) {
      engine::GenerateStats st;
      EXPECT_EQ(generate(m, p, 40, k, {}, &st), want) << "k=" << k;
      drafted += st.draft_tokens;
      accepted += st.accepted_tokens;
    }
  }
  EXPECT_GT(drafted, 0);
  // A trained module: most drafts of the greedy continuation are right.
  EXPECT_GT(accepted, drafted / 4) << accepted << " of " << drafted;
}

TEST(Speculative, GreedyOutputEqualsPlainDecodingOnARandomModel) {
  RandomMtp f;
  const int V = static_cast<int>(f.m->config().vocab_size);
  for (int salt = 0; salt < 3; ++salt) {
    const std::vector<int32_t> p = prompt_of(5 + 13 * salt, salt, V);
    const std::vector<int32_t> want = generate(*f.m, p, 24, 0);
    for (int64_t k : {1, 2, 3}) {
      engine::GenerateStats st;
      EXPECT_EQ(generate(*f.m, p, 24, k, {}, &st), want) << "k=" << k << " salt " << salt;
      EXPECT_GT(st.draft_tokens, 0);
    }
  }
}

TEST(Speculative, SeededSampledOutputIsReproducible) {
  ThreadPool pool(2);
  model::Model m(trained_dir(), pool);
  engine::SamplingParams sp;
  sp.temperature = 0.8f;
  sp.top_p = 0.95f;
  sp.seed = 11;
  engine::GenerateStats st;
  const auto a = generate(m, trained_prompts()[0], 40, 2, sp, &st);
  EXPECT_EQ(generate(m, trained_prompts()[0], 40, 2, sp), a);
  EXPECT_EQ(a.size(), 40u);
  EXPECT_GT(st.draft_tokens, 0);
  sp.seed = 12;
  EXPECT_NE(generate(m, trained_prompts()[0], 40, 2, sp), a);
}

namespace {

// Kinds of request in the mixed batch: greedy, seeded sampling (both speculate), a repetition
// penalty and logprobs (both decode without speculation).
engine::SamplingParams params_of(int i) {
  engine::SamplingParams sp;
  if (i % 4 == 1) {
    sp.temperature = 0.9f;
    sp.top_k = 40;
    sp.seed = 100 + i;
  } else if (i % 4 == 2) {
    sp.repetition_penalty = 1.3f;
  }
  return sp;
}

// Runs the requests at once through an engine; returns their outputs, checking that every block
// comes back.
std::vector<std::vector<int32_t>> run_engine(model::Model& m, const engine::EngineConfig& ec,
                                             const std::vector<std::vector<int32_t>>& prompts,
                                             int64_t n, engine::EngineStats* stats) {
  engine::Engine eng(m, ec);
  std::vector<std::unique_ptr<Pending>> reqs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    reqs.push_back(std::make_unique<Pending>(prompts[i], n));
    reqs.back()->req->sampling = params_of(static_cast<int>(i));
    if (i % 4 == 3) reqs.back()->req->top_logprobs = 2;
    uint64_t id;
    std::string err;
    EXPECT_EQ(eng.submit(reqs.back()->req, &id, &err), engine::SubmitResult::Accepted) << err;
  }
  std::vector<std::vector<int32_t>> out;
  for (auto& r : reqs) {
    auto fut = r->done.get_future();
    EXPECT_EQ(fut.wait_for(120s), std::future_status::ready) << "request did not finish";
    EXPECT_EQ(fut.get().reason, engine::FinishReason::Length);
    out.push_back(r->out);
  }
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (eng.stats().kv_blocks_used != 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(2ms);
  *stats = eng.stats();
  EXPECT_EQ(stats->kv_blocks_used, 0) << "KV blocks still held";
  return out;
}

}  // namespace

// A batch of speculating and non-speculating requests, with a small step budget (chunked
// prefill, drafts cut) and a small cache (preemption), gives each request what it gives alone:
// greedy ones what plain decoding gives, sampled ones what the same seed gives alone.
TEST(Speculative, MixedBatchMatchesRunningAloneAndFreesEveryBlock) {
  for (bool trained : {true, false}) {
    std::unique_ptr<RandomMtp> rnd;
    ThreadPool pool(2);
    std::unique_ptr<model::Model> own;
    model::Model* m;
    if (trained) {
      own = std::make_unique<model::Model>(trained_dir(), pool);
      m = own.get();
    } else {
      rnd = std::make_unique<RandomMtp>();
      m = rnd->m.get();
    }
    const int V = static_cast<int>(m->config().vocab_size);
    std::vector<std::vector<int32_t>> prompts;
    for (int i = 0; i < 8; ++i) prompts.push_back(prompt_of(3 + (i * 11) % 40, i, V));
    const int64_t n = 20;
    engine::EngineConfig ec;
    ec.max_num_seqs = 8;
    ec.max_model_len = 128;
    ec.max_batch_tokens = 24;
    ec.speculative_tokens = 3;
    engine::EngineStats st;
    const auto batched = run_engine(*m, ec, prompts, n, &st);
    EXPECT_GT(st.spec_draft_tokens, 0);
    EXPECT_LE(st.spec_accepted_tokens, st.spec_draft_tokens);
    // A cache of 12 blocks: sequences are preempted and recomputed.
    engine::EngineConfig small = ec;
    small.kv_blocks = 12;
    const auto preempted = run_engine(*m, small, prompts, n, &st);
    EXPECT_GT(st.preemptions, 0);
    for (size_t i = 0; i < prompts.size(); ++i) {
      const engine::SamplingParams sp = params_of(static_cast<int>(i));
      if (sp.temperature == 0.0f) {
        // Greedy (with or without a penalty): the Generator's plain decoding.
        engine::Generator g(*m);
        engine::GenerateOptions o;
        o.max_tokens = n;
        o.sampling = sp;
        EXPECT_EQ(batched[i], g.generate(prompts[i], o)) << "request " << i;
      } else {
        EXPECT_EQ(batched[i], generate(*m, prompts[i], n, 3, sp)) << "request " << i;
      }
      EXPECT_EQ(preempted[i], batched[i]) << "request " << i << " under preemption";
    }
  }
}

// Drafts follow only a token the step gave: a prompt chunk that ends one short of the last
// prompt token drafts nothing, so how the step budget cuts a prompt changes neither the drafts
// verified nor a sampled request's draws.
TEST(Speculative, WherePromptChunksEndDoesNotChangeTheDrafts) {
  ThreadPool pool(2);
  model::Model m(trained_dir(), pool);
  const int V = static_cast<int>(m.config().vocab_size);
  // Request 0 greedy, request 1 sampled (params_of), prompts of 9 tokens: with 8 tokens a step,
  // the first step computes 8 of the first admitted one's.
  const std::vector<std::vector<int32_t>> prompts = {prompt_of(9, 0, V), prompt_of(9, 1, V)};
  engine::EngineConfig ec;
  ec.max_num_seqs = 4;
  ec.max_model_len = 128;
  ec.speculative_tokens = 2;
  engine::EngineStats cut, whole;
  ec.max_batch_tokens = 8;
  const auto a = run_engine(m, ec, prompts, 24, &cut);
  ec.max_batch_tokens = 64;
  const auto b = run_engine(m, ec, prompts, 24, &whole);
  EXPECT_EQ(a, b);
  EXPECT_GT(whole.spec_draft_tokens, 0);
  EXPECT_EQ(cut.spec_draft_tokens, whole.spec_draft_tokens);
  EXPECT_EQ(cut.spec_accepted_tokens, whole.spec_accepted_tokens);
}

namespace {

// One request through `eng`, to its end: its tokens, and the engine's draft and accepted
// counters' growth meanwhile.
struct Ran {
  std::vector<int32_t> out;
  int64_t drafts = 0, accepted = 0;
};
Ran run_one(engine::Engine& eng, const std::vector<int32_t>& prompt, int64_t n,
            const engine::SamplingParams& sp, int top_logprobs = -1) {
  const engine::EngineStats before = eng.stats();
  Pending p(prompt, n);
  p.req->sampling = sp;
  p.req->top_logprobs = top_logprobs;
  uint64_t id;
  std::string err;
  EXPECT_EQ(eng.submit(p.req, &id, &err), engine::SubmitResult::Accepted) << err;
  auto fut = p.done.get_future();
  EXPECT_EQ(fut.wait_for(120s), std::future_status::ready) << "request did not finish";
  fut.get();
  // The counters of the request's last step come with the step's end.
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (eng.stats().running != 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(1ms);
  const engine::EngineStats after = eng.stats();
  EXPECT_EQ(after.running, 0);
  return {p.out, after.spec_draft_tokens - before.spec_draft_tokens,
          after.spec_accepted_tokens - before.spec_accepted_tokens};
}

}  // namespace

// Prefix caching keeps what a speculating request drafts: a request that takes its start from
// blocks other requests published (one that finished there, one that decoded without
// speculation, one whose prompt went on with another token) drafts and samples what it does
// with a cold cache.
TEST(Speculative, PrefixCacheHitsKeepTheDrafts) {
  ThreadPool pool(2);
  model::Model m(trained_dir(), pool);
  const int V = static_cast<int>(m.config().vocab_size);
  engine::SamplingParams greedy, sampled;
  sampled.temperature = 0.8f;
  sampled.seed = 5;
  const std::vector<int32_t> p = prompt_of(40, 3, V), q = prompt_of(37, 4, V);
  for (int64_t budget : {16, 64}) {
    engine::EngineConfig ec;
    ec.max_num_seqs = 4;
    ec.max_model_len = 256;
    ec.max_batch_tokens = budget;
    ec.speculative_tokens = 2;
    // The earlier requests: a greedy one on p (it finishes inside a block), one with logprobs
    // (no speculation) on q.
    engine::Engine warm(m, ec);
    const Ran a = run_one(warm, p, 21, greedy);
    run_one(warm, q, 20, greedy, 2);
    std::vector<std::vector<int32_t>> follow;  // each in the warm engine and in a cold one
    // A second turn: p, a's output and more.
    std::vector<int32_t> turn = p;
    turn.insert(turn.end(), a.out.begin(), a.out.end());
    for (int32_t t : prompt_of(5, 9, V)) turn.push_back(t);
    follow.push_back(turn);
    // p's first 32 tokens (two full blocks), then others.
    std::vector<int32_t> fork(p.begin(), p.begin() + 32);
    for (int32_t t : prompt_of(9, 7, V)) fork.push_back(t);
    follow.push_back(fork);
    std::vector<int32_t> q2 = q;
    for (int32_t t : prompt_of(6, 8, V)) q2.push_back(t);
    follow.push_back(q2);
    for (size_t i = 0; i < follow.size(); ++i) {
      for (const engine::SamplingParams& sp : {greedy, sampled}) {
        const Ran hot = run_one(warm, follow[i], 24, sp);
        engine::Engine cold_engine(m, ec);
        const Ran cold = run_one(cold_engine, follow[i], 24, sp);
        const std::string what = "request " + std::to_string(i) + " at temperature " +
                                 std::to_string(sp.temperature) + ", budget " +
                                 std::to_string(budget);
        EXPECT_EQ(hot.out, cold.out) << what;
        EXPECT_EQ(hot.drafts, cold.drafts) << what;
        EXPECT_EQ(hot.accepted, cold.accepted) << what;
      }
    }
    EXPECT_GT(warm.stats().prefix_hit_tokens, 0);
  }
}

// A request that took its start from the cache publishes its own later blocks: a chat's third
// turn finds the blocks of the first two (the first's, then those the second computed after
// it), and gives what a cold cache gives. The pool's keys hold the token after each block, so a
// block whose MTP row read another next token (the same tokens went on differently) is not
// taken, and both can be published.
TEST(Speculative, PrefixCacheHitPublishesItsLaterBlocks) {
  ThreadPool pool(2);
  model::Model m(trained_dir(), pool);
  const int V = static_cast<int>(m.config().vocab_size);
  const engine::SamplingParams greedy;
  engine::EngineConfig ec;
  ec.max_num_seqs = 4;
  ec.max_model_len = 256;
  ec.max_batch_tokens = 64;
  ec.speculative_tokens = 2;
  engine::Engine warm(m, ec);
  auto hits = [&] { return warm.stats().prefix_hit_tokens; };
  // Turn 1: 40 prompt tokens, 21 generated (blocks 0-2 full and published).
  const std::vector<int32_t> p = prompt_of(40, 3, V);
  const Ran a = run_one(warm, p, 21, greedy);
  // Turn 2: all of turn 1 and 5 more tokens (66), 24 generated: it takes blocks 0-2 and
  // computes and publishes blocks 3 and 4 (positions 48-79).
  std::vector<int32_t> turn2 = p;
  turn2.insert(turn2.end(), a.out.begin(), a.out.end());
  for (int32_t t : prompt_of(5, 9, V)) turn2.push_back(t);
  int64_t before = hits();
  const Ran b = run_one(warm, turn2, 24, greedy);
  EXPECT_EQ(hits() - before, 48);
  // Turn 3: all of turn 2 and 3 more (93): blocks 0-4 from the cache, 80 tokens.
  std::vector<int32_t> turn3 = turn2;
  turn3.insert(turn3.end(), b.out.begin(), b.out.end());
  for (int32_t t : prompt_of(3, 10, V)) turn3.push_back(t);
  ASSERT_EQ(turn3.size(), 93u);
  before = hits();
  const Ran c = run_one(warm, turn3, 12, greedy);
  EXPECT_EQ(hits() - before, 80);
  engine::Engine cold_engine(m, ec);
  const Ran cold = run_one(cold_engine, turn3, 12, greedy);
  EXPECT_EQ(c.out, cold.out);
  EXPECT_EQ(c.drafts, cold.drafts);
  EXPECT_EQ(c.accepted, cold.accepted);
  // The same 32 tokens going on with another token: the block ending there is published twice
  // (once per next token), and a request on the second continuation takes both blocks.
  std::vector<int32_t> fork(p.begin(), p.begin() + 32);
  for (int32_t t : prompt_of(9, 7, V)) fork.push_back(t);
  ASSERT_NE(fork[32], p[32]);
  before = hits();
  const Ran fo = run_one(warm, fork, 20, greedy);
  EXPECT_EQ(hits() - before, 16);  // block 0 only: block 1 read p[32] after it
  // fork's first 49 tokens (with its output), then another: blocks 0-2.
  std::vector<int32_t> fork2 = fork;
  fork2.insert(fork2.end(), fo.out.begin(), fo.out.begin() + 8);
  ASSERT_EQ(fork2.size(), 49u);
  fork2.push_back(1);
  before = hits();
  const Ran f = run_one(warm, fork2, 8, greedy);
  EXPECT_EQ(hits() - before, 48);  // blocks 0-2, fork's own block 1 among them
  engine::Engine cold2(m, ec);
  EXPECT_EQ(f.out, run_one(cold2, fork2, 8, greedy).out);
}

// Draft x ~ q, then Sampler::verify against p: the tokens that come out follow p (not q), for a
// draft close to the target, one far from it, and one that gives some of p's tokens nothing.
TEST(Speculative, RejectionSamplingKeepsTheTargetDistribution) {
  const int64_t V = 8;
  const std::vector<float> target = {1.2f, 0.3f, 2.0f, -0.5f, 0.9f, -2.0f, 1.7f, 0.0f};
  const std::vector<std::vector<float>> drafts = {
      {1.0f, 0.5f, 1.8f, -0.2f, 1.0f, -1.5f, 1.5f, 0.2f},
      {-1.0f, 2.5f, -1.0f, 2.0f, 0.0f, 1.0f, -2.0f, 1.5f},
      {3.0f, -9.0f, 0.0f, -9.0f, 2.0f, -9.0f, -9.0f, 1.0f}};
  for (float temp : {1.0f, 0.7f}) {
    for (int64_t top_k : {0, 5}) {
      engine::SamplingParams sp;
      sp.temperature = temp;
      sp.top_k = top_k;
      sp.seed = 5;
      engine::Sampler s(sp);
      std::mt19937_64 rng(top_k * 10 + static_cast<int>(temp * 10));
      std::uniform_real_distribution<double> u01(0.0, 1.0);
      std::vector<float> p, q;
      s.distribution(target.data(), V, &p);
      std::vector<double> want(p.begin(), p.end());
      for (const auto& d : drafts) {
        s.distribution(d.data(), V, &q);
        std::vector<int64_t> counts(V, 0);
        int64_t kept = 0;
        const int64_t n = 200000;
        for (int64_t i = 0; i < n; ++i) {
          const int32_t x = engine::Sampler::draw(q.data(), V, u01(rng));
          int32_t t = -1;
          const double ua = u01(rng), ur = u01(rng);
          kept += s.verify(p.data(), q.data(), V, x, ua, ur, &t);
          ++counts[t];
        }
        int df = 0;
        const double x2 = chi_square(counts, want, &df);
        const double limit = chi_square_limit(df);
        EXPECT_LT(x2, limit) << "T=" << temp << " top_k=" << top_k;
        // The acceptance rate is sum_x min(p(x), q(x)).
        double overlap = 0;
        for (int64_t i = 0; i < V; ++i) overlap += std::min(p[i], q[i]);
        EXPECT_NEAR(static_cast<double>(kept) / n, overlap, 0.01);
        // The drafts alone (q) are told apart from the target.
        std::vector<int64_t> qcounts(V, 0);
        for (int64_t i = 0; i < n / 4; ++i) ++qcounts[engine::Sampler::draw(q.data(), V, u01(rng))];
        int dfq = 0;
        const double xq = chi_square(qcounts, want, &dfq);
        if (overlap < 0.95) {
          EXPECT_GT(xq, 3 * chi_square_limit(dfq));
        }
      }
    }
  }
}

// The distribution Sampler::distribution gives is the one sample() draws from.
TEST(Speculative, DistributionIsWhatSampleDraws) {
  const int64_t V = 8;
  const std::vector<float> logits = {1.2f, 0.3f, 2.0f, -0.5f, 0.9f, -2.0f, 1.7f, 0.0f};
  engine::SamplingParams sp;
  sp.temperature = 0.8f;
  sp.top_p = 0.8f;
  sp.top_k = 6;
  sp.seed = 9;
  engine::Sampler s(sp), d(sp);
  std::vector<float> p;
  d.distribution(logits.data(), V, &p);
  std::vector<int64_t> counts(V, 0);
  for (int i = 0; i < 100000; ++i) ++counts[s.sample(logits.data(), V)];
  int df = 0;
  const double x2 = chi_square(counts, std::vector<double>(p.begin(), p.end()), &df);
  EXPECT_LT(x2, chi_square_limit(df));
  // And the draws at uniform_at(position, stream) follow it too.
  std::vector<int64_t> keyed(V, 0);
  for (int i = 0; i < 100000; ++i) ++keyed[engine::Sampler::draw(p.data(), V, d.uniform_at(i, 2))];
  const double xk = chi_square(keyed, std::vector<double>(p.begin(), p.end()), &df);
  EXPECT_LT(xk, chi_square_limit(df));
  int zero = 0;
  for (float v : p) zero += v == 0.0f;
  EXPECT_GE(zero, 2);  // top_k 6 cuts two, top_p more
}

// The MTP module's forward against PyTorch's (tools/make_mtp_reference.py, the training
// script's model): logits of the module at a few positions, given the main model's hidden
// states.
TEST(Speculative, MtpLogitsMatchPyTorch) {
  std::ifstream in(moeserve::testing::source_dir() + "/tests/fixtures/mtp/shakespeare_mtp.json");
  ASSERT_TRUE(in.good()) << "fixture missing";
  const nlohmann::json j = nlohmann::json::parse(in);
  const std::vector<int32_t> ids = j["ids"].get<std::vector<int32_t>>();
  ThreadPool pool(2);
  model::Model m(trained_dir(), pool);
  m.load_mtp();
  const auto& c = m.config();
  const int64_t n = static_cast<int64_t>(ids.size()) - 1, H = c.hidden_size, V = c.vocab_size;
  kv::KvPool kv(8, 16, c.num_hidden_layers + 1, c.kv_cache_dim(), kv::KvDtype::F32);
  std::vector<int32_t> blocks;
  ASSERT_TRUE(kv.allocate(8, &blocks));
  model::Batch b;
  b.tokens.assign(ids.begin(), ids.end() - 1);
  b.seqs = {{0, n, 0, blocks.data()}};
  std::vector<float> hidden(n * H);
  m.forward(b, kv, nullptr, hidden.data());
  // Position i: the main model's hidden state there and token i + 1.
  b.tokens.assign(ids.begin() + 1, ids.end());
  for (int64_t i = 0; i < n; ++i) b.logit_rows.push_back(i);
  std::vector<float> logits(n * V);
  m.forward_mtp(b, hidden.data(), kv, logits.data(), nullptr);
  const auto& ref = j["logits"];  // {"positions": [...], "values": [[V floats], ...]}
  const auto pos = ref["positions"].get<std::vector<int64_t>>();
  ASSERT_FALSE(pos.empty());
  double worst = 0;
  for (size_t r = 0; r < pos.size(); ++r) {
    const auto want = ref["values"][r].get<std::vector<double>>();
    ASSERT_EQ(static_cast<int64_t>(want.size()), V);
    double mx = 0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, std::abs(want[v]));
    for (int64_t v = 0; v < V; ++v)
      worst = std::max(worst, std::abs(logits[pos[r] * V + v] - want[v]) / std::max(1.0, mx));
    // The argmax (the greedy draft) agrees.
    EXPECT_EQ(engine::argmax(logits.data() + pos[r] * V, V),
              std::max_element(want.begin(), want.end()) - want.begin())
        << "position " << pos[r];
  }
  EXPECT_LT(worst, 1e-4) << "largest difference, relative to the row's largest logit";
}
