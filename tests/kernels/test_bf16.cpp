// The bf16 precision (kernels.h, Precision::Bf16): every ISA's kernels against the contract
// written out (reference::matmul_bf16) bit for bit, values at the edges of the format included,
// and a token's result independent of the batch, the thread count and the other jobs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/aligned.h"
#include "kernel_test_util.h"
#include "kernels/bf16_math.h"
#include "kernels/cpu/isa.h"
#include "kernels/kernels.h"
#include "kernels/reference/reference.h"

namespace moeserve::kernels {
namespace {

// Weights uniform in [-1, 1] times 2^e, e in [e0, e0 + 4) (fp8: e4m3's range with block
// scales 2^-12..2^-6). `edge`: every 7th value a bf16 subnormal, a zero or -0.
struct Bf16Weight {
  std::vector<uint8_t> data;
  std::vector<float> scales;
  Weight w;
  Bf16Weight(DType dt, int64_t rows, int64_t cols, uint32_t seed, int e0 = 0, bool edge = false) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    w.dtype = dt, w.rows = rows, w.cols = cols;
    data.resize(rows * cols * dtype_size(dt) + 64);
    for (int64_t i = 0; i < rows * cols; ++i) {
      float v = std::ldexp(u(rng), e0 + static_cast<int>(rng() % 4));
      if (edge && i % 7 == 3) v = (i / 7) % 3 == 0 ? 1e-39f : (i / 7) % 3 == 1 ? -0.0f : -2e-39f;
      uint16_t h;
      switch (dt) {
        case DType::F32:
          std::memcpy(&data[i * 4], &v, 4);
          break;
        case DType::F16:
          h = f32_to_f16(v);
          std::memcpy(&data[i * 2], &h, 2);
          break;
        case DType::BF16:
          h = static_cast<uint16_t>(f32_bits(v) >> 16);  // keeps subnormals as they are
          std::memcpy(&data[i * 2], &h, 2);
          break;
        default:
          data[i] = f32_to_fp8e4m3(std::ldexp(u(rng), static_cast<int>(rng() % 16) - 6));
      }
    }
    if (dt == DType::F8_E4M3) {
      w.scale_cols = (cols + 127) / 128;
      scales.resize(((rows + 127) / 128) * w.scale_cols);
      for (float& s : scales)
        s = std::ldexp(1.0f + 0.5f * u(rng), -static_cast<int>(6 + rng() % 7));
      w.scale_inv = scales.data();
      w.fp8_plain = true;
    }
    w.data = data.data();
  }
};

AlignedFloats random_x(size_t n, uint32_t seed, int e0 = 0, bool edge = false) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  AlignedFloats v(n);
  const float specials[] = {1e-39f,      -1e-39f,         -0.0f, 0.0f, 1.00390625f /* a bf16 tie */,
                            1.01171875f, 0x1.fffffep127f, -3e38f};
  for (size_t i = 0; i < n; ++i) {
    v[i] = std::ldexp(u(rng), e0 + static_cast<int>(rng() % 4));
    if (edge && i % 11 == 5) v[i] = specials[(i / 11) % 8];
  }
  return v;
}

// Both NaN, or the same bits.
bool same(float a, float b) {
  return std::isnan(a) ? std::isnan(b) : bits(a) == bits(b);
}

std::string shape(Isa isa, DType dt, int64_t m, int64_t n, int64_t k) {
  return std::string(isa_name(isa)) + " " + dtype_name(dt) + " m=" + std::to_string(m) +
         " N=" + std::to_string(n) + " K=" + std::to_string(k);
}

std::vector<float> run(Isa isa, const ThreadPool& pool, const float* x, int64_t m, int64_t ldx,
                       const Weight& w) {
  const int64_t ldy = w.rows + 3;
  std::vector<float> y(m * ldy, -7.0f), out(m * w.rows);
  MatmulJob j{x, m, ldx, &w, y.data(), ldy, nullptr, Precision::Bf16};
  kernel_table(isa).matmul_bf16(pool, &j, 1);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = w.rows; c < ldy; ++c) EXPECT_EQ(y[i * ldy + c], -7.0f) << "wrote padding";
    std::memcpy(&out[i * w.rows], &y[i * ldy], w.rows * sizeof(float));
  }
  return out;
}

