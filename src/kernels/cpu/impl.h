// The kernels of kernels.h written once over an instruction set's 16-lane float vector `O`:
//
//   struct O {
//     using V = ...;                        // 16 floats, lane l = element l
//     static constexpr int kTileM, kTileN;  // matmul micro-tile: tokens x weight rows
//     static constexpr int kTileTM, kTileTN;  // matmul_t micro-tile: tokens x 16-column chunks
//     static constexpr int gemv_rows(int m);  // GEMV: weight rows streamed together, m <= 8
//     zero, set1, load, load_reg (not folded into uses), store, fma(a, b, c) = a * b + c,
//     add_mul(a, b, c) = a + b * c rounded twice (a multiply, then an add), mul, below_2p8(v)
//     (every |lane| < 2^8), max(a, b) = a > b ? a : b, pow2(n) = 2^n for integral n in
//     [-126, 127], reduce
//     (the contract's tree), cvt_bf16 / cvt_f16 (16 elements), cvt_fp8(p, s256) (16 elements times
//     s256 = scale * 256, NaN-exact), NanAcc, nan_init, nan_scan128(acc, p), nan_found(acc)
//     (whether 128-byte blocks scanned into acc hold an e4m3 NaN), cvt_fp8_nonan and
//     cvt_fp8x2_nonan(p, s256, lo, hi) (16 / 32 elements known not to be NaN), for NaN-free
//     bytes cvt_fp8_raw(p) = float(fp8) * 2^-120 (exact, three operations); with
//     kFp8Direct, cvt_fp8_direct(p, s) = cvt_fp8_raw(p) * s
//   };
//
// kernels_<isa>.cpp defines O and includes this file; everything here has internal linkage, so
// the copies compiled for different instruction sets never merge at link time. Every path
// keeps the per-lane order of the contract (K processed in increasing 16-element chunks, lane
// l of chunk c is element 16c + l), so all of them, for every ISA, give the same bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/attention_kv.h"
#include "kernels/cpu/common.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/gemv.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/matmul_t.h"
#include "kernels/exp_poly.h"

