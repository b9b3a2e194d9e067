#include "model/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "core/error.h"
#include "model/ops.h"
#include "moe/router.h"

namespace moeserve::model {

using kernels::matmul;

namespace {
inline float silu(float x) {
  return x / (1.0f + std::exp(-x));
}
}  // namespace

namespace {
// `ep` with a placement for every layer: contiguous ranges of experts when it names none.
std::optional<ExpertParallel> complete(const ExpertParallel* ep, const ModelConfig& c) {
  if (!ep) return std::nullopt;
  MS_CHECK(ep->comm, "expert parallelism needs a communicator");
  ExpertParallel out = *ep;
  const auto E = static_cast<int32_t>(c.n_routed_experts);
  if (E > 0) {
    if (out.placement.layers().empty() && !out.placement.fallback())
      out.placement.set_default(moe::Placement::contiguous(E, out.comm->size()));
    out.placement.validate(E, out.comm->size());
  }
  return out;
}

// The experts `ep` gives this rank, as a filter for load_weights (all when there is no ep).
ExpertFilter local_experts(const std::optional<ExpertParallel>& ep) {
  if (!ep) return {};
  const int rank = ep->comm->rank();
  const moe::PlacementTable* table = &ep->placement;
  return [table, rank](int64_t layer, int64_t e) {
    for (int32_t x : table->at(layer).experts_on(rank))
      if (x == e) return true;
    return false;
  };
}
}  // namespace

Model::Model(const std::string& dir, const ThreadPool& pool, const ExpertParallel* ep)
    : store_(std::make_unique<WeightStore>(dir)),
      cfg_(ModelConfig::load(dir)),
      ep_(complete(ep, cfg_)),
      w_(load_weights(*store_, cfg_, local_experts(ep_))),
      rope_(cfg_),
      pool_(pool),
      dispatcher_(ep_ ? std::make_unique<moe::Dispatcher>(*ep_->comm, ep_->mode, ep_->transport)
                      : nullptr),
      expert_counts_(new std::atomic<int64_t>[cfg_.num_hidden_layers * cfg_.n_routed_experts]()),
      expert_passes_(new std::atomic<int64_t>[cfg_.num_hidden_layers * cfg_.n_routed_experts]()) {
  mark_fp8_plain(w_, pool_);
  if (dispatcher_) dispatcher_->set_fp8_dispatch(ep_->fp8_dispatch);
}

namespace {
std::vector<int64_t> read_counts(const std::atomic<int64_t>* c, size_t n) {
  std::vector<int64_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = c[i].load(std::memory_order_relaxed);
  return out;
}
}  // namespace

std::vector<int64_t> Model::expert_token_counts() const {
  return read_counts(expert_counts_.get(), cfg_.num_hidden_layers * cfg_.n_routed_experts);
}

std::vector<int64_t> Model::expert_pass_counts() const {
  return read_counts(expert_passes_.get(), cfg_.num_hidden_layers * cfg_.n_routed_experts);
}

void Model::rmsnorm(const float* x, const std::vector<float>& w, int64_t n, int64_t dim,
                    float* out) const {
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  for (int64_t r = 0; r < n; ++r) rms_row(x + r * dim, w.data(), dim, eps, out + r * dim);
}

void Model::dense_ffn(const MlpWeights& m, const float* const* x, int64_t n, float* out) {
  const int64_t H = cfg_.hidden_size, I = m.gate.rows;
  // Each token's result is the same in any chunk (kernels.h); the GEMM takes its tokens in
  // panels of this size anyway, so chunks cost no extra weight traffic.
  for (int64_t c0 = 0; c0 < n; c0 += kFfnChunk) {
    const int64_t cn = std::min(kFfnChunk, n - c0);
    float* g = sized(ws_.gate, cn * I);
    float* u = sized(ws_.up, cn * I);
    // Gate and up in one batch: with few tokens, one fan-out over both matrices' rows.
    const kernels::MatmulJob jobs[] = {{nullptr, cn, 0, &m.gate, g, I, x + c0, precision_},
                                       {nullptr, cn, 0, &m.up, u, I, x + c0, precision_}};
    kernels::matmul_batch(pool_, jobs, 2);
    for (int64_t i = 0; i < cn * I; ++i) g[i] = silu(g[i]) * u[i];
    if (progress_) progress_->progress();
    matmul(pool_, g, cn, I, m.down, out + c0 * H, H, precision_);
    if (progress_) progress_->progress();
  }
}

const float* const* Model::token_rows(const float* x, int64_t n) {
  const int64_t H = cfg_.hidden_size;
  ws_.token_rows.resize(n);
  for (int64_t t = 0; t < n; ++t) ws_.token_rows[t] = x + t * H;
  return ws_.token_rows.data();
}

void Model::ffn_batch(const std::vector<FfnCall>& calls) {
  const int64_t H = cfg_.hidden_size;
  int64_t total = 0;
  for (const FfnCall& c : calls) total += c.n * c.w->gate.rows;
  float* g = sized(ws_.gate, total);
  float* u = sized(ws_.up, total);
  std::vector<kernels::MatmulJob> jobs;
  std::vector<int64_t> off;
  int64_t o = 0;
  for (const FfnCall& c : calls) {
    const int64_t I = c.w->gate.rows;
    off.push_back(o);
    jobs.push_back({nullptr, c.n, 0, &c.w->gate, g + o, I, c.x, precision_});
    jobs.push_back({nullptr, c.n, 0, &c.w->up, u + o, I, c.x, precision_});
    o += c.n * I;
  }
  kernels::matmul_batch(pool_, jobs.data(), static_cast<int64_t>(jobs.size()));
  for (int64_t i = 0; i < total; ++i) g[i] = silu(g[i]) * u[i];
  jobs.clear();
  for (size_t k = 0; k < calls.size(); ++k) {
    const FfnCall& c = calls[k];
    jobs.push_back({g + off[k], c.n, c.w->gate.rows, &c.w->down, c.out, H, nullptr, precision_});
  }
  kernels::matmul_batch(pool_, jobs.data(), static_cast<int64_t>(jobs.size()));
}

void Model::moe_ffn(int64_t layer, int64_t n) {
  const MoeWeights& m = layer_weights(layer).moe;
  const bool counted = layer < cfg_.num_hidden_layers;  // (the MTP module's are not counted)
  const int64_t H = cfg_.hidden_size, E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok;
  const float* h = ws_.h.data();
  float* logits = sized(ws_.router_logits, n * E);
  matmul(pool_, h, n, H, m.router, logits, E);
  int32_t* ex = sized(ws_.route_e, n * K);
  float* wt = sized(ws_.route_w, n * K);
  moe::route(moe::RouterParams::from_config(cfg_), logits,
             m.router_bias.empty() ? nullptr : m.router_bias.data(), n, ex, wt);

  // Plan: the (token, slot) entries of each expert, experts in ascending order.
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t i = 0; i < n * K; ++i) ++count[ex[i] + 1];
  for (int64_t e = 0; e < E; ++e) {
    if (counted) {
      expert_counts_[layer * E + e].fetch_add(count[e + 1], std::memory_order_relaxed);
      if (count[e + 1] > 0) expert_passes_[layer * E + e].fetch_add(1, std::memory_order_relaxed);
    }
    count[e + 1] += count[e];
  }
  std::vector<int64_t> entry(n * K), fill(count.begin(), count.end() - 1);
  for (int64_t i = 0; i < n * K; ++i) entry[fill[ex[i]]++] = i;

