// dots_cached and weighted_cached (kernels.h): attention over latent-cache rows stored as f32,
// bf16 or e4m3 with per-128 scales, read in place. Written once over an instruction set's
// vector ops `O` (impl.h); included by impl.h, internal linkage.
//
// A stored value enters as a float exactly: bf16 by a shift; e4m3 as float(e4m3) * 2^-120 by
// three bit operations (O::cvt_fp8_raw) against the other factor times 2^120 (exact where it is
// below 2^8), which gives the same products, or else through the f16 bits of value * 2^-8
// (O::cvt_fp8_nonan) times 256. The fp8 scales enter only where the contract puts them: once
// per row block on the lane sums (scores), once per row block on the softmax weight (weighted
// sum).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "kernels/cpu/common.h"

namespace moeserve::kernels {
namespace {

constexpr int64_t kKvScaleBlock = 128;  // values per fp8 scale of a cached row

template <DType DT>
constexpr int64_t kv_elem_bytes() {
  return DT == DType::F32 ? 4 : DT == DType::BF16 ? 2 : 1;
}

// Values [k, k + 16) of a stored row as floats, exactly; with Raw (fp8 only), as
// O::cvt_fp8_raw gives them: float(e4m3) * 2^-120, exactly.
template <class O, DType DT, bool Raw = false>
inline typename O::V kv_load(const uint8_t* row, int64_t k) {
  if constexpr (DT == DType::F32)
    return O::load_reg(reinterpret_cast<const float*>(row) + k);
  else if constexpr (DT == DType::BF16)
    return O::cvt_bf16(reinterpret_cast<const uint16_t*>(row) + k);
  else if constexpr (Raw)
    return O::cvt_fp8_raw(row + k);
  else
    return O::cvt_fp8_nonan(row + k, O::set1(256.0f));
}

// Values [k, k + n), n < 16, then lanes of +0.0.
template <class O, DType DT, bool Raw = false>
inline typename O::V kv_load_tail(const uint8_t* row, int64_t k, int64_t n) {
  constexpr int64_t es = kv_elem_bytes<DT>();
  alignas(64) uint8_t raw[64] = {};
  std::memcpy(raw, row + k * es, static_cast<size_t>(n * es));
  return kv_load<O, DT, Raw>(raw, 0);
}

template <DType DT>
inline float kv_elem(const uint8_t* row, int64_t k) {
  if constexpr (DT == DType::F32) {
    float f;
    std::memcpy(&f, row + 4 * k, 4);
    return f;
  } else if constexpr (DT == DType::BF16) {
    uint16_t h;
    std::memcpy(&h, row + 2 * k, 2);
    return bf16_to_f32(h);
  } else {
    return fp8e4m3_to_f32(row[k]);
  }
}

// The fp8 scale of block b of a row of `width` values.
inline float kv_scale(const uint8_t* row, int64_t width, int64_t b) {
  float s;
  std::memcpy(&s, row + width + 4 * b, 4);
  return s;
}

// Lane sums of a's G rows against NB stored rows over values [k0, k1) (k0 a multiple of 16),
// added into acc by one fma per value, in increasing k; past k1 lanes take 0 * 0. With `pf`,
// prefetches the same bytes of the rows pf[0..NB) into L1.
template <class O, DType DT, int G, int NB, bool Raw>
inline void kv_lane_sums(const float* a, int64_t lda, const uint8_t* const* b, int64_t k0,
                         int64_t k1, const uint8_t* const* pf, typename O::V (&acc)[G][NB]) {
  using V = typename O::V;
  constexpr int64_t es = kv_elem_bytes<DT>();
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    V bv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) bv[j] = kv_load<O, DT, Raw>(b[j], k);
    if (pf && (k * es) % 64 == 0)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) __builtin_prefetch(pf[j] + k * es, 0, 3);
#pragma GCC unroll 16
    for (int i = 0; i < G; ++i) {
      const V av = O::load_reg(a + i * lda + k);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = O::fma(av, bv[j], acc[i][j]);
    }
  }
  if (k < k1) {
    alignas(64) float ta[16] = {};
    V bv[NB];
    for (int j = 0; j < NB; ++j) bv[j] = kv_load_tail<O, DT, Raw>(b[j], k, k1 - k);
    for (int i = 0; i < G; ++i) {
      std::memcpy(ta, a + i * lda + k, (k1 - k) * sizeof(float));
      for (int j = 0; j < NB; ++j) acc[i][j] = O::fma(O::load(ta), bv[j], acc[i][j]);
    }
  }
}

