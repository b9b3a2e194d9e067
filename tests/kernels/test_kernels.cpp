// The fast kernels against the reference (tolerance), against the contract written out (bit
// for bit), against each other across ISAs, batch sizes and thread counts (bit for bit).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../core/dtype_fixture.h"
#include "core/aligned.h"
#include "core/error.h"
#include "kernel_test_util.h"
#include "kernels/cpu/isa.h"
#include "kernels/kernels.h"
#include "kernels/reference/reference.h"

namespace moeserve::kernels {
namespace {

// The kernel tests run every ISA this CPU has (the "AllIsas" loops and the Isas/ suites); this
// says which ones do not run here, and fails if a set the CPU has were left out. What the CPU
// has is read from the kernel's flags in /proc/cpuinfo, apart from the code under test.
TEST(KernelIsas, WhichRunHere) {
  std::ifstream info("/proc/cpuinfo");
  std::string line;
  while (std::getline(info, line) && line.rfind("flags", 0) != 0) {
  }
  ASSERT_FALSE(line.empty()) << "no flags line in /proc/cpuinfo";
  line += ' ';
  auto has = [&](const char* flag) {
    return line.find(' ' + std::string(flag) + ' ') != line.npos;
  };
  const bool avx2 = has("avx2") && has("fma") && has("f16c");
  const bool avx512 =
      avx2 && has("avx512f") && has("avx512bw") && has("avx512vl") && has("avx512dq");
  const std::vector<Isa> run = isas();
  auto runs = [&](Isa isa) { return std::find(run.begin(), run.end(), isa) != run.end(); };
  EXPECT_TRUE(runs(Isa::Scalar));
  EXPECT_EQ(runs(Isa::Avx2), avx2);
  EXPECT_EQ(runs(Isa::Avx512), avx512);
  if (avx512 && has("avx512_bf16")) {
    EXPECT_TRUE(runs(Isa::Avx512Bf16));
  }
  std::string tested, not_here;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16})
    (runs(isa) ? tested : not_here) += std::string(" ") + isa_name(isa);
  std::cout << "kernel tests run for:" << tested << "\n";
  if (!not_here.empty())
    std::cout << "NOT tested on this CPU (it lacks the instructions):" << not_here << "\n";
  RecordProperty("isas_tested", tested);
  RecordProperty("isas_not_on_this_cpu", not_here);
}

// A weight matrix with its own storage. Values uniform in [-1, 1] (fp8: the full e4m3 range
// including subnormals and zeros, with block scales between 2^-12 and 2^-6).
struct TestWeight {
  std::vector<uint8_t> data;
  std::vector<float> scales;
  Weight w;

  TestWeight(DType dtype, int64_t rows, int64_t cols, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    w.dtype = dtype;
    w.rows = rows;
    w.cols = cols;
    data.resize(rows * cols * dtype_size(dtype) + 1);
    for (int64_t i = 0; i < rows * cols; ++i) {
      const float v = u(rng);
      switch (dtype) {
        case DType::F32:
          std::memcpy(&data[i * 4], &v, 4);
          break;
        case DType::F16: {
          const uint16_t h = f32_to_f16(v);
          std::memcpy(&data[i * 2], &h, 2);
          break;
        }
        case DType::BF16: {
          const uint16_t h = f32_to_bf16(v);
          std::memcpy(&data[i * 2], &h, 2);
          break;
        }
        default:
          data[i] = f32_to_fp8e4m3(std::ldexp(v, static_cast<int>(rng() % 16) - 6));
          break;
      }
    }
    if (dtype == DType::F8_E4M3) {
      w.scale_cols = (cols + 127) / 128;
      scales.resize(((rows + 127) / 128) * w.scale_cols);
      for (float& s : scales)
        s = std::ldexp(1.0f + 0.5f * u(rng), -static_cast<int>(6 + rng() % 7));
      w.scale_inv = scales.data();
    }
    w.data = data.data();
  }
};

using Floats = AlignedFloats;

// Index of the first element whose bits differ, or -1.
int64_t first_diff(const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (bits(a[i]) != bits(b[i])) return i;
  return -1;
}

std::string shape(DType dt, int64_t m, int64_t n, int64_t k) {
  return std::string(dtype_name(dt)) + " m=" + std::to_string(m) + " N=" + std::to_string(n) +
         " K=" + std::to_string(k);
}

constexpr float kSentinel = -12345.0f;

// Runs `isa`'s matmul with strided x and y; checks y's padding is untouched. y: [m, N].
std::vector<float> run_matmul(Isa isa, const ThreadPool& pool, const Floats& x, int64_t m,
                              int64_t ldx, const Weight& w) {
  const int64_t ldy = w.rows + 3;
  std::vector<float> y(m * ldy, kSentinel), out(m * w.rows);
  kernel_table(isa).matmul(pool, x.data(), m, ldx, w, y.data(), ldy);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = w.rows; j < ldy; ++j) EXPECT_EQ(y[i * ldy + j], kSentinel) << "wrote padding";
    std::memcpy(&out[i * w.rows], &y[i * ldy], w.rows * sizeof(float));
  }
  return out;
}

// fast == contract bit for bit; |fast - plain float sum| <= (K + 16) * 2^-23 * sum |x * w|
// (the two error bounds, sequential sum (K - 1) u and 16-lane sum (K / 16 + 4) u, added).
void check_matmul(const ThreadPool& pool, DType dt, int64_t m, int64_t N, int64_t K,
                  uint32_t seed) {
  TestWeight tw(dt, N, K, seed);
  const int64_t ldx = seed % 2 ? K + 5 : (K + 15) / 16 * 16 + 16;  // odd: misaligned rows
  const auto x = random_floats(m * ldx, seed + 1);
  std::vector<float> lanes(m * N), plain(m * N);
  std::vector<double> mag(m * N);
  reference::matmul_lanes(x.data(), m, ldx, tw.w, lanes.data(), N);
  reference::matmul(x.data(), m, ldx, tw.w, plain.data(), N);
  reference::matmul_abs(x.data(), m, ldx, tw.w, mag.data(), N);
  const double tol = (K + 16) * std::ldexp(1.0, -23);
  // fp8: with and without the fast conversion (TestWeight's data has no NaN byte, and many
  // subnormals, which the fast conversion must also get right).
  for (bool fast : {false, true}) {
    if (fast && dt != DType::F8_E4M3) break;
    tw.w.fp8_plain = fast;
    for (Isa isa : isas()) {
      const auto y = run_matmul(isa, pool, x, m, ldx, tw.w);
      const int64_t d = first_diff(y.data(), lanes.data(), m * N);
      ASSERT_EQ(d, -1) << isa_name(isa) << " " << shape(dt, m, N, K) << " fast " << fast << " at "
                       << d << ": " << y[d] << " vs contract " << lanes[d];
      for (int64_t i = 0; i < m * N; ++i)
        ASSERT_LE(std::fabs(static_cast<double>(y[i]) - plain[i]), tol * mag[i] + 1e-30)
            << isa_name(isa) << " " << shape(dt, m, N, K) << " at " << i;
    }
  }
}

TEST(Matmul, AwkwardShapesAllDtypesAllIsas) {
  ThreadPool pool(2);
  uint32_t seed = 1;
  for (DType dt : kDtypes)
    for (int64_t K : {1, 15, 16, 17, 127, 129, 300})
      for (int64_t N : {1, 7, 130})
        for (int64_t m : {1, 3, 4, 5, 33, 70}) check_matmul(pool, dt, m, N, K, seed++);
}

TEST(Matmul, EveryDecodeBatchSize) {  // and both sides of the GEMV / GEMM crossovers
  ThreadPool pool(2);
  for (DType dt : kDtypes)
    for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 32, 33})
      check_matmul(pool, dt, m, 61, 272, 100 + m);
  for (DType dt : kDtypes)  // x too big for L1: K in blocks, with a ragged end
    for (int64_t m : {4, 8, 20}) check_matmul(pool, dt, m, 53, 2500, 120 + m);
  for (DType dt : kDtypes)  // 4 tokens' x fits L1, 8 do not: groups of <= 4 over L2 row blocks
    for (int64_t m : {5, 8, 12, 20}) check_matmul(pool, dt, m, 150, 1500, 140 + m);
}