// Every ISA == the contract bit for bit; |y - plain f32 product| within bf16's rounding of x
// and w (2^-8 each, relative) plus the sums' rounding.
void check(const ThreadPool& pool, DType dt, int64_t m, int64_t N, int64_t K, uint32_t seed,
           int xe = 0, int we = 0, bool edge = false) {
  Bf16Weight tw(dt, N, K, seed, we, edge);
  const int64_t ldx = seed % 2 ? K + 5 : (K + 15) / 16 * 16 + 16;
  const auto x = random_x(m * ldx, seed + 1, xe, edge);
  std::vector<float> want(m * N), plain(m * N);
  std::vector<double> mag(m * N);
  reference::matmul_bf16(x.data(), m, ldx, tw.w, want.data(), N);
  if (!edge) {
    reference::matmul(x.data(), m, ldx, tw.w, plain.data(), N);
    reference::matmul_abs(x.data(), m, ldx, tw.w, mag.data(), N);
  }
  const double tol = std::ldexp(1.0, -7) + (K + 32) * std::ldexp(1.0, -23);
  for (Isa isa : isas()) {
    const auto y = run(isa, pool, x.data(), m, ldx, tw.w);
    for (int64_t i = 0; i < m * N; ++i) {
      ASSERT_TRUE(same(y[i], want[i]))
          << shape(isa, dt, m, N, K) << " at " << i << ": " << y[i] << " vs contract " << want[i];
      if (!edge && xe == 0 && we == 0) {
        ASSERT_LE(std::fabs(static_cast<double>(y[i]) - plain[i]), tol * mag[i] + 1e-30)
            << shape(isa, dt, m, N, K) << " at " << i;
      }
    }
  }
}

TEST(Bf16Math, RoundIsNearestEvenWithSubnormalsFlushed) {
  EXPECT_EQ(bf16_round(1.0f), 0x3f80);
  EXPECT_EQ(bf16_round(1.00390625f), 0x3f80);                        // a tie, to even
  EXPECT_EQ(bf16_round(1.01171875f), 0x3f82);                        // a tie, to even (up)
  EXPECT_EQ(bf16_round(std::nextafter(1.00390625f, 2.0f)), 0x3f81);  // past the tie
  EXPECT_EQ(bf16_round(1e-39f), 0x0000);                             // subnormal f32
  EXPECT_EQ(bf16_round(-1e-39f), 0x8000);
  EXPECT_EQ(bf16_round(0x1.fffffep127f), 0x7f80);  // rounds to infinity
  EXPECT_EQ(bf16_round(NAN) & 0x7fc0, 0x7fc0);
  EXPECT_EQ(bf16_round(0x1p-126f), 0x0080);  // the smallest normal stays
}

TEST(Bf16Math, StepFlushesTinyResultsAndSubnormalInputs) {
  EXPECT_EQ(bits(bf16_step(0x1p-126f, -0x1p-64f, 0x1p-63f)), 0u);           // 2^-127: tiny, +0
  EXPECT_EQ(bits(bf16_step(-0x1p-126f, 0x1p-64f, 0x1p-63f)), 0x80000000u);  // -2^-127: -0
  EXPECT_EQ(bf16_step(0x1p-126f, 0x1p-64f, 0x1p-63f), 0x1.8p-126f);  // a subnormal product, added
  EXPECT_EQ(bf16_step(1e-40f, 1.0f, 1.0f), 1.0f);                    // subnormal acc taken as 0
  EXPECT_EQ(bf16_step(0.0f, 1e-39f, 1e30f), 0.0f);                   // subnormal input taken as 0
  // 2^-126 - 2^-150: 24 bits with an unbounded exponent hold it below 2^-126, so it is tiny
  EXPECT_EQ(bf16_step(0x1p-126f, -0x1p-75f, 0x1p-75f), 0.0f);
  EXPECT_EQ(bf16_step(0x1p-126f, -0x1p-76f, 0x1p-75f), 0x1p-126f);    // the tie rounds up: normal
  EXPECT_EQ(bf16_pair(1.0f, 0x1p-24f, -1.0f, 1.0f, 1.0f), 0x1p-24f);  // odd element first
}

TEST(Bf16Matmul, FollowsTheContractAllDtypesAllIsas) {
  ThreadPool pool(2);
  if (__builtin_cpu_supports("avx512bf16")) {  // a CPU with the unit must pass its check
    EXPECT_TRUE(isa_available(Isa::Avx512Bf16));
  }
  uint32_t seed = 1;
  for (DType dt : kDtypes)
    for (int64_t K : {1, 31, 32, 33, 129, 300})
      for (int64_t N : {1, 7, 130})
        for (int64_t m : {1, 3, 5, 33, 70}) check(pool, dt, m, N, K, seed++);
}

