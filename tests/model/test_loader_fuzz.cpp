// Crafted checkpoints against the loader: variants of a small valid model (config values,
// safetensors header JSON, offsets, shapes, dtypes, padding, index files, links) must each be
// either loaded correctly (a forward pass runs and gives finite logits) or rejected with one
// line of moeserve::Error, never a crash, a hang, another exception or a sanitizer report.
// The cases found by hand are kept as named regression tests; LoaderFuzz.RandomVariants draws
// more from a fixed seed, within a time budget (MOESERVE_FUZZ_SEED and MOESERVE_FUZZ_CASES
// change the seed and the count for longer runs).
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <typeinfo>

#include "../test_util.h"
#include "core/thread_pool.h"
#include "model/init_model.h"
#include "model/model.h"
#include "model/quantize.h"

using namespace moeserve;
using moeserve::testing::read_file;
using moeserve::testing::TempDir;
using moeserve::testing::write_file;
using nlohmann::json;

namespace {

namespace fs = std::filesystem;

// A checkpoint as parts that the mutations edit, written out by write().
struct Checkpoint {
  json config;
  std::optional<std::string> config_text;  // replaces config.dump() when set
  json header;                             // the safetensors header
  std::string data;                        // its data section
  int pad = -1;  // spaces after the header JSON; -1: up to a multiple of 8, as writers do
  std::optional<uint64_t> header_len;  // the length field, when it should lie
  std::string trailing;                // bytes appended to the file
  std::optional<size_t> truncate;      // file cut to this many bytes
  std::string shard = "model.safetensors";
  std::optional<json> index;  // written as model.safetensors.index.json
  std::optional<std::string> index_text;
  std::function<void(const std::string& dir)> extra;  // links, FIFOs, other files
  std::string what;                                   // the mutations, for messages
};

void write(const Checkpoint& c, const std::string& dir) {
  fs::create_directories(dir);
  write_file(dir + "/config.json", c.config_text ? *c.config_text : c.config.dump(1));
  std::string h = c.header.is_discarded() ? "" : c.header.dump();
  if (c.pad < 0)
    while ((h.size() + 8) % 8) h.push_back(' ');
  else
    h.append(static_cast<size_t>(c.pad), ' ');
  const uint64_t len = c.header_len ? *c.header_len : h.size();
  std::string file(8, '\0');
  std::memcpy(file.data(), &len, 8);
  file += h + c.data + c.trailing;
  if (c.truncate && *c.truncate < file.size()) file.resize(*c.truncate);
  if (!c.shard.empty()) write_file(dir + "/" + c.shard, file);
  if (c.index_text)
    write_file(dir + "/model.safetensors.index.json", *c.index_text);
  else if (c.index)
    write_file(dir + "/model.safetensors.index.json", c.index->dump());
  if (c.extra) c.extra(dir);
}

// A small valid model (two layers: one dense, one MoE), as parts.
Checkpoint base_checkpoint(bool fp8) {
  model::ModelConfig c = model::preset_config("tiny");
  c.vocab_size = 64;
  c.hidden_size = 32;
  c.intermediate_size = 32;
  c.moe_intermediate_size = 16;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.q_lora_rank = 16;
  c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 8;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 8;
  c.n_routed_experts = 4;
  c.num_experts_per_tok = 2;
  c.n_group = 2;
  c.topk_group = 1;
  TempDir d;
  model::InitOptions o;
  o.seed = 3;
  o.fp8 = fp8;
  model::write_random_model(c, d.path(), o);
  Checkpoint k;
  k.config = json::parse(read_file(d / "config.json"));
  const std::string file = read_file(d / "model.safetensors");
  uint64_t len = 0;
  std::memcpy(&len, file.data(), 8);
  k.header = json::parse(file.substr(8, len));
  k.data = file.substr(8 + len);
  k.what = fp8 ? "fp8 base" : "bf16 base";
  return k;
}

const Checkpoint& base(bool fp8 = false) {
  static const Checkpoint bf16 = base_checkpoint(false), f8 = base_checkpoint(true);
  return fp8 ? f8 : bf16;
}

// The compressed-tensors int4 fixture (routed experts pack-quantized, group 32), as parts.
const Checkpoint& base_int4() {
  static const Checkpoint k = [] {
    const std::string dir = moeserve::testing::source_dir() + "/tests/fixtures/models/v3_tiny_int4";
    Checkpoint c;
    c.config = json::parse(read_file(dir + "/config.json"));
    const std::string file = read_file(dir + "/model.safetensors");
    uint64_t len = 0;
    std::memcpy(&len, file.data(), 8);
    c.header = json::parse(file.substr(8, len));
    c.data = file.substr(8 + len);
    c.what = "int4 base";
    return c;
  }();
  return k;
}

// The fp8 base through `quantize --experts int8 --group-size 16`: compressed-tensors
// mixed-precision, the routed experts int8 and the other fp8 matrices fp8 (float-quantized, with
// weight_scale), as parts.
const Checkpoint& base_mixed() {
  static const Checkpoint k = [] {
    TempDir d;
    write(base(true), d / "fp8");
    model::QuantizeOptions o;
    o.model = d / "fp8";
    o.out = d / "q";
    o.bits = 8;
    o.group_size = 16;
    ThreadPool pool(1);
    model::quantize_checkpoint(o, pool);
    Checkpoint c;
    c.config = json::parse(read_file(d / "q/config.json"));
    const std::string file = read_file(d / "q/model-00001-of-00001.safetensors");
    uint64_t len = 0;
    std::memcpy(&len, file.data(), 8);
    c.header = json::parse(file.substr(8, len));
    c.data = file.substr(8 + len);
    c.what = "mixed base";
    return c;
  }();
  return k;
}

struct Outcome {
  bool loaded = false;
  std::string error;          // when rejected
  std::vector<float> logits;  // when loaded: the last token's
};

// Loads the folder as generate does (or, `resident`, as serve does: the matrices copied out of
// the mapping) and, when that succeeds, runs one forward pass.
Outcome try_load(const std::string& dir, bool resident = false) {
  static ThreadPool pool(2);
  Outcome out;
  try {
    model::Model m(dir, pool);
    if (resident) m.prefault(false, true);
    const model::ModelConfig& c = m.config();
    const std::vector<int32_t> tokens = {1, 5, 9, 2};
    kv::KvPool kv(1, 16, c.num_hidden_layers, c.kv_cache_dim());
    std::vector<int32_t> blocks;
    EXPECT_TRUE(kv.allocate(1, &blocks));
    model::Batch b;
    b.tokens = tokens;
    b.seqs = {{0, 4, 0, blocks.data()}};
    b.logit_rows = {3};
    out.logits.resize(c.vocab_size);
    m.forward(b, kv, out.logits.data());
    out.loaded = true;
  } catch (const Error& e) {
    out.error = e.what();
  }
  // Anything else (another exception type) escapes to the test as a failure.
  return out;
}

// The property every variant must have. `finite`: when loaded, the logits must be finite (the
// weights' bytes are the base's, so NaN can only come from an accepted nonsense value).
void expect_sound(const Outcome& o, const std::string& what, bool finite) {
  if (o.loaded) {
    if (!finite) return;
    for (float v : o.logits)
      if (!std::isfinite(v)) {
        ADD_FAILURE() << what << ": loaded, but the logits are not finite";
        return;
      }
    return;
  }
  EXPECT_FALSE(o.error.empty()) << what << ": rejected with an empty message";
  EXPECT_EQ(o.error.find_first_of("\r\n"), std::string::npos)
      << what << ": the error is not one line: " << o.error;
  EXPECT_LT(o.error.size(), 1000u) << what << ": the error is too long: " << o.error;
}

// Writes `k` to a fresh folder and loads it.
Outcome load(const Checkpoint& k) {
  TempDir d;
  write(k, d / "m");
  return try_load(d / "m");
}

// Loads `k`, expects a one-line error containing every fragment.
void expect_rejected(const Checkpoint& k, std::initializer_list<std::string> fragments) {
  const Outcome o = load(k);
  ASSERT_FALSE(o.loaded) << k.what << ": loaded, expected an error";
  expect_sound(o, k.what, false);
  for (const auto& f : fragments)
    EXPECT_NE(o.error.find(f), std::string::npos) << "\"" << o.error << "\" lacks \"" << f << "\"";
}

Checkpoint with_config(const std::string& key, json v) {
  Checkpoint k = base();
  k.config[key] = std::move(v);
  k.what = "config " + key + " = " + k.config[key].dump();
  return k;
}

// Rewrites every header entry's data_offsets to pack the tensors in their current order
// (name order), copying their bytes: shapes or dtypes may then change sizes consistently.
// Entries without sound offsets are left as they are.
void repack(Checkpoint& k, const std::map<std::string, std::string>& new_bytes = {}) {
  std::string data;
  for (auto it = k.header.begin(); it != k.header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    json& e = it.value();
    std::string bytes;
    if (new_bytes.count(it.key())) {
      bytes = new_bytes.at(it.key());
    } else {
      if (!e.is_object() || !e.contains("data_offsets") || !e["data_offsets"].is_array() ||
          e["data_offsets"].size() != 2 || !e["data_offsets"][0].is_number_unsigned() ||
          !e["data_offsets"][1].is_number_unsigned())
        continue;
      const size_t b = e["data_offsets"][0], en = e["data_offsets"][1];
      if (b > en || en > k.data.size()) continue;
      bytes = k.data.substr(b, en - b);
    }
    e["data_offsets"] = {data.size(), data.size() + bytes.size()};
    data += bytes;
  }
  k.data = data;
}

const std::string kSecret = "SECRET-CONTENTS-must-not-show root:x:0:0";

}  // namespace