namespace moeserve::kernels {
namespace {

// Few tokens (decode) stream the weights through the GEMV kernels, many (prefill) go to the
// blocked GEMM. The crossover is where GEMM's reuse of converted weights starts to pay: sooner
// for fp8, whose conversion costs more.
constexpr int64_t gemv_max_m(DType dt) {
  return dt == DType::F8_E4M3 || dt == DType::Q8 || dt == DType::Q4 ? 16 : 32;
}

template <class O, DType DT>
void matmul_dtype(const ThreadPool& pool, const float* const* x, int64_t m, const Weight& w,
                  float* y, int64_t ldy) {
  if (m <= gemv_max_m(DT))
    gemv<O, DT>(pool, x, m, w, y, ldy);
  else
    gemm<O, DT>(pool, x, m, w, y, ldy);
}

// Fails with one line unless the kernels take w: its dtype, and for Q8 / Q4 the shape of its
// groups (kernels.h, Weight).
inline void check_weight(const char* what, const Weight& w) {
  const DType dt = w.dtype;
  MS_CHECK(dt == DType::F32 || dt == DType::F16 || dt == DType::BF16 || dt == DType::F8_E4M3 ||
               dt == DType::Q8 || dt == DType::Q4,
           what, ": unsupported weight dtype ", dtype_name(dt));
  if (dt != DType::Q8 && dt != DType::Q4) return;
  const int64_t unit = dt == DType::Q4 ? 32 : 16, gs = w.group_size;
  MS_CHECK(w.group_scale != nullptr, what, ": ", dtype_name(dt), " weight without group scales");
  MS_CHECK(w.group_scale_dtype == DType::BF16 || w.group_scale_dtype == DType::F16 ||
               w.group_scale_dtype == DType::F32,
           what, ": unsupported group scale dtype ", dtype_name(w.group_scale_dtype));
  MS_CHECK(dt != DType::Q4 || w.cols % 32 == 0, what, ": Q4 weight with ", w.cols,
           " columns, not a multiple of 32");
  MS_CHECK(gs > 0 && (gs % unit == 0 || gs >= w.cols), what, ": ", dtype_name(dt), " group size ",
           gs, " is not a multiple of ", unit);
  MS_CHECK(w.group_cols == (w.cols + gs - 1) / gs, what, ": ", dtype_name(dt), " weight with ",
           w.group_cols, " group columns for ", w.cols, " columns in groups of ", gs);
}

// The kernels read each row of x up to round16(K), and run best on 64-byte aligned rows;
// other rows get a zero-padded, aligned copy. Q4 weights (`perm`) always take a copy, permuted
// within each chunk of 32 as their elements are stored (kernels.h): position 32c + j (j < 16)
// holds element 32c + 2j and 32c + 16 + j element 32c + 2j + 1.
inline bool row_needs_copy(const float* row, int64_t K, bool perm) {
  return perm || K % 16 || reinterpret_cast<uintptr_t>(row) % 64;
}
inline void copy_x_row(const float* row, int64_t K, float* xp, bool perm) {
  if (perm) {  // K % 32 == 0
    for (int64_t c = 0; c < K; c += 32)
      for (int64_t j = 0; j < 16; ++j) {
        xp[c + j] = row[c + 2 * j];
        xp[c + 16 + j] = row[c + 2 * j + 1];
      }
    return;
  }
  std::memcpy(xp, row, K * sizeof(float));
  std::fill(xp + K, xp + round16(K), 0.0f);
}

// Row i of a job's x.
inline const float* x_row(const MatmulJob& j, int64_t i) {
  return j.xrows ? j.xrows[i] : j.x + i * j.ldx;
}

// The row pointers the kernels read for job j (into rows [0, j.m)): its own rows where they
// are aligned, else copies in pad (m * round16(K) floats, or null when none is needed: see
// x_pad_floats). Rows [b, e) only.
inline void x_rows(const MatmulJob& j, int64_t b, int64_t e, const float** rows, float* pad) {
  const int64_t K = j.w->cols, Kp = round16(K);
  const bool perm = j.w->dtype == DType::Q4;
  for (int64_t i = b; i < e; ++i) {
    const float* r = x_row(j, i);
    if (row_needs_copy(r, K, perm)) {
      copy_x_row(r, K, pad + i * Kp, perm);
      r = pad + i * Kp;
    }
    rows[i] = r;
  }
}
inline int64_t x_pad_floats(const MatmulJob& j) {
  const int64_t K = j.w->cols;
  const bool perm = j.w->dtype == DType::Q4;
  for (int64_t i = 0; i < j.m; ++i)
    if (row_needs_copy(x_row(j, i), K, perm)) return j.m * round16(K);
  return 0;
}

template <class O>
void matmul_job(const ThreadPool& pool, const MatmulJob& j) {
  const Weight& w = *j.w;
  const int64_t K = w.cols, m = j.m;
  if (m <= 0 || w.rows <= 0) return;
  check_weight("matmul", w);
  if (K == 0) {  // an empty sum: 16 lanes of +0.0
    for (int64_t i = 0; i < m; ++i) std::fill(j.y + i * j.ldy, j.y + i * j.ldy + w.rows, 0.0f);
    return;
  }
  static thread_local Scratch xscratch;
  static thread_local std::vector<const float*> rows_tl;
  rows_tl.resize(m);
  const float** rows = rows_tl.data();  // (the workers' lambdas must not name a thread_local)
  const int64_t pad = x_pad_floats(j);
  float* xp = pad ? xscratch.get(pad) : nullptr;
  if (pad)
    pool.parallel_for(
        m, [&](int64_t b, int64_t e, int) { x_rows(j, b, e, rows, xp); },
        std::max<int64_t>(1, (64 << 10) / (round16(K) * 4)));
  else
    x_rows(j, 0, m, rows, nullptr);
  const float* const* x = rows;
  switch (w.dtype) {
    case DType::F32:
      return matmul_dtype<O, DType::F32>(pool, x, m, w, j.y, j.ldy);
    case DType::F16:
      return matmul_dtype<O, DType::F16>(pool, x, m, w, j.y, j.ldy);
    case DType::BF16:
      return matmul_dtype<O, DType::BF16>(pool, x, m, w, j.y, j.ldy);
    case DType::Q8:
      return matmul_dtype<O, DType::Q8>(pool, x, m, w, j.y, j.ldy);
    case DType::Q4:
      return matmul_dtype<O, DType::Q4>(pool, x, m, w, j.y, j.ldy);
    default:
      return matmul_dtype<O, DType::F8_E4M3>(pool, x, m, w, j.y, j.ldy);
  }
}

template <class O>
void matmul(const ThreadPool& pool, const float* x, int64_t m, int64_t ldx, const Weight& w,
            float* y, int64_t ldy) {
  matmul_job<O>(pool, MatmulJob{x, m, ldx, &w, y, ldy});
}

// ---- several small products in one fan-out

template <class O>
void gemv_range_any(const float* const* x, const MatmulJob& j, int64_t b, int64_t e) {
  switch (j.w->dtype) {
    case DType::F32:
      return gemv_range<O, DType::F32>(x, j.m, *j.w, b, e, j.y, j.ldy);
    case DType::F16:
      return gemv_range<O, DType::F16>(x, j.m, *j.w, b, e, j.y, j.ldy);
    case DType::BF16:
      return gemv_range<O, DType::BF16>(x, j.m, *j.w, b, e, j.y, j.ldy);
    case DType::Q8:
      return gemv_range<O, DType::Q8>(x, j.m, *j.w, b, e, j.y, j.ldy);
    case DType::Q4:
      return gemv_range<O, DType::Q4>(x, j.m, *j.w, b, e, j.y, j.ldy);
    default:
      return gemv_range<O, DType::F8_E4M3>(x, j.m, *j.w, b, e, j.y, j.ldy);
  }
}

template <class O>
void matmul_batch(const ThreadPool& pool, const MatmulJob* jobs, int64_t n) {
  // Jobs for the GEMV kernels, with the rows of x as they read them (aligned, zero-padded to
  // round16(K)); the others go through matmul one by one.
  std::vector<const MatmulJob*> small;
  std::vector<int64_t> first_row{0};  // of each small job in the concatenation of their rows
  std::vector<int64_t> first_x{0};    // of each small job's x rows in `rows`
  std::vector<int64_t> pads;          // floats of each small job's padded copy (x_pad_floats)
  int64_t pad_floats = 0;
  for (int64_t i = 0; i < n; ++i) {
    const MatmulJob& j = jobs[i];
    check_weight("matmul", *j.w);
    const bool gemv_ok = j.m <= gemv_max_m(j.w->dtype);
    if (j.m <= 0 || j.w->rows <= 0) continue;
    if (!gemv_ok || j.w->cols == 0) {
      matmul_job<O>(pool, j);
      continue;
    }
    pads.push_back(x_pad_floats(j));
    pad_floats += pads.back();
    small.push_back(&j);
    first_row.push_back(first_row.back() + j.w->rows);
    first_x.push_back(first_x.back() + j.m);
  }
  if (small.empty()) return;
  static thread_local Scratch xscratch;
  float* xp = pad_floats ? xscratch.get(pad_floats) : nullptr;
  std::vector<const float*> rows(first_x.back());
  for (size_t k = 0; k < small.size(); ++k) {
    x_rows(*small[k], 0, small[k]->m, rows.data() + first_x[k], pads[k] ? xp : nullptr);
    xp += pads[k];
  }
  // Pieces of the concatenated rows, taken by the threads as they come free; each row's result
  // is the same whichever thread computes it, and with whichever neighbours (kernels.h).
  const MatmulJob& j0 = *small.front();
  const int64_t piece = gemv_piece_rows(first_row.back(), row_bytes(j0.w->dtype, j0.w->cols),
                                        pool.size(), j0.w->dtype);
  parallel_pieces(pool, first_row.back(), piece, [&](int64_t b, int64_t e) {
    auto it = std::upper_bound(first_row.begin(), first_row.end(), b) - 1;
    for (size_t k = it - first_row.begin(); k < small.size() && first_row[k] < e; ++k) {
      const int64_t r0 = std::max(b, first_row[k]) - first_row[k];
      const int64_t r1 = std::min(e, first_row[k + 1]) - first_row[k];
      gemv_range_any<O>(rows.data() + first_x[k], *small[k], r0, r1);
    }
  });
}

// ---- vectors

template <class O, DType DT>
void dequant_row_dtype(const Weight& w, int64_t r, float* out) {
  const uint8_t* row = w_row(w, r);
  const float* sc = DT == DType::F8_E4M3 ? w_scales(w, r) : nullptr;
  const int64_t K = w.cols, kfull = K & ~int64_t{15};
  for (int64_t k = 0; k < kfull; k += 16)
    O::store(out + k, load_w<O, DT>(row, k, fp8_scale<O, DT>(sc, k)));
  if (kfull < K) {
    alignas(64) float tmp[16];
    O::store(tmp, load_w_tail<O, DT>(row, kfull, K - kfull, fp8_scale<O, DT>(sc, kfull)));
    std::memcpy(out + kfull, tmp, (K - kfull) * sizeof(float));
  }
}

// Q8, Q4: in plain element order (Q4 unpacks each 16 bytes' nibbles to their elements).
template <class O, DType DT>
void dequant_row_int(const Weight& w, int64_t r, float* out) {
  const uint8_t* row = w_row(w, r);
  const int64_t K = w.cols, gs = w.group_size;
  if constexpr (DT == DType::Q4) {
    alignas(64) float lo[16], hi[16];
    for (int64_t k = 0; k < K; k += 32) {
      typename O::V a, b;
      O::cvt_q4x2(row + k / 2, O::q4_prep(group_scale<O>(w, r, k / gs)), a, b);
      O::store(lo, a);
      O::store(hi, b);
      for (int j = 0; j < 16; ++j) {
        out[k + 2 * j] = lo[j];
        out[k + 2 * j + 1] = hi[j];
      }
    }
  } else {
    const int64_t kfull = K & ~int64_t{15};
    for (int64_t k = 0; k < kfull; k += 16)
      O::store(out + k, O::cvt_q8(row + k, O::q8_prep(group_scale<O>(w, r, k / gs))));
    if (kfull < K) {
      alignas(64) float tmp[16];
      O::store(tmp, load_w_tail<O, DT>(row, kfull, K - kfull,
                                       O::q8_prep(group_scale<O>(w, r, kfull / gs))));
      std::memcpy(out + kfull, tmp, (K - kfull) * sizeof(float));
    }
  }
}

template <class O>
void dequant_row(const Weight& w, int64_t r, float* out) {
  switch (w.dtype) {
    case DType::Q8:
      check_weight("dequant_row", w);
      return dequant_row_int<O, DType::Q8>(w, r, out);
    case DType::Q4:
      check_weight("dequant_row", w);
      return dequant_row_int<O, DType::Q4>(w, r, out);
    case DType::F32:
      return dequant_row_dtype<O, DType::F32>(w, r, out);
    case DType::F16:
      return dequant_row_dtype<O, DType::F16>(w, r, out);
    case DType::BF16:
      return dequant_row_dtype<O, DType::BF16>(w, r, out);
    case DType::F8_E4M3:
      return dequant_row_dtype<O, DType::F8_E4M3>(w, r, out);
    default:
      fail("dequant_row: unsupported weight dtype ", dtype_name(w.dtype));
  }
}

template <class O>
float dot(const float* a, const float* b, int64_t n) {
  typename O::V acc = O::zero();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) acc = O::fma(O::load(a + k), O::load(b + k), acc);
  if (k < n) {
    alignas(64) float ta[16] = {}, tb[16] = {};
    std::memcpy(ta, a + k, (n - k) * sizeof(float));
    std::memcpy(tb, b + k, (n - k) * sizeof(float));
    acc = O::fma(O::load(ta), O::load(tb), acc);
  }
  return O::reduce(acc);
}

template <class O>
void axpy(float a, const float* x, float* y, int64_t n) {
  const typename O::V av = O::set1(a);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) O::store(y + k, O::fma(av, O::load(x + k), O::load(y + k)));
  for (; k < n; ++k) y[k] = std::fma(a, x[k], y[k]);
}

