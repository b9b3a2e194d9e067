// The DeepSeek-V3-architecture forward pass: one function for prefill and decode. A batch is a
// set of sequence chunks; each chunk appends its tokens after the chunk's cached positions.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "core/aligned.h"
#include "core/thread_pool.h"
#include "kv/kv_pool.h"
#include "model/config.h"
#include "model/rope.h"
#include "model/weights.h"
#include "moe/dispatch.h"
#include "moe/placement.h"

namespace moeserve::model {

struct SeqChunk {
  int64_t row_begin = 0, n_tokens = 0;   // rows of Batch::tokens
  int64_t n_past = 0;                    // positions already cached; new tokens go at n_past + i
  const int32_t* block_table = nullptr;  // KV blocks covering positions [0, n_past + n_tokens)
};

struct Batch {
  std::vector<int32_t> tokens;      // [n_tokens]
  std::vector<SeqChunk> seqs;       // chunks cover the rows in order, without gaps
  std::vector<int64_t> logit_rows;  // rows whose next-token logits are wanted
};

// Activations, 64-byte aligned so that the matmuls read them in place (core/aligned.h).
using Buffer = AlignedFloats;

// Buffers reused across steps, sized on demand. Those whose size grows with the number of
// tokens times a wide dimension are used a chunk of tokens at a time (kAttnChunk, kFfnChunk),
// so a long prefill does not set the process's peak memory.
inline constexpr int64_t kAttnChunk = 64;  // tokens per pass of the absorbed attention
inline constexpr int64_t kFfnChunk = 128;  // tokens per pass of a dense FFN
// Up to this many tokens (decode), a MoE layer runs all its experts' FFNs as one batch of
// small products (kernels::matmul_batch) rather than expert after expert.
inline constexpr int64_t kBatchedExpertTokens = 32;

struct Workspace {
  Buffer x, h, attn_out, ffn_out;   // [T, hidden]
  Buffer q, q_a, kv;                // [T, nh*qk_head], [T, q_lora], [T, kv_dim]
  Buffer q_lat, o_lat, o_heads;     // [chunk, nh, kv_lora + rope], [chunk, nh, kv_lora], [T, nh*v]
  Buffer gate, up;                  // [chunk, inter] (dense) / [n, inter] (experts)
  Buffer router_logits, route_w;    // [T, E], [T, K]
  std::vector<int32_t> route_e;     // [T, K]
  Buffer yout, shared_out;          // expert outputs, shared experts' output
  std::vector<const float*> xrows;  // [T * top_k] each expert's tokens' rows in h
  std::vector<const float*> token_rows;    // [T] the rows of h (token_rows())
  Buffer norm_rows;                        // [R, hidden]
  Buffer scores;                           // decode attention: [heads, context]
  Buffer mtp_cat;                          // MTP input [T, 2 * hidden]
  std::vector<const uint8_t*> score_rows;  // decode attention: the token's cached rows
};

// Expert parallelism: the ranks of `comm` share the routed experts of every MoE layer as
// `placement` says; each MoE layer exchanges tokens with them (dispatch and combine). Attention
// and everything else is replicated and runs on each rank's own tokens.
struct ExpertParallel {
  comm::Communicator* comm = nullptr;
  moe::PlacementTable placement;  // default: contiguous ranges of experts per rank
  moe::DispatchMode mode = moe::DispatchMode::PerRank;
  moe::Transport transport = moe::Transport::Auto;
  // Prefill (a forward whose largest rank has kOverlapTokens tokens or more) through the
  // messages transport runs each MoE layer as two micro-batches, one's exchange in flight while
  // the other's experts compute (Model::moe_overlapped). The same bits either way.
  bool overlap = false;
  // Hidden rows dispatched as fp8 e4m3 with a per-token scale (messages transport only;
  // changes the output: Dispatcher::set_fp8_dispatch).
  bool fp8_dispatch = false;
};

// The fewest tokens (on the rank with the most) for which a forward splits its MoE layers into
// two overlapped micro-batches.
inline constexpr int64_t kOverlapTokens = 64;

class Model {
 public:
  // Opens the folder, reads config.json and maps the weights: all routed experts, or, with
  // `ep`, those its placement gives this rank.
  Model(const std::string& dir, const ThreadPool& pool, const ExpertParallel* ep = nullptr);

