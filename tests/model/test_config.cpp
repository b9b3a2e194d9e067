#include <cmath>

#include "../test_util.h"
#include "model/config.h"
#include "model/init_model.h"

using moeserve::model::ModelConfig;
using moeserve::model::preset_config;
using moeserve::testing::expect_error;
using nlohmann::json;

namespace {
json v3_json() {
  return preset_config("tiny").to_json();
}
}  // namespace

TEST(Config, DeepSeekV3FieldsRoundTrip) {
  const ModelConfig c = ModelConfig::from_json(v3_json());
  EXPECT_EQ(c.n_routed_experts, 16);
  EXPECT_EQ(c.scoring_func, moeserve::model::ScoringFunc::Sigmoid);
  EXPECT_EQ(c.topk_method, moeserve::model::TopkMethod::NoauxTc);
  ASSERT_TRUE(c.q_lora_rank.has_value());
  ASSERT_TRUE(c.rope_scaling.has_value());
  EXPECT_EQ(c.kv_cache_dim(), c.kv_lora_rank + c.qk_rope_head_dim);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
}

TEST(Config, V2LiteNullQLoraAndSoftmax) {
  json j = v3_json();
  j["q_lora_rank"] = nullptr;
  j["scoring_func"] = "softmax";
  j["topk_method"] = "greedy";
  j["model_type"] = "deepseek_v2";
  j.erase("rope_scaling");
  const ModelConfig c = ModelConfig::from_json(j);
  EXPECT_FALSE(c.q_lora_rank.has_value());
  EXPECT_EQ(c.scoring_func, moeserve::model::ScoringFunc::Softmax);
  EXPECT_FALSE(c.rope_scaling.has_value());
  EXPECT_DOUBLE_EQ(c.softmax_scale(), 1.0 / std::sqrt(32.0));
}

TEST(Config, SoftmaxScaleIncludesMscaleSquared) {
  json j = v3_json();
  j["rope_scaling"]["factor"] = 40.0;
  j["rope_scaling"]["mscale_all_dim"] = 1.0;
  const ModelConfig c = ModelConfig::from_json(j);
  const double m = 0.1 * std::log(40.0) + 1.0;
  EXPECT_NEAR(c.softmax_scale(), m * m / std::sqrt(32.0), 1e-12);
}

TEST(Config, MoeLayerFrequency) {
  json j = v3_json();
  j["num_hidden_layers"] = 6;
  j["first_k_dense_replace"] = 1;
  j["moe_layer_freq"] = 2;
  const ModelConfig c = ModelConfig::from_json(j);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_FALSE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(2));
  EXPECT_FALSE(c.is_moe_layer(3));
  EXPECT_TRUE(c.is_moe_layer(4));
}

TEST(Config, KimiK2Has384Experts) {
  json j = v3_json();
  j["model_type"] = "kimi_k2";
  j["n_routed_experts"] = 384;
  j["n_group"] = 1;
  j["topk_group"] = 1;
  j["num_experts_per_tok"] = 8;
  EXPECT_EQ(ModelConfig::from_json(j).n_routed_experts, 384);
}

TEST(Config, ClearErrors) {
  auto with = [](const char* key, json v) {
    json j = v3_json();
    j[key] = v;
    return j;
  };
  expect_error([&] { ModelConfig::from_json(with("scoring_func", "relu")); },
               {"scoring_func", "relu"});
  expect_error([&] { ModelConfig::from_json(with("topk_method", "random")); },
               {"topk_method", "random"});
  expect_error([&] { ModelConfig::from_json(with("hidden_size", "big")); },
               {"hidden_size", "integer"});
  expect_error([&] { ModelConfig::from_json(with("hidden_size", 0)); },
               {"hidden_size", "positive"});
  expect_error([&] { ModelConfig::from_json(with("n_group", 3)); }, {"divisible", "n_group"});
  expect_error([&] { ModelConfig::from_json(with("topk_group", 9)); }, {"topk_group"});
  expect_error([&] { ModelConfig::from_json(with("model_type", "llama")); },
               {"llama", "not supported"});
  expect_error([&] { ModelConfig::from_json(with("qk_rope_head_dim", 15)); },
               {"qk_rope_head_dim", "even"});
  expect_error(
      [&] {
        ModelConfig::from_json(with("rope_scaling", json{{"type", "linear"}, {"factor", 2}}));
      },
      {"rope_scaling", "linear"});
  expect_error(
      [&] {
        ModelConfig::from_json(with("quantization_config", json{{"quant_method", "awq"}}));
      },
      {"awq", "not supported"});
  expect_error(
      [&] {
        ModelConfig::from_json(with(
            "quantization_config", json{{"quant_method", "fp8"}, {"weight_block_size", {64, 64}}}));
      },
      {"weight_block_size"});
  json j = v3_json();
  j.erase("vocab_size");
  expect_error([&] { ModelConfig::from_json(j); }, {"vocab_size", "missing"});
}

