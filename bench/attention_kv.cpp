// bench_attention_kv: the decode attention of one token over a long cached context, for each
// latent-cache dtype, alternating: the scores (kernels::dots_cached), the softmax and the
// weighted latent sum (kernels::weighted_cached) over --context rows of 512 + 64 values, for
// --heads query heads, all threads sharing the rows as model/attention.cpp shares them.
// Reports the median time per layer-step of each dtype and the cache bytes it read.
//   bench_attention_kv [--context 8192] [--heads 16] [--reps 20] [--threads N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/aligned.h"
#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "kv/kv_pool.h"

using namespace moeserve;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  int64_t ctx = 8192, nh = 16, reps = 20, threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const int64_t v = std::atoll(argv[i + 1]);
    if (a == "--context")
      ctx = v;
    else if (a == "--heads")
      nh = v;
    else if (a == "--reps")
      reps = v;
    else if (a == "--threads")
      threads = v;
    else {
      std::fprintf(stderr,
                   "usage: bench_attention_kv [--context N] [--heads N] [--reps N] "
                   "[--threads N]\n");
      return 2;
    }
  }
  ThreadPool pool(static_cast<int>(threads));
  const int64_t L = 512, kvd = 576, bs = 16;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  struct Case {
    kv::KvDtype dt;
    DType kd;
    std::unique_ptr<kv::KvPool> pool;
    std::vector<const uint8_t*> rows;
    std::vector<double> ms, dots_ms, sum_ms;
  };
  std::vector<Case> cases;
  for (auto [dt, kd] :
       {std::pair{kv::KvDtype::F32, DType::F32}, std::pair{kv::KvDtype::BF16, DType::BF16},
        std::pair{kv::KvDtype::FP8, DType::F8_E4M3}})
    cases.push_back(
        {dt, kd, std::make_unique<kv::KvPool>(ctx / bs + 1, bs, 1, kvd, dt), {}, {}, {}, {}});
  std::vector<float> x(kvd);
  // Blocks in a scattered order, as a long-running server's pool hands them out.
  std::vector<int32_t> order(ctx / bs + 1);
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
  std::shuffle(order.begin(), order.end(), rng);
  for (int64_t j = 0; j < ctx; ++j) {
    for (float& v : x) v = nd(rng);
    for (Case& c : cases) {
      c.pool->store(x.data(), order[j / bs], 0, j % bs);
      c.rows.push_back(c.pool->at(order[j / bs], 0, j % bs));
    }
  }
  AlignedFloats q(nh * kvd), p(nh * ctx), o(nh * L);
  for (float& v : q) v = nd(rng) * 0.05f;
  for (int64_t r = 0; r < reps; ++r)
    for (size_t i = 0; i < cases.size(); ++i) {
      Case& c = cases[(i + r) % cases.size()];
      const auto t0 = Clock::now();
      pool.parallel_for(
          ctx,
          [&](int64_t j0, int64_t j1, int) {
            const kernels::CachedRows cr{c.kd, c.rows.data() + j0, kvd};
            kernels::dots_cached(q.data(), nh, kvd, cr, j1 - j0, p.data() + j0, ctx);
          },
          16);
      const auto t1 = Clock::now();
      pool.parallel_for(nh, [&](int64_t h0, int64_t h1, int) {
        for (int64_t h = h0; h < h1; ++h) kernels::softmax(p.data() + h * ctx, ctx, 0.07f);
      });
      const auto t2 = Clock::now();
      pool.parallel_for(
          L,
          [&](int64_t c0, int64_t c1, int) {
            const kernels::CachedRows cr{c.kd, c.rows.data(), kvd};
            kernels::weighted_cached(p.data(), nh, ctx, cr, ctx, c0, c1 - c0, o.data() + c0, L);
          },
          16);
      const auto t3 = Clock::now();
      c.ms.push_back(std::chrono::duration<double, std::milli>(t3 - t0).count());
      c.dots_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      c.sum_ms.push_back(std::chrono::duration<double, std::milli>(t3 - t2).count());
    }
  std::printf("%lld cached rows of %lld values, %lld heads, %d threads, %lld reps\n",
              static_cast<long long>(ctx), static_cast<long long>(kvd), static_cast<long long>(nh),
              pool.size(), static_cast<long long>(reps));
  double f32 = 0;
  for (Case& c : cases) {
    std::sort(c.ms.begin(), c.ms.end());
    std::sort(c.dots_ms.begin(), c.dots_ms.end());
    std::sort(c.sum_ms.begin(), c.sum_ms.end());
    const double med = c.ms[c.ms.size() / 2];
    if (c.dt == kv::KvDtype::F32) f32 = med;
    std::printf(
        "%-5s  %5.1f MB read (2 passes)  min %7.3f ms  median %7.3f ms (scores %.3f, sum %.3f)  "
        "%.2fx f32's time\n",
        kv::kv_dtype_name(c.dt), 2.0 * ctx * c.pool->row_bytes() / 1e6, c.ms.front(), med,
        c.dots_ms.front(), c.sum_ms.front(), med / f32);
  }
  return 0;
}