TEST(Matmul, SeveralKBlocksAndPanels) {  // K past several gemm K blocks, m past one panel
  ThreadPool pool(2);
  for (DType dt : kDtypes) {
    check_matmul(pool, dt, 150, 100, 1000, 200);
    check_matmul(pool, dt, 131, 53, 2176, 202);
  }
}

TEST(Matmul, OneTokenEqualsRowOfABatch) {
  ThreadPool pool(2);
  for (DType dt : kDtypes) {
    for (int64_t K : {129, 300, 777}) {
      TestWeight tw(dt, 130, K, 7);
      const int64_t m = 70, ldx = K;
      const auto x = random_floats(m * ldx, 8);
      for (Isa isa : isas()) {
        const auto all = run_matmul(isa, pool, x, m, ldx, tw.w);
        for (int64_t i : {0, 1, 33, 69}) {
          Floats xi(x.begin() + i * ldx, x.begin() + (i + 1) * ldx);
          const auto one = run_matmul(isa, pool, xi, 1, ldx, tw.w);
          ASSERT_EQ(first_diff(one.data(), &all[i * 130], 130), -1)
              << isa_name(isa) << " " << shape(dt, m, 130, K) << " token " << i;
        }
      }
    }
  }
}

TEST(Matmul, IndependentOfThreadCount) {
  ThreadPool p1(1), p2(2), p3(3);
  for (DType dt : kDtypes) {
    for (int64_t m : {1, 4, 70}) {
      TestWeight tw(dt, 301, 640, 11);
      const auto x = random_floats(m * 640, 12);
      for (Isa isa : isas()) {
        const auto y1 = run_matmul(isa, p1, x, m, 640, tw.w);
        const auto y2 = run_matmul(isa, p2, x, m, 640, tw.w);
        const auto y3 = run_matmul(isa, p3, x, m, 640, tw.w);
        EXPECT_EQ(first_diff(y1.data(), y2.data(), m * 301), -1) << isa_name(isa) << " m=" << m;
        EXPECT_EQ(first_diff(y1.data(), y3.data(), m * 301), -1) << isa_name(isa) << " m=" << m;
      }
    }
  }
}

TEST(Matmul, Fp8RowViewsFindTheirScales) {
  ThreadPool pool(2);
  TestWeight tw(DType::F8_E4M3, 300, 260, 21);  // partial blocks at the bottom and the right
  for (int64_t m : {1, 5, 40}) {
    const auto x = random_floats(m * 260, 22);
    for (Isa isa : isas()) {
      const auto full = run_matmul(isa, pool, x, m, 260, tw.w);
      for (auto [r0, n] : {std::pair<int64_t, int64_t>{100, 150}, {128, 129}, {299, 1}}) {
        const Weight v = tw.w.rows_view(r0, n);
        const auto part = run_matmul(isa, pool, x, m, 260, v);
        for (int64_t i = 0; i < m; ++i)
          ASSERT_EQ(first_diff(&part[i * n], &full[i * 300 + r0], n), -1)
              << isa_name(isa) << " view " << r0 << "+" << n << " m=" << m;
      }
    }
  }
}

TEST(Matmul, EmptyKGivesZeros) {
  ThreadPool pool(2);
  TestWeight tw(DType::BF16, 5, 0, 1);
  Floats x(2, 1.0f);
  for (Isa isa : isas()) {
    const auto y = run_matmul(isa, pool, x, 2, 1, tw.w);
    for (float v : y) EXPECT_EQ(bits(v), 0u);
  }
}

// Elements past K are exactly 0 * 0, not 0 * scale: with an infinite scale the padding would
// otherwise turn the sum into NaN.
TEST(Matmul, PaddingIsZeroNotZeroTimesScale) {
  ThreadPool pool(1);
  std::vector<uint8_t> bytes(17, 0x38);  // 1.0
  std::vector<float> scales(1, INFINITY);
  const Weight w{DType::F8_E4M3, bytes.data(), 1, 17, scales.data(), 1, 0};
  Floats x(17, 1.0f);
  float want;
  reference::matmul_lanes(x.data(), 1, 17, w, &want, 1);
  ASSERT_TRUE(std::isinf(want));
  for (Isa isa : isas()) {
    for (int64_t m : {1, 9}) {
      Floats xm(m * 17, 1.0f);
      const auto y = run_matmul(isa, pool, xm, m, 17, w);
      for (float v : y) EXPECT_EQ(bits(v), bits(want)) << isa_name(isa) << " m=" << m;
    }
  }
}

// e4m3 NaN bytes (0x7f, 0xff) make their rows' outputs NaN and leave every other row exact.
TEST(Matmul, Fp8NanBytesPoisonOnlyTheirRows) {
  ThreadPool pool(2);
  TestWeight tw(DType::F8_E4M3, 20, 300, 61);
  tw.data[5 * 300 + 200] = 0x7f;
  tw.data[13 * 300 + 3] = 0xff;
  for (int64_t m : {1, 3, 9}) {
    const auto x = random_floats(m * 300, 62);
    std::vector<float> want(m * 20);
    reference::matmul_lanes(x.data(), m, 300, tw.w, want.data(), 20);
    for (Isa isa : isas()) {
      const auto y = run_matmul(isa, pool, x, m, 300, tw.w);
      for (int64_t i = 0; i < m * 20; ++i) {
        const int64_t n = i % 20;
        if (n == 5 || n == 13)
          EXPECT_TRUE(std::isnan(y[i])) << isa_name(isa) << " " << i;
        else
          EXPECT_EQ(bits(y[i]), bits(want[i])) << isa_name(isa) << " " << i;
      }
    }
  }
}

// Block scales far from the usual range: large, infinite, zero, subnormal, negative.
TEST(Matmul, Fp8ExtremeScalesFollowTheContract) {
  ThreadPool pool(2);
  TestWeight tw(DType::F8_E4M3, 260, 384, 71);
  const float special[] = {256.0f, 255.99998f, -300.0f, 1e30f,     INFINITY, -INFINITY,
                           0.0f,   -0.0f,      1e-40f,  0x1p-149f, 3.0f,     -0.5f};
  for (size_t i = 0; i < tw.scales.size(); ++i) tw.scales[i] = special[i % std::size(special)];
  for (int64_t m : {1, 2, 3}) {
    const auto x = random_floats(m * 384, 72 + m);
    std::vector<float> want(m * 260);
    reference::matmul_lanes(x.data(), m, 384, tw.w, want.data(), 260);
    for (bool fast : {false, true}) {  // scales >= 2^8 or NaN must leave the fast conversion
      tw.w.fp8_plain = fast;
      for (Isa isa : isas()) {
        const auto y = run_matmul(isa, pool, x, m, 384, tw.w);
        for (int64_t i = 0; i < m * 260; ++i) {
          if (std::isnan(want[i]))
            EXPECT_TRUE(std::isnan(y[i])) << isa_name(isa) << " m=" << m << " at " << i;
          else
            EXPECT_EQ(bits(y[i]), bits(want[i]))
                << isa_name(isa) << " m=" << m << " fast " << fast << " at " << i;
        }
      }
    }
  }
}