// G x NB scores (a's rows against stored rows). fp8 keeps a second set of accumulators, the
// scaled totals of the blocks summed so far.
template <class O, DType DT, int G, int NB, bool Raw>
void kv_dots_g(const float* a, int64_t lda, const uint8_t* const* b, int64_t width, float* out,
               int64_t ldo, const uint8_t* const* pf) {
  using V = typename O::V;
  if constexpr (DT != DType::F8_E4M3) {
    V tot[G][NB];
#pragma GCC unroll 16
    for (int i = 0; i < G; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) tot[i][j] = O::zero();
    kv_lane_sums<O, DT, G, NB, false>(a, lda, b, 0, width, pf, tot);
#pragma GCC unroll 16
    for (int i = 0; i < G; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) out[i * ldo + j] = O::reduce(tot[i][j]);
  } else {
    V tot[G][NB];
    if (pf)  // the scales, past the values
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) __builtin_prefetch(pf[j] + width, 0, 2);
#pragma GCC unroll 16
    for (int i = 0; i < G; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) tot[i][j] = O::zero();
    for (int64_t b0 = 0; b0 < width; b0 += kKvScaleBlock) {
      V acc[G][NB];
#pragma GCC unroll 16
      for (int i = 0; i < G; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[i][j] = O::zero();
      kv_lane_sums<O, DT, G, NB, Raw>(a, lda, b, b0, std::min(width, b0 + kKvScaleBlock), pf, acc);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        const V s = O::set1(kv_scale(b[j], width, b0 / kKvScaleBlock));
#pragma GCC unroll 16
        for (int i = 0; i < G; ++i) tot[i][j] = O::fma(s, acc[i][j], tot[i][j]);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < G; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) out[i * ldo + j] = O::reduce(tot[i][j]);
  }
}

// Every row of a against NB stored rows, kDotHeads (fp8: kDotHeadsFp8) rows of a per pass: the
// stored rows come from memory once (the first pass, which also prefetches `pf`) and from L1
// after.
template <class O, DType DT, int NB, bool Raw>
void kv_dots_heads(const float* a, int64_t na, int64_t lda, const uint8_t* const* b, int64_t width,
                   float* out, int64_t ldo, const uint8_t* const* pf) {
  constexpr int kG = DT == DType::F8_E4M3 ? O::kDotHeadsFp8 : O::kDotHeads;
  int64_t i = 0;
  for (; i + kG <= na; i += kG, pf = nullptr)
    kv_dots_g<O, DT, kG, NB, Raw>(a + i * lda, lda, b, width, out + i * ldo, ldo, pf);
  for (; i < na; ++i, pf = nullptr)
    kv_dots_g<O, DT, 1, NB, Raw>(a + i * lda, lda, b, width, out + i * ldo, ldo, pf);
}

template <class O, DType DT, bool Raw = false>
void kv_dots(const float* a, int64_t na, int64_t lda, const uint8_t* const* b, int64_t nb,
             int64_t width, float* out, int64_t ldo) {
  constexpr int64_t kAhead = 8;
  constexpr int kNB = DT == DType::F8_E4M3 ? O::kDotRowsFp8 : 2;
  int64_t j = 0;
  for (; j + kNB <= nb; j += kNB)
    kv_dots_heads<O, DT, kNB, Raw>(a, na, lda, b + j, width, out + j, ldo,
                                   j + kAhead + kNB <= nb ? b + j + kAhead : nullptr);
  for (; j < nb; ++j) kv_dots_heads<O, DT, 1, Raw>(a, na, lda, b + j, width, out + j, ldo, nullptr);
}

