// The single-process MoE layer that expert-parallel runs must match bit for bit, with small
// deterministic experts and routings. Shared by tests/moe (one process) and tests/mpi.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/dispatch.h"

namespace moeserve::testing {

// splitmix64: the same stream on every rank for the same seed.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * ((next() >> 40) * 0x1.0p-24f); }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
};

// n_experts small SwiGLU experts with random weights: y = down(silu(gate x) * up x), each row
// computed alone in a fixed order, so a row's result never depends on the other rows.
struct FakeExperts {
  int32_t n_experts;
  int64_t H, I;
  std::vector<float> w;  // [E, 3, I, H]: gate [I, H], up [I, H], down^T [I, H]

  FakeExperts(int32_t E, int64_t hidden, int64_t inter, uint64_t seed)
      : n_experts(E), H(hidden), I(inter), w(static_cast<size_t>(E) * 3 * inter * hidden) {
    Rng r(seed);
    for (float& v : w) v = r.uniform(-0.5f, 0.5f);
  }
  // x: n rows of H f32 (Dispatcher::dispatch's row pointers); y: [n, H] f32
  void run(int32_t e, const float* const* x, int64_t n, float* y) const {
    const float* g = w.data() + static_cast<size_t>(e) * 3 * I * H;
    const float *u = g + I * H, *d = u + I * H;
    std::vector<float> a(I);
    for (int64_t t = 0; t < n; ++t) {
      const float* xr = x[t];
      for (int64_t i = 0; i < I; ++i) {
        float sg = 0.0f, su = 0.0f;
        for (int64_t h = 0; h < H; ++h) {
          sg = sg + g[i * H + h] * xr[h];
          su = su + u[i * H + h] * xr[h];
        }
        a[i] = sg / (1.0f + std::exp(-sg)) * su;
      }
      float* yr = y + t * H;
      std::fill_n(yr, H, 0.0f);
      for (int64_t i = 0; i < I; ++i)
        for (int64_t h = 0; h < H; ++h) yr[h] = yr[h] + d[i * H + h] * a[i];
    }
  }
};

// Random top-k routing: ids strictly ascending per token, positive weights summing to ~1.
inline void random_routing(Rng& r, int64_t n, int64_t K, int32_t E, int32_t* ex, float* wt) {
  std::vector<int32_t> ids(E);
  for (int64_t t = 0; t < n; ++t) {
    for (int32_t e = 0; e < E; ++e) ids[e] = e;
    for (int64_t k = 0; k < K; ++k) std::swap(ids[k], ids[k + r.below(E - k)]);
    std::sort(ids.begin(), ids.begin() + K);
    float sum = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      ex[t * K + k] = ids[k];
      wt[t * K + k] = r.uniform(0.05f, 1.0f);
      sum += wt[t * K + k];
    }
    for (int64_t k = 0; k < K; ++k) wt[t * K + k] /= sum;
  }
}

// Model::moe_ffn's routed part: experts ascending, each over its rows, then per token
// acc = acc + y * w over k from 0.0f. ex, wt: [n, K]; h, out: [n, H].
inline void reference_moe(const FakeExperts& fx, int64_t n, int64_t K, const int32_t* ex,
                          const float* wt, const float* h, float* out) {
  const int64_t H = fx.H;
  std::vector<float> slot_out(n * K * H), y;
  std::vector<const float*> xin;
  for (int32_t e = 0; e < fx.n_experts; ++e) {
    std::vector<int64_t> entries;
    for (int64_t i = 0; i < n * K; ++i)
      if (ex[i] == e) entries.push_back(i);
    if (entries.empty()) continue;
    const int64_t cnt = static_cast<int64_t>(entries.size());
    xin.resize(cnt);
    y.resize(cnt * H);
    for (int64_t j = 0; j < cnt; ++j) xin[j] = h + (entries[j] / K) * H;
    fx.run(e, xin.data(), cnt, y.data());
    for (int64_t j = 0; j < cnt; ++j)
      std::copy_n(y.data() + j * H, H, slot_out.data() + entries[j] * H);
  }
  for (int64_t t = 0; t < n; ++t) {
    float* o = out + t * H;
    std::fill_n(o, H, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float w = wt[t * K + k];
      const float* yy = slot_out.data() + (t * K + k) * H;
      for (int64_t i = 0; i < H; ++i) o[i] = o[i] + yy[i] * w;
    }
  }
}

// The expert-parallel layer on this rank's tokens: plan, dispatch, each local expert over its
// rows, combine. ex, wt: [n, K]; h, out: [n, H].
inline void ep_moe(moe::Dispatcher& d, const moe::Placement& pl, const FakeExperts& fx, int64_t n,
                   int64_t K, const int32_t* ex, const float* wt, const float* h, float* out) {
  const moe::DispatchPlan p = d.plan(pl, n, K, fx.H, ex, wt);
  const float* const* x = d.dispatch(p, h);
  float* y = d.expert_out(p);
  for (int32_t j = 0; j < p.n_slots; ++j)
    fx.run(p.slot_expert[j], x + p.slot_offset[j], p.slot_count(j), y + p.slot_offset[j] * fx.H);
  d.combine(p, y, out);
}

// ep_moe as two micro-batches (the first n / 2 tokens, the rest) on two Dispatchers, in the
// model's overlapped order: 1's dispatch in flight while 0's experts run, 0's combine while 1's
// run, each exchange progressed between experts.
inline void ep_moe_overlapped(moe::Dispatcher& d0, moe::Dispatcher& d1, const moe::Placement& pl,
                              const FakeExperts& fx, int64_t n, int64_t K, const int32_t* ex,
                              const float* wt, const float* h, float* out) {
  const int64_t H = fx.H, first[3] = {0, n / 2, n};
  moe::Dispatcher* d[2] = {&d0, &d1};
  moe::DispatchPlan p[2];
  for (int i = 0; i < 2; ++i)
    p[i] = d[i]->plan(pl, first[i + 1] - first[i], K, H, ex + first[i] * K, wt + first[i] * K);
  auto experts = [&](int i, const float* const* x, float* y, moe::Dispatcher& busy) {
    for (int32_t j = 0; j < p[i].n_slots; ++j) {
      busy.progress();
      fx.run(p[i].slot_expert[j], x + p[i].slot_offset[j], p[i].slot_count(j),
             y + p[i].slot_offset[j] * H);
    }
  };
  d0.dispatch_start(p[0], h);
  d0.progress();
  const float* const* x0 = d0.dispatch_finish(p[0]);
  d1.dispatch_start(p[1], h + first[1] * H);
  float* y0 = d0.expert_out(p[0]);
  experts(0, x0, y0, d1);
  const float* const* x1 = d1.dispatch_finish(p[1]);
  d0.combine_start(p[0], y0);
  float* y1 = d1.expert_out(p[1]);
  experts(1, x1, y1, d0);
  d0.combine_finish(p[0], out);
  d1.combine_start(p[1], y1);
  d1.combine_finish(p[1], out + first[1] * H);
}

}  // namespace moeserve::testing