  float* out = ws_.ffn_out.data();
  // Few tokens (decode): every expert FFN of the layer, the shared experts' too, in one batch
  // (ffn_batch: the same bits as one by one).
  const bool batched = n <= kBatchedExpertTokens;
  std::vector<FfnCall> calls;
  float* shared = m.shared.present() && n > 0 ? sized(ws_.shared_out, n * H) : nullptr;
  if (shared && batched) calls.push_back({&m.shared, token_rows(h, n), n, shared});
  if (dispatcher_ && overlap_now_) {
    moe_overlapped(m, layer, n, ex, wt);
    return;
  }
  if (dispatcher_) {
    // Expert parallel: the tokens travel to the ranks holding their experts and back.
    const moe::DispatchPlan plan = dispatcher_->plan(ep_->placement.at(layer), n, K, H, ex, wt);
    const float* const* recv = dispatcher_->dispatch(plan, h);
    float* eo = dispatcher_->expert_out(plan);
    for (int32_t j = 0; j < plan.n_slots; ++j) {
      const int64_t cnt = plan.slot_count(j), off = plan.slot_offset[j];
      if (!cnt) continue;
      const MlpWeights& xp = m.experts[plan.slot_expert[j]];
      MS_ASSERT(xp.present());
      if (batched)
        calls.push_back({&xp, recv + off, cnt, eo + off * H});
      else
        dense_ffn(xp, recv + off, cnt, eo + off * H);
    }
    if (!calls.empty()) ffn_batch(calls);
    dispatcher_->combine(plan, eo, out);
    const auto& t = dispatcher_->exchange_seconds();
    exchange_seconds_ += t.plan + t.dispatch + t.combine;
  } else if (batched) {
    // Each expert reads its tokens' rows of h in place; then each token's weighted sum over
    // its slots, in slot order (ascending expert id, moe::route) from +0.0.
    std::vector<const float*>& rows = ws_.xrows;
    rows.resize(n * K);
    float* y = sized(ws_.yout, n * K * H);
    for (int64_t i = 0; i < n * K; ++i) rows[i] = h + (entry[i] / K) * H;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t b = count[e], cnt = count[e + 1] - b;
      if (!cnt) continue;
      MS_ASSERT(m.experts[e].present());
      calls.push_back({&m.experts[e], rows.data() + b, cnt, y + b * H});
    }
    ffn_batch(calls);
    std::vector<const float*> ys(n * K);  // each slot's output row
    for (int64_t i = 0; i < n * K; ++i) ys[entry[i]] = y + i * H;
    for (int64_t t = 0; t < n; ++t)
      kernels::weighted_sum(ys.data() + t * K, wt + t * K, K, H, out + t * H);
  } else {
    // Expert after expert, each reading its tokens' rows of h in place, combined as they
    // finish: the experts run in ascending id, so each token's weighted sum is taken in slot
    // order, from +0.0.
    std::fill_n(out, n * H, 0.0f);
    std::vector<const float*>& rows = ws_.xrows;
    rows.resize(n * K);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t b = count[e], cnt = count[e + 1] - b;
      if (!cnt) continue;
      const MlpWeights& xp = m.experts[e];
      MS_ASSERT(xp.present());
      for (int64_t j = 0; j < cnt; ++j) rows[j] = h + (entry[b + j] / K) * H;
      float* y = sized(ws_.yout, cnt * H);
      dense_ffn(xp, rows.data(), cnt, y);
      for (int64_t j = 0; j < cnt; ++j) {
        const int64_t slot = entry[b + j];
        const float w = wt[slot];
        const float* yj = y + j * H;
        float* o = out + (slot / K) * H;
        for (int64_t i = 0; i < H; ++i) o[i] = o[i] + yj[i] * w;
      }
    }
  }
  if (shared) {  // added after the routed experts
    if (!batched) dense_ffn(m.shared, token_rows(h, n), n, shared);
    for (int64_t i = 0; i < n * H; ++i) out[i] = out[i] + shared[i];
  }
}