// G x NB dot products at once (a's rows against b's): independent accumulator chains, each
// dot's own order. One load of an a chunk serves NB rows of b. With `pf`, it also prefetches the
// same columns of the NB rows pf[0..NB) into L2, one cache line per step.
template <class O, int G, int NB>
void dots_g(const float* a, int64_t lda, const float* const* b, int64_t boff, int64_t n, float* out,
            int64_t ldo, const float* const* pf) {
  using V = typename O::V;
  V acc[G][NB];
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = O::zero();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    V bv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) bv[j] = O::load_reg(b[j] + boff + k);
    if (pf)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) __builtin_prefetch(pf[j] + boff + k, 0, 2);
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) {
      const V av = O::load_reg(a + i * lda + k);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = O::fma(av, bv[j], acc[i][j]);
    }
  }
  if (k < n) {  // the contract's zero padding
    alignas(64) float ta[16] = {}, tb[NB][16] = {};
    for (int j = 0; j < NB; ++j) std::memcpy(tb[j], b[j] + boff + k, (n - k) * sizeof(float));
    for (int i = 0; i < G; ++i) {
      std::memcpy(ta, a + i * lda + k, (n - k) * sizeof(float));
      for (int j = 0; j < NB; ++j) acc[i][j] = O::fma(O::load(ta), O::load(tb[j]), acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) out[i * ldo + j] = O::reduce(acc[i][j]);
}

// All na rows of a against NB rows of b, kG rows of a per pass: the NB rows are read from
// memory once (by the first pass, which also prefetches `pf`) and from L1 after.
template <class O, int NB>
void dots_heads(const float* a, int64_t na, int64_t lda, const float* const* b, int64_t boff,
                int64_t n, float* out, int64_t ldo, const float* const* pf) {
  constexpr int kG = O::kDotHeads;
  int64_t i = 0;
  for (; i + kG <= na; i += kG, pf = nullptr)
    dots_g<O, kG, NB>(a + i * lda, lda, b, boff, n, out + i * ldo, ldo, pf);
  if (kG > 4 && na - i >= 4) {
    dots_g<O, 4, NB>(a + i * lda, lda, b, boff, n, out + i * ldo, ldo, pf);
    i += 4;
    pf = nullptr;
  }
  for (; i < na; ++i, pf = nullptr)
    dots_g<O, 1, NB>(a + i * lda, lda, b, boff, n, out + i * ldo, ldo, pf);
}

// Rows of b outermost, two at a time: a's rows (the query heads) stay in L1 while b's rows (the
// cached tokens, read from memory) stream past once, each pair prefetched into L2 four pairs ahead.
template <class O>
void dots(const float* a, int64_t na, int64_t lda, const float* const* b, int64_t nb, int64_t boff,
          int64_t n, float* out, int64_t ldo) {
  constexpr int64_t kAhead = 8;
  int64_t j = 0;
  for (; j + 2 <= nb; j += 2)
    dots_heads<O, 2>(a, na, lda, b + j, boff, n, out + j, ldo,
                     j + kAhead + 2 <= nb ? b + j + kAhead : nullptr);
  if (j < nb) dots_heads<O, 1>(a, na, lda, b + j, boff, n, out + j, ldo, nullptr);
}

constexpr int64_t kWeightedAhead = 32;

// weighted_rows for G outputs and columns [k, k + 16 * NV): matmul_t's tile, its "weight rows"
// the cached rows; G x NV accumulators live in registers while the rows stream past.
template <class O, int G, int NV>
void weighted_rows_g(const float* c, int64_t ldc, const float* const* rows, int64_t nrows,
                     int64_t roff, int64_t k, float* y, int64_t ldy) {
  trans_tile_with<O, G, NV>(
      c, ldc, nrows,
      [&](int64_t j, typename O::V* x) {
        if (j + kWeightedAhead < nrows)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v)
            __builtin_prefetch(rows[j + kWeightedAhead] + roff + k + 16 * v);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) x[v] = O::load_reg(rows[j] + roff + k + 16 * v);
      },
      y + k, ldy, 16 * NV);
}

