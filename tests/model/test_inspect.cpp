// moeserve inspect: parameters and bytes by role and dtype from config.json alone (checked
// against the published model sizes and a closed-form count) and from safetensors headers
// (checked against the files' bytes and against the config-based computation), folders whose
// shards are missing or partly there, the per-rank memory plan, and the report.
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "core/json_file.h"
#include "model/init_model.h"
#include "model/inspect.h"
#include "model/safetensors.h"

using namespace moeserve::model;
using moeserve::testing::expect_error;
using moeserve::testing::source_dir;
using moeserve::testing::TempDir;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string configs(const std::string& name) {
  return source_dir() + "/tests/fixtures/configs/" + name;
}
std::string models(const std::string& name) {
  return source_dir() + "/tests/fixtures/models/" + name;
}

const Figure& role(const Totals& t, Role r) {
  return t.by_role[static_cast<int>(r)];
}

const Figure* kind(const Totals& t, const std::string& k) {
  for (const auto& [name, f] : t.by_kind)
    if (name == k) return &f;
  return nullptr;
}

void expect_near_rel(double got, double want, double rel) {
  EXPECT_LE(std::fabs(got - want), rel * want) << "got " << got << ", want " << want;
}

// Parameters of one MLA attention block, the per-layer norms included, by the formulas of the
// architecture (independent of tensors_from_config).
uint64_t attention_params(const ModelConfig& c) {
  const uint64_t H = c.hidden_size, nh = c.num_attention_heads, L = c.kv_lora_rank;
  uint64_t n = c.q_lora_rank
                   ? *c.q_lora_rank * H + *c.q_lora_rank + nh * c.qk_head_dim() * *c.q_lora_rank
                   : nh * c.qk_head_dim() * H;
  n += (L + c.qk_rope_head_dim) * H + L + nh * (c.qk_nope_head_dim + c.v_head_dim) * L +
       H * nh * c.v_head_dim;
  return n + 2 * H;  // input and post-attention norms
}

uint64_t moe_params(const ModelConfig& c) {
  const uint64_t H = c.hidden_size, E = c.n_routed_experts, Im = c.moe_intermediate_size;
  const uint64_t bias = c.topk_method == TopkMethod::NoauxTc ? E : 0;
  return E * 3 * Im * H + 3 * Im * c.n_shared_experts * H + E * H + bias;
}

uint64_t main_params(const ModelConfig& c) {
  const uint64_t H = c.hidden_size, V = c.vocab_size;
  const uint64_t dense = c.first_k_dense_replace, moe = c.num_hidden_layers - dense;
  return 2 * V * H + H + c.num_hidden_layers * attention_params(c) +
         dense * 3 * c.intermediate_size * H + moe * moe_params(c);
}

uint64_t data_bytes_of_files(const std::string& dir) {
  uint64_t n = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".safetensors") continue;
    std::ifstream f(e.path(), std::ios::binary);
    uint64_t len = 0;
    f.read(reinterpret_cast<char*>(&len), 8);
    n += fs::file_size(e.path()) - 8 - len;
  }
  return n;
}

std::map<std::string, TensorEntry> by_name(const std::vector<TensorEntry>& v) {
  std::map<std::string, TensorEntry> m;
  for (const TensorEntry& t : v) m.emplace(t.name, t);
  return m;
}

void expect_same_tensors(const std::vector<TensorEntry>& a, const std::vector<TensorEntry>& b) {
  const auto ma = by_name(a), mb = by_name(b);
  ASSERT_EQ(ma.size(), mb.size());
  for (const auto& [name, t] : ma) {
    auto it = mb.find(name);
    ASSERT_NE(it, mb.end()) << name;
    EXPECT_EQ(t.dtype, it->second.dtype) << name;
    EXPECT_EQ(t.shape, it->second.shape) << name;
    EXPECT_EQ(t.bytes, it->second.bytes) << name;
    EXPECT_EQ(t.params, it->second.params) << name;
  }
}

// A folder holding only `model`'s config.json (the shards not downloaded).
std::string config_only(const TempDir& d, const std::string& model) {
  const std::string dir = d / "config-only";
  fs::create_directories(dir);
  fs::copy_file(models(model) + "/config.json", dir + "/config.json");
  return dir;
}

}  // namespace