// The fast fp8 GEMV converts runs of 64 bytes at once where the CPU allows (avx512bf16 with
// VBMI: one byte permute, then shifts and masks per 16-bit half): every non-NaN byte, at every
// position of a run (K = 128, 256, and 320, whose last 64 columns take the other path), gives
// the contract's bits at m = 1 and 2 (and 3, which converts 16 at a time).
TEST(Matmul, Fp8EveryByteAtEveryPositionOfARun) {
  ThreadPool pool(2);
  for (int64_t K : {128, 256, 320}) {
    TestWeight tw(DType::F8_E4M3, 256, K, 90);
    for (int64_t r = 0; r < 256; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t b = static_cast<uint8_t>(r + 37 * k);
        tw.data[r * K + k] = (b & 0x7f) == 0x7f ? 0 : b;  // no NaN: the fast conversion's input
      }
    tw.w.fp8_plain = true;
    for (int64_t m : {1, 2, 3}) {
      const auto x = random_floats(m * K, 91 + m);
      std::vector<float> want(m * 256);
      reference::matmul_lanes(x.data(), m, K, tw.w, want.data(), 256);
      for (Isa isa : isas()) {
        const auto y = run_matmul(isa, pool, x, m, K, tw.w);
        const int64_t d = first_diff(y.data(), want.data(), m * 256);
        ASSERT_EQ(d, -1) << isa_name(isa) << " K=" << K << " m=" << m << " at " << d << ": " << y[d]
                         << " vs contract " << want[d];
      }
    }
  }
}

// fp8 scales go to x once per block row of 128 rows: row views that start and end inside a
// block row (the model's per-head slices) scale by their own rows' block, on the GEMV (one
// block row at a time, fast and general conversions) and the GEMM (N blocks cut at block rows).
TEST(Matmul, Fp8RowViewsScaleByTheirBlockRows) {
  ThreadPool pool(2);
  TestWeight tw(DType::F8_E4M3, 300, 260, 25);  // partial blocks at the bottom and the right
  for (bool fast : {false, true}) {
    tw.w.fp8_plain = fast;
    for (auto [r0, n] : {std::pair<int64_t, int64_t>{100, 150}, {128, 128}, {250, 50}}) {
      const Weight v = tw.w.rows_view(r0, n);
      for (int64_t m : {1, 3, 9, 40}) {
        const auto x = random_floats(m * 260, 26 + m);
        std::vector<float> want(m * n);
        reference::matmul_lanes(x.data(), m, 260, v, want.data(), n);
        for (Isa isa : isas()) {
          const auto y = run_matmul(isa, pool, x, m, 260, v);
          ASSERT_EQ(first_diff(y.data(), want.data(), m * n), -1)
              << isa_name(isa) << " view " << r0 << "+" << n << " m=" << m << " fast " << fast;
        }
      }
    }
  }
}

TEST(Matmul, BatchEqualsOneByOne) {
  ThreadPool pool(3);
  // Mixed dtypes and shapes: K not a multiple of 16, unaligned x, m past the GEMV range (run
  // by matmul itself), an empty job, one row.
  struct Spec {
    DType dt;
    int64_t m, N, K;
    bool plain;
  };
  const Spec specs[] = {{DType::F8_E4M3, 1, 130, 300, true}, {DType::BF16, 1, 64, 256, false},
                        {DType::F8_E4M3, 4, 77, 129, false}, {DType::F32, 3, 1, 17, false},
                        {DType::F16, 2, 40, 64, false},      {DType::BF16, 0, 10, 32, false},
                        {DType::F8_E4M3, 40, 33, 256, true}, {DType::BF16, 9, 50, 100, false}};
  for (Isa isa : isas()) {
    std::vector<std::unique_ptr<TestWeight>> ws;
    std::vector<Floats> xs;
    std::vector<std::vector<float>> want, got;
    std::vector<MatmulJob> jobs;
    uint32_t seed = 500;
    for (const Spec& sp : specs) {
      ws.push_back(std::make_unique<TestWeight>(sp.dt, sp.N, sp.K, seed++));
      ws.back()->w.fp8_plain = sp.plain;
      const int64_t ldx = sp.K + 3;  // rows not 64-byte aligned
      xs.push_back(random_floats(std::max<int64_t>(1, sp.m * ldx), seed++));
      want.push_back(run_matmul(isa, pool, xs.back(), sp.m, ldx, ws.back()->w));
      got.emplace_back(sp.m * (sp.N + 2), kSentinel);
    }
    for (size_t i = 0; i < std::size(specs); ++i)
      jobs.push_back(
          {xs[i].data(), specs[i].m, specs[i].K + 3, &ws[i]->w, got[i].data(), specs[i].N + 2});
    kernel_table(isa).matmul_batch(pool, jobs.data(), static_cast<int64_t>(jobs.size()));
    for (size_t i = 0; i < std::size(specs); ++i) {
      const Spec& sp = specs[i];
      for (int64_t t = 0; t < sp.m; ++t) {
        ASSERT_EQ(first_diff(&got[i][t * (sp.N + 2)], &want[i][t * sp.N], sp.N), -1)
            << isa_name(isa) << " job " << i << " token " << t;
        EXPECT_EQ(got[i][t * (sp.N + 2) + sp.N], kSentinel) << "wrote padding, job " << i;
      }
    }
  }
}

TEST(Matmul, RowPointersEqualContiguousRows) {
  // Rows gathered from a pool in a scattered order, repeats included (a token feeding two
  // experts), aligned or not, through the GEMV (one row, a few, more than 8) and the GEMM.
  ThreadPool pool(3);
  uint32_t seed = 700;
  for (DType dt : kDtypes) {
    for (int64_t K : {256, 100}) {
      const int64_t Kp = (K + 15) / 16 * 16, N = 37, n_pool = 64;
      TestWeight tw(dt, N, K, seed++);
      tw.w.fp8_plain = dt == DType::F8_E4M3;
      const auto rows_pool = random_floats(n_pool * Kp + 1, seed++);
      for (int64_t m : {1, 5, 13, 40}) {
        for (bool misaligned : {false, true}) {
          std::vector<const float*> rows(m);
          Floats x(m * Kp);  // the same rows, contiguous
          for (int64_t i = 0; i < m; ++i) {
            const int64_t r = (i * 29 + 7) % n_pool / (i % 3 == 2 ? 2 : 1);
            rows[i] = rows_pool.data() + r * Kp + (misaligned && i % 2 ? 1 : 0);
            std::memcpy(&x[i * Kp], rows[i], K * sizeof(float));
          }
          for (Isa isa : isas()) {
            const auto want = run_matmul(isa, pool, x, m, Kp, tw.w);
            const int64_t ldy = N + 2;
            std::vector<float> y(m * ldy, kSentinel);
            MatmulJob j;
            j.xrows = rows.data(), j.m = m, j.w = &tw.w, j.y = y.data(), j.ldy = ldy;
            kernel_table(isa).matmul_batch(pool, &j, 1);
            for (int64_t i = 0; i < m; ++i) {
              ASSERT_EQ(first_diff(&y[i * ldy], &want[i * N], N), -1)
                  << isa_name(isa) << " " << shape(dt, m, N, K) << " misaligned " << misaligned
                  << " row " << i;
              EXPECT_EQ(y[i * ldy + N], kSentinel) << "wrote padding";
            }
          }
        }
      }
    }
  }
}

TEST(MatmulT, EqualsReferenceBitForBit) {
  ThreadPool pool(3);
  uint32_t seed = 300;
  for (DType dt : kDtypes) {
    for (int64_t rows : {1, 17, 128, 192}) {
      for (int64_t cols : {1, 15, 16, 100, 260, 512}) {
        for (int64_t m : {1, 2, 3, 4, 5, 70}) {
          TestWeight tw(dt, rows, cols, seed++);
          const int64_t ldx = rows + 2, ldy = cols + 1;
          const auto x = random_floats(m * ldx, seed++);
          std::vector<float> want(m * ldy, kSentinel);
          reference::matmul_t(x.data(), m, ldx, tw.w, want.data(), ldy);
          for (bool fast : {false, true}) {
            if (fast && dt != DType::F8_E4M3) break;
            tw.w.fp8_plain = fast;
            for (Isa isa : isas()) {
              std::vector<float> y(m * ldy, kSentinel);
              kernel_table(isa).matmul_t(pool, x.data(), m, ldx, tw.w, y.data(), ldy);
              const int64_t d = first_diff(y.data(), want.data(), m * ldy);
              ASSERT_EQ(d, -1) << isa_name(isa) << " " << dtype_name(dt) << " rows=" << rows
                               << " cols=" << cols << " m=" << m << " fast " << fast << " at " << d;
            }
          }
        }
      }
    }
  }
}

