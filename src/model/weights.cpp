#include "model/weights.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace moeserve::model {

namespace {

class Loader {
 public:
  Loader(const WeightStore& s, const ModelConfig& c) : store_(s), cfg_(c) {}

  // A matrix [rows, cols] stored as `<name>`: bf16, f16, f32, or fp8 with `<name>_scale_inv`;
  // or, for a Linear module that a compressed-tensors quantization_config quantizes, as its
  // scheme stores it: pack-quantized, the module's weight_packed, weight_scale and
  // weight_shape; float-quantized, fp8 `<name>` with its block scales in `<module>.weight_scale`
  // (`linear`: whether the module is a Linear layer, which the embedding and the router are not).
  Weight matrix(const std::string& name, int64_t rows, int64_t cols, bool linear = true) const {
    if (cfg_.quant.kind == Quantization::Kind::PackQuantized && linear) {
      const std::string module = name.substr(0, name.size() - std::string(".weight").size());
      const bool packed = store_.has(module + ".weight_packed");
      switch (cfg_.quant.storage(module)) {
        case Storage::Int:
          return quantized(module, rows, cols);
        case Storage::Fp8:
          MS_CHECK(!packed, "tensor ", module,
                   ".weight_packed is int-quantized, but config.json's quantization_config "
                   "stores module ",
                   module, " as fp8 (float-quantized)");
          return fp8(name, rows, cols, module + ".weight_scale", true);
        case Storage::Plain:
          MS_CHECK(!packed, "tensor ", module,
                   ".weight_packed is quantized, but config.json's quantization_config ignores "
                   "module ",
                   module, " (its ignore list names it, or no config group targets it)");
          MS_CHECK(store_.get(name).dtype != DType::F8_E4M3, "tensor ", name,
                   " is F8_E4M3, but config.json's quantization_config has no fp8 config group "
                   "that targets module ",
                   module);
          break;
      }
    }
    const TensorView& t = store_.get(name, {rows, cols});
    if (t.dtype == DType::F8_E4M3) {
      MS_CHECK(cfg_.fp8, "tensor ", name,
               " is F8_E4M3 but config.json declares no fp8 quantization_config");
      return fp8(name, rows, cols, name + "_scale_inv", false);
    }
    MS_CHECK(t.dtype == DType::BF16 || t.dtype == DType::F16 || t.dtype == DType::F32, "tensor ",
             name, " has dtype ", dtype_name(t.dtype), ", supported: BF16, F16, F32, F8_E4M3");
    Weight w;
    w.dtype = t.dtype;
    w.data = t.data;
    w.rows = rows;
    w.cols = cols;
    return w;
  }

  // An fp8 e4m3 matrix `name` [rows, cols] with F32 scales `sname` [ceil(rows / 128),
  // ceil(cols / 128)], one per 128x128 block: weight = float(fp8) * scale (DeepSeek's
  // weight_scale_inv and compressed-tensors' block weight_scale hold the same numbers).
  Weight fp8(const std::string& name, int64_t rows, int64_t cols, const std::string& sname,
             bool declared) const {
    const TensorView& t = store_.get(name, {rows, cols});
    MS_CHECK(t.dtype == DType::F8_E4M3, "tensor ", name, " has dtype ", dtype_name(t.dtype),
             declared ? ", but config.json's quantization_config stores it as fp8 (F8_E4M3)"
                      : ", expected F8_E4M3");
    const int64_t br = (rows + 127) / 128, bc = (cols + 127) / 128;
    MS_CHECK(store_.has(sname), "tensor ", name, " is F8_E4M3 but its scale ", sname,
             " is missing");
    const TensorView& s = store_.get(sname, {br, bc});
    MS_CHECK(s.dtype == DType::F32, "tensor ", sname, " has dtype ", dtype_name(s.dtype),
             ", expected F32");
    Weight w;
    w.dtype = t.dtype;
    w.data = t.data;
    w.rows = rows;
    w.cols = cols;
    w.scale_inv = static_cast<const float*>(s.data);
    w.scale_cols = bc;
    return w;
  }