void Model::choose_overlap(int64_t n_tokens) {
  overlap_now_ = false;
  if (!dispatcher_ || !ep_->overlap) return;
  // Only the messages transport has transfers to hide: with shared memory the experts read
  // the rows where they are.
  dispatcher_->resolve_transport();
  if (dispatcher_->shared()) return;
  int64_t most = n_tokens;
  const auto t0 = std::chrono::steady_clock::now();
  ep_->comm->all_reduce(&most, 1, comm::ReduceOp::Max);
  exchange_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  overlap_now_ = most >= kOverlapTokens;
  if (overlap_now_ && !dispatcher2_)
    dispatcher2_ =
        std::make_unique<moe::Dispatcher>(*ep_->comm, ep_->mode, moe::Transport::Messages);
  if (dispatcher2_) dispatcher2_->set_fp8_dispatch(ep_->fp8_dispatch);
}

void Model::moe_overlapped(const MoeWeights& m, int64_t layer, int64_t n, const int32_t* ex,
                           const float* wt) {
  const int64_t H = cfg_.hidden_size, K = cfg_.num_experts_per_tok;
  const float* h = ws_.h.data();
  float* out = ws_.ffn_out.data();
  const int64_t first[3] = {0, n / 2, n};  // micro-batch i: tokens [first[i], first[i + 1])
  auto count = [&](int i) { return first[i + 1] - first[i]; };
  moe::Dispatcher* d[2] = {dispatcher_.get(), dispatcher2_.get()};
  const moe::Placement& pl = ep_->placement.at(layer);
  moe::DispatchPlan p[2];
  for (int i = 0; i < 2; ++i)
    p[i] = d[i]->plan(pl, count(i), K, H, ex + first[i] * K, wt + first[i] * K);
  float* shared = m.shared.present() && n > 0 ? sized(ws_.shared_out, n * H) : nullptr;
  // Each phase computes while one exchange is in flight, progressing it between kernel calls.
  auto run_shared = [&](int i) {
    if (shared && count(i))
      dense_ffn(m.shared, token_rows(h + first[i] * H, count(i)), count(i), shared + first[i] * H);
  };
  auto run_experts = [&](int i, const float* const* x, float* eo) {
    for (int32_t j = 0; j < p[i].n_slots; ++j) {
      const int64_t cnt = p[i].slot_count(j), off = p[i].slot_offset[j];
      if (!cnt) continue;
      const MlpWeights& xp = m.experts[p[i].slot_expert[j]];
      MS_ASSERT(xp.present());
      dense_ffn(xp, x + off, cnt, eo + off * H);
    }
  };
  struct Reset {  // no progress calls into a Dispatcher after this layer, whatever happens
    moe::Dispatcher*& p;
    ~Reset() { p = nullptr; }
  } reset{progress_};
  d[0]->dispatch_start(p[0], h);
  progress_ = d[0];
  run_shared(0);
  const float* const* x0 = d[0]->dispatch_finish(p[0]);
  d[1]->dispatch_start(p[1], h + first[1] * H);
  progress_ = d[1];
  float* eo0 = d[0]->expert_out(p[0]);
  run_experts(0, x0, eo0);
  const float* const* x1 = d[1]->dispatch_finish(p[1]);
  d[0]->combine_start(p[0], eo0);
  progress_ = d[0];
  float* eo1 = d[1]->expert_out(p[1]);
  run_experts(1, x1, eo1);
  d[0]->combine_finish(p[0], out);
  d[1]->combine_start(p[1], eo1);
  progress_ = d[1];
  run_shared(1);
  d[1]->combine_finish(p[1], out + first[1] * H);
  if (shared)  // added after the routed experts
    for (int64_t i = 0; i < n * H; ++i) out[i] = out[i] + shared[i];
  for (moe::Dispatcher* x : d) {
    const auto& t = x->exchange_seconds();
    exchange_seconds_ += t.plan + t.dispatch + t.combine;
  }
  ++overlapped_layers_;
}

