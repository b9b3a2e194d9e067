// Multi-head latent attention (MLA) over the paged latent cache, with the absorbed weights:
// per head, q_nope is taken into the latent space through W_UK (the first qk_nope_head_dim rows
// of the head's kv_b_proj block), scores are q_lat . c + q_pe . k_pe, and the softmax-weighted
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

void Model::attention(int64_t layer, const Batch& b, kv::KvPool& kv) {
  const AttentionWeights& a = w_.layers[layer].attn;
  const ModelConfig& c = cfg_;
  const int64_t T = static_cast<int64_t>(b.tokens.size()), H = c.hidden_size;
  const int64_t nh = c.num_attention_heads, nope = c.qk_nope_head_dim, rd = c.qk_rope_head_dim;
  const int64_t qd = c.qk_head_dim(), vd = c.v_head_dim, L = c.kv_lora_rank, kvd = c.kv_cache_dim();
  // The q_a and kv_a norms are built without an eps argument in the official model: 1e-6.
  const float eps = 1e-6f;
  const float* h = ws_.h.data();

  // Projections: q [T, nh * qd], kv [T, L + rd].
  float* q = sized(ws_.q, T * nh * qd);
  if (c.q_lora_rank) {
    const int64_t ql = *c.q_lora_rank;
    float* qa = sized(ws_.q_a, T * ql);
    matmul(pool_, h, T, H, a.q_a_proj, qa, ql);
    for (int64_t t = 0; t < T; ++t) rms_row(qa + t * ql, a.q_a_norm.data(), ql, eps, qa + t * ql);
    matmul(pool_, qa, T, ql, a.q_b_proj, q, nh * qd);
  } else {
    matmul(pool_, h, T, H, a.q_proj, q, nh * qd);
  }
  float* kvp = sized(ws_.kv, T * kvd);
  matmul(pool_, h, T, H, a.kv_a_proj, kvp, kvd);

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
      std::copy_n(kt, kvd, kv.at(s.block_table[pos / bs], layer, pos % bs));
    }
  }

  // Absorb: q_lat[t, hd] = W_UK[hd]^T q_nope[t, hd]   -> [T, nh, L]
  float* q_lat = sized(ws_.q_lat, T * nh * L);
  for (int64_t hd = 0; hd < nh; ++hd) {
    const kernels::Weight wuk = a.kv_b_proj.rows_view(hd * (nope + vd), nope);
    matmul_t(pool_, q + hd * qd, T, nh * qd, wuk, q_lat + hd * L, nh * L);
  }

  // Scores, softmax and the latent output, one (token, head) pair at a time.
  std::vector<int64_t> row_seq(T);
  for (int64_t si = 0; si < static_cast<int64_t>(b.seqs.size()); ++si)
    for (int64_t i = 0; i < b.seqs[si].n_tokens; ++i) row_seq[b.seqs[si].row_begin + i] = si;
  float* o_lat = sized(ws_.o_lat, T * nh * L);
  const float scale = static_cast<float>(c.softmax_scale());
  pool_.parallel_for(T * nh, [&](int64_t begin, int64_t end, int) {
    std::vector<float> p(max_ctx);
    for (int64_t th = begin; th < end; ++th) {
      const int64_t t = th / nh, hd = th % nh;
      const SeqChunk& s = b.seqs[row_seq[t]];
      const int64_t ctx = s.n_past + (t - s.row_begin) + 1;
      const float* ql = q_lat + (t * nh + hd) * L;
      const float* qpe = q + t * nh * qd + hd * qd + nope;
      const int64_t bs = kv.block_size();
      float mx = -INFINITY;
      for (int64_t j = 0; j < ctx; ++j) {
        const float* cj = kv.at(s.block_table[j / bs], layer, j % bs);
        p[j] = (kernels::dot(ql, cj, L) + kernels::dot(qpe, cj + L, rd)) * scale;
        mx = std::max(mx, p[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < ctx; ++j) sum += (p[j] = std::exp(p[j] - mx));
      float* o = o_lat + (t * nh + hd) * L;
      std::fill_n(o, L, 0.0f);
      for (int64_t j = 0; j < ctx; ++j)
        kernels::axpy(p[j] / sum, kv.at(s.block_table[j / bs], layer, j % bs), o, L);
    }
  });

  // Out of the latent space: o_heads[t, hd] = W_UV[hd] o_lat[t, hd], then o_proj.
  float* oh = sized(ws_.o_heads, T * nh * vd);
  for (int64_t hd = 0; hd < nh; ++hd) {
    const kernels::Weight wuv = a.kv_b_proj.rows_view(hd * (nope + vd) + nope, vd);
    matmul(pool_, o_lat + hd * L, T, nh * L, wuv, oh + hd * vd, nh * vd);
  }
  matmul(pool_, oh, T, nh * vd, a.o_proj, ws_.attn_out.data(), H);
}

}  // namespace moeserve::model