// ---- The cases of issue 16, kept as they were found. ----

TEST(LoaderRegression, BaseModelsLoad) {
  for (bool fp8 : {false, true}) {
    const Outcome o = load(base(fp8));
    ASSERT_TRUE(o.loaded) << o.error;
    expect_sound(o, base(fp8).what, true);
  }
}

TEST(LoaderRegression, HugeHeadCountWithZeroSizeTensors) {
  // 2^61 heads: the products heads * head_dim wrap to 0, which zero-size tensors matched.
  Checkpoint k = base();
  k.config["num_attention_heads"] = int64_t{1} << 61;
  std::map<std::string, std::string> empty;
  for (auto it = k.header.begin(); it != k.header.end(); ++it) {
    const std::string& n = it.key();
    if (n.find("q_b_proj.weight") != std::string::npos ||
        n.find("kv_b_proj.weight") != std::string::npos ||
        n.find("o_proj.weight") != std::string::npos) {
      it.value()["shape"] = {0, it.value()["shape"][1]};
      empty[n] = "";
    }
  }
  repack(k, empty);
  k.what = "2^61 heads, zero-size q_b/kv_b/o_proj";
  expect_rejected(k, {"num_attention_heads", "2305843009213693952"});
}

TEST(LoaderRegression, ShapeWhoseElementCountOverflows) {
  // [2^62 + 1, 256] of BF16 wrapped to 512 bytes.
  Checkpoint k = base();
  k.header["zz.overflow"] = {
      {"dtype", "BF16"}, {"shape", {(int64_t{1} << 62) + 1, 256}}, {"data_offsets", {0, 512}}};
  repack(k, {{"zz.overflow", std::string(512, '\0')}});
  k.what = "shape [2^62+1, 256] in 512 bytes";
  expect_rejected(k, {"zz.overflow", "64 bits"});
}