void Model::run_layer(int64_t l, const Batch& b, kv::KvPool& kv, float* x, int64_t T) {
  const int64_t H = cfg_.hidden_size;
  const LayerWeights& L = layer_weights(l);
  rmsnorm(x, L.attn_norm, T, H, ws_.h.data());
  attention(l, b, kv);
  for (int64_t i = 0; i < T * H; ++i) x[i] = x[i] + ws_.attn_out[i];
  rmsnorm(x, L.ffn_norm, T, H, ws_.h.data());
  if (L.is_moe)
    moe_ffn(l, T);
  else
    dense_ffn(L.mlp, token_rows(ws_.h.data(), T), T, ws_.ffn_out.data());
  for (int64_t i = 0; i < T * H; ++i) x[i] = x[i] + ws_.ffn_out[i];
}

float* Model::layer_workspace(int64_t T) {
  const int64_t H = cfg_.hidden_size;
  sized(ws_.h, T * H);
  sized(ws_.attn_out, T * H);
  sized(ws_.ffn_out, T * H);
  return sized(ws_.x, T * H);
}

void Model::embed_tokens(const Weight& embed, const Batch& b, float* out, int64_t stride) const {
  for (size_t t = 0; t < b.tokens.size(); ++t) {
    const int32_t id = b.tokens[t];
    MS_CHECK(id >= 0 && id < cfg_.vocab_size, "token id ", id, " is out of range [0, ",
             cfg_.vocab_size, ")");
    kernels::dequant_row(embed, id, out + static_cast<int64_t>(t) * stride);
  }
}

void Model::forward(const Batch& b, kv::KvPool& kv, float* logits, float* hidden) {
  const int64_t T = static_cast<int64_t>(b.tokens.size()), H = cfg_.hidden_size;
  forwards_.fetch_add(1, std::memory_order_relaxed);
  choose_overlap(T);
  if (T == 0) {
    // A rank with no tokens still takes part in every MoE exchange of its group.
    if (dispatcher_)
      for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
        if (w_.layers[l].is_moe) moe_ffn(l, 0);
    return;
  }
  float* x = layer_workspace(T);
  embed_tokens(w_.embed, b, x, H);
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) run_layer(l, b, kv, x, T);
  if (hidden) rmsnorm(x, w_.final_norm, T, H, hidden);
  const int64_t R = static_cast<int64_t>(b.logit_rows.size());
  if (!R) return;
  float* rows = sized(ws_.norm_rows, R * H);
  for (int64_t r = 0; r < R; ++r)
    rmsnorm(x + b.logit_rows[r] * H, w_.final_norm, 1, H, rows + r * H);
  matmul(pool_, rows, R, H, w_.lm_head, logits, cfg_.vocab_size, precision_);
}