// Row views (the model's per-head W_UK) read the scales of their own rows, on every path:
// decode (m <= 4, with and without the fast fp8 conversion) and prefill.
TEST(MatmulT, Fp8RowViewsFindTheirScales) {
  ThreadPool pool(2);
  TestWeight tw(DType::F8_E4M3, 300, 260, 23);  // partial blocks at the bottom and the right
  for (bool fast : {false, true}) {
    tw.w.fp8_plain = fast;
    for (auto [r0, n] : {std::pair<int64_t, int64_t>{100, 150}, {128, 128}, {256, 44}}) {
      const Weight v = tw.w.rows_view(r0, n);
      for (int64_t m : {1, 2, 4, 40}) {
        const auto x = random_floats(m * n, 24);
        std::vector<float> want(m * 260), y(m * 260);
        reference::matmul_t(x.data(), m, n, v, want.data(), 260);
        for (Isa isa : isas()) {
          kernel_table(isa).matmul_t(pool, x.data(), m, n, v, y.data(), 260);
          ASSERT_EQ(first_diff(y.data(), want.data(), m * 260), -1)
              << isa_name(isa) << " view " << r0 << "+" << n << " m=" << m << " fast " << fast;
        }
      }
    }
  }
}

// Scales the fast conversion cannot take exactly (>= 2^8, NaN, infinite) keep matmul_t's
// decode path on the general one, for the whole matrix.
TEST(MatmulT, Fp8ExtremeScalesFollowTheContract) {
  ThreadPool pool(2);
  TestWeight tw(DType::F8_E4M3, 260, 384, 73);
  const float special[] = {3.0f, -0.5f, 1e-3f, 256.0f, 7.0f, 1e30f, INFINITY, 0.0f, -0.0f};
  for (size_t i = 0; i < tw.scales.size(); ++i) tw.scales[i] = special[i % std::size(special)];
  tw.w.fp8_plain = true;
  for (int64_t m : {1, 2, 4}) {
    const auto x = random_floats(m * 260, 74 + m);
    std::vector<float> want(m * 384), y(m * 384);
    reference::matmul_t(x.data(), m, 260, tw.w, want.data(), 384);
    for (Isa isa : isas()) {
      kernel_table(isa).matmul_t(pool, x.data(), m, 260, tw.w, y.data(), 384);
      for (int64_t i = 0; i < m * 384; ++i) {
        if (std::isnan(want[i]))
          EXPECT_TRUE(std::isnan(y[i])) << isa_name(isa) << " m=" << m << " at " << i;
        else
          ASSERT_EQ(bits(y[i]), bits(want[i])) << isa_name(isa) << " m=" << m << " at " << i;
      }
    }
  }
}

TEST(MatmulT, IndependentOfThreadCount) {
  ThreadPool p1(1), p3(3);
  TestWeight tw(DType::BF16, 128, 512, 5);
  const auto x = random_floats(300 * 128, 6);
  std::vector<float> y1(300 * 512), y3(300 * 512);
  matmul_t(p1, x.data(), 300, 128, tw.w, y1.data(), 512);
  matmul_t(p3, x.data(), 300, 128, tw.w, y3.data(), 512);
  EXPECT_EQ(first_diff(y1.data(), y3.data(), 300 * 512), -1);
}

TEST(Dequant, RowsEqualReferenceBitForBit) {
  for (DType dt : kDtypes) {
    TestWeight tw(dt, 300, 270, 31);
    for (auto [r0, n] : {std::pair<int64_t, int64_t>{0, 300}, {130, 100}}) {
      const Weight v = tw.w.rows_view(r0, n);
      std::vector<float> row(270);
      for (Isa isa : isas()) {
        for (int64_t r = 0; r < n; r += 7) {
          kernel_table(isa).dequant_row(v, r, row.data());
          for (int64_t c = 0; c < 270; ++c) {
            ASSERT_EQ(bits(row[c]), bits(reference::weight_value(tw.w, r0 + r, c)))
                << isa_name(isa) << " " << dtype_name(dt) << " (" << r0 + r << ", " << c << ")";
            ASSERT_EQ(bits(row[c]), bits(v.at(r, c)));
          }
        }
      }
    }
  }
}

TEST(Dequant, EveryFp8ByteAndScale) {
  std::vector<uint8_t> bytes(256 * 4);
  for (int i = 0; i < 1024; ++i) bytes[i] = static_cast<uint8_t>(i);
  // Scales: ordinary, tiny (products underflow to subnormals), large, and one of each sign.
  for (float scale : {0.0123f, 3e-39f, 1.5e-30f, 7e20f, -0.5f}) {
    std::vector<float> scales(8, scale);
    Weight w{DType::F8_E4M3, bytes.data(), 1, 1024, scales.data(), 8, 0};
    std::vector<float> want(1024), got(1024);
    kernel_table(Isa::Scalar).dequant_row(w, 0, want.data());
    for (int i = 0; i < 1024; ++i) {
      const float ref = reference::weight_value(w, 0, i);
      if (std::isnan(ref))
        ASSERT_TRUE(std::isnan(want[i]) && std::signbit(want[i]) == std::signbit(ref));
      else
        ASSERT_EQ(bits(want[i]), bits(ref)) << "byte " << (i & 255) << " scale " << scale;
    }
    for (Isa isa : isas()) {
      kernel_table(isa).dequant_row(w, 0, got.data());
      ASSERT_EQ(first_diff(got.data(), want.data(), 1024), -1) << isa_name(isa) << " " << scale;
    }
  }
}

TEST(Dequant, EveryF16Value) {  // NaN payloads included: the ISAs agree on every bit
  std::vector<uint16_t> h(65536);
  for (int i = 0; i < 65536; ++i) h[i] = static_cast<uint16_t>(i);
  Weight w{DType::F16, h.data(), 1, 65536};
  std::vector<float> want(65536), got(65536);
  kernel_table(Isa::Scalar).dequant_row(w, 0, want.data());
  for (int i = 0; i < 65536; ++i) {
    const float ref = f16_to_f32(h[i]);
    if (std::isnan(ref))
      ASSERT_TRUE(std::isnan(want[i])) << i;
    else
      ASSERT_EQ(bits(want[i]), bits(ref)) << i;
  }
  for (Isa isa : isas()) {
    kernel_table(isa).dequant_row(w, 0, got.data());
    ASSERT_EQ(first_diff(got.data(), want.data(), 65536), -1) << isa_name(isa);
  }
}

// Every ISA's conversions against the independent table (ml_dtypes, tests/fixtures/dtypes): the
// kernel tests above compare the kernels with a reference that uses the same scalar decoders, so
// this is what would catch a wrong decoder in both.
TEST(Dequant, EveryCodeMatchesTheIndependentTable) {
  const auto& fx = moeserve::testing::dtype_fixture();
  ASSERT_TRUE(fx.is_object()) << "tests/fixtures/dtypes/dtypes.json is missing";
  std::vector<uint8_t> b8(256);
  for (int i = 0; i < 256; ++i) b8[i] = static_cast<uint8_t>(i);
  std::vector<float> one(2, 1.0f);
  const Weight w8{DType::F8_E4M3, b8.data(), 1, 256, one.data(), 2, 0};
  std::vector<uint16_t> b16(65536);
  for (int i = 0; i < 65536; ++i) b16[i] = static_cast<uint16_t>(i);
  std::vector<float> got(65536);
  for (Isa isa : isas()) {
    kernel_table(isa).dequant_row(w8, 0, got.data());
    for (int c = 0; c < 256; ++c) {
      const float want =
          moeserve::testing::f32_from_bits(fx["fp8_e4m3fn_decode"][c].get<uint32_t>());
      if (std::isnan(want))
        EXPECT_TRUE(std::isnan(got[c])) << isa_name(isa) << " fp8 code " << c;
      else
        EXPECT_EQ(bits(got[c]), bits(want)) << isa_name(isa) << " fp8 code " << c;
    }
    for (auto [dt, key] :
         {std::pair<DType, const char*>{DType::BF16, "bf16_decode"}, {DType::F16, "f16_decode"}}) {
      const Weight w{dt, b16.data(), 1, 65536};
      kernel_table(isa).dequant_row(w, 0, got.data());
      moeserve::testing::Fnv1a h;
      for (float v : got) h.add(moeserve::testing::canonical_f32(v));
      EXPECT_EQ(h.hex(), fx["sweeps"][key].get<std::string>()) << isa_name(isa) << " " << key;
    }
  }
}

