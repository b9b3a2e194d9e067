// The sampler's logit processing: logit_bias, the repetition / frequency / presence penalties
// (vLLM's semantics), min_tokens and output constraints; that it depends only on the sequence's
// own tokens (so a sampler rebuilt elsewhere goes on identically); and that requests with these
// parameters give, batched and preempted in the engine, what they give alone.
#include <chrono>
#include <future>

#include "../test_util.h"
#include "engine/engine.h"
#include "engine/generator.h"
#include "engine/sampler.h"
#include "model/init_model.h"

using namespace moeserve;
using namespace std::chrono_literals;

namespace {

int32_t greedy(const engine::SamplingParams& p, std::vector<float> logits,
               const std::vector<int32_t>& tokens, int64_t n_prompt) {
  engine::Sampler s(p);
  return s.sample(logits.data(), static_cast<int64_t>(logits.size()), tokens, n_prompt);
}

}  // namespace

TEST(SamplerProcessing, LogitBiasShiftsTheChoice) {
  const std::vector<float> l = {1.0f, 3.0f, 2.0f, 0.5f};
  engine::SamplingParams p;
  EXPECT_EQ(greedy(p, l, {}, 0), 1);
  p.logit_bias = {{3, 2.6f}};  // 3.1 beats 3.0
  EXPECT_EQ(greedy(p, l, {}, 0), 3);
  p.logit_bias = {{1, -100.0f}};
  EXPECT_EQ(greedy(p, l, {}, 0), 2);
  // The row passed in is not modified.
  std::vector<float> row = l;
  engine::Sampler s(p);
  s.sample(row.data(), 4, std::vector<int32_t>{}, 0);
  EXPECT_EQ(row, l);
}

TEST(SamplerProcessing, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogits) {
  engine::SamplingParams p;
  p.repetition_penalty = 2.0f;
  // Token 1 (1.8) is in the prompt: 0.9 < 1.0, so token 0 wins.
  EXPECT_EQ(greedy(p, {1.0f, 1.8f}, {1}, 1), 0);
  // In the output it counts as well.
  EXPECT_EQ(greedy(p, {1.0f, 1.8f}, {5, 1}, 1), 0);
  // Not seen: no penalty.
  EXPECT_EQ(greedy(p, {1.0f, 1.8f}, {0}, 1), 1);
  // Negative: -1 * 2 = -2 < -1.5.
  EXPECT_EQ(greedy(p, {-1.0f, -1.5f}, {0}, 1), 1);
  // Below 1 it rewards: 1.8 / 0.5 and -1.5 * 0.5.
  p.repetition_penalty = 0.5f;
  EXPECT_EQ(greedy(p, {3.0f, 1.8f}, {1}, 1), 1);
  EXPECT_EQ(greedy(p, {-1.0f, -1.5f}, {1}, 1), 1);
  // Once per token however often it occurs: 2.0 / 2 = 1.0 > 0.9.
  p.repetition_penalty = 2.0f;
  EXPECT_EQ(greedy(p, {0.9f, 2.0f}, {1, 1, 1, 1}, 2), 1);
}

TEST(SamplerProcessing, FrequencyAndPresencePenaltiesCountOnlyTheOutput) {
  engine::SamplingParams p;
  p.frequency_penalty = 0.4f;
  // Token 0 (2.0) three times in the output: 2.0 - 1.2 = 0.8 < 1.0.
  EXPECT_EQ(greedy(p, {2.0f, 1.0f}, {7, 0, 0, 0}, 1), 1);
  // Twice: 1.2 > 1.0.
  EXPECT_EQ(greedy(p, {2.0f, 1.0f}, {7, 0, 0}, 1), 0);
  // In the prompt only: no penalty.
  EXPECT_EQ(greedy(p, {2.0f, 1.0f}, {0, 0, 0, 0}, 4), 0);
  engine::SamplingParams q;
  q.presence_penalty = 0.6f;
  // Once, however often: 2.0 - 0.6 = 1.4 > 1.0, whether it occurred once or five times.
  EXPECT_EQ(greedy(q, {2.0f, 1.0f}, {7, 0, 0, 0, 0, 0}, 1), 0);
  q.presence_penalty = 1.5f;
  EXPECT_EQ(greedy(q, {2.0f, 1.0f}, {7, 0}, 1), 1);
  // Negative penalties encourage repetition.
  q.presence_penalty = -1.5f;
  EXPECT_EQ(greedy(q, {2.0f, 1.0f}, {7, 1}, 1), 1);
}

