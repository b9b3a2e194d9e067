// Slow, obvious twins of the kernels in kernels.h, element by element through the scalar
// conversions of core/dtype.h. Used only by tests, to hold the fast kernels to.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"

namespace moeserve::kernels::reference {

// Element (r, c) of w as a float: float(fp8) * scale_inv of its 128x128 block for F8_E4M3,
// float(q) * its group's scale for Q8 / Q4.
float weight_value(const Weight& w, int64_t r, int64_t c);
// F8_E4M3: the scale_inv of element (r, c)'s 128x128 block.
float block_scale(const Weight& w, int64_t r, int64_t c);

// Q8, Q4: the integer q of element (r, c), unpacked as compressed-tensors packs it (int32
// words, little-endian, 32 / bits elements each, lowest bits first, stored as q + 2^(bits-1));
// the scale of its group.
int int_value(const Weight& w, int64_t r, int64_t c);
float group_scale(const Weight& w, int64_t r, int64_t c);
// The position of element c in the order the lanes take it: Q4's stored order (kernels.h:
// within each chunk of 32, the even elements, then the odd ones), c itself otherwise.
int64_t stored_position(const Weight& w, int64_t c);

// out: [w.rows, w.cols] f32, every element by weight_value.
void dequant(const Weight& w, float* out);

// y[i, n] = sum_k x[i, k] * W[n, k] as one float accumulator, k = 0, 1, ... (a * b then +).
// Not the 16-lane order of the fast kernel: compare with a tolerance (see matmul_abs).
// x: [m, ldx] f32; y: [m, ldy] f32.
void matmul(const float* x, int64_t m, int64_t ldx, const Weight& w, float* y, int64_t ldy);

// y[i, n] = sum_k |x[i, k] * W[n, k]| (in double): the size of the rounding-error bounds.
void matmul_abs(const float* x, int64_t m, int64_t ldx, const Weight& w, double* y, int64_t ldy);

// The 16-lane contract of kernels.h written out: lane k % 16 takes fma(x, w, lane) for k in
// increasing order (fp8: fma(x * scale, float(fp8), lane)), K padded to a multiple of 16 with
// 0 * 0, then the tree 8, 4, 2, 1. Q4: x and W both in stored order (stored_position).
// Must equal the fast matmul bit for bit.
void matmul_lanes(const float* x, int64_t m, int64_t ldx, const Weight& w, float* y, int64_t ldy);
float dot_lanes(const float* a, const float* b, int64_t n);

// The bf16 contract of kernels.h (Precision::Bf16) written out element by element with
// bf16_math.h: x and W rounded to bf16 as it says, 16 lanes of pairs (odd element first),
// then the tree. Q8 / Q4 weights: matmul_lanes. Must equal the fast matmul bit for bit.
void matmul_bf16(const float* x, int64_t m, int64_t ldx, const Weight& w, float* y, int64_t ldy);

// y[i, c] = sum_r x[i, r] * W[r, c], one std::fma per r in increasing order from +0.0: the
// contract of matmul_t, so equal to it bit for bit.  x: [m, ldx]; y: [m, ldy].
void matmul_t(const float* x, int64_t m, int64_t ldx, const Weight& w, float* y, int64_t ldy);

// The kernels' exp (kernels.h, softmax), one float at a time: t' = max(-87.33654, t);
// n = (1.5 * 2^23 + t' * log2(e)) - 1.5 * 2^23 (each step rounded); r = t' - n * 0.693359375
// + n * 2.12194440e-4 (two FMAs); p = the degree-7 polynomial of Cephes' expf in r by Horner's
// rule with FMAs; the result p * 2^n.
float exp_lanes(float t);

// kernels::softmax written out: t[j] = x[j] * scale, m = max t, e[j] = exp_lanes(t[j] - m),
// s = 16-lane sum (lane j % 16, in order, then the tree 8, 4, 2, 1), x[j] = e[j] * (1 / s).
void softmax(float* x, int64_t n, float scale);

// kernels::dots_cached and kernels::weighted_cached written out value by value (a stored value
// through core/dtype.h's conversions): must equal them bit for bit.
float cached_value(const CachedRows& r, int64_t j, int64_t k);  // float(stored), no scale
float cached_scale(const CachedRows& r, int64_t j, int64_t k);  // fp8: k's block scale, else 1
void dots_cached(const float* a, int64_t na, int64_t lda, const CachedRows& b, int64_t nb,
                 float* out, int64_t ldo);
void weighted_cached(const float* c, int64_t nc, int64_t ldc, const CachedRows& rows, int64_t nrows,
                     int64_t roff, int64_t n, float* y, int64_t ldy);

}  // namespace moeserve::kernels::reference
