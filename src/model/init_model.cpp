#include "model/init_model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "model/safetensors.h"

namespace moeserve::model {

namespace fs = std::filesystem;

ModelConfig preset_config(const std::string& name) {
  ModelConfig c;
  c.model_type = "deepseek_v3";
  c.scoring_func = ScoringFunc::Sigmoid;
  c.topk_method = TopkMethod::NoauxTc;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.n_shared_experts = 1;
  c.bos_token_id = 0;
  c.eos_token_id = 1;
  RopeScaling r;
  r.factor = 40.0;
  r.beta_fast = 32;
  r.beta_slow = 1;
  r.mscale = 1.0;
  r.mscale_all_dim = 1.0;
  r.original_max_position_embeddings = 4096;
  c.rope_scaling = r;
  c.max_position_embeddings = 163840;
  if (name == "tiny") {
    c.vocab_size = 512;
    c.hidden_size = 64;
    c.intermediate_size = 128;
    c.moe_intermediate_size = 32;
    c.num_hidden_layers = 3;
    c.num_attention_heads = 4;
    c.q_lora_rank = 48;
    c.kv_lora_rank = 32;
    c.qk_nope_head_dim = 16;
    c.qk_rope_head_dim = 16;
    c.v_head_dim = 16;
    c.n_routed_experts = 16;
    c.num_experts_per_tok = 4;
    c.n_group = 4;
    c.topk_group = 2;
    c.rope_scaling->factor = 4.0;
    c.rope_scaling->original_max_position_embeddings = 64;
    c.max_position_embeddings = 256;
  } else if (name == "demo") {
    c.vocab_size = 129280;
    c.hidden_size = 256;
    c.intermediate_size = 768;
    c.moe_intermediate_size = 192;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 4;
    c.q_lora_rank = 192;
    c.kv_lora_rank = 128;
    c.qk_nope_head_dim = 64;
    c.qk_rope_head_dim = 32;
    c.v_head_dim = 64;
    c.n_routed_experts = 32;
    c.num_experts_per_tok = 4;
    c.n_group = 4;
    c.topk_group = 2;
  } else if (name == "bench") {
    c.vocab_size = 32768;
    c.hidden_size = 2048;
    c.intermediate_size = 5632;
    c.moe_intermediate_size = 1024;
    c.num_hidden_layers = 8;
    c.num_attention_heads = 16;
    c.q_lora_rank = 512;
    c.kv_lora_rank = 512;
    c.qk_nope_head_dim = 128;
    c.qk_rope_head_dim = 64;
    c.v_head_dim = 128;
    c.n_routed_experts = 16;
    c.num_experts_per_tok = 4;
    c.n_group = 4;
    c.topk_group = 2;
    c.num_nextn_predict_layers = 1;  // as DeepSeek-V3: the MTP module, for speculative decoding
  } else {
    std::string known;
    for (const auto& n : preset_names()) known += (known.empty() ? "" : ", ") + n;
    fail("unknown preset \"", name, "\" (known: ", known, ")");
  }
  return ModelConfig::from_json(c.to_json());  // validated like any config.json
}

std::vector<std::string> preset_names() {
  return {"tiny", "demo", "bench"};
}

namespace {

// A counter-based generator: the values of a tensor depend only on (seed, name, index).
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t s) : state(s) {}
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Approximately standard normal: sum of four 16-bit uniforms, centred and scaled.
  float normal() {
    const uint64_t r = next();
    const float s =
        static_cast<float>((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48));
    return (s / 65536.0f - 2.0f) * 1.7320508f;
  }
};

uint64_t hash_name(const std::string& s, uint64_t seed) {
  uint64_t h = 1469598103934665603ull ^ (seed * 0x9e3779b97f4a7c15ull);
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

struct Spec {
  std::string name;
  std::vector<int64_t> shape;
  enum Kind { Matrix, Embedding, Norm, Bias } kind;
  bool quantize;  // fp8 when the run asks for it
};

std::vector<Spec> tensor_specs(const ModelConfig& c) {
  std::vector<Spec> out;
  const int64_t H = c.hidden_size, nh = c.num_attention_heads;
  auto mat = [&](const std::string& n, int64_t r, int64_t col, bool q = true) {
    out.push_back({n, {r, col}, Spec::Matrix, q});
  };
  auto mlp = [&](const std::string& p, int64_t inter) {
    mat(p + ".gate_proj.weight", inter, H);
    mat(p + ".up_proj.weight", inter, H);
    mat(p + ".down_proj.weight", H, inter);
  };
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, H}, Spec::Embedding, false});
  auto layer = [&](int64_t l) {
    const std::string p = "model.layers." + std::to_string(l);
    out.push_back({p + ".input_layernorm.weight", {H}, Spec::Norm, false});
    out.push_back({p + ".post_attention_layernorm.weight", {H}, Spec::Norm, false});
    const std::string a = p + ".self_attn";
    if (c.q_lora_rank) {
      mat(a + ".q_a_proj.weight", *c.q_lora_rank, H);
      out.push_back({a + ".q_a_layernorm.weight", {*c.q_lora_rank}, Spec::Norm, false});
      mat(a + ".q_b_proj.weight", nh * c.qk_head_dim(), *c.q_lora_rank);
    } else {
      mat(a + ".q_proj.weight", nh * c.qk_head_dim(), H);
    }
    mat(a + ".kv_a_proj_with_mqa.weight", c.kv_cache_dim(), H);
    out.push_back({a + ".kv_a_layernorm.weight", {c.kv_lora_rank}, Spec::Norm, false});
    mat(a + ".kv_b_proj.weight", nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
    mat(a + ".o_proj.weight", H, nh * c.v_head_dim);
    const std::string m = p + ".mlp";
    if (!c.is_moe_layer(l)) {
      mlp(m, c.intermediate_size);
      return;
    }
    mat(m + ".gate.weight", c.n_routed_experts, H, false);
    if (c.topk_method == TopkMethod::NoauxTc)
      out.push_back({m + ".gate.e_score_correction_bias", {c.n_routed_experts}, Spec::Bias, false});
    for (int64_t e = 0; e < c.n_routed_experts; ++e)
      mlp(m + ".experts." + std::to_string(e), c.moe_intermediate_size);
    if (c.n_shared_experts > 0)
      mlp(m + ".shared_experts", c.moe_intermediate_size * c.n_shared_experts);
  };
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) layer(l);
  out.push_back({"model.norm.weight", {H}, Spec::Norm, false});
  if (!c.tie_word_embeddings) mat("lm_head.weight", c.vocab_size, H, false);
  if (c.num_nextn_predict_layers > 0) {
    // The MTP module (model.layers.{num_hidden_layers}), without its copies of the embedding
    // and the head, which then are the main model's. eh_proj stays bf16, as DeepSeek-V3's fp8
    // checkpoint keeps it.
    const std::string p = "model.layers." + std::to_string(c.num_hidden_layers);
    out.push_back({p + ".enorm.weight", {H}, Spec::Norm, false});
    out.push_back({p + ".hnorm.weight", {H}, Spec::Norm, false});
    mat(p + ".eh_proj.weight", H, 2 * H, false);
    layer(c.num_hidden_layers);
    out.push_back({p + ".shared_head.norm.weight", {H}, Spec::Norm, false});
  }
  return out;
}

}  // namespace

