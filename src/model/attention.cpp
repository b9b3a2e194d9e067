// Multi-head latent attention (MLA) over the paged latent cache, with the absorbed weights:
// per head, q_nope is taken into the latent space through W_UK (the first qk_nope_head_dim rows
// of the head's kv_b_proj block), scores are [q_lat, q_pe] . [c, k_pe], and the softmax-weighted
// sum of latents goes out through W_UV (the head's other v_head_dim rows). Per-head K and V are
// never materialized. Every (token, head) is computed on its own, in a fixed order, so the result
// does not depend on what else is in the batch.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "model/model.h"
#include "model/ops.h"

namespace moeserve::model {

using kernels::matmul;
using kernels::matmul_t;

namespace {
// Up to this many tokens, the absorbed per-head products are shared out by head.
constexpr int64_t kFewTokens = 16;
}  // namespace

void Model::attention(int64_t layer, const Batch& b, kv::KvPool& kv) {
  const AttentionWeights& a = layer_weights(layer).attn;
  const ModelConfig& c = cfg_;
  const int64_t T = static_cast<int64_t>(b.tokens.size()), H = c.hidden_size;
  const int64_t nh = c.num_attention_heads, nope = c.qk_nope_head_dim, rd = c.qk_rope_head_dim;
  const int64_t qd = c.qk_head_dim(), vd = c.v_head_dim, L = c.kv_lora_rank, kvd = c.kv_cache_dim();
  // The q_a and kv_a norms are built without an eps argument in the official model: 1e-6.
  const float eps = 1e-6f;
  const float* h = ws_.h.data();

  // Projections: q [T, nh * qd], kv [T, L + rd].
  float* q = sized(ws_.q, T * nh * qd);
  float* kvp = sized(ws_.kv, T * kvd);
  if (c.q_lora_rank) {
    // q_a and kv_a both read h: one batch (in decode, one fan-out over both matrices' rows).
    const int64_t ql = *c.q_lora_rank;
    float* qa = sized(ws_.q_a, T * ql);
    const kernels::MatmulJob jobs[] = {{h, T, H, &a.q_a_proj, qa, ql, nullptr, precision_},
                                       {h, T, H, &a.kv_a_proj, kvp, kvd, nullptr, precision_}};
    kernels::matmul_batch(pool_, jobs, 2);
    for (int64_t t = 0; t < T; ++t) rms_row(qa + t * ql, a.q_a_norm.data(), ql, eps, qa + t * ql);
    matmul(pool_, qa, T, ql, a.q_b_proj, q, nh * qd, precision_);
  } else {
    matmul(pool_, h, T, H, a.q_proj, q, nh * qd, precision_);
    matmul(pool_, h, T, H, a.kv_a_proj, kvp, kvd, precision_);
  }

  // RoPE on q_pe of every head and on k_pe; normalize the latent; write the cache.
  std::vector<float> cs(rd);
  int64_t max_ctx = 0;
  for (const SeqChunk& s : b.seqs) {
    max_ctx = std::max(max_ctx, s.n_past + s.n_tokens);
    for (int64_t i = 0; i < s.n_tokens; ++i) {
      const int64_t t = s.row_begin + i, pos = s.n_past + i;
      rope_.table(pos, cs.data());
      for (int64_t hd = 0; hd < nh; ++hd)
        Rope::apply(cs.data(), q + t * nh * qd + hd * qd + nope, rd);
      float* kt = kvp + t * kvd;
      rms_row(kt, a.kv_a_norm.data(), L, eps, kt);
      Rope::apply(cs.data(), kt + L, rd);
      const int64_t bs = kv.block_size();
      kv.store(kt, s.block_table[pos / bs], layer, pos % bs);
    }
  }

  // The latent-space part, a chunk of tokens at a time (each token's result is its own), then
  // o_proj over all of them.
  float* oh = sized(ws_.o_heads, T * nh * vd);
  for (int64_t r0 = 0; r0 < T; r0 += kAttnChunk)
    attention_core(layer, b, kv, r0, std::min(T, r0 + kAttnChunk), max_ctx);
  matmul(pool_, oh, T, nh * vd, a.o_proj, ws_.attn_out.data(), H, precision_);
}

void Model::attention_core(int64_t layer, const Batch& b, kv::KvPool& kv, int64_t r0, int64_t r1,
                           int64_t max_ctx) {
  const AttentionWeights& a = layer_weights(layer).attn;
  const ModelConfig& c = cfg_;
  const int64_t T = r1 - r0;
  const int64_t nh = c.num_attention_heads, nope = c.qk_nope_head_dim, rd = c.qk_rope_head_dim;
  const int64_t qd = c.qk_head_dim(), vd = c.v_head_dim, L = c.kv_lora_rank;
  const float* q = ws_.q.data() + r0 * nh * qd;  // rows [r0, r1)
  float* oh = ws_.o_heads.data() + r0 * nh * vd;

  // fn(hd) for every head. With few tokens each head's product is too small to share out on
  // its own, so the heads are shared among the threads (the products inside run on one thread);
  // with many, each product is shared out. Either way every head's result is the same.
  auto per_head = [&](const auto& fn) {
    if (T <= kFewTokens) {
      pool_.parallel_for(nh, [&](int64_t h0, int64_t h1, int) {
        for (int64_t hd = h0; hd < h1; ++hd) fn(hd);
      });
    } else {
      for (int64_t hd = 0; hd < nh; ++hd) fn(hd);
    }
  };

  // Absorb: q_lat[t, hd] = [W_UK[hd]^T q_nope[t, hd], q_pe[t, hd]]   -> [T, nh, L + rd], so
  // that a head's score against a cached row [c, k_pe] is one dot product.
  const int64_t kvd = c.kv_cache_dim();
  float* q_lat = sized(ws_.q_lat, T * nh * kvd);
  per_head([&](int64_t hd) {
    const kernels::Weight wuk = a.kv_b_proj.rows_view(hd * (nope + vd), nope);
    matmul_t(pool_, q + hd * qd, T, nh * qd, wuk, q_lat + hd * kvd, nh * kvd);
    for (int64_t t = 0; t < T; ++t)
      std::copy_n(q + t * nh * qd + hd * qd + nope, rd, q_lat + (t * nh + hd) * kvd + L);
  });

  // Scores, softmax and the latent output of one token, all heads (MLA is multi-query in the
  // latent space: every head reads the same cached rows). Each phase is shared among the
  // threads: the cached rows for the scores, the heads for the softmax, the latent columns for
  // the sum. Called from inside a parallel_for, the phases run on the calling thread (the
  // pool's nesting rule). Either way every score and output element is computed the same.
  std::vector<int64_t> row_seq(T);
  for (int64_t si = 0; si < static_cast<int64_t>(b.seqs.size()); ++si) {
    const SeqChunk& s = b.seqs[si];
    for (int64_t i = 0; i < s.n_tokens; ++i)
      if (s.row_begin + i >= r0 && s.row_begin + i < r1) row_seq[s.row_begin + i - r0] = si;
  }
  float* o_lat = sized(ws_.o_lat, T * nh * L);
  const float scale = static_cast<float>(c.softmax_scale());
  const int64_t bs = kv.block_size();
  const DType cache_dtype = kv.dtype() == kv::KvDtype::F32    ? DType::F32
                            : kv.dtype() == kv::KvDtype::BF16 ? DType::BF16
                                                              : DType::F8_E4M3;
  auto token = [&](int64_t t, float* p, const uint8_t** rows) {
    const SeqChunk& s = b.seqs[row_seq[t]];
    const int64_t ctx = s.n_past + (r0 + t - s.row_begin) + 1;
    for (int64_t j = 0; j < ctx; ++j) rows[j] = kv.at(s.block_table[j / bs], layer, j % bs);
    const float* ql = q_lat + t * nh * kvd;
    pool_.parallel_for(
        ctx,
        [&](int64_t j0, int64_t j1, int) {
          const kernels::CachedRows cr{cache_dtype, rows + j0, kvd};
          kernels::dots_cached(ql, nh, kvd, cr, j1 - j0, p + j0, max_ctx);
        },
        16);
    pool_.parallel_for(nh, [&](int64_t h0, int64_t h1, int) {
      for (int64_t i = h0; i < h1; ++i) {
        kernels::softmax(p + i * max_ctx, ctx, scale);
      }
    });
    pool_.parallel_for(
        L,
        [&](int64_t c0, int64_t c1, int) {
          const kernels::CachedRows cr{cache_dtype, rows, kvd};
          kernels::weighted_cached(p, nh, max_ctx, cr, ctx, c0, c1 - c0, o_lat + t * nh * L + c0,
                                   L);
        },
        16);
  };
  if (T < pool_.size()) {
    // Decode: one token at a time, all threads on it, so the cache is read twice per layer
    // whatever the thread count.
    float* p = sized(ws_.scores, nh * max_ctx);
    ws_.score_rows.resize(max_ctx);
    for (int64_t t = 0; t < T; ++t) token(t, p, ws_.score_rows.data());
  } else {
    pool_.parallel_for(T, [&](int64_t t0, int64_t t1, int) {
      std::vector<float> p(nh * max_ctx);
      std::vector<const uint8_t*> rows(max_ctx);
      for (int64_t t = t0; t < t1; ++t) token(t, p.data(), rows.data());
    });
  }

  // Out of the latent space: o_heads[t, hd] = W_UV[hd] o_lat[t, hd].
  per_head([&](int64_t hd) {
    const kernels::Weight wuv = a.kv_b_proj.rows_view(hd * (nope + vd) + nope, vd);
    matmul(pool_, o_lat + hd * L, T, nh * L, wuv, oh + hd * vd, nh * vd);
  });
}

}  // namespace moeserve::model