  // A pack-quantized Linear module: `<module>.weight_packed` I32 [rows, ceil(cols * bits / 32)]
  // read in place as Q4 / Q8, `<module>.weight_scale` [rows, groups] in its stored dtype, and
  // `<module>.weight_shape` [2] = {rows, cols}.
  Weight quantized(const std::string& module, int64_t rows, int64_t cols) const {
    const Quantization& q = cfg_.quant;
    const std::string pname = module + ".weight_packed", sname = module + ".weight_scale",
                      shname = module + ".weight_shape";
    MS_CHECK(store_.has(pname), "tensor ", pname, " is missing: config.json's quantization_config",
             " quantizes module ", module, " (its ignore list does not name it)",
             store_.has(module + ".weight") ? ", but the checkpoint stores it unquantized" : "");
    MS_CHECK(!store_.has(module + ".weight_zero_point"), "tensor ", module,
             ".weight_zero_point: asymmetric int weights (zero points) are not supported");
    const TensorView& shape = store_.get(shname);
    MS_CHECK(shape.shape == std::vector<int64_t>{2} &&
                 (shape.dtype == DType::I64 || shape.dtype == DType::I32),
             "tensor ", shname, " must be I64 or I32 [2], got ", dtype_name(shape.dtype), " ",
             shape.shape_str());
    int64_t stored[2];
    for (int i = 0; i < 2; ++i) {
      if (shape.dtype == DType::I64) {
        std::memcpy(&stored[i], static_cast<const std::byte*>(shape.data) + 8 * i, 8);
      } else {
        int32_t v;
        std::memcpy(&v, static_cast<const std::byte*>(shape.data) + 4 * i, 4);
        stored[i] = v;
      }
    }
    MS_CHECK(stored[0] == rows && stored[1] == cols, "tensor ", shname, " is [", stored[0], ", ",
             stored[1], "], expected [", rows, ", ", cols, "]");
    const int64_t align = q.num_bits == 4 ? 32 : 16;
    MS_CHECK(cols % align == 0, "tensor ", pname, ": int", q.num_bits, " needs columns (", cols,
             ") that are a multiple of ", align);
    const TensorView& p = store_.get(pname, {rows, q.packed_cols(cols)});
    MS_CHECK(p.dtype == DType::I32, "tensor ", pname, " has dtype ", dtype_name(p.dtype),
             ", expected I32");
    const int64_t groups = q.scale_cols(cols);
    const TensorView& s = store_.get(sname, {rows, groups});
    MS_CHECK(s.dtype == DType::BF16 || s.dtype == DType::F16 || s.dtype == DType::F32, "tensor ",
             sname, " has dtype ", dtype_name(s.dtype), ", supported: BF16, F16, F32");
    Weight w;
    w.dtype = q.num_bits == 4 ? DType::Q4 : DType::Q8;
    w.data = p.data;
    w.rows = rows;
    w.cols = cols;
    w.group_scale = s.data;
    w.group_scale_dtype = s.dtype;
    w.group_size = q.group_size > 0 ? q.group_size : cols;
    w.group_cols = groups;
    return w;
  }

  std::vector<float> vec(const std::string& name, int64_t n) const {
    const TensorView& t = store_.get(name, {n});
    std::vector<float> out(n);
    const auto* p = static_cast<const std::byte*>(t.data);
    for (int64_t i = 0; i < n; ++i) {
      switch (t.dtype) {
        case DType::F32:
          std::memcpy(&out[i], p + 4 * i, 4);
          break;
        case DType::BF16:
        case DType::F16: {
          uint16_t h;
          std::memcpy(&h, p + 2 * i, 2);
          out[i] = t.dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
          break;
        }
        default:
          fail("tensor ", name, " has dtype ", dtype_name(t.dtype), ", supported: BF16, F16, F32");
      }
    }
    return out;
  }

  MlpWeights mlp(const std::string& prefix, int64_t inter) const {
    const int64_t h = cfg_.hidden_size;
    return {matrix(prefix + ".gate_proj.weight", inter, h),
            matrix(prefix + ".up_proj.weight", inter, h),
            matrix(prefix + ".down_proj.weight", h, inter)};
  }

 private:
  const WeightStore& store_;
  const ModelConfig& cfg_;
};

}  // namespace

