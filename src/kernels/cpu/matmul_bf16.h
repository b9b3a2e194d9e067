// matmul under Precision::Bf16 (kernels.h): the bf16 contract, for any number of tokens and a
// batch of products in one fan-out. Part of impl.h, generic over O, which adds for it:
//
//   PB                      32 bf16 values as the unit takes them (lane l: elements 2l, 2l + 1)
//   load_pb(p)              32 bf16 values from memory
//   dp(acc, x, w)           per lane l: the two steps of the contract (odd element, then even)
//   Ftz                     a scope object: dp is exact only while one lives (the emulations
//                           set the MXCSR's FTZ and DAZ bits; vdpbf16ps needs nothing)
//   round_bf16x16(p, out)   bf16_round of 16 floats
//   kFp8Bf16, fp8_bf16x32   (optional) 32 NaN-free e4m3 bytes as bf16, exactly
//   kBTileM, kBTileN        the register tile: tokens x weight rows
//
// x is rounded to bf16 once per product (fp8: per block row of scales, x * scale), weights are
// read in place when they are bf16 with K % 32 == 0, else converted a block at a time. The
// tiles keep 16-lane partial sums across K blocks taken in increasing order, so which rows
// share a tile, how many tokens there are and which thread runs a block never change a bit.
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include "kernels/bf16_math.h"
#include "kernels/cpu/common.h"