TEST(Inspect, DeepSeekV3FromConfigMatchesPublishedSizes) {
  const Inventory inv = inspect_model(configs("deepseek-v3"));
  EXPECT_EQ(inv.source, "config.json");
  EXPECT_EQ(inv.shards_present, 0);
  EXPECT_EQ(inv.mtp_layers, 1);
  EXPECT_EQ(inv.quant.kind, Quantization::Kind::Fp8Block);
  const Totals t = totals(inv);
  const ModelConfig& c = inv.cfg;
  // 671B in the main model, 685B with the multi-token-prediction layer (the model card's).
  EXPECT_EQ(t.loaded.params, main_params(c));
  expect_near_rel(t.loaded.params, 671.0e9, 0.005);
  const uint64_t H = c.hidden_size, V = c.vocab_size;
  const uint64_t mtp = attention_params(c) + moe_params(c) + 2 * V * H + 2 * H * H + 3 * H;
  EXPECT_EQ(role(t, Role::Mtp).params, mtp);
  expect_near_rel(role(t, Role::Mtp).params, 14e9, 0.05);
  expect_near_rel(t.checkpoint.params, 685e9, 0.005);
  // fp8 e4m3 with F32 128x128 block scales: about 690 GB on disk.
  expect_near_rel(t.checkpoint.bytes, 690e9, 0.01);
  const Figure* fp8 = kind(t, "F8_E4M3");
  const Figure* scales = kind(t, "F32 block scales");
  ASSERT_TRUE(fp8 && scales);
  EXPECT_EQ(fp8->bytes, fp8->params);
  EXPECT_EQ(scales->params, 0u);
  EXPECT_GT(scales->bytes, fp8->bytes / (128 * 128) * 4 * 99 / 100);  // ~4 bytes per block
  EXPECT_LT(scales->bytes, fp8->bytes / (128 * 128) * 4 * 11 / 10);
  // Routed experts: 58 MoE layers x 256 x 3 matrices of 2048 x 7168.
  EXPECT_EQ(role(t, Role::RoutedExperts).params, uint64_t{58} * 256 * 3 * 2048 * 7168);
  EXPECT_EQ(role(t, Role::Embedding).bytes, 2 * V * H);  // bf16
  EXPECT_EQ(role(t, Role::LmHead).bytes, 2 * V * H);
}

TEST(Inspect, KimiK2AndV2LiteFromConfigMatchPublishedSizes) {
  const Inventory k2 = inspect_model(configs("kimi-k2-instruct"));
  const Totals tk = totals(k2);
  EXPECT_EQ(tk.loaded.params, main_params(k2.cfg));
  expect_near_rel(tk.loaded.params, 1.03e12, 0.01);
  EXPECT_EQ(role(tk, Role::Mtp).params, 0u);
  EXPECT_EQ(tk.loaded.params, tk.checkpoint.params);

  const Inventory v2 = inspect_model(configs("deepseek-v2-lite"));
  const Totals tv = totals(v2);
  EXPECT_FALSE(v2.cfg.q_lora_rank.has_value());
  EXPECT_EQ(tv.loaded.params, main_params(v2.cfg));
  expect_near_rel(tv.loaded.params, 15.7e9, 0.005);
  ASSERT_EQ(tv.by_kind.size(), 1u);  // all bf16
  EXPECT_EQ(tv.by_kind[0].first, "BF16");
  EXPECT_EQ(tv.loaded.bytes, 2 * tv.loaded.params);
}