TEST(Bf16Matmul, SeveralKBlocksAndPanels) {
  ThreadPool pool(2);
  for (DType dt : kDtypes) {
    check(pool, dt, 150, 100, 1100, 200);
    check(pool, dt, 5, 300, 2048, 201);
  }
}

// One panel of more than a few tokens (batched decode): row groups over several K blocks of
// the grouped path (bf16_grouped), the last one partial, rows not a multiple of a group.
TEST(Bf16Matmul, BatchedDecodeRowGroupsAndKBlocks) {
  ThreadPool pool(2);
  uint32_t seed = 500;
  for (DType dt : kDtypes)
    for (int64_t m : {9, 16, 64}) {
      check(pool, dt, m, 133, 1100, seed++);
      check(pool, dt, m, 20, 2048, seed++);
    }
}

// Subnormal, zero, huge and NaN inputs, and sums that pass through the tiny range, where the
// flushes decide the bits.
TEST(Bf16Matmul, EdgeValuesFollowTheContract) {
  ThreadPool pool(2);
  uint32_t seed = 300;
  for (DType dt : {DType::BF16, DType::F32})
    for (int64_t K : {64, 200}) {
      check(pool, dt, 9, 40, K, seed++, 0, 0, true);
      check(pool, dt, 9, 40, K, seed++, -64, -62);  // products near 2^-126
      check(pool, dt, 9, 40, K, seed++, -66, -64, true);
      check(pool, dt, 9, 40, K, seed++, -70, -56);
    }
}

// Few tokens (decode) of fp8 weights: every tile shape of the in-register conversion, chunks
// with e4m3 subnormals among them (the random weights hold many), x too large for the scaled
// conversion (the exact one then), and edge values.
TEST(Bf16Matmul, FewTokensFp8EveryTileShape) {
  ThreadPool pool(2);
  uint32_t seed = 400;
  for (int64_t m = 1; m <= 9; ++m) {
    check(pool, DType::F8_E4M3, m, 133, 256, seed++);
    check(pool, DType::F8_E4M3, m, 40, 2048, seed++);
    check(pool, DType::F8_E4M3, m, 40, 256, seed++, 16);  // |x * scale| >= 2^8
    check(pool, DType::F8_E4M3, m, 40, 96, seed++, 0, 0, true);
  }
}

TEST(Bf16Matmul, OneTokenEqualsRowOfABatchAndThreadsDoNotMatter) {
  ThreadPool p1(1), p2(2), p3(3);
  for (DType dt : kDtypes) {
    const int64_t K = 300, N = 130, m = 70;
    Bf16Weight tw(dt, N, K, 7);
    const auto x = random_x(m * K, 8);
    for (Isa isa : isas()) {
      const auto all = run(isa, p2, x.data(), m, K, tw.w);
      for (int64_t i : {0, 1, 33, 69}) {
        const auto one = run(isa, p2, x.data() + i * K, 1, K, tw.w);
        for (int64_t c = 0; c < N; ++c)
          ASSERT_EQ(bits(one[c]), bits(all[i * N + c])) << shape(isa, dt, m, N, K) << " " << i;
      }
      const auto a1 = run(isa, p1, x.data(), m, K, tw.w);
      const auto a3 = run(isa, p3, x.data(), m, K, tw.w);
      for (int64_t c = 0; c < m * N; ++c) {
        ASSERT_EQ(bits(a1[c]), bits(all[c])) << shape(isa, dt, m, N, K);
        ASSERT_EQ(bits(a3[c]), bits(all[c])) << shape(isa, dt, m, N, K);
      }
    }
  }
}

