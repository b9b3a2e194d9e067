#include "model/inspect.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "core/checked.h"
#include "core/error.h"
#include "core/json_file.h"

namespace moeserve::model {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Element sizes of the safetensors dtypes (0: unknown).
uint64_t elem_size(const std::string& d) {
  static const std::map<std::string, uint64_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8}};
  auto it = sizes.find(d);
  return it == sizes.end() ? 0 : it->second;
}

uint64_t numel(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

// The by-dtype row and parameter count of a tensor, from its name and dtype.
void describe(TensorEntry& t, const Quantization& q) {
  const uint64_t n = numel(t.shape);
  if (t.name.ends_with("_scale_inv") ||
      (t.name.ends_with(".weight_scale") && q.kind == Quantization::Kind::PackQuantized &&
       q.storage(t.name.substr(0, t.name.size() - 13)) == Storage::Fp8)) {
    t.kind = t.dtype + " block scales";
    t.params = 0;
  } else if (t.name.ends_with(".weight_scale") || t.name.ends_with(".weight_zero_point")) {
    t.kind = t.dtype + " group scales";
    t.params = 0;
  } else if (t.name.ends_with(".weight_shape")) {
    t.kind = t.dtype + " shapes";
    t.params = 0;
  } else if (t.name.ends_with(".weight_packed")) {
    const uint64_t bits = elem_size(t.dtype) * 8;
    const uint64_t per = bits && q.num_bits > 0 ? bits / static_cast<uint64_t>(q.num_bits) : 1;
    t.kind = "int" + std::to_string(q.num_bits) + " (packed " + t.dtype + ")";
    t.params = n * per;
  } else {
    t.kind = t.dtype;
    t.params = n;
  }
}

TensorEntry entry(const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
                  const Quantization& q) {
  TensorEntry t;
  t.name = name;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.bytes = numel(t.shape) * elem_size(dtype);
  describe(t, q);
  return t;
}

std::string torch_dtype_name(const json& j) {
  if (!j.contains("torch_dtype") || !j["torch_dtype"].is_string()) return "BF16";
  const std::string s = j["torch_dtype"];
  if (s == "float16") return "F16";
  if (s == "float32") return "F32";
  return "BF16";
}

// One safetensors header, read without touching the data section.
struct Header {
  std::vector<TensorEntry> tensors;
  bool complete = true;  // the file holds every byte its header describes
};

Header read_header(const std::string& path, const Quantization& q) {
  std::error_code ec;
  MS_CHECK(fs::is_regular_file(path, ec), path, " is not a regular file");
  const uint64_t size = fs::file_size(path, ec);
  MS_CHECK(!ec, "cannot stat ", path, ": ", ec.message());
  std::FILE* f = std::fopen(path.c_str(), "rb");
  MS_CHECK(f, "cannot open ", path, ": ", std::strerror(errno));
  struct Closer {
    std::FILE* f;
    ~Closer() { std::fclose(f); }
  } closer{f};
  uint64_t len = 0;
  MS_CHECK(size >= 8 && std::fread(&len, 8, 1, f) == 1, path,
           " is not a safetensors file: shorter than its 8-byte header");
  MS_CHECK(len <= size - 8, path,
           " is truncated or not a safetensors file: its header claims more bytes than the file "
           "has (",
           size, ")");
  MS_CHECK(len >= 2 && len <= kMaxHeaderBytes, path,
           " is not a safetensors file: header length out of range");
  std::string text(len, '\0');
  MS_CHECK(std::fread(text.data(), 1, len, f) == len, "cannot read the header of ", path);
  json h;
  try {
    h = json::parse(text);
  } catch (const json::exception&) {
    fail(path, ": safetensors header is not valid JSON");
  }
  MS_CHECK(h.is_object(), path, ": safetensors header is not a JSON object");
  Header out;
  uint64_t end = 0;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const json& e = it.value();
    const std::string name = printable(it.key());
    MS_CHECK(e.is_object() && e.contains("dtype") && e["dtype"].is_string() &&
                 e.contains("shape") && e["shape"].is_array() && e.contains("data_offsets") &&
                 e["data_offsets"].is_array() && e["data_offsets"].size() == 2 &&
                 e["data_offsets"][0].is_number_unsigned() &&
                 e["data_offsets"][1].is_number_unsigned(),
             path, ": header entry for tensor ", name, " is malformed");
    TensorEntry t;
    t.name = it.key();
    t.dtype = e["dtype"].get<std::string>();
    uint64_t n = 1;
    for (const json& d : e["shape"]) {
      MS_CHECK(d.is_number_integer() &&
                   !(d.is_number_unsigned() && d.get<uint64_t>() > INT64_MAX) &&
                   d.get<int64_t>() >= 0,
               path, ": tensor ", name, " has an invalid shape");
      t.shape.push_back(d.get<int64_t>());
      const auto r = checked_mul(n, d.get<uint64_t>());
      MS_CHECK(r, path, ": tensor ", name, " has more elements than fit in 64 bits");
      n = *r;
    }
    const uint64_t b = e["data_offsets"][0].get<uint64_t>(),
                   en = e["data_offsets"][1].get<uint64_t>();
    MS_CHECK(b <= en, path, ": tensor ", name, " has invalid data_offsets");
    const uint64_t es = elem_size(t.dtype);
    MS_CHECK(es, path, ": tensor ", name, " has unsupported dtype ", printable(t.dtype));
    const auto want = checked_mul(n, es);
    MS_CHECK(want && *want == en - b, path, ": tensor ", name, " has ", en - b,
             " bytes but its shape and dtype need ", want ? *want : 0);
    t.bytes = en - b;
    t.from_header = true;
    describe(t, q);
    end = std::max(end, en);
    out.tensors.push_back(std::move(t));
  }
  out.complete = size - 8 - len >= end;
  return out;
}