TEST(Inspect, KimiK2ThinkingInt4FromConfig) {
  const Inventory fp8 = inspect_model(configs("kimi-k2-instruct"));
  const Inventory int4 = inspect_model(configs("kimi-k2-thinking"));
  ASSERT_EQ(int4.quant.kind, Quantization::Kind::PackQuantized);
  EXPECT_EQ(int4.quant.group_size, 32);
  EXPECT_EQ(int4.quant.num_bits, 4);
  EXPECT_EQ(int4.quant.ignore.size(), 4u);
  const Totals a = totals(fp8), b = totals(int4);
  // The same architecture: the same parameters in every role, stored differently.
  for (int r = 0; r < kRoleCount; ++r) EXPECT_EQ(a.by_role[r].params, b.by_role[r].params) << r;
  // Routed experts int4: half a byte per weight, a bf16 scale per 32, an I64 [2] shape each.
  const Figure& routed = role(b, Role::RoutedExperts);
  const uint64_t matrices = uint64_t{60} * 384 * 3;
  EXPECT_EQ(routed.bytes, routed.params / 2 + routed.params / 32 * 2 + matrices * 16);
  // Everything the ignore list names (attention, shared experts, dense MLP, lm_head) and what is
  // not a Linear (embeddings, routers) stays bf16.
  for (Role r :
       {Role::Attention, Role::SharedExperts, Role::DenseMlp, Role::LmHead, Role::Embedding})
    EXPECT_EQ(role(b, r).bytes, 2 * role(b, r).params) << role_name(r);
  const Figure* packed = kind(b, "int4 (packed I32)");
  ASSERT_TRUE(packed);
  EXPECT_EQ(packed->params, routed.params);
  // About 594 GB: a little over half the fp8 checkpoint.
  expect_near_rel(b.checkpoint.bytes, 594e9, 0.01);
  EXPECT_TRUE(int4.quant.quantizes("model.layers.5.mlp.experts.7.down_proj"));
  EXPECT_FALSE(int4.quant.quantizes("model.layers.5.mlp.shared_experts.down_proj"));
  EXPECT_FALSE(int4.quant.quantizes("model.layers.0.mlp.gate_proj"));
  EXPECT_FALSE(int4.quant.quantizes("model.layers.5.self_attn.q_a_proj"));
  EXPECT_FALSE(int4.quant.quantizes("lm_head"));
}

TEST(Inspect, HeaderTotalsEqualFileBytesAndConfigComputation) {
  for (const char* m :
       {"v3_tiny", "v3_fp8_tiny", "v3_sharded_tiny", "v2_lite_tiny", "v2_group_tiny"}) {
    SCOPED_TRACE(m);
    const Inventory inv = inspect_model(models(m));
    EXPECT_EQ(inv.source, "headers");
    EXPECT_EQ(inv.shards_present, inv.shards_listed);
    EXPECT_EQ(inv.shards_incomplete, 0);
    const Totals t = totals(inv);
    EXPECT_EQ(t.checkpoint.bytes, data_bytes_of_files(models(m)));
    EXPECT_EQ(t.checkpoint.bytes, WeightStore(models(m)).total_bytes());
    TempDir d;
    const Inventory cfg = inspect_model(config_only(d, m));
    EXPECT_EQ(cfg.source, "config.json");
    expect_same_tensors(inv.tensors, cfg.tensors);
    const Totals tc = totals(cfg);
    for (int r = 0; r < kRoleCount; ++r) {
      EXPECT_EQ(t.by_role[r].bytes, tc.by_role[r].bytes) << role_key(static_cast<Role>(r));
      EXPECT_EQ(t.by_role[r].params, tc.by_role[r].params) << role_key(static_cast<Role>(r));
    }
  }
  // v3_tiny carries an MTP layer (layer 4 of 4): counted apart, not loaded.
  const Totals t = totals(inspect_model(models("v3_tiny")));
  EXPECT_GT(role(t, Role::Mtp).bytes, 0u);
  EXPECT_EQ(t.loaded.bytes + role(t, Role::Mtp).bytes, t.checkpoint.bytes);
  // v3_fp8_tiny: fp8 matrices with their F32 block scales.
  const Totals f = totals(inspect_model(models("v3_fp8_tiny")));
  ASSERT_TRUE(kind(f, "F8_E4M3") && kind(f, "F32 block scales"));
}

