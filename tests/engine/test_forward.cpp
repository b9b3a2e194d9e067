// Properties of the forward pass on random-weight models: cached decoding equals a full
// recompute bit for bit, a sequence's logits do not depend on its batch, fp8 checkpoints run.
#include <cmath>
#include <cstring>

#include "../test_util.h"
#include "engine/generator.h"
#include "engine_test_util.h"
#include "forward_util.h"
#include "model/init_model.h"
#include "model/model.h"

using namespace moeserve;
using moeserve::testing::full_logits;
using moeserve::testing::TempDir;
using namespace moeserve::engine_test;

namespace {

// Every cache dtype. The tests of batch, layout and thread-count invariance run for each, on a
// model whose cache rows (160 + 16 values) span two fp8 scale blocks.
constexpr kv::KvDtype kCacheDtypes[] = {kv::KvDtype::F32, kv::KvDtype::BF16, kv::KvDtype::FP8};
constexpr int64_t kWideLatent = 160;

}  // namespace

TEST(Forward, IncrementalDecodeEqualsFullRecomputeBitForBit) {
  TinyModel t(false, "tiny", kWideLatent);
  model::Model& m = *t.m;
  const auto& c = m.config();
  for (kv::KvDtype dt : kCacheDtypes) {
    const std::vector<int32_t> tok = ids(40, 1, c.vocab_size);
    const std::vector<float> full = full_logits(m, tok, dt);
    // Prefill 13 tokens, then one token at a time, then a chunk of 5, then singles.
    kv::KvPool kv(4, 16, c.num_hidden_layers, c.kv_cache_dim(), dt);
    std::vector<int32_t> blocks;
    ASSERT_TRUE(kv.allocate(3, &blocks));
    std::vector<float> logits(5 * c.vocab_size);
    int64_t past = 0;
    for (int64_t n : {13, 1, 1, 5, 1, 1, 1, 17}) {
      model::Batch b;
      b.tokens.assign(tok.begin() + past, tok.begin() + past + n);
      b.seqs = {{0, n, past, blocks.data()}};
      b.logit_rows = {n - 1};
      m.forward(b, kv, logits.data());
      const int64_t row = past + n - 1;
      ASSERT_EQ(0, std::memcmp(logits.data(), full.data() + row * c.vocab_size, c.vocab_size * 4))
          << "logits of position " << row << " differ, " << kv::kv_dtype_name(dt) << " cache";
      past += n;
    }
    EXPECT_EQ(past, 40);
  }
}

TEST(Forward, LogitsDoNotDependOnTheBatch) {
  TinyModel t(false, "tiny", kWideLatent);
  model::Model& m = *t.m;
  const auto& c = m.config();
  for (kv::KvDtype dt : kCacheDtypes) {
    SCOPED_TRACE(kv::kv_dtype_name(dt));
    const std::vector<int32_t> a = ids(9, 2, c.vocab_size), b2 = ids(23, 3, c.vocab_size);
    const std::vector<float> fa = full_logits(m, a, dt), fb = full_logits(m, b2, dt);
    // Both sequences in one batch, b2 first, with a different block size and block order.
    kv::KvPool kv(16, 4, c.num_hidden_layers, c.kv_cache_dim(), dt);
    std::vector<int32_t> ba, bb;
    ASSERT_TRUE(kv.allocate(6, &bb));
    ASSERT_TRUE(kv.allocate(3, &ba));
    model::Batch b;
    b.tokens = b2;
    b.tokens.insert(b.tokens.end(), a.begin(), a.end());
    b.seqs = {{0, 23, 0, bb.data()}, {23, 9, 0, ba.data()}};
    b.logit_rows = {22, 23 + 8, 5};
    std::vector<float> out(3 * c.vocab_size);
    m.forward(b, kv, out.data());
    EXPECT_EQ(0, std::memcmp(out.data(), fb.data() + 22 * c.vocab_size, c.vocab_size * 4));
    EXPECT_EQ(
        0, std::memcmp(out.data() + c.vocab_size, fa.data() + 8 * c.vocab_size, c.vocab_size * 4));
    EXPECT_EQ(0, std::memcmp(out.data() + 2 * c.vocab_size, fb.data() + 5 * c.vocab_size,
                             c.vocab_size * 4));
  }
}

TEST(Forward, ResultDoesNotDependOnThreadCount) {
  TinyModel t(false, "tiny", kWideLatent);
  ThreadPool one(1);
  model::Model m1(t.dir.path(), one);
  const auto tok = ids(20, 4, t.m->config().vocab_size);
  for (kv::KvDtype dt : kCacheDtypes) {
    const auto two = full_logits(*t.m, tok, dt);
    const auto single = full_logits(m1, tok, dt);
    EXPECT_EQ(0, std::memcmp(two.data(), single.data(), two.size() * 4)) << kv::kv_dtype_name(dt);
  }
}

