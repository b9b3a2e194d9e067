// perplexity: how well a model predicts a text, and how far its next-token distributions are
// from those of a base model saved earlier (KL divergence, top-1 agreement): the measure of a
// quantized checkpoint against the one it was made from.
//
// The rule (the same as llama.cpp's llama-perplexity): the text becomes one list of token ids;
// chunk c is ids [c*ctx, (c+1)*ctx), each run as a fresh sequence (nothing cached from the chunk
// before); when the text was tokenized with a tokenizer that adds a BOS token, the first id of
// every chunk is replaced by BOS. The first half of a chunk is context only: with
// first = ctx / 2, the logits at positions first .. ctx-2 are scored against the ids at
// first+1 .. ctx-1, i.e. ctx - 1 - first tokens per chunk. The ids after the last whole chunk
// are not used.
//
// The logits file (--save-logits, read by --kl-base), little-endian:
//   "MSLOGITS" | u64 header bytes | header JSON | one record per scored token, chunk by chunk
//   record: i32 argmax | f64 log P(target) | f32 log P(rest) | top_k x i32 ids | top_k x f32
//   log-probs; with top_k = 0 (whole rows) no ids and vocab_size x f32 log-probs in id order.
// The top-k ids are the base's most likely tokens (ties: the lower id first); "rest" is the
// probability of all the other tokens together (-inf with whole rows).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "cli/commands.h"
#include "cli/common.h"
#include "cli/parallel.h"
#include "core/error.h"
#include "engine/generator.h"
#include "engine/sampler.h"
#include "tokenizer/tokenizer.h"

