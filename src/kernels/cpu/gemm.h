// matmul for many tokens (prefill): compute bound, blocked and register-tiled. Part of impl.h.
#pragma once

#include <algorithm>
#include <utility>

#include "kernels/cpu/common.h"

namespace moeserve::kernels {
namespace {

// Each thread takes whole N blocks (gemm_n rows). For each panel of kGemmM tokens and each
// K block of kGemmK columns, in increasing k, the block's weights are dequantized once into a
// float buffer (L2) and used by all the panel's tokens; register tiles of kTileM tokens x
// kTileN rows (the rows' floats stay in L1 across the panel) keep 16-lane partial sums, which
// wait in a buffer between K blocks. Taking K blocks in increasing order keeps each lane's
// order of the contract, so the result is bit for bit that of the GEMV path.

constexpr int64_t kGemmK = 1024;  // columns per K block (a multiple of 128: fp8 blocks stay whole)
constexpr int64_t kGemmM = 128;   // tokens per panel
// Row stride of the dequantized block: not a multiple of 4 KB, so that a tile's weight rows do
// not all fall in the same L1 set.
constexpr int64_t kLdw = kGemmK + 16;

template <class O>
constexpr int64_t gemm_n() {  // weight rows per N block
  return 8 * O::kTileN;
}

// Rows [n0, n0 + nn) x columns [k0, k0 + 16 * nc) of w as floats, zero past K.
// wb: [nn, ldw] f32.
template <class O, DType DT>
void dequant_block(const Weight& w, int64_t n0, int64_t nn, int64_t k0, int64_t nc, float* wb,
                   int64_t ldw) {
  using V = typename O::V;
  const int64_t K = w.cols;
  for (int64_t r = 0; r < nn; ++r) {
    const uint8_t* row = w_row(w, n0 + r);
    const float* sc = DT == DType::F8_E4M3 ? w_scales(w, n0 + r) : nullptr;
    V s = O::zero();
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t k = k0 + 16 * c;
      if (DT == DType::F8_E4M3 && (c == 0 || k % kFp8Block == 0)) s = fp8_scale<O, DT>(sc, k);
      const V v = k + 16 <= K ? load_w<O, DT>(row, k, s) : load_w_tail<O, DT>(row, k, K - k, s);
      O::store(wb + r * ldw + 16 * c, v);
    }
  }
}

// MT tokens x NT weight rows over nc chunks of one K block. x: MT row pointers, read from
// column xoff (the block's first); wb: [NT, ldw]; part: [MT, ldp] 16-lane partial sums, 16 floats
// per row; y: [MT, ldy]. `first` starts from +0.0, `last` reduces into y.
template <class O, int MT, int NT>
void gemm_tile(const float* const* x, int64_t xoff, const float* wb, int64_t ldw, int64_t nc,
               float* part, int64_t ldp, bool first, bool last, float* y, int64_t ldy) {
  using V = typename O::V;
  const float* xr[MT];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) xr[i] = x[i] + xoff;
  V acc[MT][NT];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NT; ++j) acc[i][j] = first ? O::zero() : O::load(part + i * ldp + 16 * j);
  for (int64_t c = 0; c < nc; ++c) {
    V xv[MT];
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) xv[i] = O::load(xr[i] + 16 * c);
#pragma GCC unroll 8
    for (int j = 0; j < NT; ++j) {
      const V wv = O::load(wb + j * ldw + 16 * c);
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) acc[i][j] = O::fma(xv[i], wv, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NT; ++j) {
      if (last)
        y[i * ldy + j] = O::reduce(acc[i][j]);
      else
        O::store(part + i * ldp + 16 * j, acc[i][j]);
    }
}

using GemmTileFn = void (*)(const float* const*, int64_t, const float*, int64_t, int64_t, float*,
                            int64_t, bool, bool, float*, int64_t);

template <class O, int MT, int... NT>
constexpr void fill_gemm_row(GemmTileFn* row, std::integer_sequence<int, NT...>) {
  ((row[NT] = &gemm_tile<O, MT, NT + 1>), ...);
}
template <class O, int... MT>
constexpr void fill_gemm_tiles(GemmTileFn (*t)[O::kTileN], std::integer_sequence<int, MT...>) {
  (fill_gemm_row<O, MT + 1>(t[MT], std::make_integer_sequence<int, O::kTileN>{}), ...);
}

template <class O, DType DT>
void gemm(const ThreadPool& pool, const float* const* x, int64_t m, const Weight& w, float* y,
          int64_t ldy) {
  constexpr int64_t NB = gemm_n<O>();
  static_assert(kGemmM % O::kTileM == 0 && NB % O::kTileN == 0);
  static const auto tiles = [] {
    struct T {
      GemmTileFn f[O::kTileM][O::kTileN];
    } t{};
    fill_gemm_tiles<O>(t.f, std::make_integer_sequence<int, O::kTileM>{});
    return t;
  }();
  const int64_t N = w.rows, K = w.cols, Kp = round16(K);
  pool.parallel_for((N + NB - 1) / NB, [&](int64_t b, int64_t e, int) {
    static thread_local Scratch wscratch, pscratch;
    float* wb = wscratch.get(NB * kLdw);           // [NB, kLdw]
    float* part = pscratch.get(kGemmM * NB * 16);  // [kGemmM, NB, 16]
    for (int64_t nb = b; nb < e; ++nb) {
      const int64_t n0 = nb * NB, nn = std::min(NB, N - n0);
      for (int64_t m0 = 0; m0 < m; m0 += kGemmM) {
        const int64_t mm = std::min(kGemmM, m - m0);
        for (int64_t k0 = 0; k0 < K; k0 += kGemmK) {
          const int64_t nc = std::min(kGemmK, Kp - k0) / 16;
          const bool first = k0 == 0, last = k0 + kGemmK >= K;
          dequant_block<O, DT>(w, n0, nn, k0, nc, wb, kLdw);
          for (int64_t j0 = 0; j0 < nn; j0 += O::kTileN) {
            const int64_t nt = std::min<int64_t>(O::kTileN, nn - j0);
            for (int64_t i0 = 0; i0 < mm; i0 += O::kTileM) {
              const int64_t mt = std::min<int64_t>(O::kTileM, mm - i0);
              tiles.f[mt - 1][nt - 1](x + m0 + i0, k0, wb + j0 * kLdw, kLdw, nc,
                                      part + (i0 * NB + j0) * 16, NB * 16, first, last,
                                      y + (m0 + i0) * ldy + n0 + j0, ldy);
            }
          }
        }
      }
    }
  });
}

}  // namespace
}  // namespace moeserve::kernels
