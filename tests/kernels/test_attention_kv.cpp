// dots_cached and weighted_cached (the attention kernels over stored latent-cache rows): every
// ISA equal to the reference bit for bit for f32, bf16 and fp8 rows; f32 and bf16 rows give the
// bits of dots / weighted_rows on the rows as floats; the fp8 scales enter as the contract says.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/aligned.h"
#include "core/dtype.h"
#include "kernel_test_util.h"
#include "kernels/cpu/isa.h"
#include "kernels/kernels.h"
#include "kernels/reference/reference.h"

namespace moeserve::kernels {
namespace {

int64_t row_bytes_of(DType dt, int64_t width) {
  return dt == DType::F32    ? 4 * width
         : dt == DType::BF16 ? 2 * width
                             : width + (width + 127) / 128 * 4;
}

// nrows stored rows of `width` values scattered over one buffer in an odd order (as a paged
// cache's blocks are), at odd byte offsets. fp8: every byte but the NaNs (0x7f, 0xff), scales
// between 2^-10 and 2^2 (one block all zeros, to reach the zero bytes).
struct StoredRows {
  std::vector<uint8_t> buf;
  std::vector<const uint8_t*> ptrs;
  CachedRows rows;

  // big: fp8 scales between 2^-1 and 2^11, so that some weight * scale passes 2^8 (the kernels'
  // general path on every ISA).
  StoredRows(DType dt, int64_t width, int64_t nrows, uint32_t seed, bool big = false) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    const int64_t rb = row_bytes_of(dt, width), stride = rb + 3;
    buf.assign(nrows * stride + 8, 0);
    for (int64_t r = 0; r < nrows; ++r) {
      uint8_t* p = buf.data() + r * stride + 1;
      for (int64_t k = 0; k < width; ++k) {
        const float v = u(rng);
        if (dt == DType::F32) {
          std::memcpy(p + 4 * k, &v, 4);
        } else if (dt == DType::BF16) {
          const uint16_t h = f32_to_bf16(v);
          std::memcpy(p + 2 * k, &h, 2);
        } else {
          uint8_t b;
          do b = static_cast<uint8_t>(rng());
          while ((b & 0x7f) == 0x7f);
          p[k] = (r == 1 && k < 128) ? 0 : b;
        }
      }
      if (dt == DType::F8_E4M3)
        for (int64_t b = 0; b * 128 < width; ++b) {
          const float s = std::ldexp(1.0f + (rng() % 1000) / 1000.0f,
                                     static_cast<int>(rng() % 12) - (big ? 1 : 10));
          std::memcpy(p + width + 4 * b, &s, 4);
        }
    }
    ptrs.resize(nrows);
    for (int64_t j = 0; j < nrows; ++j) ptrs[j] = buf.data() + ((j * 7) % nrows) * stride + 1;
    rows.dtype = dt;
    rows.rows = ptrs.data();
    rows.width = width;
  }
  // Row j as floats (without the fp8 scales).
  std::vector<float> values(int64_t j) const {
    std::vector<float> v(rows.width);
    for (int64_t k = 0; k < rows.width; ++k) v[k] = reference::cached_value(rows, j, k);
    return v;
  }
};

const DType kCacheDtypes[] = {DType::F32, DType::BF16, DType::F8_E4M3};

TEST(CachedRows, DotsEveryIsaEqualsTheReference) {
  for (DType dt : kCacheDtypes)
    for (int64_t width : {1, 15, 16, 17, 48, 128, 130, 200, 576})
      for (int64_t na : {1, 3, 4, 5, 8, 9, 16})
        for (int64_t nb : {1, 2, 3, 7, 12}) {
          const StoredRows b(dt, width, nb, static_cast<uint32_t>(width * 31 + nb));
          const int64_t lda = width + 3, ldo = nb + 2;
          const auto a = random_floats(na * lda, static_cast<uint32_t>(na + width));
          std::vector<float> want(na * ldo, -1.0f);
          reference::dots_cached(a.data(), na, lda, b.rows, nb, want.data(), ldo);
          for (Isa isa : isas()) {
            std::vector<float> got(na * ldo, -1.0f);
            kernel_table(isa).dots_cached(a.data(), na, lda, b.rows, nb, got.data(), ldo);
            for (int64_t i = 0; i < na; ++i) {
              for (int64_t j = 0; j < nb; ++j)
                ASSERT_EQ(bits(got[i * ldo + j]), bits(want[i * ldo + j]))
                    << isa_name(isa) << " " << dtype_name(dt) << " width=" << width << " na=" << na
                    << " nb=" << nb << " i=" << i << " j=" << j;
              EXPECT_EQ(got[i * ldo + nb], -1.0f) << "wrote past the row's outputs";
            }
          }
        }
}

// fp8 scores take a times 2^120 against float(e4m3) * 2^-120 where every |a| < 2^8, and the
// general conversion otherwise: both give the reference's bits, also where the products are
// subnormal or underflow (tiny a) and where one element of a is 2^8 or more, or not finite.
TEST(CachedRows, DotsFp8EveryRangeOfAEqualsTheReference) {
  const int64_t width = 576, nb = 9;
  for (int range = 0; range < 5; ++range) {
    const StoredRows b(DType::F8_E4M3, width, nb, static_cast<uint32_t>(40 + range));
    for (int64_t na : {1, 5, 16}) {
      auto a = random_floats(na * width, static_cast<uint32_t>(na * 3 + range));
      if (range == 1)
        for (float& v : a) v *= 0x1p-140f;  // products below f32's normal range
      if (range == 2) a[(na - 1) * width + width - 1] = 256.0f;
      if (range == 3) a[width / 2] = -300.5f;
      if (range == 4) a[0] = std::numeric_limits<float>::infinity();
      std::vector<float> want(na * nb);
      reference::dots_cached(a.data(), na, width, b.rows, nb, want.data(), nb);
      for (Isa isa : isas()) {
        std::vector<float> got(na * nb, -1.0f);
        kernel_table(isa).dots_cached(a.data(), na, width, b.rows, nb, got.data(), nb);
        for (int64_t k = 0; k < na * nb; ++k)
          ASSERT_EQ(bits(got[k]), bits(want[k]))
              << isa_name(isa) << " range=" << range << " na=" << na << " k=" << k;
      }
      if (range == 1) {  // some scores are subnormal or zero, not all
        int tiny = 0;
        for (float v : want) tiny += std::fabs(v) < std::numeric_limits<float>::min();
        EXPECT_GT(tiny, 0);
      }
    }
  }
}

// f32 and bf16 rows: dot's contract on the values; fp8: per 128-block lane sums, each scaled
// once. Checked against independent sums too: near the exact score in double.
TEST(CachedRows, DotsFollowTheContract) {
  for (DType dt : kCacheDtypes)
    for (int64_t width : {17, 128, 576}) {
      const int64_t nb = 5;
      const StoredRows b(dt, width, nb, static_cast<uint32_t>(width + 7));
      const auto a = random_floats(width, 99);
      std::vector<float> got(nb);
      dots_cached(a.data(), 1, width, b.rows, nb, got.data(), nb);
      for (int64_t j = 0; j < nb; ++j) {
        const auto v = b.values(j);
        double exact = 0, mag = 0;
        for (int64_t k = 0; k < width; ++k) {
          const double p = static_cast<double>(a[k]) * v[k] * reference::cached_scale(b.rows, j, k);
          exact += p;
          mag += std::fabs(p);
        }
        EXPECT_NEAR(got[j], exact, 1e-6 * mag + 1e-30) << dtype_name(dt) << " " << width;
        if (dt != DType::F8_E4M3) {
          EXPECT_EQ(bits(got[j]), bits(reference::dot_lanes(a.data(), v.data(), width)));
        }
      }
    }
}

TEST(CachedRows, WeightedEveryIsaEqualsTheReference) {
  for (DType dt : kCacheDtypes)
    for (int64_t width : {1, 16, 17, 48, 130, 576})
      for (int64_t nc : {1, 2, 4, 7, 8, 12, 16})
        for (int64_t nrows : {0, 1, 5, 40})
          for (int64_t roff : {int64_t{0}, width / 3, width > 100 ? int64_t{96} : int64_t{0}}) {
            const int64_t n = width - roff;
            const StoredRows rows(dt, width, nrows, static_cast<uint32_t>(width * 13 + nrows),
                                  /*big=*/roff == width / 3);
            const int64_t ldc = nrows + 2, ldy = n + 1;
            const auto c = random_floats(nc * ldc + 1, static_cast<uint32_t>(nc + 5));
            std::vector<float> want(nc * ldy, 9.0f);
            reference::weighted_cached(c.data(), nc, ldc, rows.rows, nrows, roff, n, want.data(),
                                       ldy);
            for (Isa isa : isas()) {
              std::vector<float> got(nc * ldy, 9.0f);
              kernel_table(isa).weighted_cached(c.data(), nc, ldc, rows.rows, nrows, roff, n,
                                                got.data(), ldy);
              for (int64_t i = 0; i < nc; ++i) {
                for (int64_t k = 0; k < n; ++k)
                  ASSERT_EQ(bits(got[i * ldy + k]), bits(want[i * ldy + k]))
                      << isa_name(isa) << " " << dtype_name(dt) << " width=" << width
                      << " nc=" << nc << " rows=" << nrows << " roff=" << roff << " i=" << i
                      << " k=" << k;
                EXPECT_EQ(got[i * ldy + n], 9.0f) << "wrote past the row";
              }
            }
          }
}

// Long contexts: fp8 takes the rows a chunk at a time (2048 for 16 outputs), the sums carried
// across chunks; the bits stay the reference's.
TEST(CachedRows, WeightedOverManyRowsEqualsTheReference) {
  for (DType dt : kCacheDtypes) {
    const int64_t width = 200, nc = 16, nrows = 4200, roff = 64, n = 136;
    const StoredRows rows(dt, width, nrows, 17);
    const auto c = random_floats(nc * nrows, 18);
    std::vector<float> want(nc * n), got(nc * n);
    reference::weighted_cached(c.data(), nc, nrows, rows.rows, nrows, roff, n, want.data(), n);
    for (Isa isa : isas()) {
      kernel_table(isa).weighted_cached(c.data(), nc, nrows, rows.rows, nrows, roff, n, got.data(),
                                        n);
      for (int64_t k = 0; k < nc * n; ++k)
        ASSERT_EQ(bits(got[k]), bits(want[k]))
            << isa_name(isa) << " " << dtype_name(dt) << " " << k;
    }
  }
}

// f32 and bf16 rows: weighted_rows' bits on the rows as floats; fp8: the weight times the
// block's scale, rounded once, then one fma per row.
TEST(CachedRows, WeightedFollowsTheContract) {
  for (DType dt : kCacheDtypes) {
    const int64_t width = 576, nrows = 9, nc = 3;
    const StoredRows rows(dt, width, nrows, 5);
    const auto c = random_floats(nc * nrows, 6);
    std::vector<float> got(nc * width);
    weighted_cached(c.data(), nc, nrows, rows.rows, nrows, 0, width, got.data(), width);
    std::vector<std::vector<float>> vals;
    for (int64_t j = 0; j < nrows; ++j) vals.push_back(rows.values(j));
    for (int64_t i = 0; i < nc; ++i)
      for (int64_t k = 0; k < width; ++k) {
        float acc = 0;
        for (int64_t j = 0; j < nrows; ++j) {
          const float s = reference::cached_scale(rows.rows, j, k);
          acc = std::fma(dt == DType::F8_E4M3 ? c[i * nrows + j] * s : c[i * nrows + j], vals[j][k],
                         acc);
        }
        ASSERT_EQ(bits(got[i * width + k]), bits(acc)) << dtype_name(dt) << " " << i << " " << k;
      }
    if (dt != DType::F8_E4M3) {
      std::vector<const float*> fr(nrows);
      for (int64_t j = 0; j < nrows; ++j) fr[j] = vals[j].data();
      std::vector<float> plain(nc * width);
      weighted_rows(c.data(), nc, nrows, fr.data(), nrows, 0, width, plain.data(), width);
      for (int64_t k = 0; k < nc * width; ++k) ASSERT_EQ(bits(got[k]), bits(plain[k])) << k;
    }
  }
}

}  // namespace
}  // namespace moeserve::kernels