TEST(LoaderRegression, HugeLayerCountIsRejectedAtOnce) {
  const auto t0 = std::chrono::steady_clock::now();
  Checkpoint k = with_config("num_hidden_layers", int64_t{1} << 62);
  k.config["first_k_dense_replace"] = 0;  // every layer MoE: the old check looped over them all
  expect_rejected(k, {"num_hidden_layers"});
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
}

TEST(LoaderRegression, ValuesThatGaveNaNOrNonsense) {
  expect_rejected(with_config("rope_theta", -1), {"rope_theta"});
  expect_rejected(with_config("rope_theta", 0), {"rope_theta"});
  expect_rejected(with_config("rms_norm_eps", -1), {"rms_norm_eps"});
  expect_rejected(with_config("rms_norm_eps", 0), {"rms_norm_eps"});
  expect_rejected(with_config("rms_norm_eps", 1e-300), {"rms_norm_eps"});  // 0 as a float
  expect_rejected(with_config("max_position_embeddings", -5), {"max_position_embeddings"});
  expect_rejected(with_config("n_shared_experts", -1), {"n_shared_experts"});
  expect_rejected(with_config("n_routed_experts", -4), {"n_routed_experts"});
  expect_rejected(with_config("routed_scaling_factor", -2.5), {"routed_scaling_factor"});
  expect_rejected(with_config("eos_token_id", 64), {"eos_token_id", "vocabulary"});
  expect_rejected(with_config("bos_token_id", -7), {"bos_token_id"});
  expect_rejected(with_config("hidden_act", "gelu"), {"hidden_act", "gelu"});
  expect_rejected(with_config("attention_bias", true), {"attention_bias"});
  for (const auto& [key, v] :
       std::vector<std::pair<std::string, json>>{{"original_max_position_embeddings", 0},
                                                 {"original_max_position_embeddings", -3},
                                                 {"factor", 0.5},
                                                 {"beta_fast", -32},
                                                 {"beta_slow", 0},
                                                 {"mscale", -1},
                                                 {"mscale_all_dim", -0.5}}) {
    Checkpoint k = base();
    k.config["rope_scaling"][key] = v;
    k.what = "rope_scaling." + key + " = " + v.dump();
    expect_rejected(k, {key});
  }
  // Numbers beyond a double's range.
  Checkpoint k = base();
  k.config_text = k.config.dump();
  const std::string from = "\"rope_theta\":10000.0";
  ASSERT_NE(k.config_text->find(from), std::string::npos);
  k.config_text->replace(k.config_text->find(from), from.size(), "\"rope_theta\":1e400");
  k.what = "rope_theta 1e400";
  expect_rejected(k, {"config.json", "out of range"});
  // and in a header
  Checkpoint h = base();
  h.header["lm_head.weight"]["shape"][0] = 7;
  h.extra = [&](const std::string& dir) {
    std::string text = h.header.dump();
    text.replace(text.find("[7,"), 2, "[1e400");
    std::string f(8, '\0');
    const uint64_t n = text.size();
    std::memcpy(f.data(), &n, 8);
    write_file(dir + "/model.safetensors", f + text + h.data);
  };
  h.what = "shape 1e400";
  expect_rejected(h, {"not valid JSON", "out of range"});
}

TEST(LoaderRegression, MetadataMustBeAnObjectOfStrings) {
  for (const json& m : {json::array({"a"}), json(5), json{{"format", 1}}}) {
    Checkpoint k = base();
    k.header["__metadata__"] = m;
    k.what = "__metadata__ " + m.dump();
    expect_rejected(k, {"__metadata__"});
  }
  Checkpoint k = base();
  k.header["__metadata__"] = {{"format", "pt"}, {"note", "anything"}};
  const Outcome o = load(k);
  EXPECT_TRUE(o.loaded) << o.error;
}

TEST(LoaderRegression, QuantizationMustMatchTheWeights) {
  Checkpoint k = base(false);
  k.config["quantization_config"] = base(true).config["quantization_config"];
  k.what = "fp8 declared on bf16 weights";
  expect_rejected(k, {"fp8", "F8_E4M3"});
  Checkpoint r = base(true);
  r.config.erase("quantization_config");
  r.what = "fp8 weights, no quantization_config";
  expect_rejected(r, {"F8_E4M3", "quantization_config"});
}

TEST(LoaderRegression, TiedEmbeddingsAreRefused) {
  for (bool drop_head : {false, true}) {
    Checkpoint k = with_config("tie_word_embeddings", true);
    if (drop_head) {
      k.header.erase("lm_head.weight");
      repack(k);
    }
    expect_rejected(k, {"tie_word_embeddings"});
  }
}