// The rounded caches change the logits (they are not silently f32), a little: bf16 less than
// fp8, both far less than the logits' own spread.
TEST(Forward, RoundedCachesTrackF32) {
  TinyModel t(false, "tiny", kWideLatent);
  const auto tok = ids(48, 8, t.m->config().vocab_size);
  const auto f32 = full_logits(*t.m, tok, kv::KvDtype::F32);
  double spread = 0, diff[3] = {};
  for (float v : f32) spread = std::max(spread, std::fabs(static_cast<double>(v)));
  for (int d = 1; d < 3; ++d) {
    const auto q = full_logits(*t.m, tok, kCacheDtypes[d]);
    for (size_t i = 0; i < q.size(); ++i)
      diff[d] = std::max(diff[d], std::fabs(static_cast<double>(q[i]) - f32[i]));
    EXPECT_GT(diff[d], 0.0) << kv::kv_dtype_name(kCacheDtypes[d]);
    EXPECT_LT(diff[d], 0.2 * spread) << kv::kv_dtype_name(kCacheDtypes[d]);
  }
  EXPECT_LT(diff[1], diff[2]);
  std::printf("[ max |logit - f32 cache's| ] bf16 %.3g, fp8 %.3g (logits up to %.3g)\n", diff[1],
              diff[2], spread);
}

TEST(Forward, Fp8CheckpointRunsAndTracksBf16) {
  TinyModel bf(false), f8(true);
  EXPECT_TRUE(f8.m->config().fp8);
  // The loader found the random fp8 weights NaN-free, so the kernels take the fast conversion
  // (whose bits kernels tests hold to the contract).
  const model::LayerWeights& L0 = f8.m->weights().layers[0];
  EXPECT_EQ(L0.attn.kv_a_proj.dtype, DType::F8_E4M3);
  EXPECT_TRUE(L0.attn.kv_a_proj.fp8_plain);
  EXPECT_TRUE(L0.attn.o_proj.fp8_plain);
  EXPECT_FALSE(bf.m->weights().layers[0].attn.o_proj.fp8_plain);
  const auto tok = ids(12, 5, bf.m->config().vocab_size);
  engine::Generator g1(*bf.m), g2(*f8.m);
  const auto l1 = g1.score(tok), l2 = g2.score(tok);
  double max_diff = 0;
  for (size_t i = 1; i < l1.size(); ++i) {
    ASSERT_TRUE(std::isfinite(l2[i]));
    max_diff = std::max(max_diff, std::fabs(l1[i] - l2[i]));
  }
  // fp8 rounding of random weights moves log-probs a little, never wildly.
  EXPECT_GT(max_diff, 0.0);
  EXPECT_LT(max_diff, 0.5);
}

TEST(Forward, GenerateIsDeterministicAndGreedyMatchesScore) {
  TinyModel t;
  engine::Generator g(*t.m);
  engine::GenerateOptions o;
  o.max_tokens = 8;
  const auto prompt = ids(6, 6, t.m->config().vocab_size);
  const auto out1 = g.generate(prompt, o), out2 = g.generate(prompt, o);
  EXPECT_EQ(out1, out2);
  ASSERT_EQ(out1.size(), 8u);
  // Each greedy token is the argmax of the full forward over prompt + previous outputs.
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), out1.begin(), out1.end());
  const auto full = full_logits(*t.m, all);
  const int64_t V = t.m->config().vocab_size;
  for (size_t j = 0; j < out1.size(); ++j) {
    const float* row = full.data() + (prompt.size() - 1 + j) * V;
    EXPECT_EQ(out1[j], engine::argmax(row, V));
  }
  // Sampling with a seed is reproducible, differs from greedy, and each token is the sampler's
  // draw (same seed, same stream) from the full forward's logits of its prefix: the generator
  // hands the sampler the right row and nothing else.
  o.sampling.temperature = 1.5f;
  o.sampling.top_p = 0.95f;
  o.sampling.seed = 3;
  const auto s1 = g.generate(prompt, o), s2 = g.generate(prompt, o);
  EXPECT_EQ(s1, s2);
  ASSERT_EQ(s1.size(), 8u);
  EXPECT_NE(s1, out1);
  std::vector<int32_t> seq = prompt;
  seq.insert(seq.end(), s1.begin(), s1.end());
  const auto sfull = full_logits(*t.m, seq);
  engine::Sampler replay(o.sampling);
  for (size_t j = 0; j < s1.size(); ++j)
    EXPECT_EQ(s1[j], replay.sample(sfull.data() + (prompt.size() - 1 + j) * V, V)) << "token " << j;
}

TEST(Forward, InitModelIsDeterministic) {
  TempDir a, b;
  model::InitOptions o;
  o.seed = 5;
  model::write_random_model(model::preset_config("tiny"), a.path(), o);
  model::write_random_model(model::preset_config("tiny"), b.path(), o);
  model::WeightStore sa(a.path()), sb(b.path());
  ASSERT_EQ(sa.all().size(), sb.all().size());
  for (const auto& [name, v] : sa.all())
    EXPECT_EQ(0, std::memcmp(v->data, sb.get(name).data, v->nbytes)) << name;
}