namespace moeserve::kernels {
namespace {

constexpr int64_t round32(int64_t n) {
  return (n + 31) & ~int64_t{31};
}

constexpr int64_t kBf16K = 1024;  // columns per K block (a multiple of 128)
constexpr int64_t kBf16M = 64;    // tokens per panel

template <class O>
constexpr int64_t bf16_nb() {  // weight rows per N block
  return 8 * O::kBTileN;
}

// n floats (n % 16 == 0) to bf16 by the contract.
template <class O>
void round_bf16(const float* in, int64_t n, uint16_t* out) {
  for (int64_t k = 0; k < n; k += 16) O::round_bf16x16(in + k, out + k);
}

// A row of x (K values) as bf16, zero-padded to round32(K); fp8 (sc set): times the block
// row's scales, rounded to f32 and then to bf16.
template <class O>
void x_to_bf16(const float* x, int64_t K, const float* sc, uint16_t* out) {
  using V = typename O::V;
  alignas(64) float t[16];
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    V v = O::load(x + k);
    if (sc) v = O::mul(v, O::set1(sc[k / kFp8Block]));
    O::store(t, v);
    O::round_bf16x16(t, out + k);
  }
  if (k < K) {
    for (int64_t l = 0; l < 16; ++l) t[l] = k + l < K ? x[k + l] : 0.0f;
    V v = O::load(t);
    if (sc) v = O::mul(v, O::set1(sc[k / kFp8Block]));
    O::store(t, v);
    for (int64_t l = K - k; l < 16; ++l) t[l] = 0.0f;
    O::round_bf16x16(t, out + k);
    k += 16;
  }
  std::fill(out + k, out + round32(K), uint16_t{0});
}

// Rows [n0, n0 + nn), columns [k0, k1) of w as bf16 (k0 % 32 == 0, k1 <= round32(K); zero
// past K). wb: [nn, ldw], column k0 first. NaN-free fp8 (w.fp8_plain) goes through
// O::fp8_bf16x32 where O has it: the same values.
template <class O, DType DT>
void bf16_rows(const Weight& w, int64_t n0, int64_t nn, uint16_t* wb, int64_t ldw, int64_t k0,
               int64_t k1) {
  using V = typename O::V;
  const int64_t K = std::min(w.cols, k1);
  const V s = DT == DType::F8_E4M3 ? O::set1(256.0f) : O::zero();  // cvt_fp8's scale 1
  alignas(64) float t[16];
  for (int64_t r = 0; r < nn; ++r) {
    const uint8_t* row = w_row(w, n0 + r);
    uint16_t* o = wb + r * ldw - k0;
    int64_t k = k0;
    if constexpr (DT == DType::F8_E4M3 && O::kFp8Bf16) {
      if (w.fp8_plain)
        for (; k + 32 <= K; k += 32) O::fp8_bf16x32(row + k, o + k);
    }
    for (; k < K; k += 16) {
      O::store(t, k + 16 <= K ? load_w<O, DT>(row, k, s) : load_w_tail<O, DT>(row, k, K - k, s));
      O::round_bf16x16(t, o + k);
    }
    if (k < k1) std::fill(o + k, o + k1, uint16_t{0});
  }
}

// MT tokens x NT weight rows over nc pairs-of-16 chunks. x: [MT, ldx] bf16; w: [NT, ldw] bf16;
// part: [MT, ldp] partial lanes (16 floats per row); `first` starts from +0.0, `last` reduces
// into y.
// F8: w is NaN-free e4m3 bytes ([NT, ldw] bytes), converted in registers (O::load_pb_fp8, the
// same values as fp8_bf16x32), for few tokens, where a converted copy would cost more memory
// traffic than the products.
template <class O, int MT, int NT, bool F8 = false>
void bf16_tile(const uint16_t* x, int64_t ldx, const void* wv0, int64_t ldw, int64_t nc,
               float* part, int64_t ldp, bool first, bool last, float* y, int64_t ldy) {
  const auto* w = static_cast<const uint16_t*>(wv0);
  const auto* w8 = static_cast<const uint8_t*>(wv0);
  using V = typename O::V;
  using PB = typename O::PB;
  V acc[MT][NT];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NT; ++j) acc[i][j] = first ? O::zero() : O::load(part + i * ldp + 16 * j);
  {
    [[maybe_unused]] const typename O::Ftz ftz;
    for (int64_t c = 0; c < nc; ++c) {
      PB xv[MT];
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) xv[i] = O::load_pb(x + i * ldx + 32 * c);
#pragma GCC unroll 8
      for (int j = 0; j < NT; ++j) {
        PB wv;
        if constexpr (F8)
          wv = O::load_pb_fp8(w8 + j * ldw + 32 * c);
        else
          wv = O::load_pb(w + j * ldw + 32 * c);
#pragma GCC unroll 8
        for (int i = 0; i < MT; ++i) acc[i][j] = O::dp(acc[i][j], xv[i], wv);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NT; ++j) O::fence(acc[i][j]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NT; ++j) O::fence(acc[i][j]);  // (after the scope's end too)
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

// Whether O converts NaN-free fp8 to bf16 as float(fp8) * 2^-120 (O::load_pb_fp8_raw), against
// x scaled by 2^120 (O::bf16_up120): the same products, so the same bits, for three
// operations per 32 weights instead of the exact conversion's table lookup.
template <class O>
constexpr bool fp8_raw_bf16() {
  if constexpr (requires { O::kFp8Raw; })
    return O::kFp8Raw;
  else
    return false;
}

// bf16_tile for NaN-free fp8 weights converted in registers by O::load_pb_fp8_raw, K whole
// (nc chunks of 32, the last zero-padded in x): xs is the tokens' x times 2^120, xp the same x
// unscaled. A chunk of a row that holds an e4m3 subnormal takes the exact conversion against
// xp instead (the same products, so the same bits either way).
template <class O, int MT, int NT>
void bf16_tile_raw(const uint16_t* xs, const uint16_t* xp, int64_t ldx, const uint8_t* w8,
                   int64_t ldw, int64_t nc, float* y, int64_t ldy, int64_t rs) {
  const uint8_t* wr[NT];
#pragma GCC unroll 16
  for (int j = 0; j < NT; ++j) wr[j] = w8 + j * rs * ldw;
  using V = typename O::V;
  using PB = typename O::PB;
  V acc[MT][NT];
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) acc[i][j] = O::zero();
  {
    [[maybe_unused]] const typename O::Ftz ftz;
    for (int64_t c = 0; c < nc; ++c) {
      PB xv[MT];
#pragma GCC unroll 16
      for (int i = 0; i < MT; ++i) xv[i] = O::load_pb(xs + i * ldx + 32 * c);
#pragma GCC unroll 16
      for (int j = 0; j < NT; ++j) {
        if constexpr (fp8_raw_bf16<O>()) {
          uint32_t sub;
          const PB wv = O::load_pb_fp8_raw(wr[j] + 32 * c, sub);
          if (__builtin_expect(sub == 0, 1)) {
#pragma GCC unroll 16
            for (int i = 0; i < MT; ++i) acc[i][j] = O::dp(acc[i][j], xv[i], wv);
            continue;
          }
        }
        const PB wv = O::load_pb_fp8(wr[j] + 32 * c);
#pragma GCC unroll 16
        for (int i = 0; i < MT; ++i)
          acc[i][j] = O::dp(acc[i][j], O::load_pb(xp + i * ldx + 32 * c), wv);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NT; ++j) O::fence(acc[i][j]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) O::fence(acc[i][j]);
#pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) y[i * ldy + j * rs] = O::reduce(acc[i][j]);
}

// Tokens per raw tile: up to 8, so that each weight is converted once for all of a job's few
// tokens; rows per tile as many as the registers hold next to the tokens' x. (Tiles of 16
// tokens, x read from L1 at each use, ran a 2048 x 2048 product at about half the speed of
// converting the rows once into a bf16 copy, which more than 8 tokens take.)
constexpr int kRawTileM = 8;
constexpr int raw_tile_n(int mt) {
  return mt <= 4 ? 6 : mt == 5 ? 4 : mt == 6 ? 3 : 2;
}

using Bf16RawFn = void (*)(const uint16_t*, const uint16_t*, int64_t, const uint8_t*, int64_t,
                           int64_t, float*, int64_t, int64_t);

template <class O, int MT, int... NT>
constexpr void fill_raw_row(Bf16RawFn* row, std::integer_sequence<int, NT...>) {
  ((row[NT] = &bf16_tile_raw<O, MT, NT + 1>), ...);
}

template <class O>
Bf16RawFn bf16_raw_fn(int64_t mt, int64_t nt) {
  static const auto tiles = [] {
    struct T {
      Bf16RawFn f[kRawTileM][6];
    } t{};
    [&]<int... MT>(std::integer_sequence<int, MT...>) {
      (fill_raw_row<O, MT + 1>(t.f[MT], std::make_integer_sequence<int, raw_tile_n(MT + 1)>{}),
       ...);
    }
    (std::make_integer_sequence<int, kRawTileM>{});
    return t;
  }();
  return tiles.f[mt - 1][nt - 1];
}

using Bf16TileFn = void (*)(const uint16_t*, int64_t, const void*, int64_t, int64_t, float*,
                            int64_t, bool, bool, float*, int64_t);

template <class O, bool F8, int MT, int... NT>
constexpr void fill_bf16_row(Bf16TileFn* row, std::integer_sequence<int, NT...>) {
  ((row[NT] = &bf16_tile<O, MT, NT + 1, F8>), ...);
}
template <class O, bool F8, int... MT>
constexpr void fill_bf16_tiles(Bf16TileFn (*t)[O::kBTileN], std::integer_sequence<int, MT...>) {
  (fill_bf16_row<O, F8, MT + 1>(t[MT], std::make_integer_sequence<int, O::kBTileN>{}), ...);
}

template <class O, bool F8>
Bf16TileFn bf16_tile_fn(int64_t mt, int64_t nt) {
  static const auto tiles = [] {
    struct T {
      Bf16TileFn f[O::kBTileM][O::kBTileN];
    } t{};
    fill_bf16_tiles<O, F8>(t.f, std::make_integer_sequence<int, O::kBTileM>{});
    return t;
  }();
  return tiles.f[mt - 1][nt - 1];
}

// Up to this many tokens (decode), NaN-free fp8 weights are converted in the tiles' registers
// instead of into a bf16 copy, and K is taken whole: by the raw conversion where O has it
// (fp8_raw_bf16) and x allows it, else by the exact one.
constexpr int64_t kFp8RegM = 8;

// One piece of work: rows [n0, n1) of job `job` (for fp8 within one block row of scales).
struct Bf16Item {
  int64_t job, n0, n1;
};

// bf16_grouped's blocks: kGroupK columns of O::kBTileN rows (6 KB of bf16 for the unit's
// tiles: in L1 with the partial sums and a tile's tokens); the weights of the block
// kGroupAhead blocks on are prefetched while a block's products run, so that the conversion of
// each block (or the tiles, for weights read in place) finds them in L2.
constexpr int64_t kGroupK = 512;
constexpr int kGroupAhead = 4;

// Rows [it.n0, it.n1) of job j, all its m <= kBf16M tokens (x: [m, ldx] bf16): for each group
// of O::kBTileN rows and each K block, the group's weights (wp: read in place, else converted
// here into an L1-sized block) serve every token while they stay in L1, and the tiles' partial
// sums (16 lanes each) wait in an L1-sized buffer between K blocks. Against converting all the
// item's rows first (into L2), the weights' reads overlap the products and the tiles read them
// from L1.
template <class O, DType DT>
void bf16_grouped(const MatmulJob& j, const Bf16Item& it, const uint16_t* x, int64_t ldx,
                  const uint16_t* wp, int64_t ldw) {
  constexpr int64_t G = O::kBTileN;
  constexpr int64_t es = DT == DType::F8_E4M3 ? 1 : DT == DType::F32 ? 4 : 2;  // weight bytes
  static thread_local std::vector<uint16_t> wbuf;
  static thread_local std::vector<float> pbuf;
  const Weight& w = *j.w;
  const int64_t Kp = round32(w.cols), m = j.m, rows = it.n1 - it.n0;
  const int64_t kb = std::min(kGroupK, Kp), ldb = kb + 32;
  if (!wp) wbuf.resize(static_cast<size_t>(G * ldb));
  pbuf.resize(static_cast<size_t>(kBf16M * G * 16));
  float* part = pbuf.data();
  for (int64_t g0 = 0; g0 < rows; g0 += G) {
    const int64_t gn = std::min(G, rows - g0);
    for (int64_t k0 = 0; k0 < Kp; k0 += kb) {
      const int64_t k1 = std::min(Kp, k0 + kb), nc = (k1 - k0) / 32;
      const bool first = k0 == 0, last = k1 == Kp;
      int64_t pg = g0, pk = k0;  // the block to prefetch
      for (int d = 0; d < kGroupAhead && pg < rows; ++d) {
        pk += kb;
        if (pk >= Kp) pg += G, pk = 0;
      }
      if (pg < rows) {
        const int64_t b0 = pk * es, b1 = std::min(w.cols, pk + kb) * es;
        for (int64_t r = pg; r < std::min(rows, pg + G); ++r) {
          const uint8_t* row = w_row(w, it.n0 + r);
          for (int64_t b = b0; b < b1; b += 64) __builtin_prefetch(row + b, 0, 2);
        }
      }
      const uint16_t* wg = wbuf.data();
      int64_t ld = ldb;
      if (wp)
        wg = wp + g0 * ldw + k0, ld = ldw;
      else
        bf16_rows<O, DT>(w, it.n0 + g0, gn, wbuf.data(), ldb, k0, k1);
      for (int64_t i0 = 0; i0 < m; i0 += O::kBTileM) {
        const int64_t mt = std::min<int64_t>(O::kBTileM, m - i0);
        bf16_tile_fn<O, false>(mt, gn)(x + i0 * ldx + k0, ldx, wg, ld, nc, part + i0 * G * 16,
                                       G * 16, first, last, j.y + i0 * j.ldy + it.n0 + g0, j.ldy);
      }
    }
  }
}

// Rows [it.n0, it.n1) of job j for all its tokens. xb: the job's x as bf16 ([m, round32(K)];
// null for fp8, whose x is scaled here by the item's block row of scales, a panel of tokens at
// a time). Weights that are not read in place are converted once, whole rows, and serve every
// panel.
template <class O, DType DT>
void bf16_item(const MatmulJob& j, const Bf16Item& it, const uint16_t* xb) {
  constexpr int64_t NB = bf16_nb<O>();
  constexpr bool fp8 = DT == DType::F8_E4M3;
  static thread_local std::vector<uint16_t> wbuf, xbuf, xsbuf;
  static thread_local std::vector<float> pbuf;
  const Weight& w = *j.w;
  const int64_t K = w.cols, Kp = round32(K), m = j.m, rows = it.n1 - it.n0;
  const bool direct = DT == DType::BF16 && K % 32 == 0;
  bool f8reg = false;
  if constexpr (fp8 && O::kFp8Bf16) f8reg = w.fp8_plain && K % 32 == 0 && m <= kFp8RegM;
  // One panel of more than a few tokens (batched decode, short prefill): row groups, see
  // bf16_grouped.
  const bool grouped = m > kFp8RegM && m <= kBf16M;
  const uint16_t* wp = nullptr;
  int64_t ldw;
  if (direct) {
    wp = reinterpret_cast<const uint16_t*>(w_row(w, it.n0));
    ldw = K;
  } else if (f8reg || grouped) {
    ldw = K;  // bytes, read in place
  } else {
    ldw = Kp + 32;  // rows not 4 KB apart
    wbuf.resize(static_cast<size_t>(rows * ldw));
    bf16_rows<O, DT>(w, it.n0, rows, wbuf.data(), ldw, 0, Kp);
    wp = wbuf.data();
  }
  // K blocks: for a few tokens (decode) whole rows, which stream from memory best; for more,
  // blocks whose weights stay in L1 while a panel of tokens passes.
  const int64_t kb = m <= kFp8RegM ? Kp : kBf16K;
  pbuf.resize(static_cast<size_t>(kBf16M * NB * 16));
  float* part = pbuf.data();
  // The tokens' rows of x: fp8's (converted here) not 4 KB apart, so that a tile's tokens do
  // not all fall in the same L1 set.
  const int64_t ldx = fp8 ? Kp + 32 : Kp;
  if constexpr (fp8) xbuf.resize(static_cast<size_t>(std::min(m, kBf16M) * ldx));
  for (int64_t m0 = 0; m0 < m; m0 += kBf16M) {
    const int64_t mm = std::min(kBf16M, m - m0);
    const uint16_t* xp = xb ? xb + m0 * Kp : nullptr;
    if constexpr (fp8) {
      const float* sc = w_scales(w, it.n0);
      for (int64_t i = 0; i < mm; ++i) x_to_bf16<O>(x_row(j, m0 + i), K, sc, xbuf.data() + i * ldx);
      xp = xbuf.data();
      if constexpr (fp8_raw_bf16<O>()) {
        // Few tokens: every weight converted once (raw), for all of them, rows taken whole.
        if (f8reg) {
          xsbuf.resize(xbuf.size());
          bool up = true;
          for (int64_t i = 0; i < mm; ++i)
            up &= O::bf16_up120(xp + i * ldx, xsbuf.data() + i * ldx, Kp);
          if (up) {
            for (int64_t i0 = 0; i0 < mm; i0 += kRawTileM) {
              const int64_t mt = std::min<int64_t>(kRawTileM, mm - i0), nt = raw_tile_n(mt);
              // A tile's rows come from nt runs of s consecutive rows, and the next tile takes
              // each run's next row: nt long sequential streams for the prefetchers, rather
              // than nt short rows.
              for (int64_t r = 0; r < rows;) {
                const int64_t ntt = std::min(nt, rows - r), s = (rows - r) / ntt;
                const Bf16RawFn f = bf16_raw_fn<O>(mt, ntt);
                for (int64_t q = 0; q < s; ++q)
                  f(xsbuf.data() + i0 * ldx, xp + i0 * ldx, ldx, w_row(w, it.n0 + r + q), ldw,
                    Kp / 32, j.y + (m0 + i0) * j.ldy + it.n0 + r + q, j.ldy, s);
                r += ntt * s;
              }
            }
            continue;
          }
        }
      }
    }
    if (grouped) {
      bf16_grouped<O, DT>(j, it, xp, ldx, wp, ldw);
      continue;
    }
    // Few tokens (whole K): the tiles take their rows from O::kBTileN runs of consecutive
    // rows, the next tile the next row of each run, so the prefetchers see long sequential
    // streams rather than short rows side by side (gemv_rows does the same).
    int64_t n_done = 0;
    if (kb == Kp) {
      constexpr int64_t NT = O::kBTileN;
      const int64_t st = rows / NT;  // rows per run
      alignas(64) float yt[O::kBTileM * NT];
      for (int64_t p = 0; p < st; ++p) {
        for (int64_t i0 = 0; i0 < mm; i0 += O::kBTileM) {
          const int64_t mt = std::min<int64_t>(O::kBTileM, mm - i0);
          bool done = false;
          if constexpr (O::kFp8Bf16) {
            if (f8reg) {
              bf16_tile_fn<O, true>(mt, NT)(xp + i0 * ldx, ldx, w_row(w, it.n0 + p), st * ldw,
                                            Kp / 32, part, NB * 16, true, true, yt, NT);
              done = true;
            }
          }
          if (!done)
            bf16_tile_fn<O, false>(mt, NT)(xp + i0 * ldx, ldx, wp + p * ldw, st * ldw, Kp / 32,
                                           part, NB * 16, true, true, yt, NT);
          for (int64_t i = 0; i < mt; ++i)
            for (int64_t q = 0; q < NT; ++q)
              j.y[(m0 + i0 + i) * j.ldy + it.n0 + p + q * st] = yt[i * NT + q];
        }
      }
      n_done = st * NT;
    }
    for (int64_t n0 = n_done; n0 < rows; n0 += NB) {
      const int64_t nn = std::min(NB, rows - n0);
      for (int64_t k0 = 0; k0 < Kp; k0 += kb) {
        const int64_t nc = std::min(kb, Kp - k0) / 32;
        const bool first = k0 == 0, last = k0 + kb >= Kp;
        for (int64_t j0 = 0; j0 < nn; j0 += O::kBTileN) {
          const int64_t nt = std::min<int64_t>(O::kBTileN, nn - j0);
          for (int64_t i0 = 0; i0 < mm; i0 += O::kBTileM) {
            const int64_t mt = std::min<int64_t>(O::kBTileM, mm - i0);
            float* yt = j.y + (m0 + i0) * j.ldy + it.n0 + n0 + j0;
            float* pt = part + (i0 * NB + j0) * 16;
            if constexpr (O::kFp8Bf16) {
              if (f8reg) {
                bf16_tile_fn<O, true>(mt, nt)(xp + i0 * ldx + k0, ldx,
                                              w_row(w, it.n0 + n0 + j0) + k0, ldw, nc, pt, NB * 16,
                                              first, last, yt, j.ldy);
                continue;
              }
            }
            bf16_tile_fn<O, false>(mt, nt)(xp + i0 * ldx + k0, ldx, wp + (n0 + j0) * ldw + k0, ldw,
                                           nc, pt, NB * 16, first, last, yt, j.ldy);
          }
        }
      }
    }
  }
}

template <class O>
void bf16_item_any(const MatmulJob& j, const Bf16Item& it, const uint16_t* xb) {
  switch (j.w->dtype) {
    case DType::F32:
      return bf16_item<O, DType::F32>(j, it, xb);
    case DType::F16:
      return bf16_item<O, DType::F16>(j, it, xb);
    case DType::BF16:
      return bf16_item<O, DType::BF16>(j, it, xb);
    default:
      return bf16_item<O, DType::F8_E4M3>(j, it, xb);
  }
}

// Every job under the bf16 contract (their weights F32, F16, BF16 or F8_E4M3): x rounded to
// bf16 first (all jobs' rows in one fan-out), then the jobs' row blocks in another.
template <class O>
void matmul_bf16(const ThreadPool& pool, const MatmulJob* jobs, int64_t n) {
  // Rows per item: enough work per item to amortize its setup, few enough that the threads
  // share out even one product.
  constexpr int64_t NB = bf16_nb<O>();
  std::vector<Bf16Item> items;
  std::vector<int64_t> xoff(static_cast<size_t>(n) + 1, 0);  // each job's bf16 x in xb
  std::vector<std::pair<int64_t, int64_t>> xrows;            // (job, token) to convert
  for (int64_t q = 0; q < n; ++q) {
    const MatmulJob& j = jobs[q];
    const Weight& w = *j.w;
    const bool fp8 = w.dtype == DType::F8_E4M3;
    xoff[q + 1] = xoff[q];
    if (j.m <= 0 || w.rows <= 0) continue;
    check_weight("matmul", w);
    if (w.cols == 0) {
      for (int64_t i = 0; i < j.m; ++i) std::fill(j.y + i * j.ldy, j.y + i * j.ldy + w.rows, 0.0f);
      continue;
    }
    if (!fp8) {
      xoff[q + 1] += j.m * round32(w.cols);
      for (int64_t i = 0; i < j.m; ++i) xrows.emplace_back(q, i);
    }
    // Items of ~2 N blocks; fp8 items are a block row of scales (x is scaled once for it).
    const int64_t step = fp8 ? kFp8Block : 2 * NB;
    for (int64_t n0 = 0; n0 < w.rows;) {
      int64_t n1 = std::min(w.rows, n0 + step);
      if (fp8) n1 = std::min(n1, block_row_end(w, n0));
      items.push_back({q, n0, n1});
      n0 = n1;
    }
  }
  static thread_local Scratch xscratch;
  uint16_t* xb = reinterpret_cast<uint16_t*>(xscratch.get(static_cast<size_t>(xoff[n] / 2 + 16)));
  // Few rows are converted on this thread: a fan-out would cost more than they do.
  const auto convert = [&](int64_t b, int64_t e, int) {
    for (int64_t r = b; r < e; ++r) {
      const MatmulJob& j = jobs[xrows[r].first];
      const int64_t K = j.w->cols;
      x_to_bf16<O>(x_row(j, xrows[r].second), K, nullptr,
                   xb + xoff[xrows[r].first] + xrows[r].second * round32(K));
    }
  };
  const int64_t nx = static_cast<int64_t>(xrows.size());
  if (xoff[n] <= (int64_t{1} << 20))
    convert(0, nx, 0);
  else
    pool.parallel_for(nx, convert, 16);
  parallel_pieces(pool, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Bf16Item& it = items[i];
      const MatmulJob& j = jobs[it.job];
      bf16_item_any<O>(j, it, j.w->dtype == DType::F8_E4M3 ? nullptr : xb + xoff[it.job]);
    }
  });
}

}  // namespace
}  // namespace moeserve::kernels