TEST(Config, UnknownPreset) {
  expect_error([] { preset_config("huge"); }, {"unknown preset", "huge", "tiny"});
}

TEST(Config, BoundsAndValuesThatGiveNaN) {
  auto with = [](const char* key, json v) {
    json j = v3_json();
    j[key] = v;
    return j;
  };
  auto rope = [](const char* key, json v) {
    json j = v3_json();
    j["rope_scaling"][key] = v;
    return j;
  };
  // Products that overflowed, and counts the old checks looped over.
  expect_error([&] { ModelConfig::from_json(with("num_attention_heads", int64_t{1} << 61)); },
               {"num_attention_heads", "more than"});
  expect_error([&] { ModelConfig::from_json(with("num_hidden_layers", int64_t{1} << 62)); },
               {"num_hidden_layers", "more than"});
  expect_error([&] { ModelConfig::from_json(with("vocab_size", uint64_t{1} << 63)); },
               {"vocab_size", "too large"});
  json heads = v3_json();
  heads["num_attention_heads"] = 8192;
  heads["qk_nope_head_dim"] = 8192;
  expect_error([&] { ModelConfig::from_json(heads); },
               {"num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim)"});
  // Values that gave NaN or nonsense.
  expect_error([&] { ModelConfig::from_json(with("rope_theta", -1)); }, {"rope_theta"});
  expect_error([&] { ModelConfig::from_json(with("rope_theta", 1)); }, {"rope_theta"});
  expect_error([&] { ModelConfig::from_json(with("rms_norm_eps", -1)); }, {"rms_norm_eps"});
  expect_error([&] { ModelConfig::from_json(with("max_position_embeddings", -5)); },
               {"max_position_embeddings"});
  expect_error([&] { ModelConfig::from_json(with("n_shared_experts", -1)); },
               {"n_shared_experts", ">= 0"});
  expect_error([&] { ModelConfig::from_json(with("routed_scaling_factor", 0)); },
               {"routed_scaling_factor"});
  expect_error([&] { ModelConfig::from_json(with("eos_token_id", 512)); },
               {"eos_token_id", "512", "vocabulary"});
  expect_error(
      [&] {
        ModelConfig::from_json(with("eos_token_id", json::array({1, "x"})));
      },
      {"eos_token_id"});
  expect_error([&] { ModelConfig::from_json(with("tie_word_embeddings", true)); },
               {"tie_word_embeddings", "not supported"});
  expect_error([&] { ModelConfig::from_json(rope("original_max_position_embeddings", 0)); },
               {"original_max_position_embeddings"});
  expect_error([&] { ModelConfig::from_json(rope("factor", 0.25)); }, {"factor"});
  expect_error([&] { ModelConfig::from_json(rope("beta_slow", 64)); }, {"beta_fast", "beta_slow"});
  expect_error([&] { ModelConfig::from_json(rope("mscale", -1)); }, {"mscale"});
  // Every layer MoE: intermediate_size is not needed (and 2^62 layers did not hang this check).
  json moe_only = v3_json();
  moe_only["first_k_dense_replace"] = 0;
  moe_only["intermediate_size"] = 0;
  EXPECT_NO_THROW(ModelConfig::from_json(moe_only));
  moe_only["moe_layer_freq"] = 2;
  expect_error([&] { ModelConfig::from_json(moe_only); }, {"intermediate_size", "positive"});
}

TEST(Config, ValuesInMessagesAreShort) {
  // A deeply nested value is named by its kind, not printed (nor walked recursively).
  std::string deep = std::string(100000, '[') + std::string(100000, ']');
  std::string text = v3_json().dump();
  const std::string from = "\"hidden_size\":64";
  ASSERT_NE(text.find(from), std::string::npos);
  text.replace(text.find(from), from.size(), "\"hidden_size\":" + deep);
  const json j = json::parse(text);
  expect_error([&] { ModelConfig::from_json(j); }, {"hidden_size", "an array"});
  json s = v3_json();
  s["scoring_func"] = std::string(5000, 'x');
  try {
    ModelConfig::from_json(s);
    ADD_FAILURE() << "accepted";
  } catch (const moeserve::Error& e) {
    EXPECT_LT(std::string(e.what()).size(), 300u) << e.what();
  }
}
