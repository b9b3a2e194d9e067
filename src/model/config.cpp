#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>

#include "core/error.h"
#include "core/json_file.h"

namespace moeserve::model {

using nlohmann::json;

double yarn_get_mscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

bool ModelConfig::is_moe_layer(int64_t layer) const {
  return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
}

double ModelConfig::softmax_scale() const {
  double s = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (rope_scaling && rope_scaling->mscale_all_dim != 0.0) {
    const double m = yarn_get_mscale(rope_scaling->factor, rope_scaling->mscale_all_dim);
    s = s * m * m;
  }
  return s;
}

namespace {

// Sanity bounds, far above any released model of this architecture (DeepSeek-V3: hidden 7168,
// vocabulary 129280, 61 layers, 128 heads), that keep every size the loader and the forward
// pass compute from the configuration well inside int64_t.
constexpr int64_t kMaxVocab = int64_t{1} << 24;
constexpr int64_t kMaxWidth = int64_t{1} << 20;  // hidden, intermediate and LoRA ranks
constexpr int64_t kMaxHeadDim = int64_t{1} << 16;
constexpr int64_t kMaxHeads = int64_t{1} << 14;
constexpr int64_t kMaxLayers = int64_t{1} << 14;
constexpr int64_t kMaxExperts = 4096;
constexpr int64_t kMaxRows = int64_t{1} << 24;  // rows of a matrix made of several heads/experts
constexpr int64_t kMaxPositions = (int64_t{1} << 31) - 1;

// A value for a message: scalars as JSON, long strings cut, arrays and objects by kind only (a
// crafted value may be huge or deeply nested).
std::string brief(const json& v) {
  if (v.is_array() && v.size() <= 8 &&
      std::none_of(v.begin(), v.end(), [](const json& x) { return x.is_structured(); }))
    return v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 64) s = s.substr(0, 60) + "...";
  return s;
}

// A string from the file for a message: cut when long, control bytes shown as '?'.
std::string cut(const std::string& s) {
  std::string out = s.size() > 64 ? s.substr(0, 60) + "..." : s;
  for (char& ch : out)
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = '?';
  return out;
}

int64_t get_int(const json& j, const char* key, std::optional<int64_t> def = std::nullopt) {
  if (!j.contains(key) || j[key].is_null()) {
    MS_CHECK(def.has_value(), "config.json: required field \"", key, "\" is missing");
    return *def;
  }
  const json& v = j[key];
  MS_CHECK(v.is_number_integer(), "config.json: \"", key, "\" must be an integer, got ", brief(v));
  MS_CHECK(!v.is_number_unsigned() || v.get<uint64_t>() <= uint64_t{INT64_MAX}, "config.json: \"",
           key, "\" is too large: ", brief(v));
  return v.get<int64_t>();
}

double get_num(const json& j, const char* key, double def) {
  if (!j.contains(key) || j[key].is_null()) return def;
  MS_CHECK(j[key].is_number(), "config.json: \"", key, "\" must be a number, got ", brief(j[key]));
  const double v = j[key].get<double>();
  MS_CHECK(std::isfinite(v), "config.json: \"", key, "\" must be a finite number, got ",
           brief(j[key]));
  return v;
}

bool get_bool(const json& j, const char* key, bool def) {
  if (!j.contains(key) || j[key].is_null()) return def;
  MS_CHECK(j[key].is_boolean(), "config.json: \"", key, "\" must be true or false, got ",
           brief(j[key]));
  return j[key].get<bool>();
}

std::string get_str(const json& j, const char* key, const std::string& def) {
  if (!j.contains(key) || j[key].is_null()) return def;
  MS_CHECK(j[key].is_string(), "config.json: \"", key, "\" must be a string, got ", brief(j[key]));
  return j[key].get<std::string>();
}

void check_positive(int64_t v, const char* key) {
  MS_CHECK(v > 0, "config.json: \"", key, "\" must be positive, got ", v);
}

// 0 < v <= max.
void check_size(int64_t v, const char* key, int64_t max) {
  check_positive(v, key);
  MS_CHECK(v <= max, "config.json: \"", key, "\" is ", v, ", more than the ", max,
           " this loader accepts");
}

// 0 <= v <= max.
void check_count(int64_t v, const char* key, int64_t max) {
  MS_CHECK(v >= 0, "config.json: \"", key, "\" must be >= 0, got ", v);
  MS_CHECK(v <= max, "config.json: \"", key, "\" is ", v, ", more than the ", max,
           " this loader accepts");
}

// a * b <= max (a, b >= 0 and each already bounded, so the product does not overflow).
void check_rows(int64_t a, int64_t b, const char* what) {
  MS_CHECK(a * b <= kMaxRows, "config.json: ", what, " is ", a * b, ", more than the ", kMaxRows,
           " this loader accepts");
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& j) {
  MS_CHECK(j.is_object(), "config.json must hold a JSON object");
  ModelConfig c;
  c.model_type = get_str(j, "model_type", "deepseek_v3");
  MS_CHECK(
      c.model_type == "deepseek_v3" || c.model_type == "deepseek_v2" || c.model_type == "kimi_k2",
      "config.json: model_type \"", cut(c.model_type),
      "\" is not supported (supported: deepseek_v3, deepseek_v2, kimi_k2)");
  c.vocab_size = get_int(j, "vocab_size");
  c.hidden_size = get_int(j, "hidden_size");
  c.intermediate_size = get_int(j, "intermediate_size");
  c.num_hidden_layers = get_int(j, "num_hidden_layers");
  c.num_attention_heads = get_int(j, "num_attention_heads");
  if (j.contains("q_lora_rank") && !j["q_lora_rank"].is_null())
    c.q_lora_rank = get_int(j, "q_lora_rank");
  c.kv_lora_rank = get_int(j, "kv_lora_rank");
  c.qk_nope_head_dim = get_int(j, "qk_nope_head_dim");
  c.qk_rope_head_dim = get_int(j, "qk_rope_head_dim");
  c.v_head_dim = get_int(j, "v_head_dim");
  c.n_routed_experts = get_int(j, "n_routed_experts", 0);
  c.moe_intermediate_size = get_int(j, "moe_intermediate_size", 0);
  c.n_shared_experts = get_int(j, "n_shared_experts", 0);
  c.num_experts_per_tok = get_int(j, "num_experts_per_tok", 0);
  c.n_group = get_int(j, "n_group", 1);
  c.topk_group = get_int(j, "topk_group", 1);
  c.first_k_dense_replace = get_int(j, "first_k_dense_replace", 0);
  c.num_nextn_predict_layers = get_int(j, "num_nextn_predict_layers", 0);
  c.moe_layer_freq = get_int(j, "moe_layer_freq", 1);
  c.norm_topk_prob = get_bool(j, "norm_topk_prob", false);
  c.routed_scaling_factor = get_num(j, "routed_scaling_factor", 1.0);
  const std::string scoring =
      get_str(j, "scoring_func", c.model_type == "deepseek_v2" ? "softmax" : "sigmoid");
  if (scoring == "sigmoid")
    c.scoring_func = ScoringFunc::Sigmoid;
  else if (scoring == "softmax")
    c.scoring_func = ScoringFunc::Softmax;
  else
    fail("config.json: scoring_func \"", cut(scoring), "\" is not supported (sigmoid, softmax)");
  const std::string topk =
      get_str(j, "topk_method", c.model_type == "deepseek_v2" ? "greedy" : "noaux_tc");
  if (topk == "noaux_tc")
    c.topk_method = TopkMethod::NoauxTc;
  else if (topk == "greedy")
    c.topk_method = TopkMethod::Greedy;
  else if (topk == "group_limited_greedy")
    c.topk_method = TopkMethod::GroupLimitedGreedy;
  else
    fail("config.json: topk_method \"", cut(topk),
         "\" is not supported (noaux_tc, greedy, group_limited_greedy)");
  c.rms_norm_eps = get_num(j, "rms_norm_eps", 1e-6);
  c.rope_theta = get_num(j, "rope_theta", 10000.0);
  c.max_position_embeddings = get_int(j, "max_position_embeddings", 4096);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", false);
  c.bos_token_id = get_int(j, "bos_token_id", -1);
  if (j.contains("eos_token_id") && j["eos_token_id"].is_array()) {
    const json& e = j["eos_token_id"];
    MS_CHECK(!e.empty() && std::all_of(e.begin(), e.end(),
                                       [](const json& x) { return x.is_number_integer(); }),
             "config.json: eos_token_id list must hold integers");
    c.eos_token_id = get_int(json{{"eos_token_id", e[0]}}, "eos_token_id");
  } else {
    c.eos_token_id = get_int(j, "eos_token_id", -1);
  }

  // Newer transformers write "rope_parameters" (with rope_theta inside) instead.
  const char* rope_key = j.contains("rope_scaling") ? "rope_scaling" : "rope_parameters";
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    c.rope_theta = get_num(j["rope_parameters"], "rope_theta", c.rope_theta);
    const std::string t = get_str(j["rope_parameters"], "rope_type", "default");
    if (t == "default" && !j.contains("rope_scaling")) rope_key = "";
  }
  if (*rope_key && j.contains(rope_key) && !j[rope_key].is_null()) {
    const json& r = j[rope_key];
    MS_CHECK(r.is_object(), "config.json: rope_scaling must be an object or null");
    const std::string type = get_str(r, "type", get_str(r, "rope_type", ""));
    MS_CHECK(type == "yarn" || type == "deepseek_yarn", "config.json: rope_scaling type \"",
             cut(type), "\" is not supported (yarn)");
    RopeScaling rs;
    rs.factor = get_num(r, "factor", 1.0);
    rs.beta_fast = get_num(r, "beta_fast", 32.0);
    rs.beta_slow = get_num(r, "beta_slow", 1.0);
    rs.mscale = get_num(r, "mscale", 1.0);
    rs.mscale_all_dim = get_num(r, "mscale_all_dim", 0.0);
    rs.original_max_position_embeddings =
        get_int(r, "original_max_position_embeddings", c.max_position_embeddings);
    // YaRN interpolates by `factor` between the rotation counts beta_slow and beta_fast of the
    // original context length; anything else gives NaN or reversed frequencies.
    MS_CHECK(rs.factor >= 1 && rs.factor <= 1e6,
             "config.json: rope_scaling.factor must be between 1 and 1e6, got ", rs.factor);
    MS_CHECK(rs.beta_fast > 0 && rs.beta_slow > 0 && rs.beta_fast >= rs.beta_slow,
             "config.json: rope_scaling needs beta_fast >= beta_slow > 0, got beta_fast ",
             rs.beta_fast, " and beta_slow ", rs.beta_slow);
    MS_CHECK(
        rs.mscale >= 0 && rs.mscale_all_dim >= 0 && rs.mscale <= 1000 && rs.mscale_all_dim <= 1000,
        "config.json: rope_scaling.mscale and mscale_all_dim must be between 0 and 1000, got ",
        rs.mscale, " and ", rs.mscale_all_dim);
    MS_CHECK(rs.original_max_position_embeddings > 0 &&
                 rs.original_max_position_embeddings <= kMaxPositions,
             "config.json: rope_scaling.original_max_position_embeddings must be between 1 and ",
             kMaxPositions, ", got ", rs.original_max_position_embeddings);
    c.rope_scaling = rs;
  }