// A shard named by the index, as a path inside the folder (no absolute path, no "..").
fs::path shard_path(const fs::path& dir, const std::string& name, const std::string& index) {
  const fs::path rel(name);
  MS_CHECK(!name.empty() && rel.is_relative() && !rel.has_root_name(), "shard \"", printable(name),
           "\" named by ", index, " is not a file inside the model folder");
  for (const auto& part : rel)
    MS_CHECK(part != "..", "shard ", printable(name), " named by ", index,
             " leads out of the model folder");
  return dir / rel;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

std::string count(uint64_t n) {
  const double v = static_cast<double>(n);
  if (v >= 1e12) return fmt("%.3fT", v / 1e12);
  if (v >= 1e9) return fmt("%.2fB", v / 1e9);
  if (v >= 1e6) return fmt("%.2fM", v / 1e6);
  if (v >= 1e3) return fmt("%.1fK", v / 1e3);
  return std::to_string(n);
}

std::string pad(const std::string& s, size_t w, bool right = false) {
  if (s.size() >= w) return s;
  return right ? std::string(w - s.size(), ' ') + s : s + std::string(w - s.size(), ' ');
}

}  // namespace

std::string format_bytes(uint64_t bytes) {
  const double v = static_cast<double>(bytes);
  if (v >= 1e9) return fmt("%.2f GB", v / 1e9);
  if (v >= 1e6) return fmt("%.2f MB", v / 1e6);
  if (v >= 1e3) return fmt("%.2f KB", v / 1e3);
  return std::to_string(bytes) + " B";
}

const char* role_name(Role r) {
  static const char* names[] = {"routed experts",   "shared experts", "attention",
                                "dense MLP layers", "routers",        "embeddings",
                                "lm_head",          "norms/other",    "MTP (--speculative-tokens)"};
  return names[static_cast<int>(r)];
}

const char* role_key(Role r) {
  static const char* keys[] = {"routed_experts", "shared_experts", "attention",
                               "dense_mlp",      "router",         "embeddings",
                               "lm_head",        "norms_other",    "mtp"};
  return keys[static_cast<int>(r)];
}