TEST(LoaderRegression, IndexShardsStayInsideTheModelFolder) {
  TempDir outside;
  write_file(outside / "secret", kSecret);
  auto with_index = [&](const std::string& shard_name) {
    Checkpoint k = base();
    json wm = json::object();
    for (auto it = k.header.begin(); it != k.header.end(); ++it)
      if (it.key() != "__metadata__") wm[it.key()] = "model-00001-of-00001.safetensors";
    wm["model.norm.weight"] = shard_name;
    k.shard = "model-00001-of-00001.safetensors";
    k.index = json{{"weight_map", wm}};
    k.what = "index names " + shard_name;
    return k;
  };
  auto expect_confined = [&](const Checkpoint& k, const std::string& fragment) {
    TempDir d;
    write_file(d / "secret", kSecret);
    write(k, d / "m");
    const Outcome o = try_load(d / "m");
    ASSERT_FALSE(o.loaded) << k.what;
    expect_sound(o, k.what, false);
    EXPECT_NE(o.error.find(fragment), std::string::npos) << o.error;
    EXPECT_EQ(o.error.find("SECRET"), std::string::npos) << "leaks the file: " << o.error;
  };
  expect_confined(with_index("../secret"), "out of the model folder");
  expect_confined(with_index("../../../../../../../../etc/passwd"), "out of the model folder");
  expect_confined(with_index("/etc/passwd"), "absolute path");
  expect_confined(with_index(outside / "secret"), "absolute path");
  Checkpoint link = with_index("link.safetensors");
  link.extra = [&](const std::string& dir) {
    fs::create_symlink(outside / "secret", dir + "/link.safetensors");
  };
  expect_confined(link, "leads out of the model folder");
  // Without an index, a *.safetensors link that leads out is refused too.
  Checkpoint plain = base();
  plain.shard = "a.safetensors";
  plain.extra = [&](const std::string& dir) {
    fs::create_symlink(outside / "secret", dir + "/b.safetensors");
  };
  expect_confined(plain, "leads out of the model folder");
  // A link inside the folder, and a path through a subfolder, are fine.
  Checkpoint inner = with_index("sub/../model-00001-of-00001.safetensors");
  expect_confined(inner, "out of the model folder");  // ".." is refused even when it comes back
  Checkpoint ok = with_index("model-00001-of-00001.safetensors");
  ok.extra = [&](const std::string& dir) {
    fs::create_directory(dir + "/sub");
    fs::rename(dir + "/model-00001-of-00001.safetensors", dir + "/sub/real.safetensors");
    fs::create_symlink("sub/real.safetensors", dir + "/model-00001-of-00001.safetensors");
  };
  const Outcome o = load(ok);
  EXPECT_TRUE(o.loaded) << o.error;
}

TEST(LoaderRegression, HuggingFaceCacheSnapshotLinksIntoBlobs) {
  // <repo>/snapshots/<rev>/model.safetensors -> ../../blobs/<hash>, as the hub's cache lays out.
  TempDir d;
  const std::string snap = d / "models--x--y/snapshots/abc";
  write(base(), snap);
  fs::create_directories(d / "models--x--y/blobs");
  fs::rename(snap + "/model.safetensors", d / "models--x--y/blobs/0123");
  fs::create_symlink("../../blobs/0123", snap + "/model.safetensors");
  const Outcome o = try_load(snap);
  EXPECT_TRUE(o.loaded) << o.error;
}

TEST(LoaderRegression, ConfigErrorsDoNotShowAnotherFile) {
  TempDir d;
  write(base(), d / "m");
  write_file(d / "secret", kSecret);
  fs::remove(d / "m/config.json");
  fs::create_symlink(d / "secret", d / "m/config.json");
  const Outcome o = try_load(d / "m");
  ASSERT_FALSE(o.loaded);
  expect_sound(o, "config.json linked to another file", false);
  EXPECT_NE(o.error.find("not valid JSON"), std::string::npos) << o.error;
  EXPECT_EQ(o.error.find("SECRET"), std::string::npos) << o.error;
  EXPECT_EQ(o.error.find("root"), std::string::npos) << o.error;
}

TEST(LoaderRegression, UnpaddedHeaderLoadsTheSameModel) {
  // A header not padded to 8 bytes leaves every tensor unaligned: the loader copies them, and
  // the model computes exactly what the padded file gives.
  const Outcome want = load(base());
  ASSERT_TRUE(want.loaded) << want.error;
  for (int pad : {0, 1, 3, 5}) {
    Checkpoint k = base();
    k.pad = pad;
    const size_t h = k.header.dump().size() + static_cast<size_t>(pad);
    if ((h + 8) % 8 == 0) continue;
    k.what = "header padded with " + std::to_string(pad) + " spaces";
    TempDir d;
    write(k, d / "m");
    const model::WeightStore store(d / "m");
    for (const auto& [name, t] : store.all())
      EXPECT_EQ(reinterpret_cast<uintptr_t>(t->data) % dtype_size(t->dtype), 0u) << name;
    for (bool resident : {false, true}) {
      const Outcome o = try_load(d / "m", resident);
      ASSERT_TRUE(o.loaded) << k.what << ": " << o.error;
      EXPECT_EQ(o.logits, want.logits) << k.what << (resident ? ", resident" : "");
    }
  }
}

TEST(LoaderRegression, SpecRulesOfTheHeader) {
  {
    Checkpoint k = base();
    k.trailing = "junk";
    k.what = "bytes after the last tensor";
    expect_rejected(k, {"belong to no tensor"});
  }
  {
    Checkpoint k = base();
    const size_t end = k.header["lm_head.weight"]["data_offsets"][1];
    k.header["lm_head.weight"]["data_offsets"] = {end, end + 4096};  // moved past a hole
    k.data += std::string(4096, '\0');
    k.what = "a hole before a tensor";
    expect_rejected(k, {"belong to no tensor"});
  }
  {
    Checkpoint k = base();
    k.header_len = uint64_t{1} << 40;
    k.what = "header length past the end";
    expect_rejected(k, {"header claims more bytes than the file has"});
  }
  {
    Checkpoint k = base();
    k.config_text.reset();
    k.pad = 0;
    k.header = json::object();
    k.data.clear();
    k.what = "header of leading spaces";
    k.extra = [](const std::string& dir) {
      std::string h = "   {}";
      std::string f(8, '\0');
      const uint64_t n = h.size();
      std::memcpy(f.data(), &n, 8);
      write_file(dir + "/model.safetensors", f + h);
    };
    expect_rejected(k, {"does not start with '{'"});
  }
  {
    Checkpoint k = base();
    k.shard = "";
    k.extra = [](const std::string& dir) { ::mkfifo((dir + "/model.safetensors").c_str(), 0600); };
    k.what = "a FIFO named model.safetensors";
    expect_rejected(k, {"not a regular file"});
  }
}