namespace {
// Decoder layer l (model.layers.{l}): attention, then a dense FFN or an MoE.
LayerWeights load_layer(const Loader& ld, const ModelConfig& c, int64_t l,
                        const ExpertFilter& local) {
  const int64_t H = c.hidden_size, nh = c.num_attention_heads;
  const std::string p = "model.layers." + std::to_string(l);
  LayerWeights L;
  L.attn_norm = ld.vec(p + ".input_layernorm.weight", H);
  L.ffn_norm = ld.vec(p + ".post_attention_layernorm.weight", H);
  AttentionWeights& a = L.attn;
  const std::string ap = p + ".self_attn";
  if (c.q_lora_rank) {
    a.q_a_proj = ld.matrix(ap + ".q_a_proj.weight", *c.q_lora_rank, H);
    a.q_a_norm = ld.vec(ap + ".q_a_layernorm.weight", *c.q_lora_rank);
    a.q_b_proj = ld.matrix(ap + ".q_b_proj.weight", nh * c.qk_head_dim(), *c.q_lora_rank);
  } else {
    a.q_proj = ld.matrix(ap + ".q_proj.weight", nh * c.qk_head_dim(), H);
  }
  a.kv_a_proj = ld.matrix(ap + ".kv_a_proj_with_mqa.weight", c.kv_cache_dim(), H);
  a.kv_a_norm = ld.vec(ap + ".kv_a_layernorm.weight", c.kv_lora_rank);
  a.kv_b_proj =
      ld.matrix(ap + ".kv_b_proj.weight", nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
  a.o_proj = ld.matrix(ap + ".o_proj.weight", H, nh * c.v_head_dim);
  MS_CHECK(a.kv_b_proj.dtype != DType::Q4 && a.kv_b_proj.dtype != DType::Q8, "tensor ", ap,
           ".kv_b_proj.weight_packed: a quantized kv_b_proj is not supported (the absorbed "
           "attention reads it transposed; keep it unquantized, as published checkpoints do)");
  L.is_moe = c.is_moe_layer(l);
  const std::string mp = p + ".mlp";
  if (!L.is_moe) {
    L.mlp = ld.mlp(mp, c.intermediate_size);
  } else {
    MoeWeights& m = L.moe;
    m.router = ld.matrix(mp + ".gate.weight", c.n_routed_experts, H, false);
    if (c.topk_method == TopkMethod::NoauxTc)
      m.router_bias = ld.vec(mp + ".gate.e_score_correction_bias", c.n_routed_experts);
    m.experts.resize(c.n_routed_experts);
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      if (local && !local(l, e)) continue;
      m.experts[e] = ld.mlp(mp + ".experts." + std::to_string(e), c.moe_intermediate_size);
    }
    if (c.n_shared_experts > 0)
      m.shared = ld.mlp(mp + ".shared_experts", c.moe_intermediate_size * c.n_shared_experts);
  }
  return L;
}
}  // namespace

ModelWeights load_weights(const WeightStore& store, const ModelConfig& c,
                          const ExpertFilter& local) {
  Loader ld(store, c);
  const int64_t H = c.hidden_size;
  ModelWeights w;
  w.embed = ld.matrix("model.embed_tokens.weight", c.vocab_size, H, false);
  MS_CHECK(w.embed.dtype != DType::F8_E4M3, "model.embed_tokens.weight must not be F8_E4M3");
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) w.layers.push_back(load_layer(ld, c, l, local));
  w.final_norm = ld.vec("model.norm.weight", H);
  // (config.json's tie_word_embeddings is refused, so the head is always its own tensor.)
  w.lm_head = ld.matrix("lm_head.weight", c.vocab_size, H);
  if (c.fp8) {
    bool any = false;
    for_each_matrix(w, [&](Weight& m) { any = any || (m.data && m.dtype == DType::F8_E4M3); });
    MS_CHECK(any,
             "config.json declares fp8 quantization (quantization_config) but no weight "
             "matrix in ",
             store.dir(), " is F8_E4M3");
  }
  return w;
}

MtpWeights load_mtp_weights(const WeightStore& store, const ModelConfig& c,
                            const ExpertFilter& local) {
  MS_CHECK(c.num_nextn_predict_layers > 0,
           "the model has no multi-token-prediction module (config.json's "
           "num_nextn_predict_layers is 0), which speculative decoding needs");
  Loader ld(store, c);
  const int64_t H = c.hidden_size, l = c.num_hidden_layers;
  const std::string p = "model.layers." + std::to_string(l);
  MS_CHECK(store.has(p + ".eh_proj.weight"), "config.json declares num_nextn_predict_layers ",
           c.num_nextn_predict_layers, " but the checkpoint has no ", p, ".eh_proj.weight");
  MtpWeights m;
  m.enorm = ld.vec(p + ".enorm.weight", H);
  m.hnorm = ld.vec(p + ".hnorm.weight", H);
  m.eh_proj = ld.matrix(p + ".eh_proj.weight", H, 2 * H);
  m.layer = load_layer(ld, c, l, local);
  m.head_norm = ld.vec(p + ".shared_head.norm.weight", H);
  // DeepSeek-V3 stores the shared embedding and head again under the module's name; a checkpoint
  // may leave them out, and then the main model's are used.
  if (store.has(p + ".shared_head.head.weight"))
    m.head = ld.matrix(p + ".shared_head.head.weight", c.vocab_size, H);
  if (store.has(p + ".embed_tokens.weight")) {
    m.embed = ld.matrix(p + ".embed_tokens.weight", c.vocab_size, H, false);
    MS_CHECK(m.embed.dtype != DType::F8_E4M3, p, ".embed_tokens.weight must not be F8_E4M3");
  }
  m.present = true;
  return m;
}

