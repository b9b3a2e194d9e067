// The weights of a DeepSeek-V3-architecture model as views into the mapped checkpoint, in the
// dtype they are stored in (bf16, f16, f32, fp8 e4m3 with 128x128 block scales, or
// compressed-tensors pack-quantized int4 / int8 with group scales, read in place as Q4 / Q8).
// Only the 1-D vectors (norm weights, router bias) are copied, to f32.
//
// pack-quantized checkpoints: every Linear module that config.json's quantization_config does
// not ignore must be stored quantized (weight_packed, weight_scale, weight_shape), and every
// module it ignores unquantized (weight) -- as compressed-tensors itself reads them; either
// mismatch is an error naming the tensor. The embedding and the router (mlp.gate) are not Linear
// layers and are always read unquantized.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/huge_pages.h"
#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace moeserve::model {

using kernels::Weight;

struct MlpWeights {  // SwiGLU: down(silu(gate(x)) * up(x))
  Weight gate, up;   // [inter, hidden]
  Weight down;       // [hidden, inter]
  bool present() const { return gate.data != nullptr; }
};

struct AttentionWeights {        // MLA
  Weight q_proj;                 // [heads * qk_head_dim, hidden] when q_lora_rank is null
  Weight q_a_proj;               // [q_lora_rank, hidden]
  std::vector<float> q_a_norm;   // [q_lora_rank]
  Weight q_b_proj;               // [heads * qk_head_dim, q_lora_rank]
  Weight kv_a_proj;              // [kv_lora_rank + qk_rope_head_dim, hidden]
  std::vector<float> kv_a_norm;  // [kv_lora_rank]
  Weight kv_b_proj;              // [heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]
  Weight o_proj;                 // [hidden, heads * v_head_dim]
};

struct MoeWeights {
  Weight router;                    // [n_routed_experts, hidden]
  std::vector<float> router_bias;   // [n_routed_experts] (noaux_tc), else empty
  std::vector<MlpWeights> experts;  // [n_routed_experts]; only this rank's are present()
  MlpWeights shared;                // inter = moe_intermediate_size * n_shared_experts
};

struct LayerWeights {
  std::vector<float> attn_norm, ffn_norm;  // [hidden]
  AttentionWeights attn;
  bool is_moe = false;
  MlpWeights mlp;  // dense layers
  MoeWeights moe;  // MoE layers
};

// The multi-token-prediction module (model.layers.{num_hidden_layers}): from the main model's
// final hidden state h_i and the embedding of token i+1 it predicts token i+2:
//   x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)]), x = layer(x), logits = head(head_norm(x)).
struct MtpWeights {
  bool present = false;
  std::vector<float> enorm, hnorm;  // [hidden]
  Weight eh_proj;                   // [hidden, 2 * hidden]
  LayerWeights layer;               // its attention caches as layer num_hidden_layers
  std::vector<float> head_norm;     // shared_head.norm [hidden]
  Weight head;                      // shared_head.head [vocab, hidden]; absent: lm_head
  Weight embed;                     // embed_tokens [vocab, hidden]; absent: the main embedding
};

struct ModelWeights {
  Weight embed;  // [vocab, hidden]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // [hidden]
  Weight lm_head;                 // [vocab, hidden]
  MtpWeights mtp;                 // loaded on demand (Model::load_mtp)
};

// Which routed experts this process holds: (layer, expert) -> bool. Empty means all.
using ExpertFilter = std::function<bool(int64_t layer, int64_t expert)>;

// Looks every tensor up by its Hugging Face name, checks dtype and shape, and builds the views.
// Errors name the tensor. The MTP layer (model.layers.{num_hidden_layers}.*) is left to
// load_mtp_weights.
ModelWeights load_weights(const WeightStore& store, const ModelConfig& cfg,
                          const ExpertFilter& local = {});

// The first MTP module (its routed experts that `local` names: all by default); errors name the
// missing tensor, or say that config.json declares none.
MtpWeights load_mtp_weights(const WeightStore& store, const ModelConfig& cfg,
                            const ExpertFilter& local = {});

// Calls fn(Weight&) on every matrix of w (embedding and LM head included; absent ones too,
// with data null).
void for_each_matrix(ModelWeights& w, const std::function<void(Weight&)>& fn);

// Memory of the process's own holding the matrices of a model (make_resident): 2 MB aligned,
// advised as huge pages.
class ResidentWeights {
 public:
  explicit ResidentWeights(size_t bytes) : mem_(bytes, "the weights"), used_(bytes) {}
  std::byte* data() { return mem_.data(); }
  size_t used() const { return used_; }

 private:
  HugeBuffer mem_;  // `used_` bytes used, rounded up to 2 MB allocated
  size_t used_ = 0;
};

// Copies every tensor a matrix of w reads (its data, fp8 scales and int group scales) out of the
// mapped checkpoint into ResidentWeights and points the matrices there, dropping the mapped pages
// as they are copied (so the peak stays at the weights' size). The weights then read ~1.4x faster
// than from the mapped page cache on the machines measured (docs/benchmarks.md). Same bytes, same
// results. progress(done, total) after each tensor, in bytes.
std::unique_ptr<ResidentWeights> make_resident(
    ModelWeights& w, const WeightStore& store, const ThreadPool& pool,
    const std::function<void(size_t, size_t)>& progress = {});

// Sets fp8_plain on every F8_E4M3 matrix whose data allows the kernels' fast conversion
// (kernels::fp8_plain), reading the weights once with the pool's threads.
void mark_fp8_plain(ModelWeights& w, const ThreadPool& pool);

// Bytes of weights one token reads at batch 1: attention, dense FFNs, shared experts, top-k
// routed experts, one embedding row and the LM head.
size_t active_weight_bytes(const ModelWeights& w, const ModelConfig& cfg);

// Matrix elements one token multiplies with: attention (without kv_b_proj, whose products the
// absorbed attention counts apart), dense FFNs, routers, shared experts, top-k routed experts
// and the LM head (the embedding row is a lookup, not a product).
size_t active_matrix_elems(const ModelWeights& w, const ModelConfig& cfg);

// One routed expert's three matrices (gate, up, down): bytes held, and elements. 0 without
// MoE layers or when this process holds no routed expert.
size_t routed_expert_bytes(const ModelWeights& w);
size_t routed_expert_elems(const ModelConfig& cfg);

}  // namespace moeserve::model