TEST(Inspect, IndexWithShardsAbsentOrPartlyPresent) {
  const std::string src = models("v3_sharded_tiny");
  const Totals full = totals(inspect_model(src));
  TempDir d;
  const std::string dir = d / "m";
  fs::create_directories(dir);
  fs::copy_file(src + "/config.json", dir + "/config.json");
  fs::copy_file(src + "/model.safetensors.index.json", dir + "/model.safetensors.index.json");
  {
    const Inventory inv = inspect_model(dir);  // no shard downloaded yet
    EXPECT_EQ(inv.source, "config.json");
    EXPECT_EQ(inv.shards_listed, 3);
    EXPECT_EQ(inv.shards_present, 0);
    EXPECT_EQ(inv.unknown_tensors, 0);
    const Totals t = totals(inv);
    EXPECT_EQ(t.checkpoint.bytes, full.checkpoint.bytes);
    EXPECT_EQ(t.checkpoint.params, full.checkpoint.params);
  }
  fs::copy_file(src + "/model-00002-of-00003.safetensors",
                dir + "/model-00002-of-00003.safetensors");
  {
    const Inventory inv = inspect_model(dir);  // one of three
    EXPECT_EQ(inv.source, "headers + config.json");
    EXPECT_EQ(inv.shards_present, 1);
    EXPECT_EQ(totals(inv).checkpoint.bytes, full.checkpoint.bytes);
    size_t from_header = 0;
    for (const TensorEntry& t : inv.tensors) from_header += t.from_header;
    EXPECT_GT(from_header, 0u);
    EXPECT_LT(from_header, inv.tensors.size());
  }
  {
    // A shard still downloading (its data cut short) is read from its header.
    const std::string s = dir + "/model-00001-of-00003.safetensors";
    fs::copy_file(src + "/model-00001-of-00003.safetensors", s);
    fs::resize_file(s, fs::file_size(s) - 100);
    const Inventory inv = inspect_model(dir);
    EXPECT_EQ(inv.shards_present, 2);
    EXPECT_EQ(inv.shards_incomplete, 1);
    EXPECT_EQ(totals(inv).checkpoint.bytes, full.checkpoint.bytes);
  }
  {
    // A tensor the index names that config.json does not imply is reported, not guessed.
    json idx = moeserve::read_json_file(dir + "/model.safetensors.index.json", 1 << 20);
    idx["weight_map"]["model.extra.weight"] = "model-00003-of-00003.safetensors";
    std::ofstream(dir + "/model.safetensors.index.json") << idx.dump();
    EXPECT_EQ(inspect_model(dir).unknown_tensors, 1);
  }
}

TEST(Inspect, Int4CompressedTensorsHeaders) {
  // A small checkpoint laid out as Kimi-K2-Thinking publishes it: routed experts as
  // weight_packed (I32, 8 weights each) + weight_scale (BF16, one per 32) + weight_shape.
  TempDir d;
  const std::string dir = d / "m";
  fs::create_directories(dir);
  json cfg = preset_config("tiny").to_json();
  cfg["quantization_config"] = json::parse(R"({
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
      "num_bits": 4, "group_size": 32, "strategy": "group", "symmetric": true, "type": "int"}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
               "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]})");
  std::ofstream(dir + "/config.json") << cfg.dump(2);
  const Quantization q = parse_quantization(cfg);
  const ModelConfig c = ModelConfig::from_json(preset_config("tiny").to_json());
  const std::vector<TensorEntry> derived = tensors_from_config(c, q, 0);
  std::vector<SafeTensorsWriter::Entry> entries;
  uint64_t total = 0;
  for (const TensorEntry& t : derived) {
    moeserve::DType dt;
    ASSERT_TRUE(moeserve::parse_dtype(t.dtype, &dt)) << t.dtype;
    entries.push_back({t.name, dt, t.shape});
    total += t.bytes;
  }
  {
    SafeTensorsWriter w(dir + "/model.safetensors", entries);
    const std::vector<char> zeros(total, 0);
    w.write_data(zeros.data(), zeros.size());
    w.finish();
  }
  const Inventory inv = inspect_model(dir);
  EXPECT_EQ(inv.source, "headers");
  expect_same_tensors(inv.tensors, derived);
  const auto m = by_name(inv.tensors);
  // tiny: hidden 64, moe_intermediate 32.
  const TensorEntry& packed = m.at("model.layers.1.mlp.experts.3.gate_proj.weight_packed");
  EXPECT_EQ(packed.dtype, "I32");
  EXPECT_EQ(packed.shape, (std::vector<int64_t>{32, 8}));
  EXPECT_EQ(packed.params, 32u * 64);
  EXPECT_EQ(packed.bytes, 32u * 64 / 2);
  const TensorEntry& scale = m.at("model.layers.1.mlp.experts.3.down_proj.weight_scale");
  EXPECT_EQ(scale.shape, (std::vector<int64_t>{64, 1}));
  EXPECT_EQ(scale.params, 0u);
  EXPECT_EQ(m.at("model.layers.1.mlp.experts.3.up_proj.weight_shape").bytes, 16u);
  EXPECT_EQ(m.at("model.layers.1.self_attn.o_proj.weight").dtype, "BF16");
  EXPECT_EQ(m.at("model.layers.1.mlp.shared_experts.up_proj.weight").dtype, "BF16");
  EXPECT_EQ(m.at("model.layers.0.mlp.up_proj.weight").dtype, "BF16");
  const Totals t = totals(inv);
  EXPECT_EQ(t.checkpoint.bytes, data_bytes_of_files(dir));
  EXPECT_EQ(role(t, Role::RoutedExperts).params, uint64_t{2} * 16 * 3 * 32 * 64);
}