TEST(LoaderRegression, DeeplyNestedValues) {
  // Written as text (building them as json values would copy them recursively).
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  auto header_with = [&](const std::string& from, const std::string& to) {
    Checkpoint k = base();
    k.extra = [&, from, to](const std::string& dir) {
      std::string text = base().header.dump();
      ASSERT_NE(text.find(from), std::string::npos);
      text.replace(text.find(from), from.size(), to);
      std::string f(8, '\0');
      const uint64_t n = text.size();
      std::memcpy(f.data(), &n, 8);
      write_file(dir + "/model.safetensors", f + text + base().data);
    };
    k.what = "nested " + from;
    return k;
  };
  expect_rejected(header_with("\"__metadata__\":{\"format\":\"pt\"}", "\"__metadata__\":" + deep),
                  {"__metadata__"});
  expect_rejected(header_with("\"dtype\":\"BF16\"", "\"dtype\":" + deep), {"malformed"});
  Checkpoint k = base();
  k.shard = "model-00001-of-00001.safetensors";
  k.index_text = "{\"weight_map\": {\"lm_head.weight\": " + deep + "}}";
  k.what = "nested index entry";
  expect_rejected(k, {"not a string"});
}

// ---- compressed-tensors pack-quantized checkpoints (issue 17). ----

namespace {
const std::string kExpert = "model.layers.1.mlp.experts.0.gate_proj";  // [32, 64], int4

std::string i64_pair(int64_t a, int64_t b) {
  std::string s(16, '\0');
  std::memcpy(s.data(), &a, 8);
  std::memcpy(s.data() + 8, &b, 8);
  return s;
}
}  // namespace

TEST(QuantizedLoader, BaseLoads) {
  const Outcome o = load(base_int4());
  ASSERT_TRUE(o.loaded) << o.error;
  expect_sound(o, "int4 base", true);
  // And as serve loads it: the matrices and their group scales copied out of the mapping.
  TempDir d;
  write(base_int4(), d / "m");
  const Outcome r = try_load(d / "m", true);
  ASSERT_TRUE(r.loaded) << r.error;
  EXPECT_EQ(r.logits, o.logits);
}

TEST(QuantizedLoader, WeightShapeMustMatch) {
  Checkpoint k = base_int4();
  repack(k, {{kExpert + ".weight_shape", i64_pair(32, 96)}});
  k.what = "weight_shape [32, 96]";
  expect_rejected(k, {kExpert + ".weight_shape", "[32, 96]", "expected [32, 64]"});
  k = base_int4();
  k.header[kExpert + ".weight_shape"]["shape"] = {3};
  repack(k, {{kExpert + ".weight_shape", i64_pair(32, 64) + std::string(8, '\0')}});
  k.what = "weight_shape of 3";
  expect_rejected(k, {kExpert + ".weight_shape", "[2]"});
}

TEST(QuantizedLoader, WeightShapeMayBeI32) {
  Checkpoint k = base_int4();
  k.header[kExpert + ".weight_shape"]["dtype"] = "I32";
  std::string b(8, '\0');
  const int32_t v[2] = {32, 64};
  std::memcpy(b.data(), v, 8);
  repack(k, {{kExpert + ".weight_shape", b}});
  k.what = "weight_shape I32";
  const Outcome o = load(k);
  ASSERT_TRUE(o.loaded) << o.error;
  EXPECT_EQ(o.logits, load(base_int4()).logits);
}

TEST(QuantizedLoader, PackedAndScaleShapesAndDtypes) {
  Checkpoint k = base_int4();
  k.header[kExpert + ".weight_packed"]["shape"] = {32, 4};
  repack(k, {{kExpert + ".weight_packed", std::string(32 * 4 * 4, '\x11')}});
  k.what = "weight_packed [32, 4]";
  expect_rejected(k, {kExpert + ".weight_packed", "[32, 4]", "[32, 8]"});
  k = base_int4();
  k.header[kExpert + ".weight_packed"]["dtype"] = "F32";
  k.what = "weight_packed F32";
  expect_rejected(k, {kExpert + ".weight_packed", "F32", "expected I32"});
  k = base_int4();
  k.header[kExpert + ".weight_scale"]["shape"] = {32, 1};
  repack(k, {{kExpert + ".weight_scale", std::string(64, '\0')}});
  k.what = "weight_scale [32, 1]";
  expect_rejected(k, {kExpert + ".weight_scale", "[32, 1]", "[32, 2]"});
  k = base_int4();
  k.header[kExpert + ".weight_scale"]["dtype"] = "I16";
  k.what = "weight_scale I16";
  expect_rejected(k, {kExpert + ".weight_scale"});
  k = base_int4();
  k.header[kExpert + ".weight_scale"]["dtype"] = "I32";
  repack(k, {{kExpert + ".weight_scale", std::string(32 * 2 * 4, '\0')}});
  k.what = "weight_scale I32";
  expect_rejected(k, {kExpert + ".weight_scale", "I32", "BF16, F16, F32"});
}

TEST(QuantizedLoader, AsymmetricIsRefused) {
  Checkpoint k = base_int4();
  k.header[kExpert + ".weight_zero_point"] = {{"dtype", "I32"}, {"shape", {1, 2}}};
  repack(k, {{kExpert + ".weight_zero_point", std::string(8, '\0')}});
  k.what = "weight_zero_point";
  expect_rejected(k, {kExpert + ".weight_zero_point", "asymmetric"});
  k = base_int4();
  k.config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = false;
  k.what = "symmetric false";
  expect_rejected(k, {"asymmetric"});
}

