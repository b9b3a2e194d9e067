// matmul for many tokens (prefill): compute bound, blocked and register-tiled. Part of impl.h.
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include "kernels/cpu/common.h"

namespace moeserve::kernels {
namespace {

// Each thread takes whole N blocks (gemm_n rows). For each panel of kGemmM tokens and each
// K block of kGemmK columns, in increasing k, the block's weights are dequantized once into a
// float buffer (L2) and used by all the panel's tokens; register tiles of kTileM tokens x
// kTileN rows (the rows' floats stay in L1 across the panel) keep 16-lane partial sums, which
// wait in a buffer between K blocks. Taking K blocks in increasing order keeps each lane's
// order of the contract, so the result is bit for bit that of the GEMV path. fp8: an N block
// stays within one block row of scales, its weights are dequantized to float(fp8) exactly and
// the panel's x is scaled by the block row's scales (the contract, kernels.h).

constexpr int64_t kGemmK = 1024;  // columns per K block (a multiple of 128: fp8 blocks stay whole)
constexpr int64_t kGemmM = 128;   // tokens per panel
// Row stride of the dequantized block (and of fp8's scaled x): not a multiple of 4 KB, so that
// a tile's rows do not all fall in the same L1 set.
constexpr int64_t kLdw = kGemmK + 16;

template <class O>
constexpr int64_t gemm_n() {  // weight rows per N block
  return 8 * O::kTileN;
}

// Rows [n0, n0 + nn) x columns [k0, k0 + 16 * nc) of w as floats (fp8: float(fp8), unscaled),
// zero past K. wb: [nn, ldw] f32.
template <class O, DType DT>
void dequant_block(const Weight& w, int64_t n0, int64_t nn, int64_t k0, int64_t nc, float* wb,
                   int64_t ldw) {
  using V = typename O::V;
  const int64_t K = w.cols;
  if constexpr (is_int<DT>()) {
    // Q8 / Q4: each chunk with its group's scale; Q4 in stored order, 32 elements at a time.
    const int64_t gs = w.group_size;
    for (int64_t r = 0; r < nn; ++r) {
      const uint8_t* row = w_row(w, n0 + r);
      float* o = wb + r * ldw - k0;
      int64_t g = -1;
      V t = O::zero();
      for (int64_t k = k0; k < k0 + 16 * nc;) {
        if (k / gs != g) t = int_prep<O, DT>(group_scale<O>(w, n0 + r, g = k / gs));
        if constexpr (DT == DType::Q4) {
          V lo, hi;
          O::cvt_q4x2(row + k / 2, t, lo, hi);
          O::store(o + k, lo);
          O::store(o + k + 16, hi);
          k += 32;
        } else {
          O::store(o + k,
                   k + 16 <= K ? O::cvt_q8(row + k, t) : load_w_tail<O, DT>(row, k, K - k, t));
          k += 16;
        }
      }
    }
    return;
  }
  const V s = DT == DType::F8_E4M3 ? O::set1(256.0f) : O::zero();  // cvt_fp8's scale 1
  for (int64_t r = 0; r < nn; ++r) {
    const uint8_t* row = w_row(w, n0 + r);
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t k = k0 + 16 * c;
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
  constexpr bool fp8 = DT == DType::F8_E4M3;
  const int64_t N = w.rows, K = w.cols, Kp = round16(K);
  // N blocks: NB rows each; for fp8 also cut where a block row of scales ends.
  std::vector<int64_t> starts;
  for (int64_t n0 = 0; n0 < N;) {
    starts.push_back(n0);
    n0 = std::min(N, n0 + NB);
    if constexpr (fp8) n0 = std::min(n0, block_row_end(w, starts.back()));
  }
  starts.push_back(N);
  pool.parallel_for(static_cast<int64_t>(starts.size()) - 1, [&](int64_t b, int64_t e, int) {
    static thread_local Scratch wscratch, pscratch, xscratch;
    constexpr int64_t kRunRows = fp8 ? kFp8Block : NB;
    float* wb = wscratch.get(NB * kLdw);                      // [NB, kLdw]
    float* part = pscratch.get(kGemmM * kRunRows * 16);       // [kGemmM, run rows, 16]
    float* xs = fp8 ? xscratch.get(kGemmM * kLdw) : nullptr;  // [kGemmM, kLdw]
    const float* xsr[kGemmM];
    for (int64_t i = 0; i < kGemmM; ++i) xsr[i] = xs + i * kLdw;
    // A run: this thread's N blocks of one block row (fp8, whose scaled x they share), else
    // one N block.
    for (int64_t r0 = b, r1; r0 < e; r0 = r1) {
      r1 = r0 + 1;
      if constexpr (fp8)
        while (r1 < e && starts[r1] < block_row_end(w, starts[r0])) ++r1;
      const int64_t g0 = starts[r0], gn = starts[r1] - g0;
      for (int64_t m0 = 0; m0 < m; m0 += kGemmM) {
        const int64_t mm = std::min(kGemmM, m - m0);
        for (int64_t k0 = 0; k0 < K; k0 += kGemmK) {
          const int64_t nc = std::min(kGemmK, Kp - k0) / 16;
          const bool first = k0 == 0, last = k0 + kGemmK >= K;
          const float* const* xp = x + m0;
          int64_t xoff = k0;
          if constexpr (fp8) {
            fp8_scale_x<O>(x + m0, mm, K, k0, std::min(K, k0 + kGemmK), w_scales(w, g0), false, xs,
                           kLdw);
            xp = xsr;
            xoff = 0;
          }
          for (int64_t nb = r0; nb < r1; ++nb) {
            const int64_t n0 = starts[nb], nn = starts[nb + 1] - n0;
            dequant_block<O, DT>(w, n0, nn, k0, nc, wb, kLdw);
            for (int64_t j0 = 0; j0 < nn; j0 += O::kTileN) {
              const int64_t nt = std::min<int64_t>(O::kTileN, nn - j0);
              for (int64_t i0 = 0; i0 < mm; i0 += O::kTileM) {
                const int64_t mt = std::min<int64_t>(O::kTileM, mm - i0);
                tiles.f[mt - 1][nt - 1](xp + i0, xoff, wb + j0 * kLdw, kLdw, nc,
                                        part + (i0 * gn + n0 - g0 + j0) * 16, gn * 16, first, last,
                                        y + (m0 + i0) * ldy + n0 + j0, ldy);
              }
            }
          }
        }
      }
    }
  });
}

}  // namespace
}  // namespace moeserve::kernels