// The figures inspect plans with are the bytes a pool of each dtype really takes per token.
TEST(Inspect, KvBytesPerTokenAreThePools) {
  for (const char* name : {"deepseek-v3", "deepseek-v2-lite"}) {
    const Inventory inv = inspect_model(configs(name));
    for (KvDtype d : kKvDtypes) {
      moeserve::kv::KvPool pool(1, 16, inv.cfg.num_hidden_layers, inv.cfg.kv_cache_dim(), d);
      EXPECT_EQ(kv_bytes_per_token(inv.cfg, d) * 16, pool.block_bytes())
          << name << " " << kv_dtype_name(d);
    }
  }
}

TEST(Inspect, PerRankPlan) {
  const Inventory inv = inspect_model(configs("deepseek-v3"));
  const Totals t = totals(inv);
  const uint64_t routed = role(t, Role::RoutedExperts).bytes;
  EXPECT_EQ(kv_bytes_per_token(inv.cfg, KvDtype::F32), 61u * (512 + 64) * 4);
  EXPECT_EQ(kv_bytes_per_token(inv.cfg, KvDtype::BF16), 61u * (512 + 64) * 2);
  // fp8: a byte per value and an f32 scale per 128 values (four for the latent, one for rope).
  EXPECT_EQ(kv_bytes_per_token(inv.cfg, KvDtype::FP8), 61u * (512 + 64 + 5 * 4));
  PlanOptions o;
  RankPlan p = plan_rank(inv, o);
  EXPECT_EQ(p.experts_per_layer, 256);
  EXPECT_EQ(p.routed, routed);
  EXPECT_EQ(p.replicated + p.routed, t.loaded.bytes);  // the MTP layer is not loaded
  EXPECT_EQ(p.kv[0], 4096u * 61 * 576 * 4);
  EXPECT_EQ(p.kv[1], p.kv[0] / 2);
  EXPECT_EQ(p.kv[2], 4096u * 61 * 596);
  EXPECT_EQ(p.total(KvDtype::F32), p.replicated + p.routed + p.kv[0] + p.workspace);
  o.ep = 8;
  p = plan_rank(inv, o);
  EXPECT_EQ(p.experts_per_layer, 32);
  EXPECT_EQ(p.routed, routed / 8);
  o.ep = 3;  // 86, 85, 85: the largest rank's share
  p = plan_rank(inv, o);
  EXPECT_EQ(p.experts_per_layer, 86);
  EXPECT_EQ(p.routed, routed / 256 * 86);
  o.ep = 1;
  o.seqs = 4;
  o.context = 4097;  // sequences take whole 16-token blocks
  p = plan_rank(inv, o);
  EXPECT_EQ(p.kv[0], 4u * 4112 * 61 * 576 * 4);
  o.ep = 0;
  expect_error([&] { plan_rank(inv, o); }, {"--ep"});
}

TEST(Inspect, WorkspaceEstimate) {
  // docs/benchmarks.md sizes the bench preset's workspace at a 2048-token forward at ~145 MB
  // without the routed experts' output rows; this estimate adds them (an upper bound).
  const ModelConfig bench = preset_config("bench");
  PlanOptions o;
  o.batch_tokens = 2048;
  const uint64_t w = workspace_bytes(bench, o);
  EXPECT_GE(w, 145'000'000u);
  EXPECT_LE(w, 175'000'000u);
  o.batch_tokens = 4096;
  EXPECT_GT(workspace_bytes(bench, o), w);
  // DeepSeek-V3 at serve's default 256 tokens per step: well under 1% of a rank's weights.
  const Inventory v3 = inspect_model(configs("deepseek-v3"));
  const RankPlan p = plan_rank(v3, PlanOptions{});
  EXPECT_LT(p.workspace, p.replicated / 100);
  EXPECT_GT(p.workspace, 0u);
}

