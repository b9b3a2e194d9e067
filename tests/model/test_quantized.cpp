// compressed-tensors pack-quantized checkpoints: the loader against the package's own unpacking
// and dequantization (fixtures tests/fixtures/models/v3_tiny_int4 and v3_tiny_int8, made by
// tools/make_quantized_fixtures.py with the package), and `quantize` against the package's
// quantization of the same weights. (Their log-probs against transformers: test_engine's
// Reference suite, which runs every fixture with a reference.json.)
#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "core/dtype.h"
#include "kernels/kernels.h"
#include "kv/kv_pool.h"
#include "model/config.h"
#include "model/init_model.h"
#include "model/inspect.h"
#include "model/model.h"
#include "model/quantize.h"
#include "model/safetensors.h"
#include "model/weights.h"

using namespace moeserve;
using moeserve::testing::expect_error;
using moeserve::testing::TempDir;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string fixture(const std::string& name) {
  return (fs::path(moeserve::testing::source_dir()) / "tests/fixtures/models" / name).string();
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

// The matrix `module` (model.layers.L.mlp.experts.E.{gate,up,down}_proj) of w.
const model::Weight& expert_matrix(const model::ModelWeights& w, const std::string& module) {
  int l = -1, e = -1;
  char which[16] = {};
  EXPECT_EQ(std::sscanf(module.c_str(), "model.layers.%d.mlp.experts.%d.%15[a-z]", &l, &e, which),
            3)
      << module;
  const model::MlpWeights& m = w.layers.at(l).moe.experts.at(e);
  const std::string s = which;
  return s == "gate" ? m.gate : s == "up" ? m.up : m.down;
}

struct Loaded {
  model::ModelConfig cfg;
  std::unique_ptr<model::WeightStore> store;
  model::ModelWeights w;
  explicit Loaded(const std::string& dir)
      : cfg(model::ModelConfig::load(dir)), store(std::make_unique<model::WeightStore>(dir)) {
    w = model::load_weights(*store, cfg);
  }
};

// The last token's logits of one forward pass over a few tokens.
std::vector<float> forward_logits(const std::string& dir) {
  ThreadPool pool(2);
  model::Model m(dir, pool);
  const model::ModelConfig& c = m.config();
  kv::KvPool kv(1, 16, c.num_hidden_layers, c.kv_cache_dim());
  std::vector<int32_t> blocks;
  EXPECT_TRUE(kv.allocate(1, &blocks));
  model::Batch b;
  b.tokens = {1, 5, 9, 2, 7, 3};
  b.seqs = {{0, 6, 0, blocks.data()}};
  b.logit_rows = {5};
  std::vector<float> logits(c.vocab_size);
  m.forward(b, kv, logits.data());
  for (float v : logits) EXPECT_TRUE(std::isfinite(v));
  return logits;
}

class QuantizedFixture : public ::testing::TestWithParam<int> {
 protected:
  std::string dir() const { return fixture("v3_tiny_int" + std::to_string(GetParam())); }
};

}  // namespace