TEST(Forward, BadTokenIdIsAnError) {
  TinyModel t;
  engine::Generator g(*t.m);
  moeserve::testing::expect_error([&] { g.score({1, 2, 100000}); }, {"100000", "out of range"});
}

TEST(Forward, ResidentWeightsGiveTheSameLogits) {
  for (bool fp8 : {false, true}) {
    TinyModel t(fp8);
    model::Model& m = *t.m;
    const auto tok = ids(20, 6, m.config().vocab_size);
    const auto mapped = full_logits(m, tok);
    const model::LayerWeights& L0 = m.weights().layers[0];
    const std::string o = "model.layers.0.self_attn.o_proj.weight";
    ASSERT_EQ(L0.attn.o_proj.data, m.store().get(o).data);
    const bool plain = L0.attn.o_proj.fp8_plain;
    m.prefault(/*progress=*/false, /*copy=*/true);
    EXPECT_TRUE(m.resident());
    // The matrices (and fp8 scales) now lie in the model's own memory, with the same bytes.
    EXPECT_NE(L0.attn.o_proj.data, m.store().get(o).data);
    EXPECT_EQ(0, std::memcmp(L0.attn.o_proj.data, m.store().get(o).data, m.store().get(o).nbytes));
    EXPECT_EQ(m.weights().lm_head.rows, m.config().vocab_size);
    EXPECT_NE(m.weights().lm_head.data, m.store().get("lm_head.weight").data);
    if (fp8) {
      const auto& sc = m.store().get(o.substr(0, o.size() - 6) + "weight_scale_inv");
      EXPECT_NE(static_cast<const void*>(L0.attn.o_proj.scale_inv), sc.data);
      EXPECT_EQ(0, std::memcmp(L0.attn.o_proj.scale_inv, sc.data, sc.nbytes));
    }
    EXPECT_EQ(L0.attn.o_proj.fp8_plain, plain);
    const auto resident = full_logits(m, tok);
    EXPECT_EQ(0, std::memcmp(mapped.data(), resident.data(), mapped.size() * 4)) << "fp8 " << fp8;
    m.prefault(false, true);  // once only
    EXPECT_EQ(0, std::memcmp(resident.data(), full_logits(m, tok).data(), mapped.size() * 4));
  }
}

// The step counters bench_batching prices steps with: one forward counted per call; per expert,
// the calls in which any token went to it (a one-token call: exactly its top-k experts).
TEST(Forward, CountsForwardsAndTheExpertsEachOneRead) {
  TinyModel t;
  model::Model& m = *t.m;
  const auto& c = m.config();
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok;
  auto delta = [](const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
    std::vector<int64_t> d(a.size());
    for (size_t i = 0; i < a.size(); ++i) d[i] = b[i] - a[i];
    return d;
  };
  kv::KvPool kv(4, 16, c.num_hidden_layers, c.kv_cache_dim());
  std::vector<int32_t> blocks;
  ASSERT_TRUE(kv.allocate(3, &blocks));
  std::vector<float> logits(c.vocab_size);
  const std::vector<int32_t> tok = ids(12, 3, c.vocab_size);
  int64_t past = 0;
  for (int64_t n : {1, 11}) {
    const int64_t f0 = m.forward_count();
    const auto tok0 = m.expert_token_counts(), pass0 = m.expert_pass_counts();
    model::Batch b;
    b.tokens.assign(tok.begin() + past, tok.begin() + past + n);
    b.seqs = {{0, n, past, blocks.data()}};
    b.logit_rows = {n - 1};
    m.forward(b, kv, logits.data());
    past += n;
    EXPECT_EQ(m.forward_count(), f0 + 1);
    const auto tokens = delta(tok0, m.expert_token_counts());
    const auto passes = delta(pass0, m.expert_pass_counts());
    int64_t moe_layers = 0;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      int64_t layer_tokens = 0, layer_passes = 0;
      for (int64_t e = 0; e < E; ++e) {
        const int64_t i = l * E + e;
        EXPECT_EQ(passes[i], tokens[i] > 0 ? 1 : 0) << "layer " << l << " expert " << e;
        layer_tokens += tokens[i];
        layer_passes += passes[i];
      }
      if (layer_tokens == 0) continue;  // a dense layer
      ++moe_layers;
      EXPECT_EQ(layer_tokens, n * K) << "layer " << l;
      if (n == 1) {
        EXPECT_EQ(layer_passes, K) << "layer " << l;
      }
      EXPECT_GT(layer_passes, n == 1 ? 0 : K - 1);
    }
    EXPECT_GT(moe_layers, 0);
  }
}
