// matmul for few tokens (decode): memory bound, weights streamed once. Part of impl.h.
#pragma once

#include <algorithm>
#include <type_traits>

#include "kernels/cpu/common.h"

namespace moeserve::kernels {
namespace {

// ---- matmul, small m: stream R weight rows at a time, each converted once for up to 8 tokens.

// Elements [k, k + 16) of a row as floats, with no NaN check (fp8: the caller has checked
// the block with O::nan_scan128).
template <class O, DType DT>
inline typename O::V load_w_checked(const uint8_t* row, int64_t k, typename O::V s) {
  if constexpr (DT == DType::F8_E4M3)
    return O::cvt_fp8_nonan(row + k, s);
  else
    return load_w<O, DT>(row, k, s);
}

// Whether O converts 64 fp8 bytes at once (O::cvt_fp8x4_raw, where O::fp8_quad_ok()).
template <class O>
constexpr bool has_fp8_quad() {
  if constexpr (requires { O::kFp8Quad; })
    return O::kFp8Quad;
  else
    return false;
}

// gemv_tile for Q8 and Q4 (same arguments, no `raw`). Per group of each row, the scale is
// prepared once (int_prep: for Q4 on AVX-512 the group's table of 16 values); then each 16
// bytes of a row give 16 weights (Q8) or 32 (Q4: low nibbles the even elements of a chunk of
// 32, high nibbles the odd ones, against x permuted the same way: see x_rows), one FMA per
// 16 weights per token.
template <class O, DType DT, int M, int R>
void gemv_tile_int(const float* const* x, const Weight& w, int64_t r, int64_t rs, int64_t ka,
                   int64_t kb, float* part, int64_t pf, float* y, int64_t ldy) {
  using V = typename O::V;
  constexpr bool q4 = DT == DType::Q4;
  constexpr int64_t step = q4 ? 32 : 16;  // elements per 16 bytes
  const float* xr[M];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) xr[i] = x[i];
  const int64_t K = w.cols, kfull = K & ~int64_t{15}, gs = w.group_size;
  const uint8_t* row[R];
  const uint8_t* srow[R];  // each row's group scales
  bool first[R];           // row 0 of the view: its first scale has none before it
  for (int j = 0; j < R; ++j) {
    const int64_t rj = r + j * rs;
    row[j] = w_row(w, rj);
    srow[j] = w_group_scales(w, rj);
    first[j] = rj == 0;
  }
  V acc[M][R];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) acc[i][j] = ka == 0 ? O::zero() : O::load(part + (j * M + i) * 16);
  // Q4: one chunk of 32 elements of every row, with the rows' group tables t.
  [[maybe_unused]] auto q4_chunk = [&](int64_t k, const V* t) {
    if constexpr (M <= 4) {
      V x0[M], x1[M];
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        x0[i] = O::load_reg(xr[i] + k);
        x1[i] = O::load_reg(xr[i] + k + 16);
      }
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) {
        V w0, w1;
        O::cvt_q4x2(row[j] + k / 2, t[j], w0, w1);
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i) acc[i][j] = O::fma(x1[i], w1, O::fma(x0[i], w0, acc[i][j]));
      }
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) {
        V w0, w1;
        O::cvt_q4x2(row[j] + k / 2, t[j], w0, w1);
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i)
          acc[i][j] =
              O::fma(O::load(xr[i] + k + 16), w1, O::fma(O::load(xr[i] + k), w0, acc[i][j]));
      }
    }
  };
  if constexpr (q4 && O::kPrepBf16) {
    // The common case (bf16 scales, whole rows, no row 0 of the view, whose first scale has
    // nothing readable before it): a plain loop over the groups, each row's table made from its
    // scale in place, without the general loop's per-group bookkeeping (with groups of 32 it
    // cost as much as the products).
    if (w.group_scale_dtype == DType::BF16 && ka == 0 && kb == K && !pf && r != 0) {
      const uint16_t* sp[R];
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) sp[j] = reinterpret_cast<const uint16_t*>(srow[j]);
      for (int64_t k = 0, g = 0; k < K; ++g) {
        V t[R];
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j) t[j] = O::q4_prep_bf16(sp[j] + g);
        for (const int64_t ge = std::min(K, k + gs); k < ge; k += step) q4_chunk(k, t);
      }
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j) y[i * ldy + r + j * rs] = O::reduce(acc[i][j]);
      return;
    }
  }
  int64_t g = ka / gs, gend = (g + 1) * gs;  // the group of column k, and its end
  for (int64_t k0 = ka; k0 < kb; k0 += kFp8Block) {
    const int64_t kend = std::min(kfull, k0 + kFp8Block);
    if (pf) {
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j)
        for (int64_t b = 0; b < row_bytes(DT, kFp8Block); b += 64)
          __builtin_prefetch(row[j] + row_bytes(DT, k0 + pf) + b);
    }
    for (int64_t k = k0; k < kend;) {
      if (k >= gend) {  // groups are whole chunks: k reaches each group's start
        ++g;
        gend += gs;
      }
      const int64_t ge = std::min(kend, gend);
      V t[R];
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) t[j] = int_prep_at<O, DT>(w, srow[j], g, first[j] && g == 0);
      if constexpr (q4) {
        for (; k < ge; k += step) q4_chunk(k, t);
      } else {
        // Q8: few tokens by O::cvt_q8_fma (c = -128 * scale) where every row's scale allows it.
        [[maybe_unused]] V c[R];
        auto chunks = [&](auto by_fma) {
          for (; k < ge; k += step) {
            V xv[M];
#pragma GCC unroll 8
            for (int i = 0; i < M; ++i) xv[i] = O::load_reg(xr[i] + k);
#pragma GCC unroll 8
            for (int j = 0; j < R; ++j) {
              V wv;
              if constexpr (decltype(by_fma)::value)
                wv = O::cvt_q8_fma(row[j] + k, t[j], c[j]);
              else
                wv = O::cvt_q8(row[j] + k, t[j]);
#pragma GCC unroll 8
              for (int i = 0; i < M; ++i) acc[i][j] = O::fma(xv[i], wv, acc[i][j]);
            }
          }
        };
        if constexpr (O::kQ8Fma && M <= 2) {  // more tokens: the FMAs are the cost anyway
          bool ok = true;
#pragma GCC unroll 8
          for (int j = 0; j < R; ++j) {
            ok &= O::q8_fma_ok(t[j]);
            c[j] = O::mul(t[j], O::set1(-128.0f));
          }
          if (ok)
            chunks(std::true_type{});
          else
            chunks(std::false_type{});
        } else {
          chunks(std::false_type{});
        }
      }
    }
  }
  if (kb < K) {
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) O::store(part + (j * M + i) * 16, acc[i][j]);
    return;
  }
  if (kfull < K) {  // Q8 only (Q4 has K % 32 == 0)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      const V wv = load_w_tail<O, DT>(row[j], kfull, K - kfull,
                                      int_prep_at<O, DT>(w, srow[j], kfull / gs, true));
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[i][j] = O::fma(O::load(xr[i] + kfull), wv, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) y[i * ldy + r + j * rs] = O::reduce(acc[i][j]);
}