// Every element of the recorded matrices: Weight::at and dequant_row give q * scale exactly,
// with q and scale as compressed-tensors unpacks them, and rounded to bf16 what the package's
// checkpoint dequantizer gives (it multiplies in bf16).
TEST_P(QuantizedFixture, UnpackingEqualsThePackage) {
  const Loaded m(dir());
  const json q = read_json(dir() + "/quantized.json");
  ASSERT_EQ(q["num_bits"], GetParam());
  ASSERT_EQ(q["matrices"].size(), 3u);
  int64_t checked = 0;
  for (const json& rec : q["matrices"]) {
    const model::Weight& w = expert_matrix(m.w, rec["module"]);
    ASSERT_EQ(w.dtype, GetParam() == 4 ? DType::Q4 : DType::Q8);
    ASSERT_EQ(w.rows, rec["shape"][0].get<int64_t>());
    ASSERT_EQ(w.cols, rec["shape"][1].get<int64_t>());
    ASSERT_EQ(w.group_size, 32);
    ASSERT_EQ(w.group_scale_dtype, DType::BF16);
    std::vector<float> row(w.cols);
    for (int64_t r = 0; r < w.rows; ++r) {
      kernels::dequant_row(w, r, row.data());
      for (int64_t c = 0; c < w.cols; ++c) {
        const int qi = rec["ints"][r][c];
        const float s = rec["scales"][r][c / 32];
        const float want = static_cast<float>(qi) * s;
        ASSERT_EQ(w.at(r, c), want) << rec["module"] << " (" << r << ", " << c << ")";
        ASSERT_EQ(row[c], want) << rec["module"] << " dequant_row (" << r << ", " << c << ")";
        ASSERT_EQ(bf16_to_f32(f32_to_bf16(want)), rec["dequantized_bf16"][r][c].get<float>())
            << rec["module"] << " (" << r << ", " << c << ")";
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 3 * 1000);
}

// Half a byte (int4) or a byte (int8) per weight plus the bf16 scales, read in place from the
// mapping; make_resident copies the scales with the data, and the values stay the same.
TEST_P(QuantizedFixture, LoadsInPlaceAndResident) {
  Loaded m(dir());
  const int bits = GetParam();
  const std::string name = "model.layers.2.mlp.experts.7.down_proj";
  model::Weight& w = const_cast<model::Weight&>(expert_matrix(m.w, name));
  EXPECT_EQ(w.data, m.store->get(name + ".weight_packed").data);
  EXPECT_EQ(w.group_scale, m.store->get(name + ".weight_scale").data);
  EXPECT_EQ(w.bytes(), static_cast<size_t>(w.rows * w.cols * bits / 8 + w.rows * w.group_cols * 2));
  EXPECT_EQ(model::routed_expert_bytes(m.w), 3 * w.bytes());
  // Attention, shared experts, dense layer and head are bf16 (the ignore list).
  EXPECT_EQ(m.w.layers[1].attn.o_proj.dtype, DType::BF16);
  EXPECT_EQ(m.w.layers[1].moe.shared.gate.dtype, DType::BF16);
  EXPECT_EQ(m.w.layers[0].mlp.down.dtype, DType::BF16);
  EXPECT_EQ(m.w.lm_head.dtype, DType::BF16);

  std::vector<float> before;
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t c = 0; c < w.cols; ++c) before.push_back(w.at(r, c));
  ThreadPool pool(2);
  auto resident = model::make_resident(m.w, *m.store, pool);
  const auto* lo = reinterpret_cast<const std::byte*>(resident->data());
  const auto* hi = lo + resident->used();
  const model::Weight& v = expert_matrix(m.w, name);
  for (const void* p : {v.data, v.group_scale}) {
    EXPECT_GE(static_cast<const std::byte*>(p), lo);
    EXPECT_LT(static_cast<const std::byte*>(p), hi);
  }
  size_t i = 0;
  for (int64_t r = 0; r < v.rows; ++r)
    for (int64_t c = 0; c < v.cols; ++c) ASSERT_EQ(v.at(r, c), before[i++]) << r << ", " << c;
}

// A whole forward pass through the quantized experts runs (the log-probs against transformers
// are test_engine's Reference suite), and int4 and int8 differ from each other.
TEST_P(QuantizedFixture, ForwardRuns) {
  ThreadPool pool(2);
  model::Model m(dir(), pool);
  EXPECT_EQ(m.weights().layers[1].moe.experts[3].up.dtype, GetParam() == 4 ? DType::Q4 : DType::Q8);
}

INSTANTIATE_TEST_SUITE_P(Bits, QuantizedFixture, ::testing::Values(4, 8),
                         [](const auto& info) { return "int" + std::to_string(info.param); });

// The published Kimi-K2-Thinking config.json (model_type kimi_k2, int4 group 32) is accepted,
// and its ignore list leaves exactly the routed experts quantized.
TEST(QuantizedConfig, KimiK2Thinking) {
  const model::ModelConfig c = model::ModelConfig::load(
      (fs::path(moeserve::testing::source_dir()) / "tests/fixtures/configs/kimi-k2-thinking")
          .string());
  ASSERT_EQ(c.quant.kind, model::Quantization::Kind::PackQuantized);
  EXPECT_EQ(c.quant.num_bits, 4);
  EXPECT_EQ(c.quant.group_size, 32);
  EXPECT_FALSE(c.fp8);
  EXPECT_TRUE(c.quant.quantizes("model.layers.5.mlp.experts.7.down_proj"));
  for (const char* m :
       {"model.layers.5.mlp.shared_experts.down_proj", "model.layers.0.mlp.gate_proj",
        "model.layers.5.self_attn.kv_b_proj", "lm_head"})
    EXPECT_FALSE(c.quant.quantizes(m)) << m;
  // Written back as read.
  EXPECT_EQ(c.to_json()["quantization_config"]["ignore"].size(), 4u);
}

TEST(QuantizedConfig, Errors) {
  json j = read_json(fixture("v3_tiny_int4") + "/config.json");
  auto with = [&](const std::function<void(json&)>& edit) {
    json k = j;
    edit(k["quantization_config"]);
    return k;
  };
  const std::vector<std::pair<std::function<void(json&)>, std::vector<std::string>>> cases = {
      {[](json& q) { q["config_groups"]["group_0"]["weights"]["num_bits"] = 3; }, {"num_bits 3"}},
      {[](json& q) { q["config_groups"]["group_0"]["weights"]["symmetric"] = false; },
       {"asymmetric"}},
      {[](json& q) { q["config_groups"]["group_0"]["weights"]["group_size"] = 48; },
       {"multiple of 32", "48"}},
      {[](json& q) { q["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"; },
       {"strategy", "tensor"}},
      {[](json& q) { q["config_groups"]["group_0"]["weights"]["type"] = "float"; }, {"int"}},
      {[](json& q) {
         q["config_groups"]["group_0"]["input_activations"] = {{"num_bits", 8}};
       },
       {"input_activations"}},
      {[](json& q) { q["format"] = "marlin-24"; }, {"marlin-24"}},
      {[](json& q) { q["quantization_status"] = "frozen"; }, {"frozen"}},
      {[](json& q) { q["config_groups"]["group_1"] = q["config_groups"]["group_0"]; },
       {"more than one pack-quantized"}},
      {[](json& q) { q["config_groups"] = json::object(); }, {"at least one entry"}},
      {[](json& q) { q["config_groups"]["group_0"]["targets"] = json::array(); }, {"no targets"}},
      {[](json& q) { q["config_groups"]["group_0"]["targets"] = {"re:(x"}; },
       {"target pattern", "regular expression"}},
      {[](json& q) { q["config_groups"]["group_0"]["format"] = "nvfp4-pack-quantized"; },
       {"group_0", "nvfp4-pack-quantized"}},
      {[](json& q) { q["ignore"] = {"re:(unclosed"}; }, {"regular expression"}},
      {[](json& q) { q["config_groups"]["group_0"]["weights"]["num_bits"] = "four"; },
       {"malformed"}},
  };
  for (const auto& [edit, fragments] : cases) {
    const json k = with(edit);
    try {
      model::ModelConfig::from_json(k);
      ADD_FAILURE() << "accepted " << k["quantization_config"].dump();
    } catch (const Error& e) {
      const std::string msg = e.what();
      for (const auto& f : fragments)
        EXPECT_NE(msg.find(f), std::string::npos) << f << " / " << msg;
    }
  }
  // int8 takes groups of 16.
  json k8 = with([](json& q) {
    q["config_groups"]["group_0"]["weights"]["num_bits"] = 8;
    q["config_groups"]["group_0"]["weights"]["group_size"] = 16;
  });
  EXPECT_EQ(model::ModelConfig::from_json(k8).quant.group_size, 16);
  // A float-quantized (fp8) group: 128x128 blocks of e4m3, weights static, activations
  // unquantized or dynamic.
  auto fp8 = [&](const std::function<void(json&)>& edit) {
    return with([&](json& q) {
      q["format"] = "mixed-precision";
      json g = model::mixed_config(4, 32, {"re:.*experts.*"}, {"Linear"},
                                   {"lm_head"})["config_groups"]["group_1"];
      edit(g);
      q["config_groups"]["group_0"]["targets"] = {"re:.*experts.*"};
      q["config_groups"]["group_1"] = g;
    });
  };
  const model::ModelConfig ok = model::ModelConfig::from_json(fp8([](json&) {}));
  EXPECT_TRUE(ok.fp8);
  const std::vector<std::pair<std::function<void(json&)>, std::vector<std::string>>> fp8_cases = {
      {[](json& g) {
         g["weights"]["block_structure"] = {64, 64};
       },
       {"block_structure", "[64,64]"}},
      {[](json& g) {
         g["weights"]["strategy"] = "channel";
         g["weights"]["block_structure"] = nullptr;
       },
       {"fp8 strategy", "channel"}},
      {[](json& g) { g["weights"]["num_bits"] = 4; }, {"8-bit floats"}},
      {[](json& g) { g["input_activations"]["dynamic"] = false; }, {"static input_activations"}},
      {[](json& g) { g["weights"]["dynamic"] = true; }, {"dynamic weight"}},
      {[](json& g) { g["targets"] = {"re:.*experts.*"}; }, {"more than one config group"}},
  };
  for (const auto& [edit, fragments] : fp8_cases) {
    const json k = fp8(edit);
    try {
      model::ModelConfig::from_json(k);
      ADD_FAILURE() << "accepted " << k["quantization_config"].dump();
    } catch (const Error& e) {
      const std::string msg = e.what();
      for (const auto& f : fragments)
        EXPECT_NE(msg.find(f), std::string::npos) << f << " / " << msg;
    }
  }
}

// Which config group takes a module when several targets match it, as compressed-tensors
// decides: exact names first, then "re:" patterns in string order, then the class "Linear";
// the ignore list before all of them; a module no target names stays unquantized.
TEST(QuantizedConfig, TargetsChooseTheScheme) {
  json j = read_json(fixture("v3_tiny_int4") + "/config.json");
  j["quantization_config"] =
      model::mixed_config(4, 32, {"re:.*mlp\\.experts\\..*", "model.layers.1.self_attn.o_proj"},
                          {"Linear", "re:.*self_attn\\.o_proj$"}, {"lm_head", "re:.*kv_b_proj"});
  const model::Quantization q = model::ModelConfig::from_json(j).quant;
  using model::Storage;
  EXPECT_EQ(q.storage("model.layers.1.mlp.experts.3.up_proj"), Storage::Int);  // pattern > class
  EXPECT_EQ(q.storage("model.layers.1.self_attn.o_proj"), Storage::Int);       // exact > pattern
  EXPECT_EQ(q.storage("model.layers.2.self_attn.o_proj"), Storage::Fp8);
  EXPECT_EQ(q.storage("model.layers.2.self_attn.q_a_proj"), Storage::Fp8);     // class Linear
  EXPECT_EQ(q.storage("model.layers.2.self_attn.kv_b_proj"), Storage::Plain);  // ignored
  EXPECT_EQ(q.storage("lm_head"), Storage::Plain);
  EXPECT_TRUE(q.has(Storage::Int));
  EXPECT_TRUE(q.has(Storage::Fp8));
  // Two patterns that both match: the one first in string order wins.
  j["quantization_config"] =
      model::mixed_config(4, 32, {"re:model\\.layers\\.1\\..*"}, {"re:.*experts.*"}, {});
  const model::Quantization r = model::ModelConfig::from_json(j).quant;
  EXPECT_EQ(r.storage("model.layers.1.mlp.experts.0.up_proj"), Storage::Fp8);  // ".*" < "m"
  EXPECT_EQ(r.storage("model.layers.1.self_attn.o_proj"), Storage::Int);
  EXPECT_EQ(r.storage("model.layers.2.self_attn.o_proj"), Storage::Plain);  // no target
}

namespace {

// Every tensor of a folder: name -> (dtype, shape, bytes).
struct Tensors {
  std::map<std::string, std::tuple<DType, std::vector<int64_t>, std::string>> t;
  explicit Tensors(const std::string& dir) {
    model::WeightStore s(dir);
    for (const auto& [name, v] : s.all())
      t[name] = {v->dtype, v->shape, std::string(static_cast<const char*>(v->data), v->nbytes)};
  }
};

}  // namespace

// `quantize` on the base fixture gives the package's own quantization of it, tensor for tensor
// and byte for byte (the integers, the bf16 scales and the shapes), sharded with an index, with
// the same ignore list, and loads back.
TEST_P(QuantizedFixture, QuantizeMatchesThePackage) {
  TempDir d;
  const std::string out = d / "q";
  model::QuantizeOptions o;
  o.model = fixture("v3_tiny");
  o.out = out;
  o.bits = GetParam();
  o.shard_bytes = 300'000;
  ThreadPool pool(2);
  std::vector<std::string> lines;
  const model::QuantizeResult r =
      model::quantize_checkpoint(o, pool, [&](const std::string& l) { lines.push_back(l); });
  EXPECT_EQ(r.quantized, 4 * 16 * 3);  // MoE layers 1-3 and the MTP layer 4: 16 experts each
  EXPECT_EQ(r.converted, 0);
  EXPECT_GE(r.shards, 3);
  EXPECT_FALSE(lines.empty());
  EXPECT_TRUE(fs::exists(out + "/model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(out + "/model-00001-of-" +
                         std::string(5 - std::to_string(r.shards).size(), '0') +
                         std::to_string(r.shards) + ".safetensors"));
  for (const auto& f : fs::directory_iterator(out)) {
    if (f.path().extension() == ".safetensors") {
      EXPECT_LT(fs::file_size(f.path()), 300'000u + 100'000u) << f.path();
    }
  }

  const Tensors got(out), want(dir());
  ASSERT_EQ(got.t.size(), want.t.size());
  for (const auto& [name, v] : want.t) {
    ASSERT_TRUE(got.t.count(name)) << name;
    const auto& g = got.t.at(name);
    EXPECT_EQ(std::get<0>(g), std::get<0>(v)) << name;
    EXPECT_EQ(std::get<1>(g), std::get<1>(v)) << name;
    EXPECT_TRUE(std::get<2>(g) == std::get<2>(v)) << name << ": other bytes";
  }
  const json qc = read_json(out + "/config.json")["quantization_config"];
  const json pc = read_json(dir() + "/config.json")["quantization_config"];
  EXPECT_EQ(qc["ignore"], pc["ignore"]);
  EXPECT_EQ(qc["config_groups"]["group_0"]["weights"]["num_bits"],
            pc["config_groups"]["group_0"]["weights"]["num_bits"]);
  EXPECT_EQ(qc["config_groups"]["group_0"]["weights"]["group_size"], 32);
  EXPECT_EQ(qc["format"], "pack-quantized");
  const json index = read_json(out + "/model.safetensors.index.json");
  EXPECT_EQ(index["weight_map"].size(), got.t.size());

  const Loaded m(out);
  EXPECT_EQ(expert_matrix(m.w, "model.layers.3.mlp.experts.15.up_proj").dtype,
            GetParam() == 4 ? DType::Q4 : DType::Q8);
}

// quantize_row_bf16 on hand-picked rows: the scale max|w| / 7.5 rounded to bf16, ties of
// w / scale rounded to even, the largest magnitude clamped (int4: +7.5 -> 7, -7.5 -> -8), an
// all-zero group given bf16's epsilon as its scale; and pack_row's layout.
TEST(Quantize, RowsAsTheFormulas) {
  std::vector<uint16_t> w(64);
  for (int c = 0; c < 32; ++c) w[c] = f32_to_bf16(0.0f);
  // Group 1: max |w| = 7.5 -> scale 1.0; values at halves.
  const float vals[] = {7.5f, -7.5f, 2.5f, 3.5f, -0.5f, 0.5f, 1.25f, -6.75f};
  for (int c = 32; c < 64; ++c) w[c] = f32_to_bf16(vals[c % 8]);
  std::vector<int8_t> q(64);
  uint16_t s[2];
  model::quantize_row_bf16(w.data(), 64, 4, 32, q.data(), s);
  EXPECT_EQ(bf16_to_f32(s[0]), 0.0078125f);
  EXPECT_EQ(bf16_to_f32(s[1]), 1.0f);
  for (int c = 0; c < 32; ++c) EXPECT_EQ(q[c], 0);
  const int want[] = {7, -8, 2, 4, 0, 0, 1, -7};
  for (int c = 32; c < 64; ++c) EXPECT_EQ(q[c], want[c % 8]) << c;
  // int8: scale max / 127.5.
  model::quantize_row_bf16(w.data() + 32, 32, 8, 32, q.data(), s);
  EXPECT_EQ(s[0], f32_to_bf16(7.5f / 127.5f));
  EXPECT_EQ(q[0], 127);
  EXPECT_EQ(q[1], -128);

  // Packing: int4 element i at bits 4i of the row (offset binary), int8 byte i.
  std::vector<int8_t> p4(32);
  for (int i = 0; i < 32; ++i) p4[i] = static_cast<int8_t>(i % 16 - 8);
  uint32_t words[8];
  model::pack_row(p4.data(), 32, 4, words);
  EXPECT_EQ(words[0], 0x76543210u);
  EXPECT_EQ(words[1], 0xfedcba98u);
  std::vector<int8_t> p8 = {-128, -1, 0, 127};
  uint32_t w8;
  model::pack_row(p8.data(), 4, 8, &w8);
  EXPECT_EQ(w8, 0xff807f00u);
}

namespace {

// A random fp8 checkpoint whose matrices have partial 128x128 blocks (160 = 128 + 32).
void write_fp8_model(const std::string& dir) {
  model::ModelConfig c = model::preset_config("tiny");
  c.hidden_size = 160;
  c.moe_intermediate_size = 96;
  c.intermediate_size = 192;
  model::InitOptions io;
  io.seed = 5;
  io.fp8 = true;
  model::write_random_model(c, dir, io);
  std::ofstream(fs::path(dir) / "tokenizer_config.json") << "{}";
}

// Log-softmax of logits.
std::vector<double> log_probs(const std::vector<float>& l) {
  double m = *std::max_element(l.begin(), l.end()), z = 0;
  for (float v : l) z += std::exp(v - m);
  std::vector<double> out;
  for (float v : l) out.push_back(v - m - std::log(z));
  return out;
}

}  // namespace

// An fp8 checkpoint, by default: the experts are dequantized (float(fp8) * scale_inv, rounded to
// bf16) and quantized; every other fp8 matrix stays fp8 byte for byte, its scale_inv renamed
// weight_scale, in one compressed-tensors "mixed-precision" checkpoint that loads, reads the
// same fp8 weights and gives log-probs close to the fp8 original's.
TEST(Quantize, Fp8InputStaysFp8) {
  TempDir d;
  write_fp8_model(d / "fp8");
  ThreadPool pool(2);
  model::QuantizeOptions o;
  o.model = d / "fp8";
  o.out = d / "q";
  const model::QuantizeResult r = model::quantize_checkpoint(o, pool);
  o.out = d / "bf16";
  o.keep_fp8 = false;
  const model::QuantizeResult rb = model::quantize_checkpoint(o, pool);
  EXPECT_EQ(r.converted, 0);
  EXPECT_GT(r.kept_fp8, 0);
  EXPECT_EQ(rb.converted, r.kept_fp8);
  EXPECT_EQ(r.quantized, rb.quantized);
  EXPECT_EQ(r.files_copied, std::vector<std::string>{"tokenizer_config.json"});

  const Tensors in(d / "fp8"), mixed(d / "q"), viabf16(d / "bf16");
  int64_t fp8_seen = 0, expert_seen = 0;
  for (const auto& [name, v] : in.t) {
    const auto& [dt, shape, bytes] = v;
    if (name.size() > 10 && name.compare(name.size() - 10, 10, "_scale_inv") == 0) {
      EXPECT_EQ(mixed.t.count(name), 0u) << name;
      continue;
    }
    if (model::is_routed_expert_weight(name)) {
      // The experts: what quantizing the dequantized input gives (the bf16 route's).
      const std::string m = name.substr(0, name.size() - 7);
      for (const char* k : {".weight_packed", ".weight_scale", ".weight_shape"}) {
        ASSERT_TRUE(mixed.t.count(m + k)) << m + k;
        EXPECT_EQ(mixed.t.at(m + k), viabf16.t.at(m + k)) << m + k;
      }
      ++expert_seen;
      continue;
    }
    ASSERT_TRUE(mixed.t.count(name)) << name;
    EXPECT_EQ(mixed.t.at(name), v) << name;  // dtype, shape and bytes
    if (dt == DType::F8_E4M3) {
      const std::string scale = name + "_scale";  // X.weight_scale_inv -> X.weight_scale
      ASSERT_TRUE(mixed.t.count(scale)) << scale;
      EXPECT_EQ(mixed.t.at(scale), in.t.at(name + "_scale_inv")) << scale;
      ++fp8_seen;
    }
  }
  EXPECT_EQ(fp8_seen, r.kept_fp8);
  EXPECT_EQ(expert_seen, r.quantized);

  // The config: experts int4, the fp8 matrices fp8, lm_head ignored; written back as read.
  const json qc = read_json(d / "q/config.json")["quantization_config"];
  EXPECT_EQ(qc["format"], "mixed-precision");
  EXPECT_EQ(qc["ignore"], json::array({"lm_head"}));
  EXPECT_EQ(qc["config_groups"]["group_1"]["format"], "float-quantized");
  const Loaded a(d / "fp8"), b(d / "q");
  EXPECT_TRUE(b.cfg.fp8);
  EXPECT_EQ(b.cfg.to_json()["quantization_config"], qc);
  EXPECT_EQ(model::ModelConfig::from_json(b.cfg.to_json()).to_json(), b.cfg.to_json());
  // Loaded: the same fp8 matrices and scales as the input's, read in place.
  const std::vector<std::pair<const model::Weight*, const model::Weight*>> same = {
      {&a.w.layers[1].attn.kv_b_proj, &b.w.layers[1].attn.kv_b_proj},
      {&a.w.layers[1].attn.q_a_proj, &b.w.layers[1].attn.q_a_proj},
      {&a.w.layers[1].moe.shared.down, &b.w.layers[1].moe.shared.down},
      {&a.w.layers[0].mlp.up, &b.w.layers[0].mlp.up}};
  for (const auto& [x, y] : same) {
    ASSERT_EQ(x->dtype, DType::F8_E4M3);
    ASSERT_EQ(y->dtype, DType::F8_E4M3);
    ASSERT_EQ(y->scale_cols, x->scale_cols);
    for (int64_t i = 0; i < x->rows; ++i)
      for (int64_t j = 0; j < x->cols; ++j) ASSERT_EQ(y->at(i, j), x->at(i, j));
  }
  EXPECT_EQ(b.w.layers[1].attn.kv_b_proj.scale_inv,
            b.store->get("model.layers.1.self_attn.kv_b_proj.weight_scale").data);
  EXPECT_EQ(b.w.layers[1].moe.experts[2].down.dtype, DType::Q4);
  EXPECT_EQ(b.w.lm_head.dtype, DType::BF16);

  // Forward: the mixed checkpoint's log-probs are close to the fp8 original's (int4 experts
  // are the only difference) and differ from the all-bf16 route's (fp8 matrices computed as fp8).
  const std::vector<double> lf = log_probs(forward_logits(d / "fp8")),
                            lm = log_probs(forward_logits(d / "q")),
                            lb = log_probs(forward_logits(d / "bf16"));
  double dmax = 0;
  for (size_t i = 0; i < lf.size(); ++i) dmax = std::max(dmax, std::fabs(lf[i] - lm[i]));
  EXPECT_LT(dmax, 0.05);  // (0.03 here; the log-probs spread over 2)
  EXPECT_NE(lm, lb);
}

// With keep_fp8 off (--dense-dtype bf16): the experts are dequantized and quantized; the other
// fp8 matrices become bf16 the same way and their scales go: one pack-quantized config group.
TEST(Quantize, Fp8InputToBf16) {
  TempDir d;
  model::ModelConfig c = model::preset_config("tiny");
  c.hidden_size = 64;
  c.moe_intermediate_size = 32;
  c.intermediate_size = 64;
  model::InitOptions io;
  io.seed = 5;
  io.fp8 = true;
  model::write_random_model(c, d / "fp8", io);
  model::QuantizeOptions o;
  o.model = d / "fp8";
  o.out = d / "q";
  o.bits = 4;
  o.keep_fp8 = false;
  ThreadPool pool(2);
  const model::QuantizeResult r = model::quantize_checkpoint(o, pool);
  EXPECT_GT(r.converted, 0);
  EXPECT_EQ(r.kept_fp8, 0);

  const Loaded in(d / "fp8");
  const Loaded out(d / "q");
  EXPECT_FALSE(out.cfg.fp8);
  EXPECT_EQ(out.cfg.quant.schemes.size(), 1u);
  for (const auto& [name, v] : out.store->all()) EXPECT_NE(v->dtype, DType::F8_E4M3) << name;
  // A converted matrix: bf16(float(fp8) * scale_inv).
  const model::Weight& a = in.w.layers[1].attn.kv_b_proj;
  const model::Weight& b = out.w.layers[1].attn.kv_b_proj;
  ASSERT_EQ(a.dtype, DType::F8_E4M3);
  ASSERT_EQ(b.dtype, DType::BF16);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < a.cols; ++j)
      ASSERT_EQ(b.at(i, j), bf16_to_f32(f32_to_bf16(a.at(i, j))));
  // A quantized expert: quantize_row_bf16 of the same bf16 values.
  const model::Weight& e = in.w.layers[1].moe.experts[2].down;
  const model::Weight& q = out.w.layers[1].moe.experts[2].down;
  ASSERT_EQ(q.dtype, DType::Q4);
  std::vector<uint16_t> row(e.cols);
  std::vector<int8_t> qi(e.cols);
  std::vector<uint16_t> sc(e.cols / 32);
  for (int64_t i = 0; i < e.rows; ++i) {
    for (int64_t j = 0; j < e.cols; ++j) row[j] = f32_to_bf16(e.at(i, j));
    model::quantize_row_bf16(row.data(), e.cols, 4, 32, qi.data(), sc.data());
    for (int64_t j = 0; j < e.cols; ++j)
      ASSERT_EQ(q.at(i, j), static_cast<float>(qi[j]) * bf16_to_f32(sc[j / 32]));
  }
}

// The loader refuses a mixed checkpoint whose config and tensors disagree, naming the module.
TEST(QuantizedConfig, MixedLoaderErrors) {
  TempDir d;
  write_fp8_model(d / "fp8");
  ThreadPool pool(2);
  model::QuantizeOptions o;
  o.model = d / "fp8";
  o.out = d / "q";
  model::quantize_checkpoint(o, pool);
  const json cfg = read_json(d / "q/config.json");
  auto load_with = [&](const std::function<void(json&)>& edit) {
    json k = cfg;
    edit(k["quantization_config"]);
    std::ofstream(d / "q/config.json") << k.dump();
    Loaded l(d / "q");
  };
  // An fp8 matrix that no fp8 group targets.
  expect_error([&] { load_with([](json& q) { q["ignore"].push_back("re:.*o_proj"); }); },
               {"self_attn.o_proj.weight is F8_E4M3", "no fp8 config group"});
  // The experts declared fp8: no weight tensor.
  expect_error(
      [&] {
        load_with([](json& q) {
          q["config_groups"]["group_1"]["targets"].push_back(
              q["config_groups"]["group_0"]["targets"][0]);
          q["config_groups"]["group_0"]["targets"] = {"model.layers.0.mlp.nothing"};
        });
      },
      {"weight_packed is int-quantized", "as fp8"});
  // lm_head (bf16) declared fp8.
  expect_error(
      [&] {
        load_with([](json& q) {
          q["ignore"] = json::array();
          q["config_groups"]["group_1"]["targets"].push_back("lm_head");
        });
      },
      {"lm_head.weight has dtype BF16", "as fp8"});
  load_with([](json&) {});  // as written: loads
}

TEST(Quantize, Errors) {
  TempDir d;
  ThreadPool pool(1);
  auto run = [&](model::QuantizeOptions o) { model::quantize_checkpoint(o, pool); };
  model::QuantizeOptions o;
  o.model = fixture("v3_tiny");
  o.out = d / "out";
  fs::create_directories(d / "out");
  std::ofstream(d / "out/x") << "x";
  expect_error([&] { run(o); }, {"exists and is not empty"});
  o.out = d / "new";
  for (int64_t g : {48, 0, 16, -32}) {
    o.group_size = g;
    expect_error([&] { run(o); }, {"--group-size"});
  }
  o.group_size = 128;  // does not divide hidden_size 64
  expect_error([&] { run(o); }, {"--group-size 128", "hidden_size (64)"});
  o.group_size = 32;
  o.bits = 3;
  expect_error([&] { run(o); }, {"int4 or int8"});
  o.bits = 4;
  o.model = fixture("v3_tiny_int4");
  expect_error([&] { run(o); }, {"already quantized"});
  o.model = d / "nowhere";
  expect_error([&] { run(o); }, {"does not exist"});
  o.model = fixture("v3_tiny");
  o.out = o.model;
  expect_error([&] { run(o); }, {"must not be the model folder"});
  {  // an expert of an integer dtype: refused before anything is written
    const model::WeightStore in(fixture("v3_tiny"));
    std::vector<model::SafeTensorsWriter::Entry> entries;
    for (const auto& [name, t] : in.all()) {
      if (name == "model.layers.1.mlp.experts.3.up_proj.weight")  // the same bytes as I8
        entries.push_back({name, DType::I8, {t->shape[0], 2 * t->shape[1]}});
      else
        entries.push_back({name, t->dtype, t->shape});
    }
    fs::create_directories(d / "i16");
    fs::copy_file(fixture("v3_tiny") + "/config.json", d / "i16/config.json");
    model::SafeTensorsWriter out(d / "i16/model.safetensors", entries);
    for (const auto& [name, t] : in.all()) out.write_data(t->data, t->nbytes);
    out.finish();
  }
  o.model = d / "i16";
  o.out = d / "new";
  expect_error([&] { run(o); }, {"experts.3.up_proj.weight", "I8"});
  EXPECT_FALSE(fs::exists(d / "new"));
}

// inspect reads what quantize wrote from the headers, and derives the same tensors from its
// config.json alone (a folder whose shards are not downloaded yet).
TEST(Quantize, InspectDerivesWhatItWrites) {
  TempDir d;
  model::QuantizeOptions o;
  o.model = fixture("v3_tiny");
  o.out = d / "q";
  ThreadPool pool(2);
  model::quantize_checkpoint(o, pool);
  // The same for an fp8 input's mixed output.
  write_fp8_model(d / "fp8");
  o.model = d / "fp8";
  o.out = d / "mixed";
  model::quantize_checkpoint(o, pool);
  fs::create_directories(d / "config-only-mixed");
  fs::copy_file(d / "mixed/config.json", d / "config-only-mixed/config.json");
  {
    const model::Inventory headers = model::inspect_model(d / "mixed");
    const model::Inventory derived = model::inspect_model(d / "config-only-mixed");
    EXPECT_NE(headers.quant.describe().find("fp8 e4m3 (float-quantized)"), std::string::npos);
    std::map<std::string, const model::TensorEntry*> by_name;
    for (const auto& t : derived.tensors) by_name[t.name] = &t;
    size_t fp8 = 0;
    for (const auto& t : headers.tensors) {
      ASSERT_TRUE(by_name.count(t.name)) << t.name;
      EXPECT_EQ(by_name[t.name]->dtype, t.dtype) << t.name;
      EXPECT_EQ(by_name[t.name]->shape, t.shape) << t.name;
      EXPECT_EQ(by_name[t.name]->kind, t.kind) << t.name;
      fp8 += t.dtype == "F8_E4M3";
    }
    EXPECT_GT(fp8, 0u);
    EXPECT_EQ(headers.tensors.size(), derived.tensors.size());
  }
  fs::create_directories(d / "config-only");
  fs::copy_file(d / "q/config.json", d / "config-only/config.json");
  const model::Inventory headers = model::inspect_model(d / "q");
  const model::Inventory derived = model::inspect_model(d / "config-only");
  EXPECT_EQ(headers.source, "headers");
  EXPECT_EQ(derived.source, "config.json");
  ASSERT_EQ(headers.tensors.size(), derived.tensors.size());
  std::map<std::string, const model::TensorEntry*> by_name;
  for (const auto& t : derived.tensors) by_name[t.name] = &t;
  for (const auto& t : headers.tensors) {
    ASSERT_TRUE(by_name.count(t.name)) << t.name;
    EXPECT_EQ(by_name[t.name]->dtype, t.dtype) << t.name;
    EXPECT_EQ(by_name[t.name]->shape, t.shape) << t.name;
  }
}

TEST(Quantize, CommandLine) {
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
  ASSERT_EQ(run("quantize --help", &out, &err), 0) << err;
  for (const char* s : {"[MODEL]", "--out", "--experts", "--group-size INT=32", "--shard-size",
                        "--dense-dtype fp8|bf16"})
    EXPECT_NE(out.find(s), std::string::npos) << s << "\n" << out;
  const std::string model = fixture("v3_tiny");
  ASSERT_EQ(run("quantize " + model + " --out " + (d / "q") + " --experts int8 --shard-size 0.0005",
                &out, &err),
            0)
      << err;
  EXPECT_NE(out.find("quantized 192 expert matrices to int8 group 32"), std::string::npos) << out;
  EXPECT_NE(err.find("wrote model-00001-of-"), std::string::npos) << err;
  EXPECT_TRUE(fs::exists(d / "q/model.safetensors.index.json"));
  EXPECT_EQ(run("quantize " + model + " --out " + (d / "q") + " --experts int8", &out, &err), 1);
  EXPECT_NE(err.find("not empty"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_EQ(run("quantize " + model + " --out " + (d / "r") + " --experts int3", &out, &err), 1);
  EXPECT_NE(err.find("--experts"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_EQ(run("quantize " + model + " --out " + (d / "r") + " --experts int4 --group-size 20",
                &out, &err),
            1);
  EXPECT_NE(err.find("--group-size 20"), std::string::npos) << err;
  EXPECT_EQ(run("quantize " + model + " --experts int4", &out, &err), 1);
  EXPECT_NE(err.find("--out"), std::string::npos) << err;
  EXPECT_EQ(run("quantize " + model + " --out " + (d / "r") + " --experts int4 --dense-dtype f16",
                &out, &err),
            1);
  EXPECT_NE(err.find("--dense-dtype \"f16\""), std::string::npos) << err;
  // An fp8 input: its other fp8 matrices kept fp8 by default, or made bf16.
  write_fp8_model(d / "fp8");
  ASSERT_EQ(run("quantize " + (d / "fp8") + " --out " + (d / "m") + " --experts int4", &out, &err),
            0)
      << err;
  EXPECT_NE(out.find("kept 24 fp8 matrices fp8, converted 0"), std::string::npos) << out;
  ASSERT_EQ(
      run("quantize " + (d / "fp8") + " --out " + (d / "b") + " --experts int4 --dense-dtype bf16",
          &out, &err),
      0)
      << err;
  EXPECT_NE(out.find("kept 0 fp8 matrices fp8, converted 24"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(d / "r"));
}

// The "channel" strategy: one scale per row (weight_scale [rows, 1]). The int4 fixture with only
// the first group's scale of each row kept.
TEST(QuantizedConfig, ChannelStrategyLoads) {
  TempDir d;
  const std::string src = fixture("v3_tiny_int4");
  json cfg = read_json(src + "/config.json");
  json& w = cfg["quantization_config"]["config_groups"]["group_0"]["weights"];
  w["strategy"] = "channel";
  w["group_size"] = nullptr;
  std::ofstream(d / "config.json") << cfg.dump();
  {
    const model::WeightStore in(src);
    std::vector<model::SafeTensorsWriter::Entry> entries;
    for (const auto& [name, t] : in.all()) {
      std::vector<int64_t> shape = t->shape;
      if (name.size() > 13 && name.compare(name.size() - 13, 13, ".weight_scale") == 0)
        shape[1] = 1;
      entries.push_back({name, t->dtype, shape});
    }
    model::SafeTensorsWriter out(d / "model.safetensors", entries);
    for (const auto& [name, t] : in.all()) {
      if (name.size() > 13 && name.compare(name.size() - 13, 13, ".weight_scale") == 0) {
        const auto* s = static_cast<const uint16_t*>(t->data);
        for (int64_t r = 0; r < t->shape[0]; ++r) out.write_data(s + r * t->shape[1], 2);
      } else {
        out.write_data(t->data, t->nbytes);
      }
    }
    out.finish();
  }
  const Loaded orig(src), chan(d.path());
  EXPECT_EQ(chan.cfg.quant.group_size, 0);
  const std::string name = "model.layers.2.mlp.experts.5.gate_proj";
  const model::Weight& a = expert_matrix(orig.w, name);
  const model::Weight& b = expert_matrix(chan.w, name);
  ASSERT_EQ(b.group_size, 64);
  ASSERT_EQ(b.group_cols, 1);
  const auto* sa = static_cast<const uint16_t*>(a.group_scale);
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t c = 0; c < a.cols; ++c) {
      const float q = a.at(r, c) / bf16_to_f32(sa[r * a.group_cols + c / 32]);
      ASSERT_EQ(b.at(r, c), q * bf16_to_f32(sa[r * a.group_cols])) << r << ", " << c;
    }
  const std::vector<float> lc = forward_logits(d.path()), l4 = forward_logits(src);
  EXPECT_NE(lc, l4);
}

// Expert parallelism: a rank loads, and copies into its own memory, only its experts' packed
// weights and scales.
TEST(QuantizedFixtureEp, ARankHoldsOnlyItsExperts) {
  const std::string dir = fixture("v3_tiny_int4");
  const model::ModelConfig cfg = model::ModelConfig::load(dir);
  const model::WeightStore store(dir);
  ThreadPool pool(2);
  model::ModelWeights all = model::load_weights(store, cfg);
  model::ModelWeights half =
      model::load_weights(store, cfg, [](int64_t, int64_t e) { return e % 2 == 0; });
  EXPECT_FALSE(half.layers[1].moe.experts[1].present());
  ASSERT_TRUE(half.layers[1].moe.experts[2].present());
  EXPECT_EQ(half.layers[1].moe.experts[2].up.dtype, DType::Q4);
  const size_t full_bytes = model::make_resident(all, store, pool)->used();
  const size_t half_bytes = model::make_resident(half, store, pool)->used();
  // 3 MoE layers x 8 experts not held, each 3 matrices of 32 x 64: 1 KB packed + 128 B scales.
  const size_t expert = 3 * (32 * 64 / 2 + 32 * 2 * 2);
  EXPECT_EQ(model::routed_expert_bytes(half), expert);
  EXPECT_GE(full_bytes - half_bytes, 3 * 8 * expert);
  EXPECT_LE(full_bytes - half_bytes, 3 * 8 * (expert + 6 * 64));  // + each tensor's padding
}