  if (j.contains("quantization_config") && !j["quantization_config"].is_null()) {
    const json& q = j["quantization_config"];
    MS_CHECK(q.is_object(), "config.json: quantization_config must be an object");
    const std::string method = get_str(q, "quant_method", "");
    if (method == "compressed-tensors") {
      c.quant = parse_quantization(j);
      // An fp8 (float-quantized) group: those matrices take the fp8 path as quant_method fp8's.
      c.fp8 = c.quant.has(Storage::Fp8);
      // What the Q4 / Q8 kernels take (kernels::Weight).
      const int64_t align = c.quant.num_bits == 4 ? 32 : 16;
      MS_CHECK(c.quant.group_size % align == 0, "config.json: compressed-tensors int",
               c.quant.num_bits, " needs a group_size that is a multiple of ", align, ", got ",
               c.quant.group_size);
    } else {
      MS_CHECK(method == "fp8", "config.json: quantization method \"", cut(method),
               "\" is not supported (fp8 with 128x128 blocks, compressed-tensors pack-quantized)");
      const std::string fmt = get_str(q, "fmt", "e4m3");
      MS_CHECK(fmt == "e4m3", "config.json: fp8 format \"", cut(fmt), "\" is not supported (e4m3)");
      if (q.contains("weight_block_size")) {
        const json& b = q["weight_block_size"];
        MS_CHECK(b.is_array() && b.size() == 2 && b[0] == 128 && b[1] == 128,
                 "config.json: weight_block_size ", brief(b), " is not supported ([128, 128])");
      }
      c.fp8 = true;
      c.quant.kind = Quantization::Kind::Fp8Block;
    }
  }