TEST(Vector, DotFollowsTheContract) {
  for (int64_t n : {0, 1, 15, 16, 17, 100, 1000, 4099}) {
    const auto a = random_floats(n + 1, 40 + n), b = random_floats(n + 1, 41 + n);
    const float want = reference::dot_lanes(a.data(), b.data(), n);
    double mag = 0, plain = 0;
    for (int64_t k = 0; k < n; ++k) {
      mag += std::fabs(static_cast<double>(a[k]) * b[k]);
      plain += static_cast<double>(a[k]) * b[k];
    }
    EXPECT_LE(std::fabs(want - plain), (n / 16 + 5) * std::ldexp(1.0, -24) * mag + 1e-30);
    for (Isa isa : isas())
      EXPECT_EQ(bits(kernel_table(isa).dot(a.data(), b.data(), n)), bits(want))
          << isa_name(isa) << " n=" << n;
    EXPECT_EQ(bits(dot(a.data(), b.data(), n)), bits(want));
  }
}

TEST(Vector, AxpyIsOneFmaPerElement) {
  for (int64_t n : {0, 1, 15, 16, 17, 100, 1000}) {
    const auto x = random_floats(n, 50 + n), y0 = random_floats(n, 51 + n);
    for (Isa isa : isas()) {
      auto y = y0;
      kernel_table(isa).axpy(0.37f, x.data(), y.data(), n);
      for (int64_t k = 0; k < n; ++k)
        ASSERT_EQ(bits(y[k]), bits(std::fma(0.37f, x[k], y0[k]))) << isa_name(isa) << " " << k;
    }
  }
}

TEST(Vector, DotsEqualDotOneByOne) {
  for (int64_t n : {0, 1, 15, 16, 17, 64, 100, 512}) {
    for (int64_t na : {1, 3, 4, 5, 8, 9, 13, 16}) {
      for (int64_t nb : {1, 2, 3, 7, 16}) {
        const int64_t lda = n + 3, boff = 5, ldo = nb + 2;
        const auto a = random_floats(na * lda, 60 + n + na);
        // b's rows scattered over one buffer, read from boff on.
        const auto buf = random_floats(nb * (n + 9) + 1, 61 + n + nb);
        std::vector<const float*> b(nb);
        for (int64_t j = 0; j < nb; ++j) b[j] = buf.data() + ((j * 3) % nb) * (n + 9);
        for (Isa isa : isas()) {
          std::vector<float> got(na * ldo, -1.0f);
          kernel_table(isa).dots(a.data(), na, lda, b.data(), nb, boff, n, got.data(), ldo);
          for (int64_t i = 0; i < na; ++i) {
            for (int64_t j = 0; j < nb; ++j)
              ASSERT_EQ(bits(got[i * ldo + j]),
                        bits(reference::dot_lanes(a.data() + i * lda, b[j] + boff, n)))
                  << isa_name(isa) << " n=" << n << " na=" << na << " nb=" << nb << " i=" << i
                  << " j=" << j;
            EXPECT_EQ(got[i * ldo + nb], -1.0f) << "wrote past the row's outputs";
          }
        }
      }
    }
  }
}

// The kernels' exp: within 2 ulp of exp over the whole range softmax feeds it, 1 at 0, the
// floor at -87.33 (FLT_MIN), NaN through.
TEST(Vector, ExpLanesIsWithinTwoUlp) {
  double worst = 0;
  for (int i = 0; i <= 200000; ++i) {
    const float t = -87.3f * static_cast<float>(i) / 200000.0f;
    const double want = std::exp(static_cast<double>(t));
    const double got = reference::exp_lanes(t);
    worst = std::max(worst, std::fabs(got - want) / want);
  }
  EXPECT_LE(worst, 2 * 0x1p-24) << "max relative error " << worst;
  EXPECT_EQ(reference::exp_lanes(0.0f), 1.0f);
  EXPECT_EQ(reference::exp_lanes(-1000.0f), reference::exp_lanes(-87.33654f));
  EXPECT_GT(reference::exp_lanes(-1000.0f), 0.0f);
  EXPECT_TRUE(std::isnan(reference::exp_lanes(NAN)));
}

// Every ISA's softmax is the written-out contract bit for bit, and close to the exact softmax.
TEST(Vector, SoftmaxFollowsTheContract) {
  for (int64_t n : {1, 2, 15, 16, 17, 100, 513, 2048}) {
    std::mt19937 rng(static_cast<uint32_t>(n));
    std::uniform_real_distribution<float> u(-30.0f, 30.0f);
    std::vector<float> x0(n);
    for (float& v : x0) v = u(rng);
    if (n > 3) x0[n / 2] = -1e4f;  // far below the rest: exp's floor
    const float scale = 0.0883883f;
    std::vector<float> want = x0;
    reference::softmax(want.data(), n, scale);
    double m = -1e30, sum = 0, total = 0;
    for (float v : x0) m = std::max(m, static_cast<double>(v * scale));
    for (float v : x0) sum += std::exp(static_cast<double>(v * scale) - m);
    for (int64_t j = 0; j < n; ++j) {
      const double exact = std::exp(static_cast<double>(x0[j] * scale) - m) / sum;
      EXPECT_NEAR(want[j], exact, 1e-6 * exact + 1e-37) << "n=" << n << " j=" << j;
      total += want[j];
    }
    EXPECT_NEAR(total, 1.0, 1e-5) << "n=" << n;
    for (Isa isa : isas()) {
      std::vector<float> got = x0;
      kernel_table(isa).softmax(got.data(), n, scale);
      ASSERT_EQ(first_diff(got.data(), want.data(), n), -1) << isa_name(isa) << " n=" << n;
    }
  }
}

TEST(Vector, WeightedSumIsMultiplyThenAddInOrder) {
  for (int64_t cols : {1, 15, 16, 17, 64, 100, 2048}) {
    for (int64_t n : {0, 1, 3, 8, 9}) {
      const auto buf = random_floats(n * (cols + 3) + 1, 90 + cols + n);
      std::vector<const float*> rows(n);
      for (int64_t j = 0; j < n; ++j) rows[j] = buf.data() + ((j * 5) % n) * (cols + 3) + j % 2;
      const auto w = random_floats(n + 1, 91 + n);
      std::vector<float> want(cols, 0.0f);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t k = 0; k < cols; ++k) {
          const float prod = rows[j][k] * w[j];  // rounded: -ffp-contract=off
          want[k] = want[k] + prod;
        }
      for (Isa isa : isas()) {
        std::vector<float> got(cols + 1, 9.0f);
        kernel_table(isa).weighted_sum(rows.data(), w.data(), n, cols, got.data());
        ASSERT_EQ(first_diff(got.data(), want.data(), cols), -1)
            << isa_name(isa) << " cols=" << cols << " n=" << n;
        EXPECT_EQ(got[cols], 9.0f) << "wrote past the row";
        if (n > 1) {  // and not an FMA, which rounds once: some element tells them apart
          std::vector<float> fused(cols, 0.0f);
          for (int64_t j = 0; j < n; ++j)
            for (int64_t k = 0; k < cols; ++k) fused[k] = std::fma(rows[j][k], w[j], fused[k]);
          if (cols >= 64) {
            EXPECT_NE(first_diff(got.data(), fused.data(), cols), -1) << cols;
          }
        }
      }
    }
  }
}