template <class O, int G>
void weighted_rows_cols(const float* c, int64_t ldc, const float* const* rows, int64_t nrows,
                        int64_t roff, int64_t n, float* y, int64_t ldy) {
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) weighted_rows_g<O, G, 2>(c, ldc, rows, nrows, roff, k, y, ldy);
  for (; k + 16 <= n; k += 16) weighted_rows_g<O, G, 1>(c, ldc, rows, nrows, roff, k, y, ldy);
  for (; k < n; ++k)
    for (int i = 0; i < G; ++i) {
      float s = 0.0f;
      for (int64_t j = 0; j < nrows; ++j) s = std::fma(c[i * ldc + j], rows[j][roff + k], s);
      y[i * ldy + k] = s;
    }
}

template <class O>
void weighted_rows(const float* c, int64_t nc, int64_t ldc, const float* const* rows, int64_t nrows,
                   int64_t roff, int64_t n, float* y, int64_t ldy) {
  int64_t i = 0;
  for (; i + 8 <= nc; i += 8)
    weighted_rows_cols<O, 8>(c + i * ldc, ldc, rows, nrows, roff, n, y + i * ldy, ldy);
  if (nc - i >= 4) {
    weighted_rows_cols<O, 4>(c + i * ldc, ldc, rows, nrows, roff, n, y + i * ldy, ldy);
    i += 4;
  }
  for (; i < nc; ++i)
    weighted_rows_cols<O, 1>(c + i * ldc, ldc, rows, nrows, roff, n, y + i * ldy, ldy);
}