// fp8 scores: where every |a| < 2^8 (none NaN), a times 2^120 (exact) against the rows as
// O::cvt_fp8_raw gives them (float(e4m3) * 2^-120, exact): the same products, without a
// multiply per value. a's copy: [na][round16(width)], per thread.
template <class O>
void kv_dots_fp8(const float* a, int64_t na, int64_t lda, const uint8_t* const* b, int64_t nb,
                 int64_t width, float* out, int64_t ldo) {
  using V = typename O::V;
  if (width <= 0) {  // empty sums: +0.0
    for (int64_t i = 0; i < na; ++i) std::fill(out + i * ldo, out + i * ldo + nb, 0.0f);
    return;
  }
  static thread_local Scratch scaled;
  const int64_t ld = round16(width);
  float* q = scaled.get(static_cast<size_t>(na * ld));
  const V up = O::set1(0x1p120f);
  bool small = true;
  for (int64_t i = 0; i < na && small; ++i) {
    const float* ai = a + i * lda;
    float* qi = q + i * ld;
    int64_t k = 0;
    for (; k + 16 <= width; k += 16) {
      const V v = O::load(ai + k);
      small &= O::below_2p8(v);
      O::store(qi + k, O::mul(v, up));
    }
    for (; k < width; ++k) {
      small &= std::fabs(ai[k]) < 0x1p8f;
      qi[k] = ai[k] * 0x1p120f;
    }
  }
  if (small)
    kv_dots<O, DType::F8_E4M3, true>(q, na, ld, b, nb, width, out, ldo);
  else
    kv_dots<O, DType::F8_E4M3>(a, na, lda, b, nb, width, out, ldo);
}

template <class O>
void dots_cached(const float* a, int64_t na, int64_t lda, const CachedRows& b, int64_t nb,
                 float* out, int64_t ldo) {
  switch (b.dtype) {
    case DType::F32:
      return kv_dots<O, DType::F32>(a, na, lda, b.rows, nb, b.width, out, ldo);
    case DType::BF16:
      return kv_dots<O, DType::BF16>(a, na, lda, b.rows, nb, b.width, out, ldo);
    case DType::F8_E4M3:
      return kv_dots_fp8<O>(a, na, lda, b.rows, nb, b.width, out, ldo);
    default:
      fail("dots_cached: unsupported cache dtype ", dtype_name(b.dtype));
  }
}

