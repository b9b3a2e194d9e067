// bench_moe_step: the weight products of one MoE layer of a batched decode step, on the bench
// preset's shapes (hidden 2048, 16 routed experts of 1024, top-4, one shared expert), and one
// dense 2048 x 2048 product for all the tokens: what bench_batching's step spends most of its
// time in, without the rest of the engine. Random weights (fp8 e4m3 with 128 x 128 block scales,
// values as a checkpoint's: ~1 subnormal in 10^4, or bf16), random routing (fixed seed).
// Reports GFLOP/s against the peak of the unit the products run on, timed two ways: wall clock,
// and CPU time per thread (what the threads would take on an unshared machine).
//   bench_moe_step [--weights fp8|bf16] [--precision exact|bf16] [--tokens 16] [--threads N]
//                  [--iters 30] [--sweep 0|1]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/aligned.h"
#include "core/dtype.h"
#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "kernels/roofline.h"

using namespace moeserve;
using namespace moeserve::kernels;

namespace {

struct Matrix {
  std::vector<uint8_t> data;
  std::vector<float> scales;
  Weight w;
};

Matrix make(DType dt, int64_t rows, int64_t cols, std::mt19937& g) {
  Matrix m;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  m.data.resize(static_cast<size_t>(rows * cols * dtype_size(dt)));
  for (int64_t i = 0; i < rows * cols; ++i) {
    if (dt == DType::F8_E4M3) {
      m.data[i] = f32_to_fp8e4m3(nd(g) * 64.0f);
    } else {
      const uint16_t h = f32_to_bf16(nd(g) * 0.02f);
      std::memcpy(&m.data[i * 2], &h, 2);
    }
  }
  m.w.dtype = dt, m.w.data = m.data.data(), m.w.rows = rows, m.w.cols = cols;
  if (dt == DType::F8_E4M3) {
    m.w.scale_cols = (cols + 127) / 128;
    m.scales.resize(((rows + 127) / 128) * m.w.scale_cols);
    for (float& s : m.scales) s = 1e-4f * static_cast<float>(1 + g() % 7);
    m.w.scale_inv = m.scales.data();
    m.w.fp8_plain = fp8_plain(m.data.data(), m.data.size());
  }
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  DType dt = DType::F8_E4M3;
  Precision prec = Precision::Exact;
  int64_t T = 16;
  int threads = 0, iters = 30;
  bool sweep = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const std::string v = i + 1 < argc ? argv[++i] : "";
    if (a == "--weights" && (v == "fp8" || v == "bf16"))
      dt = v == "fp8" ? DType::F8_E4M3 : DType::BF16;
    else if (a == "--precision" && (v == "exact" || v == "bf16"))
      prec = v == "bf16" ? Precision::Bf16 : Precision::Exact;
    else if (a == "--tokens")
      T = std::max(1, std::atoi(v.c_str()));
    else if (a == "--threads")
      threads = std::atoi(v.c_str());
    else if (a == "--iters")
      iters = std::max(1, std::atoi(v.c_str()));
    else if (a == "--sweep" && (v == "0" || v == "1"))
      sweep = v == "1";
    else {
      std::fprintf(stderr,
                   "usage: bench_moe_step [--weights fp8|bf16] [--precision exact|bf16] "
                   "[--tokens 16] [--threads N] [--iters 30] [--sweep 0|1]\n");
      return 2;
    }
  }
  ThreadPool pool(threads);
  std::mt19937 g(1);
  constexpr int64_t H = 2048, I = 1024, E = 16, topk = 4;
  std::vector<Matrix> gate, up, down;
  for (int64_t e = 0; e <= E; ++e) {  // E routed + the shared one
    gate.push_back(make(dt, I, H, g));
    up.push_back(make(dt, I, H, g));
    down.push_back(make(dt, H, I, g));
  }
  const Matrix dense = make(dt, H, H, g);
  AlignedFloats x(T * H);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (float& v : x) v = u(g);
  // Each token's top-4 of 16 experts, uniformly: ~4 tokens per expert at 16 tokens.
  std::vector<int64_t> count(E, 0);
  std::vector<std::vector<const float*>> rows(E + 1);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int64_t> ids(E);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), g);
    for (int64_t k = 0; k < topk; ++k) rows[ids[k]].push_back(x.data() + t * H);
    rows[E].push_back(x.data() + t * H);
  }
  const int64_t slots = T * topk + T;
  std::vector<float> gy(slots * I), uy(slots * I), dy(slots * H), y(T * H);
  std::vector<MatmulJob> gu, dn;
  int64_t off = 0;
  for (int64_t e = 0; e <= E; ++e) {
    const int64_t n = static_cast<int64_t>(rows[e].size());
    if (!n) continue;
    gu.push_back({nullptr, n, 0, &gate[e].w, gy.data() + off * I, I, rows[e].data(), prec});
    gu.push_back({nullptr, n, 0, &up[e].w, uy.data() + off * I, I, rows[e].data(), prec});
    dn.push_back({gy.data() + off * I, n, I, &down[e].w, dy.data() + off * H, H, nullptr, prec});
    off += n;
  }
  auto best = [&](Clock clock, auto&& fn) {
    fn();
    double b = 1e30;
    for (int r = 0; r < iters; ++r) {
      const double t0 = now_seconds(clock, pool);
      fn();
      b = std::min(b, now_seconds(clock, pool) - t0);
    }
    return b;
  };
  auto layer = [&] {
    matmul_batch(pool, gu.data(), static_cast<int64_t>(gu.size()));
    matmul_batch(pool, dn.data(), static_cast<int64_t>(dn.size()));
  };
  auto dense_product = [&] { matmul(pool, x.data(), T, H, dense.w, y.data(), H, prec); };
  const double layer_flops = 2.0 * 3 * H * I * static_cast<double>(slots);
  const double dense_flops = 2.0 * H * H * static_cast<double>(T);
  std::printf(
      "%s weights, precision %s on %s, %lld tokens, %d threads; tokens per expert:", dtype_name(dt),
      precision_name(prec), matmul_unit(prec), static_cast<long long>(T), pool.size());
  for (int64_t e = 0; e < E; ++e) std::printf(" %zu", rows[e].size());
  std::printf("\n");
  for (Clock clock : {Clock::kWall, Clock::kCpu}) {
    const double peak = measure_peak_gflops(pool, prec, clock) * 1e9;
    const double tl = best(clock, layer), td = best(clock, dense_product);
    std::printf(
        "%-4s peak %6.1f GFLOP/s | MoE layer %7.3f ms %6.1f GFLOP/s %4.0f%% | dense %lldx2048x2048 "
        "%6.3f ms %6.1f GFLOP/s %4.0f%%\n",
        clock == Clock::kWall ? "wall" : "cpu", peak / 1e9, tl * 1e3, layer_flops / tl / 1e9,
        100 * layer_flops / tl / peak, static_cast<long long>(T), td * 1e3, dense_flops / td / 1e9,
        100 * dense_flops / td / peak);
  }
  // --sweep 1: the 34 gate and up matrices (1024 x 2048 each, more bytes than an L3 holds, so
  // their weights come from memory as in a step) one after another, for 1..T tokens, CPU time
  // per thread: the rate each token count gets, and its weight bytes' rate.
  if (sweep) {
    std::vector<const Weight*> ws;
    for (int64_t e = 0; e <= E; ++e) ws.push_back(&gate[e].w), ws.push_back(&up[e].w);
    for (int64_t n = 1; n <= T; n = n < 8 ? n + 1 : n + 4) {
      const double t = best(Clock::kCpu, [&] {
        for (const Weight* w : ws) matmul(pool, x.data(), n, H, *w, y.data(), H, prec);
      });
      const double el = static_cast<double>(ws.size()) * I * H;
      std::printf("%3lld tokens x 34 x %lld x %lld: %7.3f ms %6.1f GFLOP/s %6.1f GB/s\n",
                  static_cast<long long>(n), static_cast<long long>(I), static_cast<long long>(H),
                  t * 1e3, 2.0 * el * n / t / 1e9, el * dtype_size(dt) / t / 1e9);
    }
  }
  return 0;
}