  const ModelConfig& config() const { return cfg_; }
  const ModelWeights& weights() const { return w_; }
  const WeightStore& store() const { return *store_; }
  const ThreadPool& pool() const { return pool_; }
  const ExpertParallel* expert_parallel() const { return ep_ ? &*ep_ : nullptr; }
  // How the weight products compute (kernels.h, Precision): the projections of attention
  // (q, kv_a, o), the FFNs (dense, routed and shared experts) and lm_head. The router, the
  // absorbed attention (kv_b_proj's W_UK and W_UV, scores, softmax, latent sums) and the norms
  // stay f32 either way. Set before the first forward; Exact by default.
  void set_precision(kernels::Precision p) { precision_ = p; }
  kernels::Precision precision() const { return precision_; }
  // Seconds spent inside the MoE exchanges since the start (0 without expert parallelism). With
  // overlapped micro-batches, the time the exchanges kept this rank waiting or busy in MPI
  // calls (posting, progressing, waiting), not the time they were in flight.
  double exchange_seconds() const { return exchange_seconds_; }
  // MoE layers run as two overlapped micro-batches since the start.
  int64_t overlapped_layers() const { return overlapped_layers_; }

  // Runs the batch, writing the new tokens' latent KV into `kv`, and fills
  // logits: [batch.logit_rows.size(), vocab] f32. Under expert parallelism every rank of the
  // group must call forward the same number of times; a rank without work passes an empty batch.
  // `hidden`, when given: [batch.tokens.size(), hidden] the final-normed hidden state of every
  // row (what lm_head reads; the MTP module's input).
  void forward(const Batch& batch, kv::KvPool& kv, float* logits, float* hidden = nullptr);

  // Multi-token prediction (speculative decoding). load_mtp() loads the first MTP module
  // (config.json's num_nextn_predict_layers); call it before prefault so that its weights are
  // copied too. Under expert parallelism this rank holds the module's routed experts that the
  // placement gives it for layer num_hidden_layers (its default, or contiguous ranges when the
  // placement names only the main layers), and forward_mtp exchanges tokens with the group like
  // forward: every rank of the group must call it the same number of times (an empty batch
  // where it has no rows). Its attention caches as layer num_hidden_layers of the pool, which
  // then needs num_hidden_layers + 1 layers.
  void load_mtp();
  bool has_mtp() const { return w_.mtp.present; }
  // The MTP module over a batch: row t of a chunk sits at position n_past + i and reads h_in's
  // row t (a final-normed hidden state for that position: the main model's, or the module's own
  // h_out for a chained draft) and batch.tokens[t], the token that follows that position. Writes
  // the module's KV rows, logits for batch.logit_rows ([rows, vocab]), and h_out ([T, hidden],
  // the head-normed output) when given.
  void forward_mtp(const Batch& batch, const float* h_in, kv::KvPool& kv, float* logits,
                   float* h_out);

  // Tokens routed to each expert since the start: [layers * n_routed_experts] (0 for dense
  // layers). Safe to call from any thread.
  std::vector<int64_t> expert_token_counts() const;
  // Forward calls in which at least one of this rank's tokens went to each expert, i.e. steps
  // that read its weights on a single process: [layers * n_routed_experts].
  std::vector<int64_t> expert_pass_counts() const;
  // Forward calls since the start.
  int64_t forward_count() const { return forwards_.load(std::memory_order_relaxed); }

  // Brings the weights into memory before serving or measuring, printing progress on stderr
  // when `progress`. `copy`: copies the matrices out of the mapped checkpoint into memory of
  // the process's own (make_resident: same bytes, faster reads; the mapping's pages are dropped
  // as they are copied); otherwise touches every mapped page once. Without either, pages come
  // from the checkpoint as first read.
  void prefault(bool progress, bool copy = true);
  bool resident() const { return resident_ != nullptr; }
  // Bytes of the matrices this process holds: its own copy's, or the whole mapped checkpoint.
  size_t weight_bytes_held() const;