TEST(Inspect, ReportTextAndJson) {
  const Inventory inv = inspect_model(configs("deepseek-v3"));
  PlanOptions o;
  o.ep = 8;
  const json j = inspect_json(inv, o, std::nullopt);
  EXPECT_EQ(j["source"], "config.json");
  EXPECT_EQ(j["per_rank"]["ep"], 8);
  EXPECT_EQ(j["per_rank"]["routed_experts_per_layer"], 32);
  EXPECT_EQ(j["per_rank"]["kv_cache_bytes"].size(), 3u);
  uint64_t sum = 0;
  for (const auto& [k, v] : j["by_role"].items()) sum += v["bytes"].get<uint64_t>();
  EXPECT_EQ(sum, j["total_checkpoint"]["bytes"].get<uint64_t>());
  EXPECT_EQ(j["kv_bytes_per_token"]["fp8"], 61 * 596);
  const json one = inspect_json(inv, o, KvDtype::FP8);
  EXPECT_EQ(one["per_rank"]["total_bytes"].size(), 1u);
  EXPECT_TRUE(one["per_rank"]["total_bytes"].contains("fp8"));

  const std::string text = inspect_text(inv, o, std::nullopt);
  for (const char* s :
       {"source: config.json", "MTP (--speculative-tokens)", "routed experts (32 of 256", "f32 KV",
        "bf16 KV", "fp8 KV", "F32 block scales", "671.03B"})
    EXPECT_NE(text.find(s), std::string::npos) << s << "\n" << text;
  const std::string fp8only = inspect_text(inv, o, KvDtype::FP8);
  EXPECT_EQ(fp8only.find("f32 KV"), std::string::npos);
  const std::string k2t = inspect_text(inspect_model(configs("kimi-k2-thinking")), o, {});
  EXPECT_NE(k2t.find("compressed-tensors int4 (pack-quantized), group 32"), std::string::npos)
      << k2t;
}

TEST(Inspect, CommandLine) {
  const std::string bin = MOESERVE_BINARY;
  if (!fs::exists(bin)) GTEST_SKIP() << "the moeserve binary is not built";
  TempDir d;
  auto run = [&](const std::string& args, std::string* out, std::string* err) {
    const std::string cmd = bin + " " + args + " >" + (d / "out") + " 2>" + (d / "err");
    const int rc = std::system(cmd.c_str());
    std::ifstream o(d / "out"), e(d / "err");
    out->assign(std::istreambuf_iterator<char>(o), {});
    err->assign(std::istreambuf_iterator<char>(e), {});
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
  };
  std::string out, err;
  ASSERT_EQ(run("inspect --model " + models("v3_sharded_tiny") + " --json --ep 2", &out, &err), 0)
      << err;
  const json j = json::parse(out);
  EXPECT_EQ(j, inspect_json(
                   inspect_model(models("v3_sharded_tiny")),
                   [] {
                     PlanOptions o;
                     o.ep = 2;
                     return o;
                   }(),
                   std::nullopt));
  ASSERT_EQ(run("inspect " + configs("deepseek-v2-lite") + " --kv-cache-dtype bf16", &out, &err), 0)
      << err;
  EXPECT_NE(out.find("bf16 KV"), std::string::npos) << out;
  EXPECT_EQ(out.find("f32 KV"), std::string::npos) << out;
  EXPECT_EQ(run("inspect " + configs("deepseek-v2-lite") + " --kv-cache-dtype f8", &out, &err), 1);
  EXPECT_NE(err.find("--kv-cache-dtype"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_EQ(run("inspect " + (d / "nowhere"), &out, &err), 1);
  EXPECT_NE(err.find("does not exist"), std::string::npos) << err;
}

TEST(Inspect, Errors) {
  TempDir d;
  expect_error([&] { inspect_model(d / "nowhere"); }, {"does not exist"});
  expect_error([&] { inspect_model(d.path()); }, {"no config.json"});
  json cfg = preset_config("tiny").to_json();
  cfg["quantization_config"] = {{"quant_method", "gptq"}};
  std::ofstream(d / "config.json") << cfg.dump();
  expect_error([&] { inspect_model(d.path()); }, {"gptq"});
  cfg["quantization_config"] = {{"quant_method", "compressed-tensors"},
                                {"format", "pack-quantized"},
                                {"config_groups", {{"g", {{"weights", {{"num_bits", "four"}}}}}}}};
  std::ofstream(d / "config.json") << cfg.dump();
  expect_error([&] { inspect_model(d.path()); }, {"quantization_config is malformed"});
  cfg.erase("quantization_config");
  std::ofstream(d / "config.json") << cfg.dump();
  {
    std::ofstream f(d / "model.safetensors", std::ios::binary);
    const uint64_t len = 4;
    f.write(reinterpret_cast<const char*>(&len), 8);
    f << "{\"a\"";
  }
  expect_error([&] { inspect_model(d.path()); }, {"model.safetensors", "not valid JSON"});
}