void write_random_model(const ModelConfig& cfg, const std::string& dir, const InitOptions& opt) {
  fs::create_directories(dir);
  ModelConfig c = cfg;
  c.fp8 = opt.fp8;
  {
    std::ofstream out(fs::path(dir) / "config.json");
    out << c.to_json().dump(2) << "\n";
    MS_CHECK(out.good(), "cannot write ", (fs::path(dir) / "config.json").string());
  }
  const std::vector<Spec> specs = tensor_specs(c);
  std::vector<SafeTensorsWriter::Entry> entries;
  size_t total = 0;
  for (const Spec& s : specs) {
    const bool fp8 = opt.fp8 && s.quantize;
    entries.push_back({s.name,
                       fp8 ? DType::F8_E4M3 : (s.kind == Spec::Bias ? DType::F32 : DType::BF16),
                       s.shape});
    total += static_cast<size_t>(s.shape[0]) * (s.shape.size() > 1 ? s.shape[1] : 1);
    if (fp8)
      entries.push_back({s.name + "_scale_inv",
                         DType::F32,
                         {(s.shape[0] + 127) / 128, (s.shape[1] + 127) / 128}});
  }
  const std::string path = (fs::path(dir) / "model.safetensors").string();
  SafeTensorsWriter w(path, entries);
  size_t done = 0, next_report = 0;
  const bool progress = opt.progress && total > (size_t{64} << 20);  // only for long writes
  std::vector<float> vals;
  std::vector<uint16_t> half;
  std::vector<uint8_t> q8;
  for (const Spec& s : specs) {
    Rng rng(hash_name(s.name, opt.seed));
    const int64_t rows = s.shape[0], cols = s.shape.size() > 1 ? s.shape[1] : 1;
    float stddev = 1.0f, mean = 0.0f;
    switch (s.kind) {
      case Spec::Matrix:
        stddev = 0.5f / std::sqrt(static_cast<float>(cols));
        break;
      case Spec::Embedding:
        stddev = 1.0f;
        break;
      case Spec::Norm:
        mean = 1.0f;
        stddev = 0.1f;
        break;
      case Spec::Bias:
        stddev = 0.01f;
        break;
    }
    const bool fp8 = opt.fp8 && s.quantize;
    const int64_t block_rows = fp8 ? 128 : 256;
    std::vector<float> scales;
    for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
      const int64_t nr = std::min(block_rows, rows - r0);
      vals.resize(nr * cols);
      for (auto& v : vals) v = mean + stddev * rng.normal();
      if (s.kind == Spec::Bias) {
        w.write_data(vals.data(), vals.size() * 4);
      } else if (!fp8) {
        half.resize(vals.size());
        for (size_t i = 0; i < vals.size(); ++i) half[i] = f32_to_bf16(vals[i]);
        w.write_data(half.data(), half.size() * 2);
      } else {
        q8.resize(vals.size());
        for (int64_t c0 = 0; c0 < cols; c0 += 128) {
          const int64_t nc = std::min<int64_t>(128, cols - c0);
          float amax = 0.0f;
          for (int64_t r = 0; r < nr; ++r)
            for (int64_t j = 0; j < nc; ++j)
              amax = std::max(amax, std::fabs(vals[r * cols + c0 + j]));
          const float scale = amax > 0 ? amax / 448.0f : 1.0f;
          scales.push_back(scale);
          for (int64_t r = 0; r < nr; ++r)
            for (int64_t j = 0; j < nc; ++j)
              q8[r * cols + c0 + j] = f32_to_fp8e4m3(vals[r * cols + c0 + j] / scale);
        }
        w.write_data(q8.data(), q8.size());
      }
      done += vals.size();
      if (progress && done >= next_report) {
        std::fprintf(stderr, "\rwriting %s: %3d%%", path.c_str(),
                     static_cast<int>(100.0 * done / total));
        next_report = done + total / 50;
      }
    }
    if (fp8) w.write_data(scales.data(), scales.size() * 4);
  }
  w.finish();
  if (progress) std::fprintf(stderr, "\rwriting %s: 100%%\n", path.c_str());
}

}  // namespace moeserve::model