// y[i, r + j * rs] for i < M, j < R (rows rs apart): columns [ka, kb) of the sums, ka a
// multiple of 128. x: M row pointers, each row f32, 64-byte aligned, readable and zero up to
// round16(K); y: [M, ldy]. A range that does not start at 0 continues from the 16-lane partial
// sums in part ([R, M, 16] f32), one that does not end at K leaves them there; the one that ends
// at K reduces into y. `pf`: elements ahead to prefetch on each row (0: none).
// fp8: all R rows in one block row, x already scaled by its scales (fp8_scale_x), the weights
// taken as float(fp8) exactly, or with `raw` (x also times 2^120) by O::cvt_fp8_raw.
template <class O, DType DT, int M, int R>
void gemv_tile_float(const float* const* x, const Weight& w, int64_t r, int64_t rs, int64_t ka,
                     int64_t kb, float* part, int64_t pf, float* y, int64_t ldy, bool raw) {
  using V = typename O::V;
  const float* xr[M];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) xr[i] = x[i];
  constexpr bool fp8 = DT == DType::F8_E4M3;
  constexpr int64_t es = elem_bytes<DT>();
  const int64_t K = w.cols, kfull = K & ~int64_t{15};
  const uint8_t* row[R];
  for (int j = 0; j < R; ++j) row[j] = w_row(w, r + j * rs);
  V acc[M][R];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) acc[i][j] = ka == 0 ? O::zero() : O::load(part + (j * M + i) * 16);
  // cvt_fp8's scale * 256 for float(fp8), or float(fp8) * 2^-120 with `raw`: exact either way.
  const V s = fp8 ? O::set1(raw ? 0x1p-112f : 256.0f) : O::zero();

  // One 16-element chunk of every row into every token's accumulators; load(j) converts row
  // j's.
  auto chunk_with = [&](int64_t k, auto&& load) {
    V xv[M];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) xv[i] = O::load_reg(xr[i] + k);
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      const V wv = load(j);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[i][j] = O::fma(xv[i], wv, acc[i][j]);
    }
  };
  auto chunk = [&](int64_t k, auto checked) {
    chunk_with(k, [&](int j) {
      if constexpr (decltype(checked)::value)
        return load_w_checked<O, DT>(row[j], k, s);
      else
        return load_w<O, DT>(row[j], k, s);
    });
  };
  // Two chunks (32 fp8 converted at once), for few tokens, where conversion is the cost.
  auto chunk_pair = [&](int64_t k) {
    V x0[M], x1[M];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      x0[i] = O::load_reg(xr[i] + k);
      x1[i] = O::load_reg(xr[i] + k + 16);
    }
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      V w0, w1;
      O::cvt_fp8x2_nonan(row[j] + k, s, w0, w1);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[i][j] = O::fma(x1[i], w1, O::fma(x0[i], w0, acc[i][j]));
    }
  };

  for (int64_t k0 = ka; k0 < kb; k0 += kFp8Block) {
    const int64_t kend = std::min(kfull, k0 + kFp8Block);
    if (pf) {
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j)
        for (int64_t b = 0; b < kFp8Block * es; b += 64)
          __builtin_prefetch(row[j] + (k0 + pf) * es + b);
    }
    bool checked = !fp8;
    if constexpr (fp8) {
      if constexpr (O::kFp8Direct) {
        // NaN-free data (checked at load) and x small enough: three operations a weight.
        if (raw && kend - k0 == kFp8Block) {
          if constexpr (has_fp8_quad<O>() && M <= 2) {
            // Few tokens, where the conversion bounds the speed: 64 bytes of a row at once,
            // their four chunks into the accumulators in order (the same sums).
            if (O::fp8_quad_ok()) {
              for (int64_t k = k0; k < kend; k += 64) {
                V xv[4][M];
#pragma GCC unroll 4
                for (int c = 0; c < 4; ++c)
#pragma GCC unroll 8
                  for (int i = 0; i < M; ++i) xv[c][i] = O::load_reg(xr[i] + k + 16 * c);
#pragma GCC unroll 8
                for (int j = 0; j < R; ++j) {
                  V f[4];
                  O::cvt_fp8x4_raw(row[j] + k, f[0], f[1], f[2], f[3]);
#pragma GCC unroll 4
                  for (int c = 0; c < 4; ++c)
#pragma GCC unroll 8
                    for (int i = 0; i < M; ++i) acc[i][j] = O::fma(xv[c][i], f[c], acc[i][j]);
                }
              }
              continue;
            }
          }
          for (int64_t k = k0; k < kend; k += 16)
            chunk_with(k, [&](int j) { return O::cvt_fp8_raw(row[j] + k); });
          continue;
        }
      }
      if (kend - k0 == kFp8Block) {
        auto nan = O::nan_init();
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j) nan = O::nan_scan128(nan, row[j] + k0);
        checked = !O::nan_found(nan);
      }
      if (M <= 4 && checked) {
        for (int64_t k = k0; k < kend; k += 32) chunk_pair(k);
        continue;
      }
    }
    if (checked) {
      for (int64_t k = k0; k < kend; k += 16) chunk(k, std::true_type{});
    } else {
      for (int64_t k = k0; k < kend; k += 16) chunk(k, std::false_type{});
    }
  }
  if (kb < K) {
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) O::store(part + (j * M + i) * 16, acc[i][j]);
    return;
  }
  if (kfull < K) {
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      const V wv = load_w_tail<O, DT>(row[j], kfull, K - kfull, s);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[i][j] = O::fma(O::load(xr[i] + kfull), wv, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) y[i * ldy + r + j * rs] = O::reduce(acc[i][j]);
}

