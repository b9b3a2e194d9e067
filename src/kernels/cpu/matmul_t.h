// matmul_t (W transposed; MLA absorption), vectorized over columns. Part of cpu/impl.h.
#pragma once

#include <algorithm>
#include <cstring>
#include <utility>

#include "kernels/cpu/common.h"

namespace moeserve::kernels {
namespace {

// ---- matmul_t: vectorized over columns c; each y[i, c] sums over r in order.

constexpr int64_t kTransTokens = 64;  // tokens per work item

// Columns [c0, c0 + 16 * nc) of every row of w as floats, zero past cols. wb: [rows, ldw] f32.
template <class O, DType DT>
void dequant_cols(const Weight& w, int64_t c0, int64_t nc, float* wb, int64_t ldw) {
  for (int64_t r = 0; r < w.rows; ++r) {
    const uint8_t* row = w_row(w, r);
    const float* sc = DT == DType::F8_E4M3 ? w_scales(w, r) : nullptr;
    for (int64_t j = 0; j < nc; ++j)
      O::store(wb + r * ldw + 16 * j, load_chunk<O, DT>(w, row, sc, c0 + 16 * j));
  }
}

// y[i, 16j + l] = sum_r x[i, r] * W[r, 16j + l] for i < MT, j < NT, columns < ncols, where
// load_row(r, wv) puts row r's NT chunks in wv.
template <class O, int MT, int NT, class LoadRow>
void trans_tile_with(const float* x, int64_t ldx, int64_t rows, LoadRow&& load_row, float* y,
                     int64_t ldy, int64_t ncols) {
  using V = typename O::V;
  V acc[MT][NT];
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) acc[i][j] = O::zero();
  for (int64_t r = 0; r < rows; ++r) {
    V wv[NT];
    load_row(r, wv);
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) {
      const V xb = O::set1(x[i * ldx + r]);
#pragma GCC unroll 16
      for (int j = 0; j < NT; ++j) acc[i][j] = O::fma(xb, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) {
      float* dst = y + i * ldy + 16 * j;
      if (16 * j + 16 <= ncols) {
        O::store(dst, acc[i][j]);
      } else if (16 * j < ncols) {
        alignas(64) float tmp[16];
        O::store(tmp, acc[i][j]);
        std::memcpy(dst, tmp, (ncols - 16 * j) * sizeof(float));
      }
    }
}

// From dequantized columns wb: [rows, ldw] f32.
template <class O, int MT, int NT>
void trans_tile(const float* x, int64_t ldx, const float* wb, int64_t ldw, int64_t rows, float* y,
                int64_t ldy, int64_t ncols) {
  trans_tile_with<O, MT, NT>(
      x, ldx, rows,
      [&](int64_t r, typename O::V* wv) {
#pragma GCC unroll 8
        for (int j = 0; j < NT; ++j) wv[j] = O::load(wb + r * ldw + 16 * j);
      },
      y, ldy, ncols);
}

// For few tokens (decode), reading the weights in place: each 16-column chunk of a row
// converted once, used by the MT tokens at once, no dequantized copy. The same values and the
// same order of sums as dequant_cols + trans_tile.
template <class O, DType DT, int MT, int NT>
void trans_tile_w(const float* x, int64_t ldx, const Weight& w, int64_t c0, float* y, int64_t ldy,
                  int64_t ncols) {
  auto load_row = [&](int64_t r, typename O::V* wv) {
    const uint8_t* row = w_row(w, r);
    const float* sc = DT == DType::F8_E4M3 ? w_scales(w, r) : nullptr;
#pragma GCC unroll 8
    for (int j = 0; j < NT; ++j) wv[j] = load_chunk<O, DT>(w, row, sc, c0 + 16 * j);
  };
  trans_tile_with<O, MT, NT>(x, ldx, w.rows, load_row, y, ldy, ncols);
}

// Columns [c0, c0 + ncols) for m <= kTileTM tokens, in slices of up to kTileTN chunks.
template <class O, DType DT, int MT>
void trans_cols_w(const float* x, int64_t ldx, const Weight& w, int64_t c0, int64_t ncols, float* y,
                  int64_t ldy) {
  constexpr int64_t kSlice = 16 * O::kTileTN;
  int64_t c = c0;
  for (; c + kSlice <= c0 + ncols; c += kSlice)
    trans_tile_w<O, DT, MT, O::kTileTN>(x, ldx, w, c, y + c, ldy, kSlice);
  for (; c < c0 + ncols; c += 16)  // the rest a chunk at a time
    trans_tile_w<O, DT, MT, 1>(x, ldx, w, c, y + c, ldy, std::min<int64_t>(16, c0 + ncols - c));
}

template <class O, DType DT>
void trans_cols_w(int64_t m, const float* x, int64_t ldx, const Weight& w, int64_t c0,
                  int64_t ncols, float* y, int64_t ldy) {
  static_assert(O::kTileTM <= 4);
  switch (m) {
    case 1:
      return trans_cols_w<O, DT, 1>(x, ldx, w, c0, ncols, y, ldy);
    case 2:
      if constexpr (O::kTileTM >= 2) return trans_cols_w<O, DT, 2>(x, ldx, w, c0, ncols, y, ldy);
      break;
    case 3:
      if constexpr (O::kTileTM >= 3) return trans_cols_w<O, DT, 3>(x, ldx, w, c0, ncols, y, ldy);
      break;
    default:
      if constexpr (O::kTileTM >= 4) return trans_cols_w<O, DT, 4>(x, ldx, w, c0, ncols, y, ldy);
      break;
  }
  MS_ASSERT(false);
}

constexpr int64_t kTransPfRows = 8;  // rows ahead that trans_tile_fp8 prefetches

// The fast fp8 path of decode (O::cvt_fp8_direct): whether every block scale of w allows it.
inline bool fp8_direct_ok(const Weight& w) {
  if (w.dtype != DType::F8_E4M3 || !w.fp8_plain || w.rows <= 0) return false;
  const int64_t b0 = w.scale_row0 / kFp8Block, b1 = (w.scale_row0 + w.rows - 1) / kFp8Block;
  float f = 0.0f;
  for (int64_t i = b0 * w.scale_cols; i < (b1 + 1) * w.scale_cols; ++i)
    if (!fp8_direct_scale(w.scale_inv[i], &f)) return false;
  return true;
}

// As trans_tile_w for NaN-free fp8 whose scales all allow the direct conversion (fp8_direct_ok):
// NT chunks from column c, all in one 128-column block of scales, or (NT = 16, c a multiple of
// 128) two. Each row's scale factor is taken once per block, not once per chunk. At each row r,
// columns [c, c + pf_cols) of row r + kTransPfRows are prefetched into L2 (pf_cols 0: none).
template <class O, int MT, int NT>
void trans_tile_fp8(const float* x, int64_t ldx, const Weight& w, int64_t c, float* y, int64_t ldy,
                    int64_t pf_cols) {
  constexpr int kPerBlock = kFp8Block / 16, NB = (NT + kPerBlock - 1) / kPerBlock;
  const int64_t b0 = c / kFp8Block;
  auto load_row = [&](int64_t r, typename O::V* wv) {
    const uint8_t* row = w_row(w, r) + c;
    const float* sc = w_scales(w, r) + b0;
    if (pf_cols && r + kTransPfRows < w.rows)
      for (int64_t b = 0; b < pf_cols; b += 64)
        __builtin_prefetch(row + kTransPfRows * w.cols + b, 0, 2);
    typename O::V f[NB];
#pragma GCC unroll 2
    for (int b = 0; b < NB; ++b) f[b] = O::set1(sc[b] * 0x1p120f);
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) wv[j] = O::cvt_fp8_direct(row + 16 * j, f[j / kPerBlock]);
  };
  trans_tile_with<O, MT, NT>(x, ldx, w.rows, load_row, y + c, ldy, 16 * NT);
}

// Columns [128 b, 128 e) of the fast fp8 path for MT tokens: 256 columns a pass for one token,
// 128 for two, 64 for three or four (16 to 24 accumulators). The first pass also prefetches
// (into L2) the columns of the later passes, a few rows ahead; else those would come from
// memory a line per row.
template <class O, int MT>
void trans_blocks_fp8(const float* x, int64_t ldx, const Weight& w, int64_t b, int64_t e, float* y,
                      int64_t ldy) {
  int64_t pf = (e - b) * kFp8Block;
  for (; b < e; ++b, pf = 0) {
    const int64_t c = b * kFp8Block;
    if constexpr (MT == 1) {
      if (b + 1 < e) {
        trans_tile_fp8<O, 1, 16>(x, ldx, w, c, y, ldy, pf);
        ++b;
      } else {
        trans_tile_fp8<O, 1, 8>(x, ldx, w, c, y, ldy, pf);
      }
    } else if constexpr (MT == 2) {
      trans_tile_fp8<O, 2, 8>(x, ldx, w, c, y, ldy, pf);
    } else {
      trans_tile_fp8<O, MT, 4>(x, ldx, w, c, y, ldy, pf);
      trans_tile_fp8<O, MT, 4>(x, ldx, w, c + 64, y, ldy, 0);
    }
  }
}

template <class O>
void trans_blocks_fp8(int64_t m, const float* x, int64_t ldx, const Weight& w, int64_t b, int64_t e,
                      float* y, int64_t ldy) {
  switch (m) {
    case 1:
      return trans_blocks_fp8<O, 1>(x, ldx, w, b, e, y, ldy);
    case 2:
      return trans_blocks_fp8<O, 2>(x, ldx, w, b, e, y, ldy);
    case 3:
      return trans_blocks_fp8<O, 3>(x, ldx, w, b, e, y, ldy);
    default:
      return trans_blocks_fp8<O, 4>(x, ldx, w, b, e, y, ldy);
  }
}

using TransTileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t,
                             int64_t);