TEST(SamplerProcessing, MinTokensMasksTheEndTokensUntilReached) {
  engine::SamplingParams p;
  p.min_tokens = 3;
  p.min_tokens_stop_ids = {2, 3};
  const std::vector<float> l = {0.0f, 1.0f, 5.0f, 4.0f};
  EXPECT_EQ(greedy(p, l, {9}, 1), 1);           // 0 generated
  EXPECT_EQ(greedy(p, l, {9, 1, 1}, 1), 1);     // 2 generated
  EXPECT_EQ(greedy(p, l, {9, 1, 1, 1}, 1), 2);  // 3: allowed again
  // Sampling at a temperature never draws them either.
  p.temperature = 1.0f;
  p.seed = 7;
  engine::Sampler s(p);
  std::vector<int32_t> toks = {9};
  for (int i = 0; i < 200; ++i) {
    const int32_t t = s.sample(l.data(), 4, toks, 1);
    ASSERT_TRUE(t == 0 || t == 1) << t;
  }
}

namespace {

// Allows only tokens congruent to the count of tokens it was given, mod 3.
class ModConstraint final : public engine::TokenConstraint {
 public:
  struct State final : engine::ConstraintState {
    int n = 0;
    void mask(float* l, int64_t vocab) override {
      for (int64_t i = 0; i < vocab; ++i)
        if (i % 3 != n % 3) l[i] = -INFINITY;
    }
    bool advance(int32_t t) override {
      const bool ok = t % 3 == n % 3;
      ++n;
      return ok;
    }
  };
  std::unique_ptr<engine::ConstraintState> start() const override {
    return std::make_unique<State>();
  }
  const std::string& spec() const override { return spec_; }

 private:
  std::string spec_ = "mod3";
};

}  // namespace

TEST(SamplerProcessing, AConstraintMasksEveryStepFromTheSequencesOwnTokens) {
  engine::SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 11;
  p.constraint = std::make_shared<ModConstraint>();
  std::vector<float> l(30);
  for (int i = 0; i < 30; ++i) l[i] = static_cast<float>((i * 7) % 11) * 0.3f;
  engine::Sampler a(p);
  std::vector<int32_t> toks = {1, 2, 3};  // the prompt: not given to the constraint
  for (int i = 0; i < 40; ++i) {
    const int32_t t = a.sample(l.data(), 30, toks, 3);
    ASSERT_EQ(t % 3, i % 3) << "step " << i;
    toks.push_back(t);
    if (i == 19) {
      // A sampler rebuilt from the tokens and the generator's state (a sequence that moved to
      // another rank) goes on exactly as this one.
      engine::Sampler b(p);
      b.set_state(a.state());
      std::vector<int32_t> ta = toks, tb = toks;
      for (int j = 0; j < 10; ++j) {
        const int32_t x = a.sample(l.data(), 30, ta, 3), y = b.sample(l.data(), 30, tb, 3);
        ASSERT_EQ(x, y) << "step " << j;
        ta.push_back(x);
        tb.push_back(y);
      }
      break;
    }
  }
}

