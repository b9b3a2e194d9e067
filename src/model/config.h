// The model's configuration, read once from config.json and validated; immutable afterwards.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "model/quantization.h"

namespace moeserve::model {

// The largest config.json (bytes) any reader of it accepts.
inline constexpr size_t kMaxConfigBytes = size_t{16} << 20;

enum class ScoringFunc { Sigmoid, Softmax };
enum class TopkMethod { NoauxTc, Greedy, GroupLimitedGreedy };

struct RopeScaling {  // rope_scaling of type "yarn" (or "deepseek_yarn")
  double factor = 1.0;
  double beta_fast = 32.0, beta_slow = 1.0;
  double mscale = 1.0, mscale_all_dim = 0.0;
  int64_t original_max_position_embeddings = 4096;
};

struct ModelConfig {
  std::string model_type;  // deepseek_v3, deepseek_v2, kimi_k2
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense layers
  int64_t moe_intermediate_size = 0;  // each routed / shared expert
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  std::optional<int64_t> q_lora_rank;  // null: q_proj directly (V2-Lite)
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  int64_t n_routed_experts = 0;  // 0: no MoE layers
  int64_t n_shared_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t n_group = 1, topk_group = 1;
  int64_t first_k_dense_replace = 0, moe_layer_freq = 1;
  // Multi-token-prediction modules stored after the main layers (model.layers.{num_hidden_layers}
  // and on); moeserve uses the first, for speculative decoding (Model::load_mtp).
  int64_t num_nextn_predict_layers = 0;
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;
  ScoringFunc scoring_func = ScoringFunc::Softmax;
  TopkMethod topk_method = TopkMethod::Greedy;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::optional<RopeScaling> rope_scaling;
  int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1, eos_token_id = -1;
  bool fp8 = false;  // quantization_config: fp8 with 128x128 weight blocks
  // quantization_config as read: fp8 (Fp8Block, with fp8 set), or compressed-tensors
  // pack-quantized int4 / int8 of the Linear modules it does not ignore.
  Quantization quant;

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  int64_t kv_cache_dim() const { return kv_lora_rank + qk_rope_head_dim; }  // per token per layer
  bool is_moe_layer(int64_t layer) const;
  double softmax_scale() const;  // qk_head_dim^-0.5, times mscale^2 under yarn

  static ModelConfig from_json(const nlohmann::json& j);  // validates; throws moeserve::Error
  static ModelConfig load(const std::string& model_dir);  // <dir>/config.json
  nlohmann::json to_json() const;
};

// yarn's attention magnitude correction: 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1).
double yarn_get_mscale(double scale, double mscale);

}  // namespace moeserve::model