namespace moeserve::cli {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr char kMagic[8] = {'M', 'S', 'L', 'O', 'G', 'I', 'T', 'S'};
constexpr int kFormatVersion = 1;
// Tokens per forward within a chunk (the chunk's KV cache carries the rest).
constexpr int64_t kPiece = 512;

struct PplArgs {
  std::string model, file, tokens_file, tokenizer, save_logits, kl_base;
  bool byte_tokens = false, json = false;
  int64_t ctx = 512, chunks = 0, top_k = 64, batch = 1;
  std::string kv_cache_dtype;  // add_kv_cache_dtype_option
  ParallelArgs par;
  const CLI::Option* ctx_opt = nullptr;
  const CLI::Option* top_k_opt = nullptr;
};

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string read_all(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  MS_CHECK(in.good(), "cannot open ", flag, " ", path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The token ids of the input and whether each chunk starts with the tokenizer's BOS.
struct Tokens {
  std::vector<int32_t> ids;
  int32_t bos = -1;    // replaces the first id of every chunk when >= 0
  std::string source;  // how the ids were made, for the header and the report
};

Tokens read_tokens(const PplArgs& a) {
  Tokens t;
  if (!a.tokens_file.empty()) {
    const json j = json::parse(read_all(a.tokens_file, "--tokens-file"), nullptr, false);
    const json* arr = &j;
    if (j.is_object() && j.contains("ids")) arr = &j["ids"];
    MS_CHECK(arr->is_array(), "--tokens-file ", a.tokens_file,
             " must hold a JSON list of token ids (or {\"ids\": [...]})");
    for (const json& v : *arr) {
      MS_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 &&
                   v.get<int64_t>() <= std::numeric_limits<int32_t>::max(),
               "--tokens-file ", a.tokens_file, ": ", v.dump(), " is not a token id");
      t.ids.push_back(v.get<int32_t>());
    }
    t.source = "ids of " + fs::path(a.tokens_file).filename().string();
    return t;
  }
  const std::string text = read_all(a.file, "--file");
  if (a.byte_tokens) {
    t.ids.reserve(text.size());
    for (const unsigned char c : text) t.ids.push_back(c);
    t.source = "bytes of " + fs::path(a.file).filename().string();
    return t;
  }
  const std::string dir = a.tokenizer.empty() ? a.model : a.tokenizer;
  MS_CHECK(fs::exists(fs::path(dir) / "tokenizer.json"), dir,
           " has no tokenizer.json: give --tokenizer DIR, --tokens-file FILE (JSON ids), or "
           "--byte-tokens (each byte of the text is one token id)");
  const tokenizer::Tokenizer tok = tokenizer::Tokenizer::load(dir);
  t.ids = tok.encode(text, /*add_special=*/true);
  if (tok.add_bos() && tok.bos_id() >= 0) t.bos = tok.bos_id();
  t.source = "tokens of " + fs::path(a.file).filename().string();
  return t;
}

// One scored position of the base model, as stored in the logits file.
struct BaseRow {
  int32_t argmax = 0;
  double target_lp = 0;
  float rest_lp = 0;
  std::vector<int32_t> ids;  // empty with whole rows
  std::vector<float> lps;
};

size_t record_bytes(int64_t top_k, int64_t vocab) {
  return 4 + 8 + 4 + (top_k > 0 ? static_cast<size_t>(top_k) * 8 : static_cast<size_t>(vocab) * 4);
}

// log of the summed probability of the tokens not marked in `in_set` (-inf when none).
float rest_logprob(const std::vector<float>& lq, const std::vector<uint8_t>& in_set) {
  double mx = -std::numeric_limits<double>::infinity();
  for (size_t v = 0; v < lq.size(); ++v)
    if (!in_set[v]) mx = std::max(mx, static_cast<double>(lq[v]));
  if (mx == -std::numeric_limits<double>::infinity())
    return -std::numeric_limits<float>::infinity();
  double s = 0;
  for (size_t v = 0; v < lq.size(); ++v)
    if (!in_set[v]) s += std::exp(static_cast<double>(lq[v]) - mx);
  return static_cast<float>(mx + std::log(s));
}

int32_t argmax_of(const std::vector<float>& lq) {
  int32_t best = 0;
  for (size_t v = 1; v < lq.size(); ++v)
    if (lq[v] > lq[best]) best = static_cast<int32_t>(v);
  return best;
}

// Sums and their squares, for a mean with its standard error.
struct Mean {
  double sum = 0, sum2 = 0;
  int64_t n = 0;
  void add(double x) {
    sum += x;
    sum2 += x * x;
    ++n;
  }
  double mean() const { return n ? sum / n : 0.0; }
  // Standard error of the mean: sqrt(var / (n - 1)), var the spread of the samples.
  double stderr_() const {
    if (n < 2) return 0.0;
    const double m = mean(), var = std::max(0.0, sum2 / n - m * m);
    return std::sqrt(var / (n - 1));
  }
};

struct BaseFile {
  json header;
  std::ifstream in;
  int64_t top_k = 0, vocab = 0, ctx = 0, n_chunks = 0;
  std::vector<int32_t> tokens;  // the ids run, n_chunks * ctx
  std::string model;            // the folder it was saved from

  BaseRow read_row() {
    BaseRow r;
    in.read(reinterpret_cast<char*>(&r.argmax), 4);
    in.read(reinterpret_cast<char*>(&r.target_lp), 8);
    in.read(reinterpret_cast<char*>(&r.rest_lp), 4);
    const int64_t n = top_k > 0 ? top_k : vocab;
    if (top_k > 0) {
      r.ids.resize(n);
      in.read(reinterpret_cast<char*>(r.ids.data()), n * 4);
    }
    r.lps.resize(n);
    in.read(reinterpret_cast<char*>(r.lps.data()), n * 4);
    MS_CHECK(in.good(), "--kl-base: read error");
    bool ok = r.argmax >= 0 && r.argmax < vocab;
    for (const int32_t id : r.ids) ok = ok && id >= 0 && id < vocab;
    MS_CHECK(ok, "--kl-base: the file is damaged (a token id out of range)");
    return r;
  }
};

BaseFile open_base(const std::string& path) {
  BaseFile b;
  b.in.open(path, std::ios::binary);
  MS_CHECK(b.in.good(), "cannot open --kl-base ", path);
  char magic[8] = {};
  uint64_t hlen = 0;
  b.in.read(magic, 8);
  b.in.read(reinterpret_cast<char*>(&hlen), 8);
  MS_CHECK(b.in.good() && std::memcmp(magic, kMagic, 8) == 0 && hlen < (1ull << 32), path,
           " is not a logits file written by `moeserve perplexity --save-logits`");
  std::string h(hlen, '\0');
  b.in.read(h.data(), static_cast<std::streamsize>(hlen));
  b.header = json::parse(h, nullptr, false);
  MS_CHECK(b.in.good() && b.header.is_object(), path, ": the header is damaged");
  const json& hd = b.header;
  try {
    const int version = hd.at("version").get<int>();
    MS_CHECK(version == kFormatVersion, path, " has format version ", version,
             "; this moeserve reads version ", kFormatVersion);
    b.top_k = hd.at("top_k").get<int64_t>();
    b.vocab = hd.at("vocab_size").get<int64_t>();
    b.ctx = hd.at("ctx").get<int64_t>();
    b.n_chunks = hd.at("n_chunks").get<int64_t>();
    b.tokens = hd.at("tokens").get<std::vector<int32_t>>();
    b.model = hd.at("model").get<std::string>();
    const int64_t scored = hd.at("scored_per_chunk").get<int64_t>();
    MS_CHECK(b.vocab > 0 && b.top_k >= 0 && b.top_k < b.vocab && b.ctx >= 4 && b.n_chunks >= 1 &&
                 scored == b.ctx - 1 - b.ctx / 2 &&
                 static_cast<int64_t>(b.tokens.size()) == b.n_chunks * b.ctx,
             "inconsistent");
  } catch (const Error& e) {
    if (std::string(e.what()) != "inconsistent") throw;
    fail(path, ": the header is damaged");
  } catch (const json::exception&) {
    fail(path, ": the header is damaged");
  }
  const size_t rows = static_cast<size_t>(b.n_chunks * (b.ctx - 1 - b.ctx / 2));
  const size_t want = 16 + hlen + rows * record_bytes(b.top_k, b.vocab);
  MS_CHECK(fs::file_size(path) == want, path, " is truncated or damaged: ", fs::file_size(path),
           " bytes, its header says ", want);
  return b;
}

// The value at fraction q of the sorted samples (nearest rank: the smallest value with at least
// q of the samples at or below it).
double quantile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0.0;
  const auto r = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted.size())));
  return sorted[std::min(sorted.size() - 1, r > 0 ? r - 1 : 0)];
}

