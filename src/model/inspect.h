// Memory planning for a model folder without loading it: the tensors' dtypes, shapes and bytes
// from config.json, model.safetensors.index.json and the safetensors headers of the shards that
// are present (never their data), or, for shards not yet downloaded, from shapes computed from
// config.json and dtypes from its quantization_config. From these: parameters and bytes by role
// and dtype, the KV cache per token, and what each expert-parallel rank needs.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "kv/kv_pool.h"
#include "model/config.h"
#include "model/quantization.h"

namespace moeserve::model {

enum class Role {
  RoutedExperts,
  SharedExperts,
  Attention,
  DenseMlp,
  Router,
  Embedding,
  LmHead,
  NormsOther,
  Mtp,  // model.layers.{num_hidden_layers + i}: multi-token prediction, loaded only for
        // speculative decoding (--speculative-tokens)
};
inline constexpr int kRoleCount = 9;
const char* role_name(Role r);  // "routed experts", ...
const char* role_key(Role r);   // "routed_experts", ... (JSON)

struct TensorEntry {
  std::string name;
  std::string dtype;  // safetensors spelling
  std::vector<int64_t> shape;
  uint64_t bytes = 0;
  uint64_t params = 0;  // weights the tensor holds (int4 packed: 32 / num_bits per I32; 0 for
                        // scales and shapes, which describe other tensors)
  std::string kind;     // by-dtype row: "BF16", "F8_E4M3", "F32 block scales", "int4 (packed I32)"
  bool from_header = false;
};

struct Inventory {
  std::string dir;
  ModelConfig cfg;
  Quantization quant;
  int64_t mtp_layers = 0;     // num_nextn_predict_layers
  std::string source;         // "headers", "config.json", or "headers + config.json"
  int64_t shards_listed = 0;  // shards the index names (or files found without an index)
  int64_t shards_present = 0;
  int64_t shards_incomplete = 0;  // present, but shorter than their header says
  int64_t unknown_tensors = 0;    // named by the index, in a missing shard, not derivable
  std::vector<TensorEntry> tensors;
};

// The tensors config.json implies, in the checkpoint's names (`float_dtype`: the dtype of
// unquantized tensors, from torch_dtype).
std::vector<TensorEntry> tensors_from_config(const ModelConfig& cfg, const Quantization& q,
                                             int64_t mtp_layers,
                                             const std::string& float_dtype = "BF16");

// Reads the folder: config.json, the index if present, and the headers of the present shards.
// Tensors of absent shards (or, with no shard at all, every tensor) come from the config.
Inventory inspect_model(const std::string& dir);

// Bytes in decimal units (GB = 10^9 bytes) with two decimals: "1.23 GB", "4.50 MB", "12 B".
std::string format_bytes(uint64_t bytes);

// The role of a tensor; `layer` and `expert` get its indices (-1 when none).
Role classify_tensor(const std::string& name, const ModelConfig& cfg, int64_t* layer = nullptr,
                     int64_t* expert = nullptr);

struct Figure {
  uint64_t params = 0, bytes = 0;
  void add(const TensorEntry& t) { params += t.params, bytes += t.bytes; }
};

struct Totals {
  std::array<Figure, kRoleCount> by_role;
  std::vector<std::pair<std::string, Figure>> by_kind;  // by dtype, in first-seen order
  Figure loaded;      // everything moeserve loads (all but the MTP layer)
  Figure checkpoint;  // everything in the checkpoint
};
Totals totals(const Inventory& inv);

using kv::kKvDtypes;
using kv::kv_dtype_name;
using kv::KvDtype;  // the pool's row dtypes (kv/kv_pool.h)
using kv::parse_kv_dtype;

// KV cache bytes per token: every layer caches kv_lora_rank + qk_rope_head_dim values, in the
// pool's row format (kv::kv_row_bytes: fp8 adds an f32 scale per 128 values).
uint64_t kv_bytes_per_token(const ModelConfig& cfg, KvDtype d);

struct PlanOptions {
  int64_t ep = 1;              // expert-parallel ranks
  int64_t context = 4096;      // tokens per sequence
  int64_t seqs = 1;            // sequences held at once
  int64_t batch_tokens = 256;  // tokens per forward (serve --max-batch-tokens)
  int64_t block_size = 16;     // KV block (serve's), sequences take whole blocks
};

struct RankPlan {
  uint64_t replicated = 0;        // all weights but routed experts and the MTP layer
  uint64_t routed = 0;            // this rank's routed experts
  int64_t experts_per_layer = 0;  // ceil(n_routed_experts / ep)
  std::array<uint64_t, 3> kv{};   // KV cache for seqs x context, per KvDtype
  uint64_t workspace = 0;         // activation workspace estimate (upper bound)
  uint64_t total(KvDtype d) const {
    return replicated + routed + kv[static_cast<int>(d)] + workspace;
  }
};
RankPlan plan_rank(const Inventory& inv, const PlanOptions& o);

// The forward's activation buffers (model.h Workspace) for batch_tokens tokens, context
// positions and seqs logit rows, with ep ranks' MoE exchange buffers: an upper bound.
uint64_t workspace_bytes(const ModelConfig& cfg, const PlanOptions& o);

// The report: the figures as JSON, or as text tables. `kv`: one cache dtype, or all three.
nlohmann::json inspect_json(const Inventory& inv, const PlanOptions& o, std::optional<KvDtype> kv);
std::string inspect_text(const Inventory& inv, const PlanOptions& o, std::optional<KvDtype> kv);

}  // namespace moeserve::model