 private:
  // Layer l's weights: a main layer, or the MTP module's for l == num_hidden_layers.
  const LayerWeights& layer_weights(int64_t l) const {
    return l < cfg_.num_hidden_layers ? w_.layers[l] : w_.mtp.layer;
  }
  // One decoder layer over x ([T, hidden], updated in place).
  void run_layer(int64_t l, const Batch& b, kv::KvPool& kv, float* x, int64_t T);
  void attention(int64_t layer, const Batch& b, kv::KvPool& kv);  // ws_.h -> ws_.attn_out
  // x: n rows of hidden floats, read in place (the expert kernels take rows anywhere); out:
  // [n, hidden].
  void dense_ffn(const MlpWeights& m, const float* const* x, int64_t n, float* out);
  // dense_ffn for each of several FFNs at once (the same bits), every phase one batch of
  // products: for decode, where each expert sees a token or a few.
  struct FfnCall {
    const MlpWeights* w;
    const float* const* x;  // n rows of hidden floats
    int64_t n;
    float* out;  // [n, hidden]
  };
  void ffn_batch(const std::vector<FfnCall>& calls);
  // The n rows of x ([n, hidden]) as row pointers, in the workspace.
  const float* const* token_rows(const float* x, int64_t n);
  void moe_ffn(int64_t layer, int64_t n);  // ws_.h -> ws_.ffn_out
  // Expert parallel, two micro-batches (the first n / 2 tokens, the rest): micro-batch 0's
  // dispatch in flight while its shared experts run, 1's dispatch while 0's experts run, 0's
  // combine while 1's experts run, 1's combine while 1's shared experts run. out = routed sum +
  // shared, as moe_ffn.
  void moe_overlapped(const MoeWeights& m, int64_t layer, int64_t n, const int32_t* ex,
                      const float* wt);
  // Collective under expert parallelism, at the start of each forward: whether its MoE layers
  // run overlapped (the same answer on every rank).
  void choose_overlap(int64_t n_tokens);
  // Sizes the layer workspace for T rows and returns the residual stream (ws_.x).
  float* layer_workspace(int64_t T);
  // Checks each token id of b and writes its row of `embed` at out + t * stride.
  void embed_tokens(const Weight& embed, const Batch& b, float* out, int64_t stride) const;
  void rmsnorm(const float* x, const std::vector<float>& w, int64_t n, int64_t dim,
               float* out) const;
  // The absorbed attention (q_lat, scores, o_lat, o_heads) of rows [r0, r1) of the batch.
  void attention_core(int64_t layer, const Batch& b, kv::KvPool& kv, int64_t r0, int64_t r1,
                      int64_t max_ctx);

  std::unique_ptr<WeightStore> store_;
  std::unique_ptr<ResidentWeights> resident_;  // the matrices' memory after prefault(copy)
  ModelConfig cfg_;
  std::optional<ExpertParallel> ep_;  // with its placement filled in
  ModelWeights w_;
  Rope rope_;
  const ThreadPool& pool_;
  kernels::Precision precision_ = kernels::Precision::Exact;
  Workspace ws_;
  std::unique_ptr<moe::Dispatcher> dispatcher_;
  std::unique_ptr<moe::Dispatcher> dispatcher2_;  // the second micro-batch's (overlap)
  bool overlap_now_ = false;                      // this forward's MoE layers overlap
  moe::Dispatcher* progress_ = nullptr;           // its exchange is progressed between kernel calls
  int64_t overlapped_layers_ = 0;
  double exchange_seconds_ = 0;
  std::unique_ptr<std::atomic<int64_t>[]> expert_counts_;  // [layers * n_routed_experts]
  std::unique_ptr<std::atomic<int64_t>[]> expert_passes_;  // [layers * n_routed_experts]
  std::atomic<int64_t> forwards_{0};
};

}  // namespace moeserve::model