TEST(Vector, WeightedRowsEqualAxpyInTurn) {
  for (int64_t n : {1, 15, 16, 17, 33, 48, 512}) {
    for (int64_t nc : {1, 2, 4, 7, 8, 12, 16}) {
      for (int64_t nrows : {0, 1, 5, 40}) {
        // Rows scattered over one buffer in an odd order, as blocks of a paged cache are.
        const auto buf = random_floats(nrows * (n + 5) + 1, 70 + n + nrows);
        std::vector<const float*> rows(nrows);
        for (int64_t j = 0; j < nrows; ++j) rows[j] = buf.data() + ((j * 7) % nrows) * (n + 5);
        const int64_t ldc = nrows + 2, ldy = n + 1;
        const auto c = random_floats(nc * ldc + 1, 71 + nc);
        std::vector<float> want(nc * ldy, 0.0f);
        for (int64_t i = 0; i < nc; ++i)
          for (int64_t j = 0; j < nrows; ++j)
            for (int64_t k = 0; k < n; ++k)
              want[i * ldy + k] = std::fma(c[i * ldc + j], rows[j][k], want[i * ldy + k]);
        for (Isa isa : isas()) {
          std::vector<float> got(nc * ldy, 9.0f);
          kernel_table(isa).weighted_rows(c.data(), nc, ldc, rows.data(), nrows, 0, n, got.data(),
                                          ldy);
          for (int64_t i = 0; i < nc; ++i) {
            for (int64_t k = 0; k < n; ++k)
              ASSERT_EQ(bits(got[i * ldy + k]), bits(want[i * ldy + k]))
                  << isa_name(isa) << " n=" << n << " nc=" << nc << " rows=" << nrows << " i=" << i
                  << " k=" << k;
            EXPECT_EQ(got[i * ldy + n], 9.0f) << "wrote past the row";
          }
        }
      }
    }
  }
}

TEST(Weight, Fp8PlainOnlyWithoutNanAndWithFewSubnormals) {
  std::vector<uint8_t> b(4096, 0x38);  // 1.0
  EXPECT_TRUE(fp8_plain(b.data(), b.size()));
  EXPECT_TRUE(fp8_plain(b.data(), 0));
  for (uint8_t zero : {0x00, 0x80}) {  // zeros are not subnormal
    std::fill(b.begin(), b.end(), zero);
    EXPECT_TRUE(fp8_plain(b.data(), b.size()));
  }
  std::fill(b.begin(), b.end(), 0x38);
  for (uint8_t nan : {0x7f, 0xff}) {
    b[4095] = nan;
    EXPECT_FALSE(fp8_plain(b.data(), b.size())) << int(nan);
    b[4095] = 0x38;
  }
  for (int i = 0; i < 4; ++i) b[i * 100] = static_cast<uint8_t>(i % 2 ? 0x87 : 0x01);
  EXPECT_TRUE(fp8_plain(b.data(), b.size()));  // 4 in 4096: within 1 in 1024
  b[999] = 0x05;
  EXPECT_FALSE(fp8_plain(b.data(), b.size()));  // 5 in 4096: too many
}

TEST(Weight, Fp8PlainClassifiesEveryByteAtEveryPosition) {
  // 2051 bytes: a budget of 2 subnormals; three copies of one byte value at different offsets
  // within 8-byte words, and in the tail.
  for (int v = 0; v < 256; ++v) {
    const uint32_t m = static_cast<uint32_t>(v) & 0x7f;
    const bool nan = m == 0x7f, subnormal = m >= 1 && m <= 7;
    for (size_t shift : {0, 3, 7}) {
      std::vector<uint8_t> b(2051, 0x38);
      for (size_t pos : {shift, 1000 + shift, size_t{2049}}) b[pos] = static_cast<uint8_t>(v);
      EXPECT_EQ(fp8_plain(b.data(), b.size()), !nan && !subnormal) << "byte " << v;
      b[1000 + shift] = 0x38;  // two copies: within the budget unless NaN
      EXPECT_EQ(fp8_plain(b.data(), b.size()), !nan) << "byte " << v;
    }
  }
}

TEST(Weight, ViewsAndBytes) {
  TestWeight tw(DType::F8_E4M3, 300, 260, 3);
  EXPECT_EQ(tw.w.bytes(), 300u * 260 + 3 * 3 * 4);
  const Weight v = tw.w.rows_view(100, 50);  // rows 100..149: scale rows 0 and 1
  EXPECT_EQ(v.bytes(), 50u * 260 + 2 * 3 * 4);
  EXPECT_EQ(v.scale_row0, 100);
  EXPECT_EQ(bits(v.at(30, 200)), bits(tw.w.at(130, 200)));
  const Weight vv = v.rows_view(28, 1);  // row 128: one scale row
  EXPECT_EQ(vv.scale_row0, 128);
  EXPECT_EQ(vv.bytes(), 260u + 3 * 4);
  TestWeight tb(DType::BF16, 10, 7, 4);
  EXPECT_EQ(tb.w.bytes(), 140u);
  EXPECT_EQ(tb.w.rows_view(2, 3).bytes(), 42u);
}

// ---- integer weights (Q8, Q4)

// A Q8 / Q4 weight with its own storage: every stored byte random (every q value occurs), group
// scales of either sign between 2^-9 and 2^-3, rounded to the scale dtype.
struct IntWeight {
  std::vector<uint8_t> data, scales;
  Weight w;

  IntWeight(DType dt, int64_t rows, int64_t cols, int64_t group, DType sdt, uint32_t seed) {
    std::mt19937 rng(seed);
    w.dtype = dt;
    w.rows = rows;
    w.cols = cols;
    w.group_size = group;
    w.group_cols = (cols + group - 1) / group;
    w.group_scale_dtype = sdt;
    data.resize(rows * row_bytes(dt, cols) + 1);
    for (uint8_t& b : data) b = static_cast<uint8_t>(rng());
    scales.resize(rows * w.group_cols * dtype_size(sdt));
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (int64_t i = 0; i < rows * w.group_cols; ++i) {
      const float v = u(rng);
      set_scale(i, std::ldexp(v < 0 ? -1.5f - v : 1.5f - v, -static_cast<int>(3 + rng() % 6)));
    }
    w.data = data.data();
    w.group_scale = scales.data();
  }
  // Stores scale i (row-major [rows, group_cols]) as the scale dtype.
  void set_scale(int64_t i, float v) {
    switch (w.group_scale_dtype) {
      case DType::BF16: {
        const uint16_t h = f32_to_bf16(v);
        std::memcpy(&scales[i * 2], &h, 2);
        break;
      }
      case DType::F16: {
        const uint16_t h = f32_to_f16(v);
        std::memcpy(&scales[i * 2], &h, 2);
        break;
      }
      default:
        std::memcpy(&scales[i * 4], &v, 4);
    }
  }
  void set_scale_bits(int64_t i, uint32_t b) {
    std::memcpy(&scales[i * dtype_size(w.group_scale_dtype)], &b, dtype_size(w.group_scale_dtype));
  }
};

const DType kIntDtypes[] = {DType::Q8, DType::Q4};
const DType kScaleDtypes[] = {DType::BF16, DType::F16, DType::F32};

std::string int_shape(DType dt, DType sdt, int64_t group, int64_t m, int64_t n, int64_t k) {
  return shape(dt, m, n, k) + " scales " + dtype_name(sdt) + " group " + std::to_string(group);
}

// Holds equal bits, or NaN where the contract gives NaN (which NaN an operation returns is not
// part of the contract).
::testing::AssertionResult same_or_nan(const float* got, const float* want, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const bool ok = std::isnan(want[i]) ? std::isnan(got[i]) : bits(got[i]) == bits(want[i]);
    if (!ok)
      return ::testing::AssertionFailure()
             << "at " << i << ": " << got[i] << " vs contract " << want[i];
  }
  return ::testing::AssertionSuccess();
}

// One ISA's kernels on integer weights, instantiated for the ISAs this CPU has
// (KernelIsas.WhichRunHere names the others).
class IntMatmul : public ::testing::TestWithParam<Isa> {
 protected:
  const KernelTable& table() const { return kernel_table(GetParam()); }
  const char* name() const { return isa_name(GetParam()); }