// A batch of jobs (the experts of a step) and row-pointer x: each job's own bits; through the
// public entry points, bf16 jobs and exact ones (Q8 stays exact) side by side.
TEST(Bf16Matmul, BatchEqualsOneByOne) {
  ThreadPool pool(3);
  struct Spec {
    DType dt;
    int64_t m, N, K;
  };
  const Spec specs[] = {{DType::F8_E4M3, 1, 130, 300}, {DType::BF16, 1, 64, 256},
                        {DType::F8_E4M3, 4, 77, 129},  {DType::F32, 3, 1, 17},
                        {DType::BF16, 0, 10, 32},      {DType::BF16, 40, 33, 256},
                        {DType::BF16, 9, 50, 100}};
  std::vector<std::unique_ptr<Bf16Weight>> ws;
  std::vector<AlignedFloats> xs;
  std::vector<std::vector<const float*>> rows;
  std::vector<std::vector<float>> want, got;
  std::vector<MatmulJob> jobs;
  uint32_t seed = 500;
  for (const Spec& sp : specs) {
    ws.push_back(std::make_unique<Bf16Weight>(sp.dt, sp.N, sp.K, seed++));
    xs.push_back(random_x(std::max<int64_t>(1, sp.m * (sp.K + 3)), seed++));
    want.emplace_back(std::max<int64_t>(1, sp.m * sp.N));
    reference::matmul_bf16(xs.back().data(), sp.m, sp.K + 3, ws.back()->w, want.back().data(),
                           sp.N);
    got.emplace_back(sp.m * (sp.N + 2), -7.0f);
    rows.emplace_back();
    for (int64_t t = sp.m - 1; t >= 0; --t)
      rows.back().push_back(xs.back().data() + t * (sp.K + 3));
  }
  for (size_t i = 0; i < std::size(specs); ++i) {
    MatmulJob j{xs[i].data(),  specs[i].m,     specs[i].K + 3, &ws[i]->w,
                got[i].data(), specs[i].N + 2, nullptr,        Precision::Bf16};
    if (i % 2) j.xrows = nullptr;
    jobs.push_back(j);
  }
  for (Isa isa : isas()) {
    for (auto& g : got) std::fill(g.begin(), g.end(), -7.0f);
    kernel_table(isa).matmul_bf16(pool, jobs.data(), static_cast<int64_t>(jobs.size()));
    for (size_t i = 0; i < std::size(specs); ++i)
      for (int64_t t = 0; t < specs[i].m; ++t) {
        for (int64_t c = 0; c < specs[i].N; ++c)
          ASSERT_EQ(bits(got[i][t * (specs[i].N + 2) + c]), bits(want[i][t * specs[i].N + c]))
              << isa_name(isa) << " job " << i << " token " << t;
        EXPECT_EQ(got[i][t * (specs[i].N + 2) + specs[i].N], -7.0f) << "wrote padding";
      }
  }
  // Row pointers (in reverse order) through matmul_rows equal the contiguous rows.
  for (size_t i = 0; i < std::size(specs); ++i) {
    const Spec& sp = specs[i];
    if (sp.m == 0) continue;
    std::vector<float> y(sp.m * sp.N);
    matmul_rows(pool, rows[i].data(), sp.m, ws[i]->w, y.data(), sp.N, Precision::Bf16);
    for (int64_t t = 0; t < sp.m; ++t)
      for (int64_t c = 0; c < sp.N; ++c)
        ASSERT_EQ(bits(y[t * sp.N + c]), bits(want[i][(sp.m - 1 - t) * sp.N + c])) << "job " << i;
  }
}

TEST(Bf16Matmul, PublicEntryPointsChooseByPrecisionAndDtype) {
  ThreadPool pool(2);
  Bf16Weight tw(DType::BF16, 20, 96, 9);
  const auto x = random_x(4 * 96, 10);
  std::vector<float> exact(4 * 20), bf(4 * 20), want_exact(4 * 20), want_bf(4 * 20);
  matmul(pool, x.data(), 4, 96, tw.w, exact.data(), 20);
  matmul(pool, x.data(), 4, 96, tw.w, bf.data(), 20, Precision::Bf16);
  reference::matmul_lanes(x.data(), 4, 96, tw.w, want_exact.data(), 20);
  reference::matmul_bf16(x.data(), 4, 96, tw.w, want_bf.data(), 20);
  int differ = 0;
  for (int i = 0; i < 80; ++i) {
    ASSERT_EQ(bits(exact[i]), bits(want_exact[i]));
    ASSERT_EQ(bits(bf[i]), bits(want_bf[i]));
    differ += bits(exact[i]) != bits(bf[i]);
  }
  EXPECT_GT(differ, 40);  // x's rounding shows
  EXPECT_TRUE(takes_bf16(tw.w, Precision::Bf16));
  EXPECT_FALSE(takes_bf16(tw.w, Precision::Exact));
  Weight q = tw.w;
  q.dtype = DType::Q8;
  EXPECT_FALSE(takes_bf16(q, Precision::Bf16));
  EXPECT_STREQ(precision_name(Precision::Bf16), "bf16");
  EXPECT_STREQ(precision_name(Precision::Exact), "exact");
  if (isa_available(Isa::Avx512Bf16) && detected_isa() == Isa::Avx512Bf16) {
    EXPECT_EQ(active_isa(), Isa::Avx512Bf16);
    EXPECT_STREQ(matmul_unit(Precision::Bf16), "avx512bf16");
    EXPECT_STREQ(matmul_unit(Precision::Exact), "avx512");
  }
}

}  // namespace
}  // namespace moeserve::kernels