void run_perplexity(const PplArgs& a) {
  ParallelModel pm(a.par);
  const bool root = pm.is_root();
  // Everything that can be wrong with the flags, the text or the base file is found before the
  // model is loaded, on rank 0, and ends every rank.
  Tokens tok;
  model::ModelConfig cfg;
  std::optional<BaseFile> base;
  int64_t ctx = a.ctx, n_chunks = 0;
  pm.check_all([&] {
    if (!root) return;
    MS_CHECK(a.file.empty() != a.tokens_file.empty(),
             "give exactly one of --file and --tokens-file");
    MS_CHECK(a.tokens_file.empty() || (!a.byte_tokens && a.tokenizer.empty()),
             "--byte-tokens and --tokenizer go with --file, not --tokens-file");
    MS_CHECK(!a.byte_tokens || a.tokenizer.empty(),
             "give at most one of --byte-tokens and --tokenizer");
    MS_CHECK(a.save_logits.empty() || a.kl_base.empty(),
             "give at most one of --save-logits and --kl-base");
    MS_CHECK(a.top_k >= 0, "--save-top-k must be >= 0");
    MS_CHECK(a.top_k_opt->count() == 0 || !a.save_logits.empty(),
             "--save-top-k goes with --save-logits");
    MS_CHECK(a.chunks >= 0, "--chunks must be >= 0");
    MS_CHECK(a.batch >= 1, "--batch must be at least 1 (got ", a.batch, ")");
    cfg = model::ModelConfig::load(a.model);
    if (!a.kl_base.empty()) {
      base = open_base(a.kl_base);
      const int64_t bctx = base->ctx;
      if (a.ctx_opt->count() == 0) ctx = bctx;
      MS_CHECK(ctx == bctx, "--kl-base ", a.kl_base, " was saved with --ctx ", bctx,
               "; this run uses --ctx ", ctx, " (they must be the same)");
      MS_CHECK(base->vocab == cfg.vocab_size, "--kl-base ", a.kl_base,
               " was saved from a model with a vocabulary of ", base->vocab, " tokens; ", a.model,
               " has ", cfg.vocab_size);
    }
    MS_CHECK(ctx >= 4, "--ctx must be at least 4 (got ", ctx, ")");
    MS_CHECK(ctx <= cfg.max_position_embeddings, "--ctx ", ctx, " is longer than the model's ",
             cfg.max_position_embeddings, " positions (max_position_embeddings)");
    tok = read_tokens(a);
    for (size_t i = 0; i < tok.ids.size(); ++i)
      MS_CHECK(tok.ids[i] < cfg.vocab_size, "token ", i, " of the input is id ", tok.ids[i],
               ", outside the model's vocabulary of ", cfg.vocab_size,
               (tok.source.rfind("tokens of", 0) == 0 ? " (a tokenizer for another model?)" : ""));
    const int64_t avail = static_cast<int64_t>(tok.ids.size()) / ctx;
    MS_CHECK(avail >= 1, "the input has ", tok.ids.size(),
             " tokens, fewer than one chunk of --ctx ", ctx);
    n_chunks = avail;
    if (base) {
      const int64_t bn = base->n_chunks;
      n_chunks = std::min(n_chunks, bn);
      if (a.chunks > 0) {
        MS_CHECK(a.chunks <= bn, "--kl-base ", a.kl_base, " holds ", bn,
                 " chunks; --chunks asks for ", a.chunks);
        n_chunks = std::min(n_chunks, a.chunks);
      }
    } else if (a.chunks > 0) {
      if (a.chunks > avail)
        std::fprintf(stderr, "note: the input holds only %lld chunks of %lld tokens\n",
                     static_cast<long long>(avail), static_cast<long long>(ctx));
      n_chunks = std::min(avail, a.chunks);
    }
    // The ids as run: the chunks, each with BOS first when the tokenizer adds one.
    tok.ids.resize(n_chunks * ctx);
    if (tok.bos >= 0)
      for (int64_t c = 0; c < n_chunks; ++c) tok.ids[c * ctx] = tok.bos;
    if (base) {
      const std::vector<int32_t>& bids = base->tokens;
      for (size_t i = 0; i < tok.ids.size(); ++i)
        MS_CHECK(i < bids.size() && bids[i] == tok.ids[i], "the input differs from the one ",
                 a.kl_base, " was saved with, at token ", i % ctx, " of chunk ", i / ctx,
                 " (another text, tokenizer or --ctx?)");
    }
  });
  pm.load(a.model);
  model::Model& m = pm.model();
  // Every chunk reads all the weights: bring them in first (copied unless --mmap), so that the
  // time per chunk is the forwards'.
  m.prefault(/*progress=*/root, /*copy=*/!a.par.mmap);
  engine::Generator gen(m);
  if (!root) {  // the other ranks hold experts and follow rank 0's forwards
    gen.drain();
    pm.write_expert_load();
    return;
  }
  if (has_random_weights(a.model))
    std::fprintf(stderr, "note: %s holds RANDOM weights (made by `moeserve init-model`)\n",
                 a.model.c_str());

  const int64_t V = cfg.vocab_size, first = ctx / 2, scored = ctx - 1 - first;
  const int64_t top_k = a.top_k >= V ? 0 : a.top_k;  // k covering the vocabulary: whole rows
  std::ofstream out;
  std::string partial;
  if (!a.save_logits.empty()) {
    partial = a.save_logits + ".partial";
    out.open(partial, std::ios::binary | std::ios::trunc);
    MS_CHECK(out.good(), "cannot write --save-logits ", a.save_logits);
    const json h = {{"format", "moeserve-logits"},
                    {"version", kFormatVersion},
                    {"model", fs::absolute(a.model).lexically_normal().string()},
                    {"model_type", cfg.model_type},
                    {"vocab_size", V},
                    {"ctx", ctx},
                    {"n_chunks", n_chunks},
                    {"first", first},
                    {"scored_per_chunk", scored},
                    {"top_k", top_k},
                    {"source", tok.source},
                    {"tokens", tok.ids}};
    const std::string hs = h.dump();
    const uint64_t hlen = hs.size();
    out.write(kMagic, 8);
    out.write(reinterpret_cast<const char*>(&hlen), 8);
    out.write(hs.data(), static_cast<std::streamsize>(hs.size()));
  }

  const kv::KvDtype kv_dtype = parse_kv_cache_dtype(a.kv_cache_dtype);
  // Up to --batch chunks run together, one sequence each, in the same forwards; each has its own
  // KV blocks. A row's logits do not depend on the other rows of its batch (docs/design.md), and
  // the rows are accounted chunk by chunk in order, so every figure is the same whatever --batch.
  const int64_t group = std::min(a.batch, n_chunks), blocks_per_seq = (ctx + 15) / 16;
  kv::KvPool pool(group * blocks_per_seq, 16, cfg.num_hidden_layers, cfg.kv_cache_dim(), kv_dtype);
  std::vector<int32_t> blocks;
  MS_ASSERT(pool.allocate(pool.n_blocks(), &blocks));
  std::vector<float> logits, lq(V);
  std::vector<double> row;
  std::vector<uint8_t> in_set(V);
  std::vector<int32_t> order(V);
  Mean nll, nll_base, dnll, kl, same, dp, topk_mass;
  std::vector<double> kls;
  const double t_start = now();
  double forward_seconds = 0;  // of which in the model's forwards
  // The scored rows of one chunk's piece: its logits and the ids they predict.
  struct Scored {
    const float* logits;
    int32_t target;
  };
  for (int64_t c0 = 0; c0 < n_chunks; c0 += group) {
    const double t0 = now();
    const int64_t n_seq = std::min(group, n_chunks - c0);
    // Every chunk's scored logits, in order: where they are in `logits` when the chunk is one
    // forward (ctx <= kPiece), else gathered piece after piece into chunk_logits.
    const bool one_piece = ctx <= kPiece;
    std::vector<std::vector<float>> chunk_logits(one_piece ? 0 : n_seq);
    std::vector<const float*> chunk_rows(n_seq);
    std::vector<std::vector<int32_t>> chunk_targets(n_seq);
    for (int64_t past = 0; past < ctx; past += kPiece) {
      const int64_t n = std::min(kPiece, ctx - past);
      model::Batch b;
      std::vector<int64_t> rows_of(n_seq, 0);
      for (int64_t s = 0; s < n_seq; ++s) {
        const int32_t* ids = tok.ids.data() + (c0 + s) * ctx;
        const int64_t row0 = static_cast<int64_t>(b.tokens.size());
        b.tokens.insert(b.tokens.end(), ids + past, ids + past + n);
        b.seqs.push_back({row0, n, past, blocks.data() + s * blocks_per_seq});
        for (int64_t i = 0; i < n; ++i)
          if (past + i >= first && past + i < ctx - 1) {
            b.logit_rows.push_back(row0 + i);
            chunk_targets[s].push_back(ids[past + i + 1]);
            ++rows_of[s];
          }
      }
      logits.resize(std::max<size_t>(1, b.logit_rows.size()) * V);
      gen.agree(true, 0);  // the round that precedes every forward (engine::Generator)
      const double f0 = now();
      m.forward(b, pool, logits.data());
      forward_seconds += now() - f0;
      const float* lp_row = logits.data();
      for (int64_t s = 0; s < n_seq; ++s) {
        if (one_piece) {
          chunk_rows[s] = lp_row;
        } else {
          chunk_logits[s].insert(chunk_logits[s].end(), lp_row, lp_row + rows_of[s] * V);
          chunk_rows[s] = chunk_logits[s].data();
        }
        lp_row += rows_of[s] * V;
      }
    }
    for (int64_t s = 0; s < n_seq; ++s) {
      const int64_t c = c0 + s;
      const std::vector<int32_t>& targets = chunk_targets[s];
      for (size_t r = 0; r < targets.size(); ++r) {
        engine::log_softmax(chunk_rows[s] + r * V, V, &row);
        const int32_t target = targets[r];
        const double lp = row[target];
        nll.add(-lp);
        for (int64_t v = 0; v < V; ++v) lq[v] = static_cast<float>(row[v]);
        const int32_t top1 = argmax_of(lq);
        if (out.is_open()) {
          float rest = -std::numeric_limits<float>::infinity();
          if (top_k > 0) {
            for (int64_t v = 0; v < V; ++v) order[v] = static_cast<int32_t>(v);
            std::partial_sort(
                order.begin(), order.begin() + top_k, order.end(),
                [&](int32_t x, int32_t y) { return lq[x] > lq[y] || (lq[x] == lq[y] && x < y); });
            std::fill(in_set.begin(), in_set.end(), 0);
            for (int64_t i = 0; i < top_k; ++i) in_set[order[i]] = 1;
            rest = rest_logprob(lq, in_set);
          }
          out.write(reinterpret_cast<const char*>(&top1), 4);
          out.write(reinterpret_cast<const char*>(&lp), 8);
          out.write(reinterpret_cast<const char*>(&rest), 4);
          if (top_k > 0) {
            out.write(reinterpret_cast<const char*>(order.data()), top_k * 4);
            for (int64_t i = 0; i < top_k; ++i)
              out.write(reinterpret_cast<const char*>(&lq[order[i]]), 4);
          } else {
            out.write(reinterpret_cast<const char*>(lq.data()), V * 4);
          }
        }
        if (base) {
          const BaseRow br = base->read_row();
          // KL(base || this) over the base's top-k tokens and the rest as one outcome, or over
          // the whole vocabulary with whole rows: sum of p * (log p - log q), p the base's.
          double d = 0;
          if (base->top_k > 0) {
            std::fill(in_set.begin(), in_set.end(), 0);
            for (int64_t i = 0; i < base->top_k; ++i) {
              const int32_t v = br.ids[i];
              in_set[v] = 1;
              const double p = br.lps[i];
              d += std::exp(p) * (p - static_cast<double>(lq[v]));
            }
            if (br.rest_lp > -std::numeric_limits<float>::infinity()) {
              const double pr = br.rest_lp, qr = rest_logprob(lq, in_set);
              d += std::exp(pr) * (pr - qr);
            }
          } else {
            for (int64_t v = 0; v < V; ++v) {
              const double p = br.lps[v];
              d += std::exp(p) * (p - static_cast<double>(lq[v]));
            }
          }
          kl.add(d);
          topk_mass.add(1.0 - std::exp(static_cast<double>(br.rest_lp)));
          kls.push_back(d);
          nll_base.add(-br.target_lp);
          dnll.add(-lp + br.target_lp);
          same.add(top1 == br.argmax ? 1.0 : 0.0);
          dp.add(std::exp(lp) - std::exp(br.target_lp));
        }
      }
      const double dt = (now() - t0) / static_cast<double>(n_seq);
      std::fprintf(stderr, "chunk %lld/%lld: %.2f s, perplexity so far %.4f",
                   static_cast<long long>(c + 1), static_cast<long long>(n_chunks), dt,
                   std::exp(nll.mean()));
      if (base) std::fprintf(stderr, ", mean KL so far %.6f", kl.mean());
      std::fprintf(stderr, "\n");
    }
  }
  const double seconds = now() - t_start;
  gen.drain();
  pm.write_expert_load();
  if (out.is_open()) {
    out.close();
    MS_CHECK(!out.fail(), "writing --save-logits ", a.save_logits, " failed");
    fs::rename(partial, a.save_logits);
  }

  const double ppl = std::exp(nll.mean()), ppl_se = ppl * nll.stderr_();
  json j = {{"model", a.model},
            {"source", tok.source},
            {"kv_cache_dtype", a.kv_cache_dtype},
            {"ctx", ctx},
            {"chunks", n_chunks},
            {"scored_tokens", nll.n},
            {"seconds", seconds},
            {"seconds_per_chunk", seconds / static_cast<double>(n_chunks)},
            {"forward_seconds", forward_seconds},
            {"ppl", ppl},
            {"ppl_stderr", ppl_se},
            {"mean_nll", nll.mean()}};
  std::sort(kls.begin(), kls.end());
  if (base) {
    const double pb = std::exp(nll_base.mean());
    const double rms_dp = std::sqrt(dp.sum2 / static_cast<double>(dp.n));
    j["base"] = base->model;
    j["base_top_k"] = base->top_k;
    j["base_top_k_mass"] = topk_mass.mean();  // 1 with whole rows
    j["ppl_base"] = pb;
    j["ppl_base_stderr"] = pb * nll_base.stderr_();
    j["ln_ppl_ratio"] = dnll.mean();
    j["ln_ppl_ratio_stderr"] = dnll.stderr_();
    j["kl_mean"] = kl.mean();
    j["kl_stderr"] = kl.stderr_();
    j["kl_median"] = quantile(kls, 0.5);
    j["kl_p99"] = quantile(kls, 0.99);
    j["kl_max"] = kls.empty() ? 0.0 : kls.back();
    j["same_top1"] = same.mean();
    j["same_top1_stderr"] = same.stderr_();
    j["rms_dp"] = rms_dp;
    j["mean_dp"] = dp.mean();
  }
  if (a.json) {
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf(
      "input: the %s; %lld chunk(s) of %lld, the last %lld of each scored: %lld tokens "
      "in %.2f s, %.3f s per chunk (%.0f%% in the forwards)\n",
      tok.source.c_str(), static_cast<long long>(n_chunks), static_cast<long long>(ctx),
      static_cast<long long>(scored), static_cast<long long>(nll.n), seconds,
      seconds / static_cast<double>(n_chunks), 100 * forward_seconds / seconds);
  std::printf("perplexity:          %.4f ± %.4f\n", ppl, ppl_se);
  if (!base) return;
  std::printf("base perplexity:     %.4f ± %.4f (%s)\n", j["ppl_base"].get<double>(),
              j["ppl_base_stderr"].get<double>(), j["base"].get<std::string>().c_str());
  std::printf("ln(PPL / PPL base):  %.6g ± %.3g\n", dnll.mean(), dnll.stderr_());
  std::printf("mean KL divergence:  %.6g ± %.3g\n", kl.mean(), kl.stderr_());
  std::printf("KL median:           %.6g\n", j["kl_median"].get<double>());
  std::printf("KL 99%%:              %.6g\n", j["kl_p99"].get<double>());
  std::printf("KL max:              %.6g\n", j["kl_max"].get<double>());
  std::printf("same top token:      %.3f ± %.3f %%\n", 100 * same.mean(), 100 * same.stderr_());
  std::printf("RMS Δp:              %.6g %%\n", 100 * j["rms_dp"].get<double>());
  if (base->top_k > 0)
    std::printf(
        "(KL over the base's top %lld tokens, on average %.2f%% of its probability, plus "
        "the rest of the vocabulary as one outcome: never above the whole-vocabulary "
        "KL; --save-top-k 0 saves whole rows)\n",
        static_cast<long long>(base->top_k), 100 * topk_mass.mean());
}

}  // namespace

