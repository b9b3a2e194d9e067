// Compute kernels of the CPU backend. Every kernel has a slow, obvious twin in
// kernels/reference/ that the tests hold it to.
//
// Numerical contract (what makes outputs independent of batch size, thread count and ISA):
// a dot product over K elements is accumulated in 16 lanes: lane l sums the products of the
// elements k = l, l+16, l+32, ... in increasing k with fused multiply-add, starting from +0.0;
// elements past K count as 0 * 0. The 16 lanes are then reduced by the fixed tree
//   for s in 8, 4, 2, 1: lane[l] = lane[l] + lane[l + s]  (l < s)
// and lane[0] is the result. A weight element enters as a float: bf16/f16/f32 exactly. For fp8
// e4m3 the product is float(fp8) (exact) times x * scale_inv (rounded once), scale_inv that of
// the weight's 128x128 block: the scale goes to the activation, once per 128 weight rows,
// rather than to every weight. Integer weights (Q8, Q4: see Weight) enter as float(q) * scale,
// the product rounded once (exact for bf16 and f16 scales, as published). Q4 takes its products
// in the order it stores them: within each chunk of 32 elements [32c, 32c + 32), lane j takes
// element 32c + 2j, then 32c + 2j + 1 (the plain order would give it 32c + j, then 32c + 16 +
// j) -- the 16-lane sum of x and W both permuted within each chunk. (matmul_t, below, has its
// own contract.) The scalar, AVX2 and AVX-512 implementations all follow this contract and
// agree bit for bit.
#pragma once

#include <cstdint>

#include "core/cpu_features.h"
#include "core/dtype.h"
#include "core/thread_pool.h"

namespace moeserve::kernels {

inline constexpr int kLanes = 16;
inline constexpr int kFp8Block = 128;

// A weight matrix as a checkpoint stores it: row-major [rows, cols] (torch Linear: [out, in]).
struct Weight {
  DType dtype = DType::F32;    // F32, F16, BF16, F8_E4M3, Q8 or Q4
  const void* data = nullptr;  // [rows, cols] of dtype; row r at data + row_bytes(dtype, cols) * r
  int64_t rows = 0, cols = 0;
  // F8_E4M3 only: [ceil(total_rows/128), scale_cols] float32, block (r/128, c/128) scales
  // element (r, c). `scale_row0` is the row of the full matrix that row 0 of this view is, so
  // a view of some rows still finds its scales.
  const float* scale_inv = nullptr;
  int64_t scale_cols = 0;  // ceil(cols / 128)
  int64_t scale_row0 = 0;
  // F8_E4M3 only: the data holds no NaN byte (see fp8_plain), so the kernels may take their
  // fast conversion. The results are the same bits either way.
  bool fp8_plain = false;
  // Q8 and Q4 (compressed-tensors pack-quantized, symmetric): element (r, c) is the integer q
  // times group_scale[r, c / group_size]. The integers are stored as q + 2^(bits-1) (0..255 or
  // 0..15), packed densely into little-endian int32 words: Q8 one byte each, in order; Q4 two
  // per byte, element 2b in the low nibble of byte b of its row and 2b + 1 in the high one.
  // Q4 needs cols % 32 == 0; group_size is a multiple of 32 (Q4) or 16 (Q8). A view of some
  // rows points group_scale at its first row's scales.
  const void* group_scale = nullptr;      // [rows, group_cols] of group_scale_dtype
  DType group_scale_dtype = DType::BF16;  // BF16, F16 or F32
  int64_t group_size = 0;
  int64_t group_cols = 0;  // ceil(cols / group_size)