  // matmul == the contract bit for bit, within the error bound of the plain float sum, and
  // dequant_row == the reference for a few rows.
  void check(const ThreadPool& pool, DType dt, DType sdt, int64_t group, int64_t m, int64_t N,
             int64_t K, uint32_t seed) {
    IntWeight iw(dt, N, K, group, sdt, seed);
    const int64_t ldx = seed % 2 ? K + 5 : (K + 15) / 16 * 16 + 16;  // odd: misaligned rows
    const auto x = random_floats(m * ldx, seed + 1);
    std::vector<float> lanes(m * N), plain(m * N);
    std::vector<double> mag(m * N);
    reference::matmul_lanes(x.data(), m, ldx, iw.w, lanes.data(), N);
    reference::matmul(x.data(), m, ldx, iw.w, plain.data(), N);
    reference::matmul_abs(x.data(), m, ldx, iw.w, mag.data(), N);
    const double tol = (K + 16) * std::ldexp(1.0, -23);
    const auto y = run_matmul(GetParam(), pool, x, m, ldx, iw.w);
    const int64_t d = first_diff(y.data(), lanes.data(), m * N);
    ASSERT_EQ(d, -1) << name() << " " << int_shape(dt, sdt, group, m, N, K) << " at " << d << ": "
                     << y[d] << " vs contract " << lanes[d];
    for (int64_t i = 0; i < m * N; ++i)
      ASSERT_LE(std::fabs(static_cast<double>(y[i]) - plain[i]), tol * mag[i] + 1e-30)
          << name() << " " << int_shape(dt, sdt, group, m, N, K) << " at " << i;
    std::vector<float> row(K);
    for (int64_t r = 0; r < N; r += 5) {
      table().dequant_row(iw.w, r, row.data());
      for (int64_t c = 0; c < K; ++c)
        ASSERT_EQ(bits(row[c]), bits(reference::weight_value(iw.w, r, c)))
            << name() << " dequant_row " << int_shape(dt, sdt, group, 1, N, K) << " (" << r << ", "
            << c << ")";
    }
  }
};

INSTANTIATE_TEST_SUITE_P(Isas, IntMatmul, ::testing::ValuesIn(isas()),
                         [](const auto& info) { return std::string(isa_name(info.param)); });

// Every scale dtype and group size (32, 64, 128 -- ragged at the end -- and the whole row), odd
// row counts, every decode batch size, the GEMV / GEMM crossover and the GEMM.
TEST_P(IntMatmul, FollowsTheContract) {
  ThreadPool pool(2);
  uint32_t seed = 1000;
  for (DType dt : kIntDtypes)
    for (DType sdt : kScaleDtypes)
      for (int64_t K : {256, 320})
        for (int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}, K})
          for (int64_t N : {7, 61})
            for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 16, 17, 40})
              check(pool, dt, sdt, group, m, N, K, seed++);
}

// Q8 rows of any length: a last chunk of fewer than 16 (padded with 0 * 0), in a group of its
// own or in a whole-row group that is no multiple of 16.
TEST_P(IntMatmul, Q8RaggedRows) {
  ThreadPool pool(2);
  uint32_t seed = 1500;
  for (int64_t K : {17, 300})
    for (int64_t group : {int64_t{16}, int64_t{32}, K})
      for (int64_t m : {1, 3, 8, 20}) check(pool, DType::Q8, DType::BF16, group, m, 13, K, seed++);
}

// x too big for L1 (K cut into blocks, partial sums between them), and a GEMM over several K
// blocks and panels.
TEST_P(IntMatmul, LongRowsAndLargeBatches) {
  ThreadPool pool(2);
  uint32_t seed = 1600;
  for (DType dt : kIntDtypes)
    for (int64_t group : {32, 128}) {
      for (int64_t m : {4, 8, 12}) check(pool, dt, DType::BF16, group, m, 29, 2560, seed++);
      check(pool, dt, DType::F16, group, 150, 53, 2176, seed++);
    }
}

// Views of some rows find their rows' scales, on the GEMV and the GEMM.
TEST_P(IntMatmul, RowViews) {
  ThreadPool pool(2);
  for (DType dt : kIntDtypes) {
    IntWeight iw(dt, 300, 256, 64, DType::BF16, 1700);
    for (int64_t m : {1, 5, 40}) {
      const auto x = random_floats(m * 256, 1701 + m);
      const auto full = run_matmul(GetParam(), pool, x, m, 256, iw.w);
      for (auto [r0, n] : {std::pair<int64_t, int64_t>{100, 150}, {1, 298}, {299, 1}}) {
        const Weight v = iw.w.rows_view(r0, n);
        std::vector<float> want(m * n);
        reference::matmul_lanes(x.data(), m, 256, v, want.data(), n);
        const auto part = run_matmul(GetParam(), pool, x, m, 256, v);
        ASSERT_EQ(first_diff(part.data(), want.data(), m * n), -1)
            << name() << " " << dtype_name(dt) << " view " << r0 << "+" << n << " m=" << m;
        for (int64_t i = 0; i < m; ++i)
          ASSERT_EQ(first_diff(&part[i * n], &full[i * 300 + r0], n), -1)
              << name() << " " << dtype_name(dt) << " view " << r0 << "+" << n << " m=" << m;
        std::vector<float> row(256);
        table().dequant_row(v, n - 1, row.data());
        for (int64_t c = 0; c < 256; ++c)
          ASSERT_EQ(bits(row[c]), bits(reference::weight_value(iw.w, r0 + n - 1, c)));
      }
    }
  }
}

// A token's outputs do not depend on the batch: m = 1 against every row of larger batches (the
// GEMV's token groups and the GEMM), and a job of matmul_batch against the same matmul alone
// (mixed with other jobs, integer and not, rows given as pointers).
TEST_P(IntMatmul, BatchInvariant) {
  ThreadPool pool(3);
  for (DType dt : kIntDtypes) {
    IntWeight iw(dt, 77, 512, 32, DType::BF16, 1800);
    const int64_t K = 512, N = 77;
    const auto x = random_floats(70 * K, 1801);
    const auto ones = [&] {
      std::vector<float> v(70 * N);
      for (int64_t i = 0; i < 70; ++i) {
        Floats xi(x.begin() + i * K, x.begin() + (i + 1) * K);
        const auto y = run_matmul(GetParam(), pool, xi, 1, K, iw.w);
        std::copy(y.begin(), y.end(), v.begin() + i * N);
      }
      return v;
    }();
    for (int64_t m : {2, 3, 5, 8, 9, 16, 17, 33, 70}) {
      const auto y = run_matmul(GetParam(), pool, x, m, K, iw.w);
      ASSERT_EQ(first_diff(y.data(), ones.data(), m * N), -1)
          << name() << " " << dtype_name(dt) << " m=" << m;
    }
  }
  // matmul_batch: each job the same bits as alone.
  struct Spec {
    DType dt;
    int64_t m, N, K, group;
  };
  const Spec specs[] = {{DType::Q4, 1, 130, 256, 32},  {DType::Q8, 3, 61, 300, 300},
                        {DType::BF16, 2, 40, 64, 0},   {DType::Q4, 40, 33, 128, 128},
                        {DType::Q4, 8, 25, 2048, 128}, {DType::Q8, 1, 9, 64, 32}};
  std::vector<std::unique_ptr<IntWeight>> iws;
  std::vector<std::unique_ptr<TestWeight>> tws;
  std::vector<Floats> xs;
  std::vector<std::vector<const float*>> xrows;
  std::vector<std::vector<float>> want, got;
  std::vector<MatmulJob> jobs;
  uint32_t seed = 1900;
  for (const Spec& sp : specs) {
    const Weight* w;
    if (sp.dt == DType::BF16) {
      tws.push_back(std::make_unique<TestWeight>(sp.dt, sp.N, sp.K, seed++));
      w = &tws.back()->w;
    } else {
      iws.push_back(std::make_unique<IntWeight>(sp.dt, sp.N, sp.K, sp.group, DType::BF16, seed++));
      w = &iws.back()->w;
    }
    const int64_t ldx = sp.K + 3;
    xs.push_back(random_floats(sp.m * ldx, seed++));
    want.push_back(run_matmul(GetParam(), pool, xs.back(), sp.m, ldx, *w));
    got.emplace_back(sp.m * (sp.N + 2), kSentinel);
    MatmulJob j{xs.back().data(), sp.m, ldx, w, got.back().data(), sp.N + 2};
    if (jobs.size() % 2) {  // every other job reads its rows through pointers, in reverse
      xrows.emplace_back(sp.m);
      for (int64_t i = 0; i < sp.m; ++i) xrows.back()[i] = xs.back().data() + i * ldx;
      j.xrows = xrows.back().data();
    }
    jobs.push_back(j);
  }
  table().matmul_batch(pool, jobs.data(), static_cast<int64_t>(jobs.size()));
  for (size_t i = 0; i < std::size(specs); ++i) {
    const Spec& sp = specs[i];
    for (int64_t t = 0; t < sp.m; ++t) {
      ASSERT_EQ(first_diff(&got[i][t * (sp.N + 2)], &want[i][t * sp.N], sp.N), -1)
          << name() << " job " << i << " token " << t;
      EXPECT_EQ(got[i][t * (sp.N + 2) + sp.N], kSentinel) << "wrote padding, job " << i;
    }
  }
}