void for_each_matrix(ModelWeights& w, const std::function<void(Weight&)>& fn) {
  auto mlp = [&](MlpWeights& m) {
    fn(m.gate);
    fn(m.up);
    fn(m.down);
  };
  auto layer = [&](LayerWeights& L) {
    AttentionWeights& a = L.attn;
    for (Weight* m : {&a.q_proj, &a.q_a_proj, &a.q_b_proj, &a.kv_a_proj, &a.kv_b_proj, &a.o_proj})
      fn(*m);
    mlp(L.mlp);
    fn(L.moe.router);
    for (MlpWeights& e : L.moe.experts) mlp(e);
    mlp(L.moe.shared);
  };
  fn(w.embed);
  for (LayerWeights& L : w.layers) layer(L);
  fn(w.lm_head);
  if (w.mtp.present) {
    fn(w.mtp.eh_proj);
    layer(w.mtp.layer);
    fn(w.mtp.head);
    fn(w.mtp.embed);
  }
}

std::unique_ptr<ResidentWeights> make_resident(
    ModelWeights& w, const WeightStore& store, const ThreadPool& pool,
    const std::function<void(size_t, size_t)>& progress) {
  // The checkpoint's tensors by address; a matrix (or a view of some rows) lies in one.
  struct Span {
    const std::byte *b, *e;
    const TensorView* t;
    bool used = false;
    size_t off = 0;  // in the resident copy
  };
  std::vector<Span> spans;
  for (const auto& [name, t] : store.all()) {
    const auto* b = static_cast<const std::byte*>(t->data);
    if (t->nbytes) spans.push_back({b, b + t->nbytes, t});  // (an empty one holds no matrix)
  }
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) { return x.b < y.b; });
  auto find = [&](const void* p) -> Span& {
    const auto* q = static_cast<const std::byte*>(p);
    auto it = std::upper_bound(spans.begin(), spans.end(), q,
                               [](const std::byte* v, const Span& s) { return v < s.b; });
    MS_ASSERT(it != spans.begin() && q < std::prev(it)->e);
    return *std::prev(it);
  };
  for_each_matrix(w, [&](Weight& m) {
    if (!m.data || m.rows == 0 || m.cols == 0) return;
    find(m.data).used = true;
    if (m.scale_inv) find(m.scale_inv).used = true;
    if (m.group_scale) find(m.group_scale).used = true;
  });
  size_t total = 0;
  for (Span& s : spans)
    if (s.used) s.off = total, total += (s.t->nbytes + 63) / 64 * 64;
  auto r = std::make_unique<ResidentWeights>(total);
  // Tensor by tensor in file order, 1 MB pieces over the threads; each piece's mapped pages go
  // as soon as it is copied, so the resident copy grows as the mapping shrinks.
  constexpr size_t kPiece = size_t{1} << 20;
  size_t done = 0;
  for (Span& s : spans) {
    if (!s.used) continue;
    const size_t n = s.t->nbytes;
    std::byte* dst = r->data() + s.off;
    pool.parallel_for(static_cast<int64_t>((n + kPiece - 1) / kPiece),
                      [&](int64_t b, int64_t e, int) {
                        for (int64_t i = b; i < e; ++i) {
                          const size_t lo = i * kPiece, len = std::min(n, lo + kPiece) - lo;
                          std::memcpy(dst + lo, s.b + lo, len);
                          store.release(*s.t, s.b + lo, len);
                        }
                      });
    done += n;
    if (progress) progress(done, total);
  }
  store.release_all();  // the pages shared by neighbouring tensors, and whatever else was read
  for_each_matrix(w, [&](Weight& m) {
    if (!m.data || m.rows == 0 || m.cols == 0) return;
    const Span& s = find(m.data);
    const Span& sc = m.scale_inv ? find(m.scale_inv) : s;
    const auto* scale = reinterpret_cast<const std::byte*>(m.scale_inv);
    m.data = r->data() + s.off + (static_cast<const std::byte*>(m.data) - s.b);
    if (m.scale_inv)
      m.scale_inv = reinterpret_cast<const float*>(r->data() + sc.off + (scale - sc.b));
    if (m.group_scale) {
      const Span& g = find(m.group_scale);
      m.group_scale = r->data() + g.off + (static_cast<const std::byte*>(m.group_scale) - g.b);
    }
  });
  return r;
}