  // Rows [r0, r0 + n) of this matrix as a matrix of its own.
  Weight rows_view(int64_t r0, int64_t n) const;
  // The float value of element (r, c), by the contract above.
  float at(int64_t r, int64_t c) const;
  size_t bytes() const;  // bytes of data (+ scales) this view covers
};

// How a weight product computes (the --precision setting).
//   Exact: the contract above.
//   Bf16: the activations entering the product are rounded to bf16, and the product follows
//   the bf16 contract, which the AVX512-BF16 dot-product instruction (vdpbf16ps) computes:
//   - x[k] enters as bf16_round(x[k]) (kernels/bf16_math.h: nearest even; a subnormal f32 is
//     the zero of its sign). fp8 weights: bf16_round(x[k] * scale_inv) with the product
//     x * scale_inv rounded to f32 first -- the scale still goes to the activation.
//   - W[n, k] enters as bf16: bf16 as stored (a subnormal as the zero of its sign), fp8 e4m3
//     exactly (every e4m3 value is a normal bf16), f32 and f16 rounded by bf16_round.
//   - K is padded with zeros to a multiple of 32. Lane l (of 16) takes the pairs of elements
//     (32c + 2l, 32c + 2l + 1) for c = 0, 1, ... in order, from +0.0, each pair as two steps,
//     the odd element first: acc = bf16_step(acc, x[32c + 2l + 1], W[n, 32c + 2l + 1]), then
//     the same for 32c + 2l. bf16_step (bf16_math.h) is an FMA (the bf16 product is exact)
//     whose subnormal inputs count as zero and whose tiny results become zero.
//   - Then the exact contract's tree 8, 4, 2, 1 (plain adds) gives the result.
//   Q8 and Q4 weights, and every kernel but matmul / matmul_rows / matmul_batch, compute as
//   Exact whatever the precision.
enum class Precision : uint8_t { Exact, Bf16 };
// The instruction set the kernels run on: detected_isa(), except that a CPU whose vdpbf16ps
// does not compute the bf16 contract (checked once) runs Avx512.
Isa active_isa();
const char* precision_name(Precision p);  // "exact", "bf16"
// Whether a product of w under precision p takes the bf16 contract.
bool takes_bf16(const Weight& w, Precision p);
// The unit that bf16 products run on with the kernels chosen for this CPU ("avx512bf16" for
// vdpbf16ps, else the instruction set that emulates it by FMA), and the one exact ones run on.
const char* matmul_unit(Precision p);

// y[i, n] = sum_k x[i, k] * W[n, k]   for i < m, n < W.rows, k < W.cols
// x: [m, ldx] f32 (uses the first W.cols of each row); y: [m, ldy] f32 (writes W.rows of each).
// Every y element follows the 16-lane contract (or the bf16 one), whatever m and the thread
// count. x is read in place when its rows are 64-byte aligned (x aligned, ldx % 16 == 0) and
// K % 16 == 0; otherwise matmul first makes an aligned, zero-padded copy of it (m * K floats).
// (Bf16 always makes a bf16 copy of x, m * round32(K) values.)
void matmul(const ThreadPool& pool, const float* x, int64_t m, int64_t ldx, const Weight& w,
            float* y, int64_t ldy, Precision p = Precision::Exact);

// One matmul of a batch: y = x W^T as in matmul. Row i of x is x + i * ldx, or xrows[i] when
// xrows is set (rows that may lie anywhere: tokens gathered for an expert, read in place).
struct MatmulJob {
  const float* x = nullptr;
  int64_t m = 0, ldx = 0;
  const Weight* w = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
  const float* const* xrows = nullptr;
  Precision precision = Precision::Exact;
};

// matmul with row i of x at x[i] (read in place when 64-byte aligned and K % 16 == 0, like
// matmul's rows; the same bits as matmul on a copy of the rows).
void matmul_rows(const ThreadPool& pool, const float* const* x, int64_t m, const Weight& w,
                 float* y, int64_t ldy, Precision p = Precision::Exact);

// Every job's matmul, the same bits as calling matmul on each in turn. Jobs of few tokens
// (decode: one per expert matrix) share a single fan-out over all their rows, instead of one
// small fan-out each, so the threads stay busy and the weights stream without a break. The
// jobs' outputs must not overlap their inputs or each other.
void matmul_batch(const ThreadPool& pool, const MatmulJob* jobs, int64_t n);

// y[i, c] = sum_r x[i, r] * W[r, c]   (W transposed), summed over r = 0, 1, ... in order, one
// fused multiply-add each, starting from +0.0; an fp8 W[r, c] enters as float(fp8) * scale_inv
// rounded once.  x: [m, ldx] f32 (first W.rows of each row);
// y: [m, ldy] f32 (W.cols of each row). Not for Q8 / Q4 weights (an error).
void matmul_t(const ThreadPool& pool, const float* x, int64_t m, int64_t ldx, const Weight& w,
              float* y, int64_t ldy);

// Whether n bytes of e4m3 data may take the kernels' fast conversion: no NaN byte, and at most
// one subnormal in 1024 (the fast conversion turns those into f32 subnormals, which cost the
// multiply a microcode assist on some CPUs). Real and random checkpoints have ~1 in 10^4.
bool fp8_plain(const uint8_t* data, size_t n);

// Row r of W as floats: out[c] = W.at(r, c) for c < W.cols (Q4 too: plain element order).
void dequant_row(const Weight& w, int64_t r, float* out);

// sum_k a[k] * b[k] by the 16-lane contract.
float dot(const float* a, const float* b, int64_t n);

// y[k] = fma(a, x[k], y[k])
void axpy(float a, const float* x, float* y, int64_t n);

// out[i * ldo + j] = dot(a + i * lda, b[j] + boff, n) for i < na, j < nb: every dot product of
// several vectors against several others (attention: heads against cached rows, which may lie
// anywhere), worked on together with independent accumulators, each the same bits as dot.
void dots(const float* a, int64_t na, int64_t lda, const float* const* b, int64_t nb, int64_t boff,
          int64_t n, float* out, int64_t ldo);

// y[i * ldy + k] = sum_j c[i * ldc + j] * rows[j][roff + k]  for i < nc, k < n: over j = 0, 1, ...
// in order, one fused multiply-add each, starting from +0.0 -- the same bits as clearing y and
// calling axpy(c[i * ldc + j], rows[j] + roff, y + i * ldy, n) for each j in turn, without y going
// through memory for every row. `rows` may point anywhere (blocks of a paged cache).
void weighted_rows(const float* c, int64_t nc, int64_t ldc, const float* const* rows, int64_t nrows,
                   int64_t roff, int64_t n, float* y, int64_t ldy);

// Rows of a latent KV cache (kv/kv_pool.h) as the attention kernels read them in place: row j
// starts at rows[j]; `width` values per row, stored as `dtype` says:
//   F32:     width floats;
//   BF16:    width bf16 values; one enters as a float, exactly;
//   F8_E4M3: width e4m3 bytes, then ceil(width / 128) f32 scales (unaligned), scale b for the
//            values [128b, 128b + 128). A value enters as float(e4m3), exactly (no NaN byte);
//            its scale enters once per row and block, as below.
struct CachedRows {
  DType dtype = DType::F32;
  const uint8_t* const* rows = nullptr;
  int64_t width = 0;
};

// out[i * ldo + j] = the score of a's row i against cached row j over the row's whole width,
// for i < na, j < nb (a: [na, lda] f32, its first `width` values).
//   F32, BF16: dot(a + i * lda, row j as floats, width): the 16-lane contract.
//   F8_E4M3: per 128-value block b, 16 lane sums p_b[l] of fma(a[k], float(e4m3[k]), .) over
//   the block's k = l mod 16 in increasing k from +0.0 (past width: 0 * 0), then per lane
//   t[l] = fma(scale_b, p_b[l], t[l]) for b = 0, 1, ... from +0.0, then the contract's tree.
// Every ISA gives these bits, whatever else is in the call.
void dots_cached(const float* a, int64_t na, int64_t lda, const CachedRows& b, int64_t nb,
                 float* out, int64_t ldo);

// y[i * ldy + k] = sum_j w_ij * v_j[roff + k]  for i < nc, k < n (v_j: cached row j's values as
// floats): over j = 0, 1, ... in order, one fused multiply-add each, from +0.0 -- w_ij =
// c[i * ldc + j] (F32, BF16: weighted_rows' bits on the rows as floats), or for F8_E4M3
// c[i * ldc + j] * scale rounded once, the scale of row j's block of column roff + k.
void weighted_cached(const float* c, int64_t nc, int64_t ldc, const CachedRows& rows, int64_t nrows,
                     int64_t roff, int64_t n, float* y, int64_t ldy);

// y[k] = sum_j rows[j][k] * w[j]  for k < cols: over j = 0, 1, ... in order, as acc = acc +
// rows[j][k] * w[j] (a multiply, then an add: no FMA) from +0.0 -- the same bits as the plain
// loop compiled with -ffp-contract=off (MoE combine: a token's expert outputs, weighted).
void weighted_sum(const float* const* rows, const float* w, int64_t n, int64_t cols, float* y);

// In place: x[j] = e[j] / s for j < n, where t[j] = x[j] * scale (rounded), m = max t,
// e[j] = exp_lanes(t[j] - m) and s is the 16-lane sum of the e[j] (elements past n count as 0;
// the tree of the dot-product contract), the division a multiply by 1 / s. An attention row's
// softmax. exp_lanes (reference.h) is the kernels' own exp: a degree-6 polynomial after the
// reduction t = n ln 2 + r, within 2 ulp of exp, inputs below -87.33 taken as -87.33.
void softmax(float* x, int64_t n, float scale);

}  // namespace moeserve::kernels