// gemv_tile_float or gemv_tile_int, by DT.
template <class O, DType DT, int M, int R>
void gemv_tile(const float* const* x, const Weight& w, int64_t r, int64_t rs, int64_t ka,
               int64_t kb, float* part, int64_t pf, float* y, int64_t ldy, bool raw) {
  if constexpr (is_int<DT>())
    gemv_tile_int<O, DT, M, R>(x, w, r, rs, ka, kb, part, pf, y, ldy);
  else
    gemv_tile_float<O, DT, M, R>(x, w, r, rs, ka, kb, part, pf, y, ldy, raw);
}

// Whether m tokens' rows of x (K floats each) fit the share of L1 the GEMV gives them.
constexpr bool x_fits_l1(int64_t m, int64_t K) {
  return m * K * 4 <= (32 << 10);
}

// Rows per stream of the GEMV (gemv_rows): ~16 KB of weights. Measured with 2 threads, m = 1,
// fp8, on matrices of 2048 x 2048, 1024 x 2048, 2048 x 1024 and 8192 x 7168: 65-80% of read
// bandwidth against 52-71% reading each tile's rows side by side (with the next tile
// prefetched into L2); 8-32 KB do about as well, 64 KB worse on small matrices.
constexpr int64_t gemv_stream_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(1, row_bytes));
}