std::vector<TensorEntry> tensors_from_config(const ModelConfig& c, const Quantization& q,
                                             int64_t mtp_layers, const std::string& fdt) {
  std::vector<TensorEntry> out;
  const int64_t H = c.hidden_size, nh = c.num_attention_heads;
  auto vec = [&](const std::string& name, int64_t n, const std::string& dt) {
    out.push_back(entry(name, dt, {n}, q));
  };
  auto plain = [&](const std::string& name, int64_t r, int64_t cols) {
    out.push_back(entry(name, fdt, {r, cols}, q));
  };
  auto linear = [&](const std::string& module, int64_t r, int64_t cols) {
    const Storage st = q.storage(module);
    if (st == Storage::Plain) return plain(module + ".weight", r, cols);
    if (st == Storage::Fp8) {
      // quant_method fp8 names the scales weight_scale_inv, compressed-tensors weight_scale.
      out.push_back(entry(module + ".weight", "F8_E4M3", {r, cols}, q));
      out.push_back(entry(
          module + (q.kind == Quantization::Kind::Fp8Block ? ".weight_scale_inv" : ".weight_scale"),
          "F32", {(r + q.block_rows - 1) / q.block_rows, (cols + q.block_cols - 1) / q.block_cols},
          q));
    } else {
      out.push_back(entry(module + ".weight_packed", "I32", {r, q.packed_cols(cols)}, q));
      out.push_back(entry(module + ".weight_scale", q.scale_dtype, {r, q.scale_cols(cols)}, q));
      out.push_back(entry(module + ".weight_shape", "I64", {2}, q));
    }
  };
  auto mlp = [&](const std::string& p, int64_t inter) {
    linear(p + ".gate_proj", inter, H);
    linear(p + ".up_proj", inter, H);
    linear(p + ".down_proj", H, inter);
  };
  plain("model.embed_tokens.weight", c.vocab_size, H);
  for (int64_t l = 0; l < c.num_hidden_layers + mtp_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l);
    if (l >= c.num_hidden_layers) {  // the MTP layer's own tensors (eh_proj kept unquantized)
      plain(p + ".embed_tokens.weight", c.vocab_size, H);
      vec(p + ".enorm.weight", H, fdt);
      vec(p + ".hnorm.weight", H, fdt);
      plain(p + ".eh_proj.weight", H, 2 * H);
      vec(p + ".shared_head.norm.weight", H, fdt);
      plain(p + ".shared_head.head.weight", c.vocab_size, H);
    }
    vec(p + ".input_layernorm.weight", H, fdt);
    vec(p + ".post_attention_layernorm.weight", H, fdt);
    const std::string a = p + ".self_attn";
    if (c.q_lora_rank) {
      linear(a + ".q_a_proj", *c.q_lora_rank, H);
      vec(a + ".q_a_layernorm.weight", *c.q_lora_rank, fdt);
      linear(a + ".q_b_proj", nh * c.qk_head_dim(), *c.q_lora_rank);
    } else {
      linear(a + ".q_proj", nh * c.qk_head_dim(), H);
    }
    linear(a + ".kv_a_proj_with_mqa", c.kv_cache_dim(), H);
    vec(a + ".kv_a_layernorm.weight", c.kv_lora_rank, fdt);
    linear(a + ".kv_b_proj", nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
    linear(a + ".o_proj", H, nh * c.v_head_dim);
    const std::string m = p + ".mlp";
    if (!c.is_moe_layer(l)) {
      mlp(m, c.intermediate_size);
      continue;
    }
    plain(m + ".gate.weight", c.n_routed_experts, H);  // the router: never quantized
    if (c.topk_method == TopkMethod::NoauxTc)
      vec(m + ".gate.e_score_correction_bias", c.n_routed_experts, "F32");
    for (int64_t e = 0; e < c.n_routed_experts; ++e)
      mlp(m + ".experts." + std::to_string(e), c.moe_intermediate_size);
    if (c.n_shared_experts > 0)
      mlp(m + ".shared_experts", c.moe_intermediate_size * c.n_shared_experts);
  }
  vec("model.norm.weight", H, fdt);
  plain("lm_head.weight", c.vocab_size, H);
  return out;
}

Role classify_tensor(const std::string& name, const ModelConfig& c, int64_t* layer,
                     int64_t* expert) {
  int64_t l = -1, e = -1;
  Role r = Role::NormsOther;
  static const std::string kLayers = "model.layers.";
  if (name == "model.embed_tokens.weight") {
    r = Role::Embedding;
  } else if (name == "lm_head.weight") {
    r = Role::LmHead;
  } else if (name.rfind(kLayers, 0) == 0) {
    size_t pos = kLayers.size();
    const size_t dot = name.find('.', pos);
    try {
      l = std::stoll(name.substr(pos, dot - pos));
    } catch (const std::exception&) {
      l = -1;
    }
    const std::string rest = dot == std::string::npos ? "" : name.substr(dot);
    static const std::string kExperts = ".mlp.experts.";
    if (l >= c.num_hidden_layers) {
      r = Role::Mtp;
    } else if (rest.rfind(kExperts, 0) == 0) {
      r = Role::RoutedExperts;
      try {
        e = std::stoll(rest.substr(kExperts.size()));
      } catch (const std::exception&) {
        e = -1;
      }
    } else if (rest.rfind(".mlp.shared_experts.", 0) == 0) {
      r = Role::SharedExperts;
    } else if (rest.rfind(".mlp.gate.", 0) == 0) {
      r = Role::Router;
    } else if (rest.rfind(".self_attn.", 0) == 0) {
      r = Role::Attention;
    } else if (rest.rfind(".mlp.", 0) == 0) {
      r = Role::DenseMlp;
    }
  }
  if (layer) *layer = l;
  if (expert) *expert = e;
  return r;
}