// weighted_cached for G outputs and columns [k, k + 16 * NV) of the rows; y points at column
// k's output. Row j's weight for output i is w[i * wi + j * wj]. G x NV accumulators stay in
// registers while the rows stream past, starting from +0.0, or with `acc_in` from y (where an
// earlier call over the preceding rows left them: the same chain of FMAs). Raw (fp8): values
// as O::cvt_fp8_raw gives them, float(e4m3) * 2^-120, against weights stored times 2^120: the
// same products. Prefetches the same columns of pf[0..npf) into L2.
template <class O, DType DT, int G, int NV, bool Raw>
void kv_weighted_g(const float* w, int64_t wi, int64_t wj, const uint8_t* const* rows,
                   int64_t nrows, const uint8_t* const* pf, int64_t npf, int64_t k, float* y,
                   int64_t ldy, bool acc_in) {
  using V = typename O::V;
  constexpr int64_t es = kv_elem_bytes<DT>();
  V acc[G][NV];
#pragma GCC unroll 16
  for (int i = 0; i < G; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = acc_in ? O::load(y + i * ldy + 16 * v) : O::zero();
  for (int64_t j = 0; j < nrows; ++j) {
    if (j < npf) {  // every line of the columns (a row need not start on one)
#pragma GCC unroll 4
      for (int64_t o = 0; o < 16 * NV * es; o += 64) __builtin_prefetch(pf[j] + k * es + o, 0, 2);
      __builtin_prefetch(pf[j] + (k + 16 * NV) * es - 1, 0, 2);
    }
    V x[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) x[v] = kv_load<O, DT, Raw>(rows[j], k + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < G; ++i) {
      const V cb = O::set1(w[i * wi + j * wj]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = O::fma(cb, x[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < G; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) O::store(y + i * ldy + 16 * v, acc[i][v]);
}

// All nc outputs over columns [k, k + 16 * NV): every group of outputs in turn, so that this
// tile of the rows comes from memory (or L2) once and from L1 for the other groups; the first
// prefetches pf[0..npf).
template <class O, DType DT, bool Raw, int NV>
void kv_weighted_tile(const float* w, int64_t wi, int64_t wj, int64_t nc,
                      const uint8_t* const* rows, int64_t nrows, const uint8_t* const* pf,
                      int64_t npf, int64_t k, float* y, int64_t ldy, bool acc_in) {
  constexpr int kG = DT == DType::F8_E4M3 ? O::kSumHeadsFp8 : O::kDotHeads;
  int64_t i = 0;
  for (; i + kG <= nc; i += kG, npf = 0)
    kv_weighted_g<O, DT, kG, NV, Raw>(w + i * wi, wi, wj, rows, nrows, pf, npf, k, y + i * ldy, ldy,
                                      acc_in);
  if (kG > 4 && nc - i >= 4) {
    kv_weighted_g<O, DT, 4, NV, Raw>(w + i * wi, wi, wj, rows, nrows, pf, npf, k, y + i * ldy, ldy,
                                     acc_in);
    i += 4;
    npf = 0;
  }
  for (; i < nc; ++i, npf = 0)
    kv_weighted_g<O, DT, 1, NV, Raw>(w + i * wi, wi, wj, rows, nrows, pf, npf, k, y + i * ldy, ldy,
                                     acc_in);
}

// All nc outputs over columns [k0, k1); y at column k0. kKvWeightedRows rows at a time (the
// sums carried through y), and over them a column tile at a time, every group of outputs in
// turn: a tile of the rows comes from L2 once and from L1 for the other groups. The first
// group over a tile prefetches the same tile of the next rows into L2.
constexpr int64_t kKvWeightedRows = 128;
template <class O, DType DT, bool Raw = false>
void kv_weighted_cols(const float* w, int64_t wi, int64_t wj, int64_t nc,
                      const uint8_t* const* rows, int64_t nrows, int64_t k0, int64_t k1, float* y,
                      int64_t ldy, bool acc_in) {
  constexpr int64_t es = kv_elem_bytes<DT>();
  for (int64_t j = 0; k1 > k0 && j < std::min(nrows, kKvWeightedRows); ++j)  // the first rows
    for (int64_t o = k0 * es; o < k1 * es + 63; o += 64)
      __builtin_prefetch(rows[j] + std::min(o, k1 * es - 1), 0, 2);
  int64_t r0 = 0;
  do {
    const int64_t n = std::min(kKvWeightedRows, nrows - r0);
    const int64_t npf = std::clamp<int64_t>(nrows - r0 - n, 0, kKvWeightedRows);
    const bool in = acc_in || r0 > 0;
    const float* wr = w + r0 * wj;
    const uint8_t* const* rr = rows + r0;
    int64_t k = k0;
    constexpr int kNV = DT == DType::F8_E4M3 ? O::kSumColsFp8 : 2;
    for (; k + 16 * kNV <= k1; k += 16 * kNV)
      kv_weighted_tile<O, DT, Raw, kNV>(wr, wi, wj, nc, rr, n, rr + n, npf, k, y + (k - k0), ldy,
                                        in);
    for (; k + 16 <= k1; k += 16)
      kv_weighted_tile<O, DT, Raw, 1>(wr, wi, wj, nc, rr, n, rr + n, npf, k, y + (k - k0), ldy, in);
    for (; k < k1; ++k)
      for (int64_t i = 0; i < nc; ++i) {
        float s = in ? y[i * ldy + (k - k0)] : 0.0f;
        for (int64_t j = 0; j < n; ++j) {
          const float v = kv_elem<DT>(rr[j], k);
          s = std::fma(wr[i * wi + j * wj], Raw ? v * 0x1p-120f : v, s);
        }
        y[i * ldy + (k - k0)] = s;
      }
  } while ((r0 += kKvWeightedRows) < nrows);
}

template <class O, DType DT>
void kv_weighted(const float* c, int64_t nc, int64_t ldc, const uint8_t* const* rows, int64_t nrows,
                 int64_t width, int64_t k0, int64_t k1, float* y, int64_t ldy) {
  if constexpr (DT == DType::F8_E4M3) {
    // Columns within one scale block. A chunk of rows at a time (the accumulators carried from
    // one chunk to the next through y), the weights times the rows' scales of that block,
    // rounded once, are made first ([nc][chunk], per thread; at most 128 KB), and the tiles
    // read them as the other dtypes read c. Where every one is below 2^8 (and none NaN), they
    // are stored times 2^120 (exact) and the rows take the three-operation conversion
    // (O::cvt_fp8_raw; an e4m3 subnormal becomes an f32 subnormal, exactly).
    using V = typename O::V;
    static thread_local Scratch scaled;
    const int64_t chunk = std::max<int64_t>(16, (32768 / std::max<int64_t>(nc, 1)) & ~int64_t{15});
    float* sc = scaled.get(static_cast<size_t>(chunk * (nc + 1)));
    float* ws = sc + chunk;
    const int64_t b = k0 / kKvScaleBlock;
    for (int64_t r0 = 0; r0 < nrows; r0 += chunk) {
      const int64_t n = std::min(chunk, nrows - r0);
      for (int64_t j = 0; j < n; ++j) sc[j] = kv_scale(rows[r0 + j], width, b);
      auto make = [&](bool raw) {
        const V up = O::set1(raw ? 0x1p120f : 1.0f);
        bool small = true;
        for (int64_t i = 0; i < nc; ++i) {
          const float* ci = c + i * ldc + r0;
          float* wsi = ws + i * chunk;
          int64_t j = 0;
          for (; j + 16 <= n; j += 16) {
            const V w = O::mul(O::load(ci + j), O::load(sc + j));
            small &= O::below_2p8(w);
            O::store(wsi + j, O::mul(w, up));
          }
          for (; j < n; ++j) {
            const float w = ci[j] * sc[j];
            small &= std::fabs(w) < 0x1p8f;
            wsi[j] = raw ? w * 0x1p120f : w;
          }
        }
        return small;
      };
      if (make(true)) {
        kv_weighted_cols<O, DT, true>(ws, chunk, 1, nc, rows + r0, n, k0, k1, y, ldy, r0 > 0);
      } else {
        make(false);
        kv_weighted_cols<O, DT>(ws, chunk, 1, nc, rows + r0, n, k0, k1, y, ldy, r0 > 0);
      }
    }
    if (nrows == 0) kv_weighted_cols<O, DT>(c, ldc, 1, nc, rows, 0, k0, k1, y, ldy, false);
  } else {
    kv_weighted_cols<O, DT>(c, ldc, 1, nc, rows, nrows, k0, k1, y, ldy, false);
  }
}

template <class O>
void weighted_cached(const float* c, int64_t nc, int64_t ldc, const CachedRows& rows, int64_t nrows,
                     int64_t roff, int64_t n, float* y, int64_t ldy) {
  const uint8_t* const* r = rows.rows;
  switch (rows.dtype) {
    case DType::F32:
      return kv_weighted<O, DType::F32>(c, nc, ldc, r, nrows, rows.width, roff, roff + n, y, ldy);
    case DType::BF16:
      return kv_weighted<O, DType::BF16>(c, nc, ldc, r, nrows, rows.width, roff, roff + n, y, ldy);
    case DType::F8_E4M3:
      // A scale block at a time: each column's weights take its own block's scale.
      for (int64_t k = roff; k < roff + n;) {
        const int64_t e = std::min(roff + n, (k / kKvScaleBlock + 1) * kKvScaleBlock);
        kv_weighted<O, DType::F8_E4M3>(c, nc, ldc, r, nrows, rows.width, k, e, y + (k - roff), ldy);
        k = e;
      }
      return;
    default:
      fail("weighted_cached: unsupported cache dtype ", dtype_name(rows.dtype));
  }
}

}  // namespace
}  // namespace moeserve::kernels