  // What the forward pass implements: SiLU FFNs and attention projections without biases.
  const std::string act = get_str(j, "hidden_act", "silu");
  MS_CHECK(act == "silu", "config.json: hidden_act \"", cut(act), "\" is not supported (silu)");
  MS_CHECK(!get_bool(j, "attention_bias", false),
           "config.json: attention_bias true is not supported (the attention has no biases)");
  MS_CHECK(!c.tie_word_embeddings,
           "config.json: tie_word_embeddings true is not supported (the model needs its own "
           "lm_head.weight)");

  check_size(c.vocab_size, "vocab_size", kMaxVocab);
  check_size(c.hidden_size, "hidden_size", kMaxWidth);
  check_size(c.num_hidden_layers, "num_hidden_layers", kMaxLayers);
  check_size(c.num_attention_heads, "num_attention_heads", kMaxHeads);
  check_size(c.kv_lora_rank, "kv_lora_rank", kMaxWidth);
  check_size(c.qk_nope_head_dim, "qk_nope_head_dim", kMaxHeadDim);
  check_size(c.v_head_dim, "v_head_dim", kMaxHeadDim);
  MS_CHECK(c.qk_rope_head_dim > 0 && c.qk_rope_head_dim % 2 == 0,
           "config.json: qk_rope_head_dim must be positive and even, got ", c.qk_rope_head_dim);
  check_size(c.qk_rope_head_dim, "qk_rope_head_dim", kMaxHeadDim);
  if (c.q_lora_rank) check_size(*c.q_lora_rank, "q_lora_rank", kMaxWidth);
  check_rows(c.num_attention_heads, c.qk_head_dim(),
             "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim)");
  check_rows(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim,
             "num_attention_heads * (qk_nope_head_dim + v_head_dim)");
  check_count(c.intermediate_size, "intermediate_size", kMaxWidth);
  check_count(c.moe_intermediate_size, "moe_intermediate_size", kMaxWidth);
  check_count(c.n_routed_experts, "n_routed_experts", kMaxExperts);
  check_count(c.n_shared_experts, "n_shared_experts", kMaxExperts);
  check_count(c.num_experts_per_tok, "num_experts_per_tok", kMaxExperts);
  check_rows(c.moe_intermediate_size, c.n_shared_experts,
             "moe_intermediate_size * n_shared_experts");
  check_positive(c.moe_layer_freq, "moe_layer_freq");
  MS_CHECK(c.first_k_dense_replace >= 0, "config.json: first_k_dense_replace must be >= 0");
  MS_CHECK(c.num_nextn_predict_layers >= 0, "config.json: num_nextn_predict_layers must be >= 0");
  // (Ranges far wider than any model uses, that keep the float arithmetic finite.)
  MS_CHECK(static_cast<float>(c.rms_norm_eps) > 0 && c.rms_norm_eps < 1,
           "config.json: rms_norm_eps must be positive and below 1, got ", c.rms_norm_eps);
  MS_CHECK(c.rope_theta > 1 && c.rope_theta <= 1e30,
           "config.json: rope_theta must be greater than 1 (and at most 1e30), got ", c.rope_theta);
  MS_CHECK(c.routed_scaling_factor > 0 && c.routed_scaling_factor <= 1000,
           "config.json: routed_scaling_factor must be positive (and at most 1000), got ",
           c.routed_scaling_factor);
  MS_CHECK(c.max_position_embeddings > 0 && c.max_position_embeddings <= kMaxPositions,
           "config.json: max_position_embeddings must be between 1 and ", kMaxPositions, ", got ",
           c.max_position_embeddings);
  for (const auto& [key, id] :
       {std::pair{"bos_token_id", c.bos_token_id}, std::pair{"eos_token_id", c.eos_token_id}}) {
    MS_CHECK(id >= -1 && id < c.vocab_size, "config.json: ", key, " ", id,
             " is not a token of the vocabulary (0 to ", c.vocab_size - 1, ", or -1 for none)");
  }
  // A dense layer exists when there are no routed experts, when layer 0 is dense, or when the
  // frequency skips layer 1 (no loop over the layers: their count comes from the file).
  const bool has_dense = c.n_routed_experts == 0 || c.first_k_dense_replace > 0 ||
                         (c.moe_layer_freq > 1 && c.num_hidden_layers > 1);
  if (has_dense) check_positive(c.intermediate_size, "intermediate_size");
  if (c.n_routed_experts > 0) {
    check_positive(c.moe_intermediate_size, "moe_intermediate_size");
    check_positive(c.num_experts_per_tok, "num_experts_per_tok");
    MS_CHECK(c.num_experts_per_tok <= c.n_routed_experts, "config.json: num_experts_per_tok (",
             c.num_experts_per_tok, ") exceeds n_routed_experts (", c.n_routed_experts, ")");
    check_positive(c.n_group, "n_group");
    MS_CHECK(c.n_routed_experts % c.n_group == 0, "config.json: n_routed_experts (",
             c.n_routed_experts, ") must be divisible by n_group (", c.n_group, ")");
    MS_CHECK(c.topk_group >= 1 && c.topk_group <= c.n_group, "config.json: topk_group (",
             c.topk_group, ") must be between 1 and n_group (", c.n_group, ")");
    if (c.topk_method == TopkMethod::NoauxTc) {
      MS_CHECK(c.n_routed_experts / c.n_group >= 2,
               "config.json: noaux_tc needs at least 2 experts per group");
      MS_CHECK(c.num_experts_per_tok <= c.topk_group * (c.n_routed_experts / c.n_group),
               "config.json: num_experts_per_tok exceeds the experts of the kept groups");
    }
  }
  return c;
}