template <class O, int MT, int... NT>
constexpr void fill_trans_row(TransTileFn* row, std::integer_sequence<int, NT...>) {
  ((row[NT] = &trans_tile<O, MT, NT + 1>), ...);
}
template <class O, int... MT>
constexpr void fill_trans_tiles(TransTileFn (*t)[O::kTileTN], std::integer_sequence<int, MT...>) {
  (fill_trans_row<O, MT + 1>(t[MT], std::make_integer_sequence<int, O::kTileTN>{}), ...);
}

template <class O, DType DT>
void matmul_t_dtype(const ThreadPool& pool, const float* x, int64_t m, int64_t ldx, const Weight& w,
                    float* y, int64_t ldy) {
  constexpr int64_t kSlice = 16 * O::kTileTN;  // columns per work item
  static const auto tiles = [] {
    struct T {
      TransTileFn f[O::kTileTM][O::kTileTN];
    } t{};
    fill_trans_tiles<O>(t.f, std::make_integer_sequence<int, O::kTileTM>{});
    return t;
  }();
  const int64_t C = w.cols, n_slices = (C + kSlice - 1) / kSlice;
  if (m <= O::kTileTM) {  // decode: no dequantized copy, each weight converted once anyway
    if constexpr (DT == DType::F8_E4M3 && O::kFp8Direct) {
      if (fp8_direct_ok(w)) {
        // Whole blocks of 128 columns on the fast path, a partial last block as below.
        const int64_t nb = C / kFp8Block, cf = nb * kFp8Block;
        pool.parallel_for(nb + (cf < C), [&](int64_t b, int64_t e, int) {
          trans_blocks_fp8<O>(m, x, ldx, w, b, std::min(e, nb), y, ldy);
          if (e > nb) trans_cols_w<O, DT>(m, x, ldx, w, cf, C - cf, y, ldy);
        });
        return;
      }
    }
    pool.parallel_for(n_slices, [&](int64_t b, int64_t e, int) {
      const int64_t c0 = b * kSlice, c1 = std::min(C, e * kSlice);
      trans_cols_w<O, DT>(m, x, ldx, w, c0, c1 - c0, y, ldy);
    });
    return;
  }
  const int64_t n_blocks = (m + kTransTokens - 1) / kTransTokens;
  // Items are slice-major, so a thread's consecutive items mostly reuse its dequantized slice.
  pool.parallel_for(n_slices * n_blocks, [&](int64_t b, int64_t e, int) {
    static thread_local Scratch wscratch;
    float* wb = wscratch.get(std::max<int64_t>(1, w.rows) * kSlice);  // [rows, kSlice]
    int64_t have = -1;
    for (int64_t it = b; it < e; ++it) {
      const int64_t s = it / n_blocks, blk = it % n_blocks;
      const int64_t c0 = s * kSlice, cn = std::min(kSlice, C - c0), nc = (cn + 15) / 16;
      if (s != have) {
        dequant_cols<O, DT>(w, c0, nc, wb, kSlice);
        have = s;
      }
      const int64_t i1 = std::min(m, (blk + 1) * kTransTokens);
      for (int64_t i0 = blk * kTransTokens; i0 < i1; i0 += O::kTileTM) {
        const int64_t mt = std::min<int64_t>(O::kTileTM, i1 - i0);
        tiles.f[mt - 1][nc - 1](x + i0 * ldx, ldx, wb, kSlice, w.rows, y + i0 * ldy + c0, ldy, cn);
      }
    }
  });
}

template <class O>
void matmul_t(const ThreadPool& pool, const float* x, int64_t m, int64_t ldx, const Weight& w,
              float* y, int64_t ldy) {
  if (m <= 0 || w.cols <= 0) return;
  switch (w.dtype) {
    case DType::F32:
      return matmul_t_dtype<O, DType::F32>(pool, x, m, ldx, w, y, ldy);
    case DType::F16:
      return matmul_t_dtype<O, DType::F16>(pool, x, m, ldx, w, y, ldy);
    case DType::BF16:
      return matmul_t_dtype<O, DType::BF16>(pool, x, m, ldx, w, y, ldy);
    case DType::F8_E4M3:
      return matmul_t_dtype<O, DType::F8_E4M3>(pool, x, m, ldx, w, y, ldy);
    default:
      fail("matmul_t: unsupported weight dtype ", dtype_name(w.dtype));
  }
}

}  // namespace
}  // namespace moeserve::kernels