void Model::load_mtp() {
  if (w_.mtp.present) return;
  const int64_t L = cfg_.num_hidden_layers;
  if (ep_ && cfg_.n_routed_experts > 0 && !ep_->placement.layers().count(L) &&
      !ep_->placement.fallback()) {
    // A placement naming only the main layers: the module's experts in contiguous ranges.
    ep_->placement.set(L, moe::Placement::contiguous(static_cast<int32_t>(cfg_.n_routed_experts),
                                                     ep_->comm->size()));
  }
  ModelWeights only;  // the module alone, for mark_fp8_plain
  only.mtp = load_mtp_weights(*store_, cfg_, local_experts(ep_));
  mark_fp8_plain(only, pool_);
  w_.mtp = std::move(only.mtp);
}

void Model::forward_mtp(const Batch& b, const float* h_in, kv::KvPool& kv, float* logits,
                        float* h_out) {
  MS_CHECK(w_.mtp.present, "the MTP module is not loaded");
  MS_CHECK(kv.n_layers() > cfg_.num_hidden_layers, "the KV cache has no layer for the MTP module");
  const int64_t T = static_cast<int64_t>(b.tokens.size()), H = cfg_.hidden_size;
  forwards_.fetch_add(1, std::memory_order_relaxed);
  // Every rank of the group runs this forward (empty ones included), so they agree here on
  // whether the module's MoE layer overlaps, as the main forward does.
  choose_overlap(T);
  if (T == 0) {
    // A rank with no rows still takes part in the module's MoE exchange.
    if (dispatcher_ && w_.mtp.layer.is_moe) moe_ffn(cfg_.num_hidden_layers, 0);
    return;
  }
  const MtpWeights& m = w_.mtp;
  const Weight& embed = m.embed.data ? m.embed : w_.embed;
  const Weight& head = m.head.data ? m.head : w_.lm_head;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  float* cat = sized(ws_.mtp_cat, T * 2 * H);
  float* x = layer_workspace(T);
  embed_tokens(embed, b, cat, 2 * H);
  for (int64_t t = 0; t < T; ++t) {
    float* e = cat + t * 2 * H;
    rms_row(e, m.enorm.data(), H, eps, e);
    rms_row(h_in + t * H, m.hnorm.data(), H, eps, e + H);
  }
  matmul(pool_, cat, T, 2 * H, m.eh_proj, x, H, precision_);
  run_layer(cfg_.num_hidden_layers, b, kv, x, T);
  float* out = h_out ? h_out : sized(ws_.norm_rows, T * H);
  rmsnorm(x, m.head_norm, T, H, out);
  const int64_t R = static_cast<int64_t>(b.logit_rows.size());
  if (!R) return;
  float* rows = sized(ws_.mtp_cat, R * H);  // (cat is no longer needed)
  for (int64_t r = 0; r < R; ++r) std::copy_n(out + b.logit_rows[r] * H, H, rows + r * H);
  matmul(pool_, rows, R, H, head, logits, cfg_.vocab_size, precision_);
}

size_t Model::weight_bytes_held() const {
  return resident_ ? resident_->used() : store_->total_bytes();
}

void Model::prefault(bool progress, bool copy) {
  if (copy && resident_) return;
  size_t next_report = 0;
  auto report = [&](size_t done, size_t total) {  // every 5%, and the end
    if (!progress || (done < next_report && done < total)) return;
    std::fprintf(stderr, "\rloading weights: %3d%% of %.2f GB%s",
                 static_cast<int>(100.0 * done / std::max<size_t>(total, 1)), total / 1e9,
                 done >= total ? "\n" : "");
    next_report = done + total / 20;
  };
  if (copy) {
    resident_ = make_resident(w_, *store_, pool_, report);
    return;
  }
  const size_t total = store_->total_bytes();
  size_t done = 0;
  volatile uint8_t sink = 0;
  for (const auto& [name, t] : store_->all()) {
    const auto* p = static_cast<const uint8_t*>(t->data);
    for (size_t off = 0; off < t->nbytes; off += 4096) sink = sink + p[off];
    report(done += t->nbytes, total);
  }
}

}  // namespace moeserve::model