TEST(QuantizedLoader, StorageMustMatchTheIgnoreList) {
  // A quantized module the ignore list names.
  Checkpoint k = base_int4();
  k.config["quantization_config"]["ignore"].push_back("re:.*experts\\.0\\.gate_proj$");
  k.what = "expert 0 ignored";
  expect_rejected(k, {kExpert + ".weight_packed", "ignores module"});
  // A module the config quantizes, stored unquantized.
  k = base_int4();
  for (const char* p : {".weight_packed", ".weight_scale", ".weight_shape"})
    k.header.erase(kExpert + p);
  k.header[kExpert + ".weight"] = {{"dtype", "BF16"}, {"shape", {32, 64}}};
  repack(k, {{kExpert + ".weight", std::string(32 * 64 * 2, '\0')}});
  k.what = "expert stored bf16";
  expect_rejected(k, {kExpert + ".weight_packed", "is missing", "stores it unquantized"});
  // An attention matrix the ignore list no longer names.
  k = base_int4();
  k.config["quantization_config"]["ignore"].erase(1);  // "re:.*self_attn.*"
  k.what = "attention not ignored";
  expect_rejected(k, {"self_attn", "weight_packed", "is missing"});
  // No quantization_config: the experts' .weight is looked for.
  k = base_int4();
  k.config.erase("quantization_config");
  k.what = "no quantization_config";
  expect_rejected(k, {"experts", ".weight", "missing"});
}

// A mixed-precision checkpoint: its fp8 matrices read as the fp8 base's (the same bytes and
// scales), and damage to the fp8 group's tensors or config is one clear error.
TEST(QuantizedLoader, MixedFp8Group) {
  const Outcome o = load(base_mixed());
  ASSERT_TRUE(o.loaded) << o.error;
  expect_sound(o, "mixed base", true);
  const std::string m = "model.layers.0.self_attn.o_proj";
  Checkpoint k = base_mixed();
  k.header[m + ".weight_scale_inv"] = k.header[m + ".weight_scale"];
  k.header.erase(m + ".weight_scale");
  k.what = "weight_scale named weight_scale_inv";
  expect_rejected(k, {m + ".weight_scale", "missing"});
  k = base_mixed();
  k.header[m + ".weight_scale"]["shape"] = {2, 1};
  repack(k, {{m + ".weight_scale", std::string(8, '\0')}});
  k.what = "weight_scale [2, 1]";
  expect_rejected(k, {m + ".weight_scale", "[2, 1]"});
  k = base_mixed();
  k.header[m + ".weight"]["dtype"] = "I8";
  k.what = "fp8 weight as I8";
  expect_rejected(k, {m + ".weight", "I8", "as fp8"});
  k = base_mixed();
  k.config["quantization_config"]["config_groups"]["group_1"]["weights"]["block_structure"] = {128,
                                                                                               64};
  k.what = "block_structure [128, 64]";
  expect_rejected(k, {"block_structure", "[128,64]"});
}

TEST(QuantizedLoader, QuantizedKvBProjIsRefused) {
  Checkpoint k = base_int4();
  const std::string m = "model.layers.0.self_attn.kv_b_proj";  // [256, 32]
  k.header.erase(m + ".weight");
  k.header[m + ".weight_packed"] = {{"dtype", "I32"}, {"shape", {256, 4}}};
  k.header[m + ".weight_scale"] = {{"dtype", "BF16"}, {"shape", {256, 1}}};
  k.header[m + ".weight_shape"] = {{"dtype", "I64"}, {"shape", {2}}};
  repack(k, {{m + ".weight_packed", std::string(256 * 4 * 4, '\x77')},
             {m + ".weight_scale", std::string(256 * 2, '\0')},
             {m + ".weight_shape", i64_pair(256, 32)}});
  k.config["quantization_config"]["ignore"][1] = "re:.*self_attn\\.(?!kv_b_proj).*";
  k.what = "kv_b_proj int4";
  expect_rejected(k, {m + ".weight_packed", "kv_b_proj is not supported"});
}

TEST(QuantizedLoader, BitsMustMatchThePacking) {
  Checkpoint k = base_int4();
  k.config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8;
  k.what = "num_bits 8 on int4 data";
  expect_rejected(k, {"weight_packed", "has shape"});
  k = base_int4();
  k.config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 2;
  k.what = "num_bits 2";
  expect_rejected(k, {"num_bits 2"});
  k = base_int4();
  k.config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64;
  k.what = "group_size 64";
  expect_rejected(k, {"weight_scale", "has shape"});
}

// ---- Random variants from a fixed seed. ----