Inventory inspect_model(const std::string& dir) {
  std::error_code ec;
  MS_CHECK(fs::is_directory(dir, ec), "model folder ", dir, " does not exist");
  const fs::path cfg_path = fs::path(dir) / "config.json";
  MS_CHECK(fs::exists(cfg_path, ec), "no config.json in model folder ", dir);
  json j = read_json_file(cfg_path.string(), kMaxConfigBytes);
  MS_CHECK(j.is_object(), "config.json must hold a JSON object");
  Inventory inv;
  inv.dir = dir;
  inv.quant = parse_quantization(j);
  // The architecture through the loader's own checks; the quantization is read above (the
  // loader itself takes fp8 only).
  json arch = j;
  arch.erase("quantization_config");
  inv.cfg = ModelConfig::from_json(arch);
  inv.cfg.fp8 = inv.quant.has(Storage::Fp8);
  if (j.contains("num_nextn_predict_layers") && j["num_nextn_predict_layers"].is_number_integer())
    inv.mtp_layers = std::clamp<int64_t>(j["num_nextn_predict_layers"].get<int64_t>(), 0, 16);
  const std::string fdt = torch_dtype_name(j);
  const std::vector<TensorEntry> derived =
      tensors_from_config(inv.cfg, inv.quant, inv.mtp_layers, fdt);

  // Which shards, and which tensors each holds by the index.
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  std::vector<fs::path> shards;
  std::vector<std::string> listed;  // tensor names of the index, in its order
  bool have_index = fs::exists(index, ec);
  if (have_index) {
    const json ij = read_json_file(index.string(), kMaxIndexBytes);
    MS_CHECK(ij.is_object() && ij.contains("weight_map") && ij["weight_map"].is_object(),
             index.string(), " has no weight_map object");
    std::set<std::string> seen;
    for (auto& [name, file] : ij["weight_map"].items()) {
      MS_CHECK(file.is_string(), index.string(), ": weight_map entry ", printable(name),
               " is not a string");
      listed.push_back(name);
      if (seen.insert(file.get<std::string>()).second)
        shards.push_back(shard_path(fs::path(dir), file.get<std::string>(), index.string()));
    }
  } else if (fs::exists(fs::path(dir) / "model.safetensors", ec)) {
    shards.push_back(fs::path(dir) / "model.safetensors");
  } else {
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
      if (it->path().extension() == ".safetensors") shards.push_back(it->path());
    std::sort(shards.begin(), shards.end());
  }
  inv.shards_listed = static_cast<int64_t>(shards.size());

  std::map<std::string, TensorEntry> found;
  for (const fs::path& s : shards) {
    if (!fs::exists(s, ec)) continue;
    Header h = read_header(s.string(), inv.quant);
    ++inv.shards_present;
    if (!h.complete) ++inv.shards_incomplete;
    for (TensorEntry& t : h.tensors) {
      const std::string name = t.name;
      MS_CHECK(found.emplace(name, std::move(t)).second, "tensor ", printable(name),
               " appears in two shards");
    }
  }

  // Every tensor: from a header when its shard is here, else from the config. With an index,
  // the index says which tensors exist; without one (and no shard), the config does.
  std::map<std::string, const TensorEntry*> by_name;
  for (const TensorEntry& t : derived) by_name.emplace(t.name, &t);
  bool any_config = false;
  if (have_index) {
    for (const std::string& name : listed) {
      auto f = found.find(name);
      if (f != found.end()) {
        inv.tensors.push_back(std::move(f->second));
        found.erase(f);
      } else if (auto d = by_name.find(name); d != by_name.end()) {
        inv.tensors.push_back(*d->second);
        any_config = true;
      } else {
        ++inv.unknown_tensors;
      }
    }
    for (auto& [name, t] : found) inv.tensors.push_back(std::move(t));  // not in the index
  } else if (!found.empty()) {
    for (auto& [name, t] : found) inv.tensors.push_back(std::move(t));
  } else {
    inv.tensors = derived;
    any_config = true;
  }
  const bool any_header = inv.shards_present > 0;
  inv.source = any_header && any_config ? "headers + config.json"
               : any_header             ? "headers"
                                        : "config.json";
  return inv;
}