void mark_fp8_plain(ModelWeights& w, const ThreadPool& pool) {
  std::vector<Weight*> fp8;
  for_each_matrix(w, [&](Weight& m) {
    if (m.dtype == DType::F8_E4M3 && m.data) fp8.push_back(&m);
  });
  // Pieces of at most 1 MB, so the threads share big and small tensors evenly. A tensor is
  // plain when every piece is (each piece's subnormal budget is its share of the tensor's).
  constexpr size_t kPiece = size_t{1} << 20;
  struct Piece {
    size_t weight, offset, n;
  };
  std::vector<Piece> pieces;
  for (size_t i = 0; i < fp8.size(); ++i) {
    const size_t n = static_cast<size_t>(fp8[i]->rows * fp8[i]->cols);
    for (size_t off = 0; off < n; off += kPiece)
      pieces.push_back({i, off, std::min(kPiece, n - off)});
  }
  std::vector<uint8_t> plain(pieces.size());
  pool.parallel_for(static_cast<int64_t>(pieces.size()), [&](int64_t b, int64_t e, int) {
    for (int64_t p = b; p < e; ++p) {
      const Piece& pc = pieces[p];
      plain[p] =
          kernels::fp8_plain(static_cast<const uint8_t*>(fp8[pc.weight]->data) + pc.offset, pc.n);
    }
  });
  for (Weight* m : fp8) m->fp8_plain = true;
  for (size_t p = 0; p < pieces.size(); ++p)
    if (!plain[p]) fp8[pieces[p].weight]->fp8_plain = false;
}

namespace {
size_t mlp_bytes(const MlpWeights& m) {
  return m.present() ? m.gate.bytes() + m.up.bytes() + m.down.bytes() : 0;
}
size_t elems(const Weight& w) {
  return static_cast<size_t>(w.rows * w.cols);
}
}  // namespace

size_t routed_expert_bytes(const ModelWeights& w) {
  for (const LayerWeights& L : w.layers)
    for (const MlpWeights& e : L.moe.experts)
      if (e.present()) return mlp_bytes(e);
  return 0;
}

size_t routed_expert_elems(const ModelConfig& c) {
  return 3 * static_cast<size_t>(c.moe_intermediate_size * c.hidden_size);
}

size_t active_matrix_elems(const ModelWeights& w, const ModelConfig& c) {
  const size_t routed = routed_expert_elems(c) * static_cast<size_t>(c.num_experts_per_tok);
  size_t n = elems(w.lm_head);
  for (const LayerWeights& L : w.layers) {
    const AttentionWeights& a = L.attn;
    for (const Weight* m : {&a.q_proj, &a.q_a_proj, &a.q_b_proj, &a.kv_a_proj, &a.o_proj})
      if (m->data) n += elems(*m);
    if (!L.is_moe) {
      n += 3 * elems(L.mlp.gate);
    } else {
      n += elems(L.moe.router);
      if (L.moe.shared.present()) n += 3 * elems(L.moe.shared.gate);
      n += routed;
    }
  }
  return n;
}

size_t active_weight_bytes(const ModelWeights& w, const ModelConfig& c) {
  const size_t routed = routed_expert_bytes(w) * static_cast<size_t>(c.num_experts_per_tok);
  size_t n = w.embed.bytes() / static_cast<size_t>(c.vocab_size) + w.lm_head.bytes();
  for (const LayerWeights& L : w.layers) {
    const AttentionWeights& a = L.attn;
    for (const Weight* m :
         {&a.q_proj, &a.q_a_proj, &a.q_b_proj, &a.kv_a_proj, &a.kv_b_proj, &a.o_proj})
      if (m->data) n += m->bytes();
    if (!L.is_moe) {
      n += mlp_bytes(L.mlp);
    } else {
      n += L.moe.router.bytes() + mlp_bytes(L.moe.shared);
      n += routed;
    }
  }
  return n;
}

}  // namespace moeserve::model