// Rows [r0, r1) for M tokens. When the M rows of x do not fit in L1, K is cut into blocks
// whose x fits, taken in increasing k for groups of rows (partial sums wait on the stack), so
// x is read from L1; each row's next block is prefetched meanwhile.
template <class O, DType DT, int M>
void gemv_rows(const float* const* x, const Weight& w, int64_t r0, int64_t r1, float* y,
               int64_t ldy, bool raw) {
  constexpr int R = O::gemv_rows(M);
  constexpr int64_t kGroup = 24;  // rows per group: a multiple of every R
  const int64_t K = w.cols;
  const int64_t kblk =
      x_fits_l1(M, K) ? K : std::max(kFp8Block, (16 << 10) / (M * 4) / kFp8Block * kFp8Block);
  if (kblk >= K) {
    // A tile's R rows come from R runs of s consecutive rows (~16 KB each) and the next tile
    // takes each run's next row, so the hardware prefetcher sees R long sequential streams
    // rather than R short rows that end before it has ramped up.
    const int64_t S = gemv_stream_rows(row_bytes(DT, K));
    int64_t r = r0;
    while (r + R <= r1) {
      const int64_t s = std::min(S, (r1 - r) / R);
      for (int64_t p = 0; p < s; ++p)
        gemv_tile<O, DT, M, R>(x, w, r + p, s, 0, K, nullptr, 0, y, ldy, raw);
      r += R * s;
    }
    for (; r < r1; ++r) gemv_tile<O, DT, M, 1>(x, w, r, 1, 0, K, nullptr, 0, y, ldy, raw);
    return;
  }
  alignas(64) float part[kGroup * M * 16];  // [kGroup, M, 16]
  for (int64_t g0 = r0; g0 < r1; g0 += kGroup) {
    const int64_t g1 = std::min(r1, g0 + kGroup);
    for (int64_t ka = 0; ka < K; ka += kblk) {
      const int64_t kb = std::min(K, ka + kblk), pf = kb < K ? kblk : 0;
      int64_t r = g0;
      for (; r + R <= g1; r += R)
        gemv_tile<O, DT, M, R>(x, w, r, 1, ka, kb, part + (r - g0) * M * 16, pf, y, ldy, raw);
      for (; r < g1; ++r)
        gemv_tile<O, DT, M, 1>(x, w, r, 1, ka, kb, part + (r - g0) * M * 16, pf, y, ldy, raw);
    }
  }
}

template <class O, DType DT>
void gemv_rows_m(int64_t m, const float* const* x, const Weight& w, int64_t r0, int64_t r1,
                 float* y, int64_t ldy, bool raw) {
  switch (m) {
    case 1:
      return gemv_rows<O, DT, 1>(x, w, r0, r1, y, ldy, raw);
    case 2:
      return gemv_rows<O, DT, 2>(x, w, r0, r1, y, ldy, raw);
    case 3:
      return gemv_rows<O, DT, 3>(x, w, r0, r1, y, ldy, raw);
    case 4:
      return gemv_rows<O, DT, 4>(x, w, r0, r1, y, ldy, raw);
    case 5:
      return gemv_rows<O, DT, 5>(x, w, r0, r1, y, ldy, raw);
    case 6:
      return gemv_rows<O, DT, 6>(x, w, r0, r1, y, ldy, raw);
    case 7:
      return gemv_rows<O, DT, 7>(x, w, r0, r1, y, ldy, raw);
    default:
      return gemv_rows<O, DT, 8>(x, w, r0, r1, y, ldy, raw);
  }
}