namespace {

// Values a crafted config or header may hold in place of a number.
json odd_value(std::mt19937_64& rng) {
  static const std::vector<json> pool = {
      0,
      -1,
      1,
      2,
      3,
      7,
      64,
      4097,
      int64_t{1} << 31,
      int64_t{1} << 32,
      int64_t{1} << 61,
      int64_t{1} << 62,
      INT64_MAX,
      INT64_MIN,
      uint64_t{1} << 63,
      UINT64_MAX,
      0.5,
      -0.0,
      1e-300,
      1e300,
      -1e300,
      "12",
      "",
      nullptr,
      true,
      json::array(),
      json::array({1, 2}),
      json::object(),
      json{{"a", 1}},
  };
  return pool[rng() % pool.size()];
}

const std::vector<std::string> kConfigInts = {"vocab_size",
                                              "hidden_size",
                                              "intermediate_size",
                                              "moe_intermediate_size",
                                              "num_hidden_layers",
                                              "num_attention_heads",
                                              "q_lora_rank",
                                              "kv_lora_rank",
                                              "qk_nope_head_dim",
                                              "qk_rope_head_dim",
                                              "v_head_dim",
                                              "n_routed_experts",
                                              "n_shared_experts",
                                              "num_experts_per_tok",
                                              "n_group",
                                              "topk_group",
                                              "first_k_dense_replace",
                                              "moe_layer_freq",
                                              "max_position_embeddings",
                                              "bos_token_id",
                                              "eos_token_id"};
const std::vector<std::string> kConfigOther = {
    "routed_scaling_factor", "rms_norm_eps",        "rope_theta", "norm_topk_prob",
    "scoring_func",          "topk_method",         "model_type", "tie_word_embeddings",
    "rope_scaling",          "quantization_config", "hidden_act", "attention_bias",
    "rope_parameters"};
const std::vector<std::string> kRopeKeys = {"type",
                                            "factor",
                                            "beta_fast",
                                            "beta_slow",
                                            "mscale",
                                            "mscale_all_dim",
                                            "original_max_position_embeddings"};
const std::vector<std::string> kDtypes = {"F32", "F16", "BF16", "F8_E4M3", "I64", "I32",
                                          "U8",  "F64", "BOOL", "I8",      "",    "bf16"};

std::string pick_tensor(const Checkpoint& k, std::mt19937_64& rng) {
  std::vector<std::string> names;
  for (auto it = k.header.begin(); it != k.header.end(); ++it)
    if (it.key() != "__metadata__" && it.value().is_object()) names.push_back(it.key());
  return names.empty() ? "" : names[rng() % names.size()];
}

// What an accepted variant must compute: the base model's logits (the same tensors, framed
// differently), finite logits (config values changed, the weights' bytes keep their meaning),
// or anything that does not crash (the bytes are read another way).
enum Effect { kSame, kFinite, kAny };

// One mutation of `k`.
Effect mutate(Checkpoint& k, std::mt19937_64& rng) {
  auto note = [&](const std::string& s) { k.what += "; " + s; };
  switch (rng() % 14) {
    case 0: {  // an integer field of config.json
      const std::string key = kConfigInts[rng() % kConfigInts.size()];
      const int64_t old = k.config.contains(key) && k.config[key].is_number_integer()
                              ? k.config[key].get<int64_t>()
                              : 0;
      json v = rng() % 3 ? odd_value(rng) : json(old + static_cast<int64_t>(rng() % 5) - 2);
      k.config[key] = v;
      note(key + " = " + v.dump());
      return kFinite;
    }
    case 1: {  // another field of config.json
      const std::string key = kConfigOther[rng() % kConfigOther.size()];
      json v = odd_value(rng);
      if (rng() % 2)
        k.config.erase(key), note("no " + key);
      else
        k.config[key] = v, note(key + " = " + v.dump());
      return kFinite;
    }
    case 2: {  // rope_scaling
      const std::string key = kRopeKeys[rng() % kRopeKeys.size()];
      if (!k.config["rope_scaling"].is_object()) k.config["rope_scaling"] = json::object();
      json v = odd_value(rng);
      k.config["rope_scaling"][key] = v;
      note("rope_scaling." + key + " = " + v.dump());
      return kFinite;
    }
    case 3: {  // a required field removed
      const std::string key = kConfigInts[rng() % kConfigInts.size()];
      k.config.erase(key);
      note("no " + key);
      return kFinite;
    }
    case 4: {  // a dtype
      const std::string t = pick_tensor(k, rng), dt = kDtypes[rng() % kDtypes.size()];
      if (t.empty()) return kAny;
      k.header[t]["dtype"] = dt;
      note(t + " dtype " + dt);
      return kAny;
    }
    case 5: {  // one dimension of a shape
      const std::string t = pick_tensor(k, rng);
      if (t.empty() || !k.header[t]["shape"].is_array()) return kAny;
      json& shape = k.header[t]["shape"];
      json v = rng() % 2 ? odd_value(rng) : json(int64_t{1} << (rng() % 63));
      if (shape.empty() || rng() % 4 == 0)
        shape.push_back(v);
      else
        shape[rng() % shape.size()] = v;
      note(t + " shape " + shape.dump());
      return kAny;
    }
    case 6: {  // a shape reshaped with the same element count (accepted by the file, not the
               // model)
      const std::string t = pick_tensor(k, rng);
      if (t.empty() || !k.header[t]["shape"].is_array()) return kAny;
      json& shape = k.header[t]["shape"];
      int64_t n = 1;
      for (const auto& d : shape) {
        if (!d.is_number_unsigned() || d.get<uint64_t>() > (1u << 20)) return kAny;
        n *= d.get<int64_t>();
      }
      shape = rng() % 2 ? json::array({n}) : json::array({1, n});
      note(t + " reshaped " + shape.dump());
      return kAny;
    }
    case 7: {  // data_offsets
      const std::string t = pick_tensor(k, rng);
      if (t.empty() || !k.header[t]["data_offsets"].is_array() ||
          k.header[t]["data_offsets"].size() != 2 || !k.header[t]["data_offsets"][0].is_number() ||
          !k.header[t]["data_offsets"][1].is_number())
        return kAny;
      json& off = k.header[t]["data_offsets"];
      const int i = static_cast<int>(rng() % 2);
      switch (rng() % 4) {
        case 0:
          off[i] = odd_value(rng);
          break;
        case 1:
          off[i] = off[i].get<double>() + static_cast<double>(rng() % 9) - 4;
          break;
        case 2:
          off = json::array({off[1], off[0]});
          break;
        default:
          off.push_back(0);
          break;
      }
      note(t + " data_offsets " + off.dump());
      return kAny;
    }
    case 8: {  // an entry removed, renamed, or made malformed
      const std::string t = pick_tensor(k, rng);
      if (t.empty()) return kAny;
      json e = k.header[t];
      k.header.erase(t);
      if (rng() % 3 == 0) {
        k.header[t + ".x"] = e;
        note(t + " renamed");
      } else if (rng() % 2) {
        k.header[t] = odd_value(rng);
        note(t + " entry " + k.header[t].dump());
      } else {
        repack(k);
        note(t + " removed");
      }
      return kAny;
    }
    case 9: {  // __metadata__
      json v = rng() % 2 ? odd_value(rng) : json{{"format", odd_value(rng)}};
      k.header["__metadata__"] = v;
      note("__metadata__ " + v.dump());
      return kSame;
    }
    case 10: {  // the framing: length field, padding, truncation, trailing bytes
      switch (rng() % 5) {
        case 0:
          k.header_len =
              static_cast<uint64_t>(k.header.dump().size()) + static_cast<uint64_t>(rng() % 17) - 8;
          note("header length " + std::to_string(*k.header_len));
          break;
        case 1:
          k.header_len = rng() % 2 ? rng() : uint64_t{1} << (rng() % 64);
          note("header length " + std::to_string(*k.header_len));
          break;
        case 2:
          k.pad = static_cast<int>(rng() % 8);
          note("padding " + std::to_string(k.pad));
          return kSame;  // the same tensors, unaligned: must load correctly
        case 3:
          k.truncate = rng() % (k.header.dump().size() + k.data.size() + 8);
          note("truncated to " + std::to_string(*k.truncate));
          break;
        default:
          k.trailing = std::string(1 + rng() % 16, 'x');
          note("trailing bytes");
          break;
      }
      return kAny;
    }
    case 11: {  // an index file
      json wm = json::object();
      for (auto it = k.header.begin(); it != k.header.end(); ++it)
        if (it.key() != "__metadata__") wm[it.key()] = "model-00001-of-00001.safetensors";
      k.shard = "model-00001-of-00001.safetensors";
      const std::string t = pick_tensor(k, rng);
      if (t.empty()) return kAny;
      static const std::vector<json> names = {"../model-00001-of-00001.safetensors",
                                              "/etc/passwd",
                                              "../../../../etc/passwd",
                                              "./model-00001-of-00001.safetensors",
                                              "missing.safetensors",
                                              "",
                                              ".",
                                              "sub",
                                              std::string("a\0b", 3),
                                              5,
                                              nullptr,
                                              json::array()};
      switch (rng() % 4) {
        case 0:
          wm[t] = names[rng() % names.size()];
          break;
        case 1:
          wm["not.a.tensor"] = "model-00001-of-00001.safetensors";
          break;
        case 2:
          wm.erase(t);
          break;
        default:
          break;
      }
      k.index = rng() % 8 ? json{{"weight_map", wm}} : odd_value(rng);
      if (rng() % 8 == 0) k.index_text = "{\"weight_map\": {\"a\": ";
      note("index " + (k.index_text ? *k.index_text : k.index->dump()).substr(0, 80));
      return kAny;
    }
    case 12: {  // raw damage to the header text
      std::string h = k.header.dump();
      const size_t at = rng() % h.size();
      static const char kBytes[] = "{}[]\",:0-e.\\\x80\xff ";
      h[at] = kBytes[rng() % (sizeof kBytes - 1)];
      json parsed = json::parse(h, nullptr, false);
      if (parsed.is_discarded() || !parsed.is_object()) {
        // Keep the damaged text: written through extra, with a matching length field.
        k.extra = [h, data = k.data, shard = k.shard](const std::string& dir) {
          std::string f(8, '\0');
          const uint64_t n = h.size();
          std::memcpy(f.data(), &n, 8);
          write_file(dir + "/" + shard, f + h + data);
        };
      } else {
        k.header = parsed;
      }
      note("header byte " + std::to_string(at) + " changed");
      return kAny;
    }
    default: {  // quantization declared or removed
      if (k.config.contains("quantization_config"))
        k.config.erase("quantization_config"), note("no quantization_config");
      else
        k.config["quantization_config"] = base(true).config["quantization_config"],
        note("fp8 declared");
      return kAny;
    }
  }
}

}  // namespace