// Every stored value (0..255, 0..15) under every kind of scale: ordinary, zero, subnormal,
// the largest finite, infinite, NaN (0 * inf is NaN, as float(q) * scale gives).
TEST_P(IntMatmul, EveryValueAndExtremeScales) {
  ThreadPool pool(2);
  struct S {
    DType sdt;
    std::vector<uint32_t> bits;
  };
  const S specials[] = {{DType::BF16,
                         {0x3c00, 0x0000, 0x8000, 0x0001, 0x8075, 0x0080, 0x7f7f, 0xff7f, 0x7f80,
                          0xff80, 0x7fc0, 0xbe80}},
                        {DType::F16,
                         {0x2c00, 0x0000, 0x8000, 0x0001, 0x83ff, 0x0400, 0x7bff, 0xfbff, 0x7c00,
                          0xfc00, 0x7e00, 0xb400}},
                        {DType::F32,
                         {0x3c000000, 0x00000000, 0x80000000, 0x00000001, 0x807fffff, 0x00800000,
                          0x7f7fffff, 0xff7fffff, 0x7f800000, 0xff800000, 0x7fc00000, 0xbe800000}}};
  for (DType dt : kIntDtypes) {
    const int64_t K = dt == DType::Q8 ? 256 : 32;  // one row holds every stored value
    for (const S& sp : specials) {
      const int64_t N = static_cast<int64_t>(sp.bits.size()) * 2 + 1;
      IntWeight iw(dt, N, K, K, sp.sdt, 2000);
      for (int64_t r = 0; r < N; ++r) {
        uint8_t* row = iw.data.data() + r * row_bytes(dt, K);
        for (int64_t b = 0; b < row_bytes(dt, K); ++b)  // Q4: nibbles 0..15, then 15..0
          row[b] = dt == DType::Q8 ? static_cast<uint8_t>(b + 37 * r)
                                   : static_cast<uint8_t>((2 * b % 16) | (15 - 2 * b % 16) << 4);
        if (r < 2 * static_cast<int64_t>(sp.bits.size())) iw.set_scale_bits(r, sp.bits[r / 2]);
      }
      std::vector<float> row(K);
      for (int64_t r = 0; r < N; ++r) {
        table().dequant_row(iw.w, r, row.data());
        for (int64_t c = 0; c < K; ++c) {
          const float want = static_cast<float>(reference::int_value(iw.w, r, c)) *
                             reference::group_scale(iw.w, r, c);
          ASSERT_TRUE(same_or_nan(&row[c], &want, 1))
              << name() << " " << int_shape(dt, sp.sdt, K, 1, N, K) << " (" << r << ", " << c
              << ")";
        }
      }
      for (int64_t m : {1, 3, 20}) {
        const auto x = random_floats(m * K, 2001 + m);
        std::vector<float> want(m * N);
        reference::matmul_lanes(x.data(), m, K, iw.w, want.data(), N);
        const auto y = run_matmul(GetParam(), pool, x, m, K, iw.w);
        EXPECT_TRUE(same_or_nan(y.data(), want.data(), m * N))
            << name() << " " << int_shape(dt, sp.sdt, K, m, N, K);
      }
    }
  }
}

// The reference reads the packing as compressed-tensors writes it: int32 words, little-endian,
// lowest bits first, q + 8 (Q4) or q + 128 (Q8); Weight::at and dequant_row agree.
TEST(IntWeights, ReferenceUnpacksInt32Words) {
  std::mt19937 rng(7);
  for (DType dt : kIntDtypes) {
    const int bits_per = dt == DType::Q4 ? 4 : 8, per = 32 / bits_per, off = 1 << (bits_per - 1);
    const int64_t rows = 3, cols = 64;
    std::vector<int> q(rows * cols);
    for (int& v : q) v = static_cast<int>(rng() % (2 * off)) - off;
    std::vector<int32_t> words(rows * cols / per, 0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        words[(r * cols + c) / per] |= static_cast<int32_t>(
            static_cast<uint32_t>(q[r * cols + c] + off) << (bits_per * (c % per)));
    std::vector<uint16_t> scales(rows * 2);
    for (size_t i = 0; i < scales.size(); ++i) scales[i] = f32_to_bf16(0.25f * (1 + i));
    Weight w;
    w.dtype = dt, w.data = words.data(), w.rows = rows, w.cols = cols;
    w.group_scale = scales.data(), w.group_scale_dtype = DType::BF16, w.group_size = 32;
    w.group_cols = 2;
    std::vector<float> row(cols);
    for (int64_t r = 0; r < rows; ++r) {
      dequant_row(w, r, row.data());
      for (int64_t c = 0; c < cols; ++c) {
        EXPECT_EQ(reference::int_value(w, r, c), q[r * cols + c]) << dtype_name(dt);
        const float want = static_cast<float>(q[r * cols + c]) * 0.25f * (1 + r * 2 + c / 32);
        EXPECT_EQ(reference::weight_value(w, r, c), want);
        EXPECT_EQ(w.at(r, c), want);
        EXPECT_EQ(row[c], want);
      }
    }
    EXPECT_EQ(w.bytes(), static_cast<size_t>(rows * cols * bits_per / 8 + rows * 2 * 2));
    EXPECT_EQ(w.rows_view(1, 2).bytes(), static_cast<size_t>(2 * cols * bits_per / 8 + 2 * 2 * 2));
  }
}

// What the kernels do not take is one clear error: matmul_t of integer weights, Q4 rows that
// are no multiple of 32, groups that split a chunk, missing scales.
TEST(IntWeights, UnsupportedShapesAreErrors) {
  ThreadPool pool(1);
  IntWeight iw(DType::Q4, 4, 64, 32, DType::BF16, 3);
  Floats x(64, 1.0f);
  std::vector<float> y(64);
  EXPECT_THROW(matmul_t(pool, x.data(), 1, 4, iw.w, y.data(), 64), Error);
  auto fails = [&](Weight w) {
    try {
      matmul(pool, x.data(), 1, 64, w, y.data(), 4);
    } catch (const Error& e) {
      return std::string(e.what()).find('\n') == std::string::npos;  // one line
    }
    return false;
  };
  EXPECT_TRUE(fails([&] {
    Weight w = iw.w;
    w.group_size = 48, w.group_cols = 2;
    return w;
  }()));
  EXPECT_TRUE(fails([&] {
    Weight w = iw.w;
    w.cols = 48;  // Q4: not a multiple of 32
    w.group_size = 48, w.group_cols = 1;
    return w;
  }()));
  EXPECT_TRUE(fails([&] {
    Weight w = iw.w;
    w.group_scale = nullptr;
    return w;
  }()));
  EXPECT_TRUE(fails([&] {
    Weight w = iw.w;
    w.group_cols = 1;  // 64 columns in groups of 32 need 2
    return w;
  }()));
  EXPECT_FALSE(fails(iw.w));
}

}  // namespace
}  // namespace moeserve::kernels