void register_perplexity_command(CLI::App& app) {
  auto a = std::make_shared<PplArgs>();
  CLI::App* p = app.add_subcommand(
      "perplexity", "Perplexity of a text, and KL divergence against a base model's saved logits");
  p->add_option("--model", a->model)->required()->check(CLI::ExistingDirectory);
  p->add_option("--file", a->file, "The text to score");
  p->add_option("--tokens-file", a->tokens_file,
                "The token ids to score instead of a text: a JSON list, or {\"ids\": [...]}")
      ->type_name("FILE");
  p->add_option("--tokenizer", a->tokenizer,
                "Tokenize --file with the tokenizer in this folder (default: the model's)");
  p->add_flag("--byte-tokens", a->byte_tokens,
              "Each byte of --file is one token id (for a model without a tokenizer)");
  a->ctx_opt = p->add_option("--ctx", a->ctx,
                             "Tokens per chunk; the last ctx - 1 - ctx/2 of each are scored "
                             "(default: 512, or the --kl-base file's)");
  p->add_option("--batch", a->batch,
                "Chunks evaluated together, as one batch of sequences (the figures do not depend "
                "on it)")
      ->capture_default_str();
  p->add_option("--chunks", a->chunks,
                "Chunks to score (default: all the input holds, or the --kl-base file's)");
  p->add_option("--save-logits", a->save_logits,
                "Save what --kl-base needs of this model's distributions to this file")
      ->type_name("FILE");
  a->top_k_opt =
      p->add_option("--save-top-k", a->top_k,
                    "With --save-logits: keep each position's k most likely tokens and the rest as "
                    "one (0: whole rows, 4 bytes per vocabulary entry per token)")
          ->capture_default_str();
  p->add_option("--kl-base", a->kl_base,
                "Compare with the logits a base model saved here: KL divergence, top-1 "
                "agreement, both perplexities")
      ->type_name("FILE");
  p->add_flag("--json", a->json, "Print the results as one JSON object");
  add_kv_cache_dtype_option(p, &a->kv_cache_dtype);
  add_parallel_flags(p, a->par);
  p->callback([a] { run_perplexity(*a); });
}

}  // namespace moeserve::cli