TEST(SamplerProcessing, PenaltiesRebuildFromTheTokensAfterAMove) {
  engine::SamplingParams p;
  p.temperature = 0.8f;
  p.seed = 3;
  p.frequency_penalty = 0.7f;
  p.presence_penalty = 0.3f;
  p.repetition_penalty = 1.4f;
  p.logit_bias = {{4, 1.0f}};
  std::vector<float> l(16);
  for (int i = 0; i < 16; ++i) l[i] = static_cast<float>(i % 5);
  engine::Sampler a(p);
  std::vector<int32_t> toks = {1, 4, 9};
  for (int i = 0; i < 12; ++i) toks.push_back(a.sample(l.data(), 16, toks, 3));
  engine::Sampler b(p);
  b.set_state(a.state());
  std::vector<int32_t> ta = toks, tb = toks;
  for (int j = 0; j < 12; ++j) {
    ta.push_back(a.sample(l.data(), 16, ta, 3));
    tb.push_back(b.sample(l.data(), 16, tb, 3));
  }
  EXPECT_EQ(ta, tb);
  // Penalties visibly act: without them the same seed draws differently.
  engine::SamplingParams q;
  q.temperature = 0.8f;
  q.seed = 3;
  engine::Sampler c(q);
  std::vector<int32_t> tc = {1, 4, 9};
  for (int i = 0; i < 24; ++i) tc.push_back(c.sample(l.data(), 16, tc, 3));
  EXPECT_NE(tc, ta);
}

// In the engine: requests with penalties, bias and min_tokens, batched together and preempted,
// give what each gives alone (the Generator, which samples with the same processing).
TEST(SamplerProcessing, EngineOutputsDoNotDependOnTheBatch) {
  moeserve::testing::TempDir dir;
  ThreadPool pool{2};
  model::write_random_model(model::preset_config("tiny"), dir.path(), {});
  model::Model m(dir.path(), pool);
  engine::EngineConfig cfg;
  cfg.block_size = 4;
  cfg.kv_blocks = 16;
  cfg.max_model_len = 64;
  cfg.max_num_seqs = 8;
  const int n = 8;
  auto params = [](int i) {
    engine::SamplingParams p;
    p.temperature = i % 2 ? 0.9f : 0.0f;
    p.seed = 50 + i;
    p.repetition_penalty = 1.0f + 0.3f * static_cast<float>(i % 3);
    p.frequency_penalty = 0.5f * static_cast<float>(i % 4);
    p.presence_penalty = i % 3 == 1 ? 1.0f : 0.0f;
    p.logit_bias = {{static_cast<int32_t>(i * 13 % 512), 3.0f}};
    p.min_tokens = i % 5;
    p.min_tokens_stop_ids = {static_cast<int32_t>(i * 29 % 512)};
    return p;
  };
  auto prompt = [](int i) {
    std::vector<int32_t> v(3 + (i * 7) % 30);
    for (size_t k = 0; k < v.size(); ++k) v[k] = static_cast<int32_t>((k * 31 + i * 17 + 5) % 512);
    return v;
  };
  std::vector<std::vector<int32_t>> want, plain;
  for (int i = 0; i < n; ++i) {
    engine::Generator g(m, 4);
    engine::GenerateOptions o;
    o.max_tokens = 8;
    o.sampling = params(i);
    want.push_back(g.generate(prompt(i), o));
    o.sampling = engine::SamplingParams{};
    o.sampling.temperature = params(i).temperature;
    o.sampling.seed = params(i).seed;
    plain.push_back(g.generate(prompt(i), o));
  }
  engine::Engine eng(m, cfg);
  struct Out {
    std::vector<int32_t> toks;
    std::promise<void> done;
  };
  std::vector<std::unique_ptr<Out>> outs;
  for (int i = 0; i < n; ++i) {
    outs.push_back(std::make_unique<Out>());
    auto r = std::make_shared<engine::Request>();
    r->prompt = prompt(i);
    r->max_tokens = 8;
    r->sampling = params(i);
    Out* o = outs.back().get();
    r->on_token = [o](const engine::TokenEvent& e) { o->toks.push_back(e.token); };
    r->on_finish = [o](const engine::FinishEvent&) { o->done.set_value(); };
    uint64_t id;
    std::string err;
    ASSERT_EQ(eng.submit(r, &id, &err), engine::SubmitResult::Accepted) << err;
  }
  int differ = 0;
  for (int i = 0; i < n; ++i) {
    ASSERT_EQ(outs[i]->done.get_future().wait_for(60s), std::future_status::ready);
    EXPECT_EQ(outs[i]->toks, want[i]) << "request " << i;
    differ += want[i] != plain[i];
  }
  EXPECT_GT(eng.stats().preemptions, 0);
  EXPECT_GE(differ, 4) << "the processing should change most outputs";
}