// Columns [k, k + 16 * NV) of weighted_sum: NV accumulators stay in registers while the rows
// stream past.
template <class O, int NV>
void weighted_sum_cols(const float* const* rows, const float* w, int64_t n, int64_t k, float* y) {
  using V = typename O::V;
  V acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = O::zero();
  for (int64_t j = 0; j < n; ++j) {
    const V wv = O::set1(w[j]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = O::add_mul(acc[v], O::load(rows[j] + k + 16 * v), wv);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) O::store(y + k + 16 * v, acc[v]);
}

template <class O>
void weighted_sum(const float* const* rows, const float* w, int64_t n, int64_t cols, float* y) {
  int64_t k = 0;
  for (; k + 64 <= cols; k += 64) weighted_sum_cols<O, 4>(rows, w, n, k, y);
  for (; k + 16 <= cols; k += 16) weighted_sum_cols<O, 1>(rows, w, n, k, y);
  for (; k < cols; ++k) {
    float acc = 0.0f;
    for (int64_t j = 0; j < n; ++j) acc = acc + rows[j][k] * w[j];
    y[k] = acc;
  }
}

// ---- softmax (kernels.h; reference::exp_lanes and reference::softmax write it out)

template <class O>
typename O::V exp_lanes(typename O::V t) {
  using V = typename O::V;
  using namespace exp_poly;
  const V magic = O::set1(kMagic);
  t = O::max(O::set1(kMin), t);  // a NaN stays NaN
  const V z = O::add_mul(magic, t, O::set1(kLog2e));
  const V n = O::add_mul(z, magic, O::set1(-1.0f));  // round(t / ln 2), exactly
  V r = O::fma(n, O::set1(kLn2Hi), t);
  r = O::fma(n, O::set1(kLn2Lo), r);
  V p = O::set1(kC[7]);
  for (int i = 6; i >= 0; --i) p = O::fma(p, r, O::set1(kC[i]));
  return O::mul(p, O::pow2(n));
}

template <class O>
void softmax(float* x, int64_t n, float scale) {
  using V = typename O::V;
  if (n <= 0) return;
  const V sv = O::set1(scale);
  const int64_t nf = n & ~int64_t{15};
  alignas(64) float tail[16];
  auto load_tail = [&] {
    for (int64_t l = 0; l < 16; ++l) tail[l] = nf + l < n ? x[nf + l] : 0.0f;
  };
  V mv = O::set1(-INFINITY);
  for (int64_t k = 0; k < nf; k += 16) {
    const V t = O::mul(O::load(x + k), sv);
    O::store(x + k, t);
    mv = O::max(mv, t);
  }
  if (nf < n) {
    load_tail();
    const V t = O::mul(O::load(tail), sv);
    O::store(tail, t);
    for (int64_t l = 0; nf + l < n; ++l) x[nf + l] = tail[l];
    for (int64_t l = n - nf; l < 16; ++l) tail[l] = -INFINITY;
    mv = O::max(mv, O::load(tail));
  }
  alignas(64) float lanes[16];
  O::store(lanes, mv);
  float m = lanes[0];
  for (int l = 1; l < 16; ++l) m = lanes[l] > m ? lanes[l] : m;
  const V mm = O::set1(m), neg = O::set1(-1.0f), one = O::set1(1.0f);
  V acc = O::zero();
  for (int64_t k = 0; k < nf; k += 16) {
    const V e = exp_lanes<O>(O::add_mul(O::load(x + k), mm, neg));
    O::store(x + k, e);
    acc = O::add_mul(acc, e, one);
  }
  if (nf < n) {
    load_tail();
    O::store(tail, exp_lanes<O>(O::add_mul(O::load(tail), mm, neg)));
    for (int64_t l = n - nf; l < 16; ++l) tail[l] = 0.0f;  // the contract's padding
    for (int64_t l = 0; nf + l < n; ++l) x[nf + l] = tail[l];
    acc = O::add_mul(acc, O::load(tail), one);
  }
  const float inv = 1.0f / O::reduce(acc);
  const V iv = O::set1(inv);
  for (int64_t k = 0; k < nf; k += 16) O::store(x + k, O::mul(O::load(x + k), iv));
  for (int64_t k = nf; k < n; ++k) x[k] = x[k] * inv;
}

template <class O>
void matmul_bf16(const ThreadPool& pool, const MatmulJob* jobs, int64_t n);  // matmul_bf16.h

template <class O>
const KernelTable& make_table() {
  static const KernelTable t{&matmul<O>,       &matmul_t<O>, &dequant_row<O>,   &dot<O>,
                             &axpy<O>,         &dots<O>,     &weighted_rows<O>, &matmul_batch<O>,
                             &weighted_sum<O>, &softmax<O>,  &dots_cached<O>,   &weighted_cached<O>,
                             &matmul_bf16<O>};
  return t;
}

}  // namespace
}  // namespace moeserve::kernels

#include "kernels/cpu/matmul_bf16.h"  // needs check_weight and x_row above