ModelConfig ModelConfig::load(const std::string& model_dir) {
  const auto path = std::filesystem::path(model_dir) / "config.json";
  std::error_code ec;
  MS_CHECK(std::filesystem::exists(path, ec), "no config.json in model folder ", model_dir);
  return from_json(read_json_file(path.string(), kMaxConfigBytes));
}

json ModelConfig::to_json() const {
  json j = {{"architectures",
             {model_type == "deepseek_v2" ? "DeepseekV2ForCausalLM" : "DeepseekV3ForCausalLM"}},
            {"model_type", model_type},
            {"vocab_size", vocab_size},
            {"hidden_size", hidden_size},
            {"intermediate_size", intermediate_size},
            {"moe_intermediate_size", moe_intermediate_size},
            {"num_hidden_layers", num_hidden_layers},
            {"num_attention_heads", num_attention_heads},
            {"num_key_value_heads", num_attention_heads},
            {"q_lora_rank", q_lora_rank ? json(*q_lora_rank) : json(nullptr)},
            {"kv_lora_rank", kv_lora_rank},
            {"qk_nope_head_dim", qk_nope_head_dim},
            {"qk_rope_head_dim", qk_rope_head_dim},
            {"v_head_dim", v_head_dim},
            {"n_routed_experts", n_routed_experts},
            {"n_shared_experts", n_shared_experts},
            {"num_experts_per_tok", num_experts_per_tok},
            {"n_group", n_group},
            {"topk_group", topk_group},
            {"first_k_dense_replace", first_k_dense_replace},
            {"moe_layer_freq", moe_layer_freq},
            {"num_nextn_predict_layers", num_nextn_predict_layers},
            {"norm_topk_prob", norm_topk_prob},
            {"routed_scaling_factor", routed_scaling_factor},
            {"scoring_func", scoring_func == ScoringFunc::Sigmoid ? "sigmoid" : "softmax"},
            {"topk_method", topk_method == TopkMethod::NoauxTc  ? "noaux_tc"
                            : topk_method == TopkMethod::Greedy ? "greedy"
                                                                : "group_limited_greedy"},
            {"rms_norm_eps", rms_norm_eps},
            {"rope_theta", rope_theta},
            {"max_position_embeddings", max_position_embeddings},
            {"tie_word_embeddings", tie_word_embeddings},
            {"bos_token_id", bos_token_id},
            {"eos_token_id", eos_token_id},
            {"hidden_act", "silu"},
            {"attention_bias", false},
            {"torch_dtype", "bfloat16"}};
  if (rope_scaling) {
    j["rope_scaling"] = {
        {"type", "yarn"},
        {"factor", rope_scaling->factor},
        {"beta_fast", rope_scaling->beta_fast},
        {"beta_slow", rope_scaling->beta_slow},
        {"mscale", rope_scaling->mscale},
        {"mscale_all_dim", rope_scaling->mscale_all_dim},
        {"original_max_position_embeddings", rope_scaling->original_max_position_embeddings}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  if (quant.kind == Quantization::Kind::PackQuantized) {
    j["quantization_config"] = quant.config;
  } else if (fp8) {
    j["quantization_config"] = {{"activation_scheme", "dynamic"},
                                {"fmt", "e4m3"},
                                {"quant_method", "fp8"},
                                {"weight_block_size", {128, 128}}};
  }
  return j;
}

}  // namespace moeserve::model