Totals totals(const Inventory& inv) {
  Totals t;
  for (const TensorEntry& e : inv.tensors) {
    const Role r = classify_tensor(e.name, inv.cfg);
    t.by_role[static_cast<int>(r)].add(e);
    auto it = std::find_if(t.by_kind.begin(), t.by_kind.end(),
                           [&](const auto& p) { return p.first == e.kind; });
    if (it == t.by_kind.end()) {
      t.by_kind.emplace_back(e.kind, Figure{});
      it = std::prev(t.by_kind.end());
    }
    it->second.add(e);
    t.checkpoint.add(e);
    if (r != Role::Mtp) t.loaded.add(e);
  }
  std::sort(t.by_kind.begin(), t.by_kind.end(),
            [](const auto& a, const auto& b) { return a.second.bytes > b.second.bytes; });
  return t;
}

uint64_t kv_bytes_per_token(const ModelConfig& c, KvDtype d) {
  return static_cast<uint64_t>(c.num_hidden_layers * kv::kv_row_bytes(d, c.kv_cache_dim()));
}

uint64_t workspace_bytes(const ModelConfig& c, const PlanOptions& o) {
  const uint64_t T = static_cast<uint64_t>(std::max<int64_t>(1, o.batch_tokens));
  const uint64_t H = c.hidden_size, nh = c.num_attention_heads, qd = c.qk_head_dim(),
                 vd = c.v_head_dim, L = c.kv_lora_rank, kvd = c.kv_cache_dim(),
                 ql = c.q_lora_rank.value_or(0), E = c.n_routed_experts, K = c.num_experts_per_tok,
                 I = c.intermediate_size, Im = c.moe_intermediate_size,
                 Is = Im * c.n_shared_experts;
  const uint64_t C = std::min<uint64_t>(T, 64), F = std::min<uint64_t>(T, 128),
                 B = std::min<uint64_t>(T, 32), ctx = static_cast<uint64_t>(o.context),
                 R = static_cast<uint64_t>(o.seqs), N = static_cast<uint64_t>(o.ep);
  uint64_t floats = 4 * T * H;               // x, h, attention and FFN outputs
  floats += T * nh * qd + T * ql + T * kvd;  // q, q_a, kv
  floats += C * nh * kvd + C * nh * L;       // q_lat, o_lat (a chunk of tokens)
  floats += T * nh * vd;                     // o_heads
  const uint64_t gate = std::max({F * I, F * Im, F * Is, B * (K * Im + Is)});
  floats += 2 * gate;                           // gate, up
  floats += T * E + T * K;                      // router logits and weights
  if (E) floats += std::max(B * K * H, T * H);  // expert outputs (one expert may get all)
  if (c.n_shared_experts) floats += T * H;      // shared experts' output
  floats += R * H + R * c.vocab_size;           // final-norm rows, logits
  floats += nh * ctx;                           // decode attention scores
  uint64_t bytes = 4 * floats;
  bytes += 4 * T * K + 8 * (T * K + T + ctx);               // route_e, row pointers
  if (N > 1 && E) bytes += 4 * 3 * T * std::min(K, N) * H;  // EP: received, outputs, returned
  return bytes;
}

