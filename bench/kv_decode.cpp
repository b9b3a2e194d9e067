// bench_kv_decode: decode speed at a long cached context for each latent-cache dtype, in one
// process, alternating. The prompt is prefilled once into an f32 cache; the bf16 and fp8 caches
// are that cache's rows re-encoded (what those dtypes would have stored, up to the rounding of
// the later layers' inputs, which does not change the work). Then, round after round, each
// dtype in turn decodes --decode-tokens tokens after the same --prompt-len cached positions (a
// round overwrites the previous round's positions), so machine noise falls on all dtypes alike.
// Reports each dtype's median tokens/s over the rounds, its ratio to f32, the cache bytes a
// decode step reads (the context's rows, every layer) and the logits' largest difference from
// the f32 cache's on the first decoded token.
// With --random-cache 1 the prompt's rows are random normal values instead of a prefill's (the
// same work per decode step, minutes sooner; the logits then mean nothing).
//   bench_kv_decode --model DIR [--prompt-len 8192] [--decode-tokens 16] [--rounds 5]
//                   [--threads N] [--dtypes f32,bf16,fp8] [--random-cache 0|1]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "kv/kv_pool.h"
#include "model/model.h"

using namespace moeserve;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Cache {
  kv::KvDtype dtype;
  std::unique_ptr<kv::KvPool> pool;
  std::vector<int32_t> blocks;
  std::vector<double> tps;  // per round
  std::vector<float> first_logits;
};

}  // namespace

int main(int argc, char** argv) {
  std::string dir, dtypes = "f32,bf16,fp8";
  int64_t prompt_len = 8192, decode_tokens = 16, rounds = 5, threads = 0, random_cache = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--model")
      dir = v;
    else if (a == "--prompt-len")
      prompt_len = std::atoll(v.c_str());
    else if (a == "--decode-tokens")
      decode_tokens = std::atoll(v.c_str());
    else if (a == "--rounds")
      rounds = std::atoll(v.c_str());
    else if (a == "--threads")
      threads = std::atoll(v.c_str());
    else if (a == "--dtypes")
      dtypes = v;
    else if (a == "--random-cache")
      random_cache = std::atoll(v.c_str());
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (dir.empty()) {
    std::fprintf(stderr,
                 "usage: bench_kv_decode --model DIR [--prompt-len 8192] [--decode-tokens 16] "
                 "[--rounds 5] [--threads N] [--dtypes f32,bf16,fp8]\n");
    return 2;
  }
  try {
    ThreadPool pool(static_cast<int>(threads));
    model::Model m(dir, pool);
    m.prefault(/*progress=*/false, /*copy=*/true);
    const model::ModelConfig& c = m.config();
    const int64_t total = prompt_len + decode_tokens, bs = 16;
    std::vector<Cache> caches;
    for (size_t at = 0; at < dtypes.size();) {
      const size_t e = std::min(dtypes.find(',', at), dtypes.size());
      Cache k;
      MS_CHECK(kv::parse_kv_dtype(dtypes.substr(at, e - at), &k.dtype), "bad dtype in --dtypes");
      k.pool = std::make_unique<kv::KvPool>((total + bs - 1) / bs, bs, c.num_hidden_layers,
                                            c.kv_cache_dim(), k.dtype);
      MS_CHECK(k.pool->allocate(k.pool->n_blocks(), &k.blocks), "KV pool");
      caches.push_back(std::move(k));
      at = e + 1;
    }
    std::mt19937 rng(1);
    std::vector<int32_t> tokens(total);
    for (auto& t : tokens) t = static_cast<int32_t>(rng() % c.vocab_size);

    // Prefill once, into an f32 cache, in chunks of 512.
    kv::KvPool f32(caches[0].pool->n_blocks(), bs, c.num_hidden_layers, c.kv_cache_dim());
    std::vector<int32_t> fblocks;
    f32.allocate(f32.n_blocks(), &fblocks);
    std::vector<float> logits(c.vocab_size);
    const auto t0 = Clock::now();
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> rnd(c.kv_cache_dim());
    for (int64_t p = 0; random_cache && p < prompt_len; ++p)
      for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        for (float& v : rnd) v = nd(rng);
        f32.store(rnd.data(), fblocks[p / bs], l, p % bs);
      }
    for (int64_t past = 0; !random_cache && past < prompt_len; past += 512) {
      const int64_t n = std::min<int64_t>(512, prompt_len - past);
      model::Batch b;
      b.tokens.assign(tokens.begin() + past, tokens.begin() + past + n);
      b.seqs = {{0, n, past, fblocks.data()}};
      b.logit_rows = {n - 1};
      m.forward(b, f32, logits.data());
    }
    std::fprintf(stderr, "%s %lld tokens in %.1f s\n",
                 random_cache ? "random rows for" : "prefilled", static_cast<long long>(prompt_len),
                 seconds_since(t0));
    std::vector<float> row(c.kv_cache_dim());
    for (Cache& k : caches)
      for (int64_t p = 0; p < prompt_len; ++p)
        for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
          kv::decode_row(kv::KvDtype::F32, f32.at(fblocks[p / bs], l, p % bs), c.kv_cache_dim(),
                         row.data());
          k.pool->store(row.data(), k.blocks[p / bs], l, p % bs);
        }

    for (int64_t r = 0; r < rounds; ++r)
      for (size_t i = 0; i < caches.size(); ++i) {
        Cache& k = caches[(i + r) % caches.size()];  // a different dtype first each round
        const auto t1 = Clock::now();
        for (int64_t d = 0; d < decode_tokens; ++d) {
          const int64_t pos = prompt_len + d;
          model::Batch b;
          b.tokens = {tokens[pos]};
          b.seqs = {{0, 1, pos, k.blocks.data()}};
          b.logit_rows = {0};
          m.forward(b, *k.pool, logits.data());
          if (r == 0 && d == 0) k.first_logits = logits;
        }
        k.tps.push_back(decode_tokens / seconds_since(t1));
      }

    double f32_tps = 0;
    const std::vector<float>* ref = nullptr;
    for (Cache& k : caches) {
      std::sort(k.tps.begin(), k.tps.end());
      if (k.dtype == kv::KvDtype::F32) f32_tps = k.tps[k.tps.size() / 2], ref = &k.first_logits;
    }
    std::printf(
        "model %s, %d threads, %lld cached tokens (%s), %lld decoded per round, %lld rounds\n",
        dir.c_str(), pool.size(), static_cast<long long>(prompt_len),
        random_cache ? "random rows" : "prefilled", static_cast<long long>(decode_tokens),
        static_cast<long long>(rounds));
    std::printf("%-5s %12s %10s %10s %8s %16s %18s\n", "cache", "bytes/token", "min tok/s",
                "median", "max", "median vs f32", "max |dlogit| f32");
    for (const Cache& k : caches) {
      const double med = k.tps[k.tps.size() / 2];
      double dl = 0;
      if (ref)
        for (size_t i = 0; i < k.first_logits.size(); ++i)
          dl = std::max(dl, std::fabs(static_cast<double>(k.first_logits[i]) - (*ref)[i]));
      std::printf("%-5s %12lld %10.2f %10.2f %8.2f %15.3fx %18.3g\n", kv::kv_dtype_name(k.dtype),
                  static_cast<long long>(c.num_hidden_layers * k.pool->row_bytes()), k.tps.front(),
                  med, k.tps.back(), f32_tps > 0 ? med / f32_tps : 0.0, dl);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