TEST(LoaderFuzz, RandomVariants) {
  uint64_t seed = 16;
  int cases = 600;
  if (const char* s = std::getenv("MOESERVE_FUZZ_SEED")) seed = std::stoull(s);
  if (const char* s = std::getenv("MOESERVE_FUZZ_CASES")) cases = std::stoi(s);
  std::mt19937_64 rng(seed);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(25);
  TempDir d;
  // Bases: 0 bf16, 1 fp8, 2 compressed-tensors int4, 3 compressed-tensors int8 + fp8.
  auto base_of = [](int b) -> const Checkpoint& {
    return b == 3 ? base_mixed() : b == 2 ? base_int4() : base(b == 1);
  };
  std::vector<float> base_logits[4];
  for (int b : {0, 1, 2, 3}) {
    const Outcome o = load(base_of(b));
    ASSERT_TRUE(o.loaded) << o.error;
    base_logits[b] = o.logits;
  }
  int loaded = 0, rejected = 0, ran = 0, same = 0;
  for (int i = 0; i < cases && std::chrono::steady_clock::now() < deadline; ++i, ++ran) {
    const uint64_t pick = rng() % 10;
    const int b = pick < 2 ? 1 : pick < 4 ? 2 : pick < 6 ? 3 : 0;
    Checkpoint k = base_of(b);
    k.what += " #" + std::to_string(i);
    Effect effect = kSame;
    const int n = 1 + static_cast<int>(rng() % 3);
    for (int j = 0; j < n; ++j) effect = std::max(effect, mutate(k, rng));
    const std::string dir = d / ("c" + std::to_string(i));
    write(k, dir);
    Outcome o;
    try {
      o = try_load(dir);
    } catch (const std::exception& e) {
      ADD_FAILURE() << k.what << ": threw " << typeid(e).name() << ": " << e.what();
      continue;
    }
    expect_sound(o, k.what, effect != kAny);
    if (o.loaded && effect == kSame) {
      EXPECT_EQ(o.logits, base_logits[b]) << k.what << ": loaded another model";
      ++same;
    }
    (o.loaded ? loaded : rejected) += 1;
    fs::remove_all(dir);
  }
  std::printf("seed %llu: %d variants, %d loaded (%d checked equal to the base), %d rejected\n",
              static_cast<unsigned long long>(seed), ran, loaded, same, rejected);
  EXPECT_GT(rejected, ran / 2);  // most damage is caught
  EXPECT_GT(loaded, 0);          // and harmless variants still load
}