RankPlan plan_rank(const Inventory& inv, const PlanOptions& o) {
  MS_CHECK(o.ep >= 1, "--ep must be >= 1");
  MS_CHECK(o.context >= 1, "--context must be >= 1");
  MS_CHECK(o.seqs >= 1, "--seqs must be >= 1");
  MS_CHECK(o.batch_tokens >= 1, "--batch-tokens must be >= 1");
  const ModelConfig& c = inv.cfg;
  RankPlan p;
  p.experts_per_layer = c.n_routed_experts ? (c.n_routed_experts + o.ep - 1) / o.ep : 0;
  std::map<int64_t, std::map<int64_t, uint64_t>> experts;  // layer -> expert -> bytes
  for (const TensorEntry& t : inv.tensors) {
    int64_t l, e;
    const Role r = classify_tensor(t.name, c, &l, &e);
    if (r == Role::Mtp) continue;
    if (r == Role::RoutedExperts)
      experts[l][e] += t.bytes;
    else
      p.replicated += t.bytes;
  }
  for (const auto& [l, per] : experts) {  // the rank with the largest share
    std::vector<uint64_t> b;
    for (const auto& [e, n] : per) b.push_back(n);
    std::sort(b.rbegin(), b.rend());
    const size_t k = std::min(b.size(), static_cast<size_t>(p.experts_per_layer));
    for (size_t i = 0; i < k; ++i) p.routed += b[i];
  }
  const uint64_t tokens = static_cast<uint64_t>(o.seqs) *
                          static_cast<uint64_t>((o.context + o.block_size - 1) / o.block_size) *
                          static_cast<uint64_t>(o.block_size);
  for (KvDtype d : kKvDtypes) p.kv[static_cast<int>(d)] = tokens * kv_bytes_per_token(c, d);
  p.workspace = workspace_bytes(c, o);
  return p;
}

json inspect_json(const Inventory& inv, const PlanOptions& o, std::optional<KvDtype> kv) {
  const Totals t = totals(inv);
  const ModelConfig& c = inv.cfg;
  json j;
  j["model"] = inv.dir;
  j["model_type"] = c.model_type;
  j["source"] = inv.source;
  j["shards"] = {{"listed", inv.shards_listed},
                 {"present", inv.shards_present},
                 {"incomplete", inv.shards_incomplete}};
  j["unknown_tensors"] = inv.unknown_tensors;
  j["quantization"] = inv.quant.describe();
  j["layers"] = c.num_hidden_layers;
  j["mtp_layers"] = inv.mtp_layers;
  j["n_routed_experts"] = c.n_routed_experts;
  json roles = json::object();
  for (int r = 0; r < kRoleCount; ++r)
    roles[role_key(static_cast<Role>(r))] = {{"params", t.by_role[r].params},
                                             {"bytes", t.by_role[r].bytes}};
  j["by_role"] = roles;
  json kinds = json::object();
  for (const auto& [k, f] : t.by_kind) kinds[k] = {{"params", f.params}, {"bytes", f.bytes}};
  j["by_dtype"] = kinds;
  j["total_loaded"] = {{"params", t.loaded.params}, {"bytes", t.loaded.bytes}};
  j["total_checkpoint"] = {{"params", t.checkpoint.params}, {"bytes", t.checkpoint.bytes}};
  json per_token = json::object();
  for (KvDtype d : kKvDtypes) per_token[kv_dtype_name(d)] = kv_bytes_per_token(c, d);
  j["kv_bytes_per_token"] = per_token;
  const RankPlan p = plan_rank(inv, o);
  json plan = {{"ep", o.ep},
               {"context", o.context},
               {"seqs", o.seqs},
               {"batch_tokens", o.batch_tokens},
               {"replicated_bytes", p.replicated},
               {"routed_experts_per_layer", p.experts_per_layer},
               {"routed_bytes", p.routed},
               {"workspace_bytes", p.workspace}};
  json kvs = json::object(), tot = json::object();
  for (KvDtype d : kKvDtypes) {
    if (kv && *kv != d) continue;
    kvs[kv_dtype_name(d)] = p.kv[static_cast<int>(d)];
    tot[kv_dtype_name(d)] = p.total(d);
  }
  plan["kv_cache_bytes"] = kvs;
  plan["total_bytes"] = tot;
  j["per_rank"] = plan;
  return j;
}