// Rows [r0, r1) for m <= 8 tokens. fp8 goes a block row (128 rows of the full matrix) at a
// time, with x scaled by that block row's scales.
template <class O, DType DT>
void gemv_rows(int64_t m, const float* const* x, const Weight& w, int64_t r0, int64_t r1, float* y,
               int64_t ldy) {
  if constexpr (DT == DType::F8_E4M3) {
    static thread_local Scratch scratch;
    const int64_t K = w.cols, Kp = round16(K);
    float* xs = scratch.get(m * Kp);
    const float* xr[8];
    for (int64_t i = 0; i < m; ++i) xr[i] = xs + i * Kp;
    for (int64_t b = r0; b < r1;) {
      const int64_t e = std::min(r1, block_row_end(w, b));
      const bool raw =
          fp8_scale_x<O>(x, m, K, 0, K, w_scales(w, b), O::kFp8Direct && w.fp8_plain, xs, Kp);
      gemv_rows_m<O, DT>(m, xr, w, b, e, y, ldy, raw);
      b = e;
    }
  } else {
    gemv_rows_m<O, DT>(m, x, w, r0, r1, y, ldy, false);
  }
}

// Tokens per pass over the rows: up to 8, or 4 where 4 tokens' rows of x fit in L1 and 8
// would not (1024 < K <= 2048): there, two passes over rows held in L2 beat one pass that cuts
// K into blocks (gemv_rows), whose jumps from row to row the prefetchers miss. Measured with
// N = 32768, K = 2048 (bf16 and fp8): 8 tokens 1.3-1.4x, 16 tokens 1.15-1.2x as fast.
constexpr int64_t gemv_group_tokens(int64_t K) {
  return !x_fits_l1(8, K) && x_fits_l1(4, K) ? 4 : 8;
}

// Rows [b, e) for any m, in groups of up to gemv_group_tokens(K) tokens; with more than one group
// the rows go in blocks small enough for L2, all token groups per block, so the weights still come
// from memory once.
template <class O, DType DT>
void gemv_range(const float* const* x, int64_t m, const Weight& w, int64_t b, int64_t e, float* y,
                int64_t ldy) {
  constexpr int64_t kUnit = 24;  // a multiple of every gemv_rows(m)
  const int64_t rb = std::max<int64_t>(1, row_bytes(DT, w.cols));
  const int64_t per_group = gemv_group_tokens(w.cols);
  const int64_t groups = (m + per_group - 1) / per_group;
  const int64_t block =
      groups == 1 ? w.rows : std::max<int64_t>(1, (256 << 10) / rb / kUnit) * kUnit;
  for (int64_t r0 = b, r1; r0 < e; r0 = r1) {
    r1 = std::min(e, r0 + block);
    // fp8 with several groups: a block row at a time, so that each group scales x once for it.
    if (DT == DType::F8_E4M3 && groups > 1) r1 = std::min(e, block_row_end(w, r0));
    for (int64_t g = 0; g < groups; ++g) {  // sizes differ by at most one
      const int64_t t0 = m * g / groups, t1 = m * (g + 1) / groups;
      gemv_rows<O, DT>(t1 - t0, x + t0, w, r0, r1, y + t0 * ldy, ldy);
    }
  }
}

// Rows per piece of a GEMV's work (parallel_pieces) over `rows` rows of `row_bytes` each: 24
// streams' worth (a multiple of every tile's rows, ~384 KB), fewer on small matrices so that
// every thread gets several pieces; fp8 pieces of 128 rows or more are whole block rows.
inline int64_t gemv_piece_rows(int64_t rows, int64_t row_bytes, int threads, DType dt) {
  const int64_t few = (rows / (4 * std::max(1, threads)) + 23) / 24 * 24;
  const int64_t piece = std::max<int64_t>(24, std::min(24 * gemv_stream_rows(row_bytes), few));
  // fp8: whole block rows where pieces are that large (each piece scales x per block row).
  return dt == DType::F8_E4M3 && piece >= kFp8Block ? piece / kFp8Block * kFp8Block : piece;
}

// Any m: the threads take pieces of the rows as they come free.
template <class O, DType DT>
void gemv(const ThreadPool& pool, const float* const* x, int64_t m, const Weight& w, float* y,
          int64_t ldy) {
  const int64_t piece = gemv_piece_rows(w.rows, row_bytes(DT, w.cols), pool.size(), DT);
  parallel_pieces(pool, w.rows, piece,
                  [&](int64_t b, int64_t e) { gemv_range<O, DT>(x, m, w, b, e, y, ldy); });
}

}  // namespace
}  // namespace moeserve::kernels