std::string inspect_text(const Inventory& inv, const PlanOptions& o, std::optional<KvDtype> kv) {
  const Totals t = totals(inv);
  const ModelConfig& c = inv.cfg;
  std::string s;
  s += "model: " + inv.dir + " (" + c.model_type + ", " + std::to_string(c.num_hidden_layers) +
       " layers";
  if (inv.mtp_layers) s += " + " + std::to_string(inv.mtp_layers) + " MTP";
  if (c.n_routed_experts)
    s += ", " + std::to_string(c.n_routed_experts) + " routed experts top-" +
         std::to_string(c.num_experts_per_tok);
  s += ")\n";
  s += "quantization: " + inv.quant.describe() + "\n";
  s += "source: ";
  if (inv.source == "config.json")
    s += "config.json (no shard present: shapes computed from config.json, dtypes from its "
         "quantization_config)";
  else if (inv.source == "headers")
    s += "safetensors headers of " + std::to_string(inv.shards_present) + " shard(s)";
  else
    s += "safetensors headers of " + std::to_string(inv.shards_present) + " of " +
         std::to_string(inv.shards_listed) +
         " shards; the tensors of the missing ones computed from config.json";
  s += "\n";
  if (inv.shards_incomplete)
    s += "note: " + std::to_string(inv.shards_incomplete) +
         " shard(s) are shorter than their headers say (still downloading?)\n";
  if (inv.unknown_tensors)
    s += "note: " + std::to_string(inv.unknown_tensors) +
         " tensor(s) in missing shards are not derivable from config.json and not counted\n";

  auto row = [&](const std::string& name, const Figure& f) {
    s += "  " + pad(name, 28) + pad(count(f.params), 12, true) +
         pad(format_bytes(f.bytes), 14, true) + "\n";
  };
  s += "\n" + pad("weights by role", 30) + pad("parameters", 12, true) + pad("bytes", 14, true) +
       "\n";
  for (int r = 0; r < kRoleCount; ++r) {
    if (static_cast<Role>(r) == Role::Mtp) continue;
    if (t.by_role[r].bytes || t.by_role[r].params)
      row(role_name(static_cast<Role>(r)), t.by_role[r]);
  }
  row("total loaded", t.loaded);
  if (t.by_role[static_cast<int>(Role::Mtp)].bytes) {
    row(role_name(Role::Mtp), t.by_role[static_cast<int>(Role::Mtp)]);
    row("total in checkpoint", t.checkpoint);
  }
  s += "\n" + pad("weights by dtype", 30) + pad("parameters", 12, true) + pad("bytes", 14, true) +
       "\n";
  for (const auto& [k, f] : t.by_kind) row(k, f);

  s += "\nKV cache per token (" + std::to_string(c.num_hidden_layers) + " layers x (" +
       std::to_string(c.kv_lora_rank) + " latent + " + std::to_string(c.qk_rope_head_dim) +
       " rope) values):";
  for (KvDtype d : kKvDtypes)
    s += std::string(" ") + kv_dtype_name(d) + " " + std::to_string(kv_bytes_per_token(c, d)) +
         " B" + (d == KvDtype::FP8 ? "" : ",");
  s += "\n";

  const RankPlan p = plan_rank(inv, o);
  s += "\nmemory per rank: --ep " + std::to_string(o.ep) + " --context " +
       std::to_string(o.context) + " --seqs " + std::to_string(o.seqs) + " --batch-tokens " +
       std::to_string(o.batch_tokens) + "\n";
  std::vector<KvDtype> ds;
  for (KvDtype d : kKvDtypes)
    if (!kv || *kv == d) ds.push_back(d);
  s += pad("", 40);
  for (KvDtype d : ds) s += pad(std::string(kv_dtype_name(d)) + " KV", 14, true);
  s += "\n";
  auto line = [&](const std::string& name, auto value) {
    s += "  " + pad(name, 38);
    for (KvDtype d : ds) s += pad(format_bytes(value(d)), 14, true);
    s += "\n";
  };
  line("replicated weights", [&](KvDtype) { return p.replicated; });
  line("routed experts (" + std::to_string(p.experts_per_layer) + " of " +
           std::to_string(c.n_routed_experts) + " per layer)",
       [&](KvDtype) { return p.routed; });
  line("KV cache (" + std::to_string(o.seqs) + " x " + std::to_string(o.context) + " tokens)",
       [&](KvDtype d) { return p.kv[static_cast<int>(d)]; });
  line("activation workspace (estimate)", [&](KvDtype) { return p.workspace; });
  line("total", [&](KvDtype d) { return p.total(d); });
  s += "(GB = 10^9 bytes, MB = 10^6; the workspace is an upper bound for --batch-tokens tokens per "
       "forward;\n"
       " KV bf16: 2 bytes per cached value; fp8: 1, and an f32 scale per 128 values)\n";
  return s;
}

}  // namespace moeserve::model
