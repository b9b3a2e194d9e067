// kernels.h for AVX-512 (F, BW, VL, DQ): a 16-lane accumulator is one zmm register.
// GCC 12's own avx512fintrin.h trips -W(maybe-)uninitialized in _mm512_undefined_* once inlined
// (GCC bug 105593); nothing in this file is affected.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include "kernels/cpu/impl.h"

namespace moeserve::kernels {
namespace {

struct Avx512 {
  using V = __m512;
  static constexpr bool kFp8Direct = true;
  static constexpr int kDotHeads = 8;  // dots: rows of a per pass (x 2 rows of b)
  static constexpr int kDotHeadsFp8 = 4, kDotRowsFp8 = 2;  // the same for fp8 rows
  static constexpr int kSumHeadsFp8 = 6,
                       kSumColsFp8 = 4;           // weighted_cached, fp8: outputs x 16 columns
  static constexpr int kTileM = 4, kTileN = 6;    // 24 accumulators
  static constexpr int kTileTM = 4, kTileTN = 6;  // 24 accumulators
  static constexpr int gemv_rows(int m) {
    return m == 1 ? 8 : m == 2 ? 6 : m <= 4 ? 4 : m <= 6 ? 3 : 2;
  }

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  // A load into a register that the compiler may not fold into each use (an operand reused by
  // several FMAs is cheaper loaded once than once per FMA).
  static V load_reg(const float* p) {
    V v = _mm512_loadu_ps(p);
    asm("" : "+v"(v));
    return v;
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add_mul(V a, V b, V c) { return _mm512_add_ps(a, _mm512_mul_ps(b, c)); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }  // a > b ? a : b
  static V pow2(V n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static bool below_2p8(V v) {  // every |lane| < 2^8 (NaN is not)
    return _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(256.0f), _CMP_LT_OQ) == 0xffff;
  }

  // lane[l] += lane[l + s] for s = 8, 4, 2, 1; lane 0.
  static float reduce(V v) {
    const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
  }

  static V cvt_bf16(const uint16_t* p) {
    const __m512i u =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  static V cvt_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // e4m3 byte b -> f16 bits (b & 0x80) << 8 | (b & 0x7f) << 7, which is exactly value * 2^-8
  // (sign-extend, shift, clear bit 14); then one rounding in the multiply by scale * 256.
  static __m256i fp8_to_f16x16(__m128i b) {
    return _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7),
                            _mm256_set1_epi16(static_cast<short>(0xbfff)));
  }
  static V cvt_fp8_nonan(const uint8_t* p, V s256) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_mul_ps(_mm512_cvtph_ps(fp8_to_f16x16(b)), s256);
  }
  static void cvt_fp8x2_nonan(const uint8_t* p, V s256, V& lo, V& hi) {
    const __m512i b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i h =
        _mm512_and_si512(_mm512_slli_epi16(b, 7), _mm512_set1_epi16(static_cast<short>(0xbfff)));
    lo = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), s256);
    hi = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), s256);
  }
  // e4m3 byte b -> the f32 with bits (b & 0x80) << 24 | (b & 0x7f) << 20, which is exactly
  // value * 2^-120 (exponent field e, e4m3 subnormals become f32 subnormals); times
  // s = scale * 2^120 (exact while scale < 2^8) that is float(fp8) * scale rounded once.
  // Three operations per 16 weights against five through f16. Not for NaN bytes.
  // cvt_fp8_raw stops before the product: float(fp8) * 2^-120 exactly.
  static V cvt_fp8_raw(const uint8_t* p) {
    const __m512i d = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(d, 20),
                                                _mm512_set1_epi32(static_cast<int>(0x87f00000u))));
  }
  static V cvt_fp8_direct(const uint8_t* p, V s) { return _mm512_mul_ps(cvt_fp8_raw(p), s); }
  // NaN scan: 0x7f / 0xff are NaN in e4m3fn, i.e. b | 0x80 == 0xff; a running unsigned max of
  // b | 0x80 over 128-byte blocks has a 0xff byte iff one of them holds a NaN.
  using NanAcc = __m512i;
  static NanAcc nan_init() { return _mm512_setzero_si512(); }
  static NanAcc nan_scan128(NanAcc acc, const uint8_t* p) {
    const __m512i top = _mm512_set1_epi8(static_cast<char>(0x80));
    acc = _mm512_max_epu8(acc, _mm512_or_si512(_mm512_loadu_si512(p), top));
    return _mm512_max_epu8(acc, _mm512_or_si512(_mm512_loadu_si512(p + 64), top));
  }
  static bool nan_found(NanAcc acc) {
    return _mm512_cmpeq_epi8_mask(acc, _mm512_set1_epi8(-1)) != 0;
  }
  // Integer weights (kernels.h, Weight). A Q4 group's 16 possible values (u - 8) * scale, one
  // per nibble u, are computed once per group; vpermps then looks each weight up by its nibble
  // (it reads only the low 4 bits of each index, so the bytes need no mask).
  static float f16(uint16_t h) { return _cvtsh_ss(h); }
  static V q4_u8() {
    return _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  }
  static V q4_prep(float scale) { return _mm512_mul_ps(_mm512_set1_ps(scale), q4_u8()); }
  // q8_prep / q4_prep of the bf16 scale at p, with one logic op that takes its operand
  // broadcast from memory: the 4 bytes from p - 1 (the scale in their high half), the low half
  // cleared.
  static constexpr bool kPrepBf16 = true;
  static V q8_prep_bf16(const uint16_t* p) {
    int32_t d;
    std::memcpy(&d, p - 1, 4);
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_set1_epi32(d), _mm512_set1_epi32(-65536)));
  }
  static V q4_prep_bf16(const uint16_t* p) { return _mm512_mul_ps(q8_prep_bf16(p), q4_u8()); }
  // 16 bytes: their low nibbles (lo) and high nibbles (hi) as weights.
  static void cvt_q4x2(const uint8_t* p, V table, V& lo, V& hi) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_permutexvar_ps(d, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table);
  }
  static V cvt_q4(const uint8_t* p, int half, V table) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_permutexvar_ps(half ? _mm512_srli_epi32(d, 4) : d, table);
  }
  static V q8_prep(float scale) { return _mm512_set1_ps(scale); }
  // cvt_q8 with one FMA, c = -128 * scale: float(u) * scale is exact inside the FMA and c is
  // exact while |scale| < 2^120, so the sum is (u - 128) * scale rounded once, the same value
  // (a zero weight may come out +0 where cvt_q8 gives -0, which no dot product sees: its
  // accumulator starts at +0 and never becomes -0). q8_fma_ok: whether the scale allows it.
  static constexpr bool kQ8Fma = true;
  static bool q8_fma_ok(V scale) {
    return _mm512_cmp_ps_mask(_mm512_abs_ps(scale), _mm512_set1_ps(0x1p120f), _CMP_LT_OQ) == 0xffff;
  }
  static V cvt_q8_fma(const uint8_t* p, V scale, V c) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, c);
  }
  // 16 bytes u: float(u - 128) * scale.
  static V cvt_q8(const uint8_t* p, V scale) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, _mm512_set1_epi32(128))), scale);
  }
  // bf16 products (matmul_bf16.h), emulated: lane l's pair as two FMAs (odd element first),
  // exact only with the MXCSR's FTZ and DAZ bits set (Ftz), which makes an FMA flush tiny
  // results and subnormal inputs as vdpbf16ps does.
  static constexpr int kBTileM = 4, kBTileN = 4;  // 16 accumulators, 2 registers per operand
  struct PB {
    __m512 even, odd;
  };
  static PB load_pb(const uint16_t* p) {
    const __m512i d = _mm512_loadu_si512(p);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(d, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(d, _mm512_set1_epi32(-65536)))};
  }
  static V dp(V acc, const PB& x, const PB& w) {
    return _mm512_fmadd_ps(x.even, w.even, _mm512_fmadd_ps(x.odd, w.odd, acc));
  }
  using Ftz = FtzDazScope;
  // Keeps v's computation on its side of the Ftz scope's ends.
  static void fence(V& v) { asm volatile("" : "+v"(v)); }
  // 32 NaN-free e4m3 bytes as bf16 (exact): a normal value moves its exponent and mantissa
  // into place and rebiases the exponent (+120); zero and the subnormals (m * 2^-9) come from a
  // table, with their sign.
  static constexpr bool kFp8Bf16 = true;
  static void fp8_bf16x32(const uint8_t* p, uint16_t* out) {
    _mm512_storeu_si512(out, fp8_bf16_reg(p));
  }
  // load_pb of fp8_bf16x32's result, without the trip through memory.
  static PB load_pb_fp8(const uint8_t* p) {
    const __m512i d = fp8_bf16_reg(p);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(d, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(d, _mm512_set1_epi32(-65536)))};
  }
  static __m512i fp8_bf16_reg(const uint8_t* p) {
    const __m512i b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i sign = _mm512_and_si512(b, _mm512_set1_epi16(static_cast<short>(0x8000)));
    __m512i r = _mm512_add_epi16(
        _mm512_and_si512(_mm512_slli_epi16(b, 4), _mm512_set1_epi16(static_cast<short>(0x87f0))),
        _mm512_set1_epi16(0x3c00));
    // bf16 of m * 2^-9 for m = 0..7 (the table's other entries are never picked)
    const __m512i sub =
        _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                         0x3c60, 0x3c40, 0x3c20, 0x3c00, 0x3bc0, 0x3b80, 0x3b00, 0);
    const __mmask32 small = _mm512_testn_epi16_mask(b, _mm512_set1_epi16(0x78));
    r = _mm512_mask_mov_epi16(
        r, small,
        _mm512_or_si512(sign,
                        _mm512_permutexvar_epi16(_mm512_and_si512(b, _mm512_set1_epi16(7)), sub)));
    return r;
  }
  // bf16_round of 16 floats.
  static void round_bf16x16(const float* p, uint16_t* out) {
    const __m512i u = _mm512_loadu_si512(p);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __mmask16 sub = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                 _mm512_and_si512(hi, _mm512_set1_epi32(1)));
    r = _mm512_srli_epi32(r, 16);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
    r = _mm512_mask_mov_epi32(r, sub, _mm512_and_si512(hi, _mm512_set1_epi32(0x8000)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
  }

  // NaN-exact: NaN bytes become the quiet NaN of their sign.
  static V cvt_fp8(const uint8_t* p, V s256) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    V f = _mm512_cvtph_ps(fp8_to_f16x16(b));
    const __mmask16 nan =
        _mm_cmpeq_epi8_mask(_mm_and_si128(b, _mm_set1_epi8(0x7f)), _mm_set1_epi8(0x7f));
    if (__builtin_expect(nan != 0, 0)) {
      const __m512i sign = _mm512_and_si512(_mm512_castps_si512(f), _mm512_set1_epi32(INT32_MIN));
      f = _mm512_mask_mov_ps(
          f, nan, _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_set1_epi32(0x7fc00000))));
    }
    return _mm512_mul_ps(f, s256);
  }
};

// Avx512 with the fp8 GEMV's conversion of 64 bytes at once. The avx512bf16 level's exact
// products run on it (bf16_table), so that MOESERVE_ISA=avx512 still tests the GEMV without it
// on the same CPU; every CPU with AVX512-BF16 but Cooper Lake has VBMI, and without it
// (fp8_quad_ok) the GEMV takes cvt_fp8_raw.
struct Avx512Vbmi : Avx512 {
  // cvt_fp8_raw of the chunks [0, 16), [16, 32), [32, 48), [48, 64) of 64 NaN-free e4m3 bytes
  // (f0 .. f3), in 1.5 shuffle or shift operations per 16 weights against cvt_fp8_raw's two:
  // what bounds the m = 1 GEMV on CPUs that run 512-bit shuffles and shifts on two of their
  // four vector pipes (Zen 4). One byte permute (vpermb, AVX512-VBMI: fp8_quad_ok) puts element
  // j of chunk t into byte t of dword j; an arithmetic shift of the 16-bit halves by 4 turns the
  // high byte b of each half into (b & 0x80) << 8 | (b & 0x7f) << 4, with copies of the sign in
  // bits 14..11 and the low byte's high nibble in bits 3..0, which the mask clears: bytes 3 and 1
  // that way, bytes 2 and 0 after a shift of the dword by 8; the low halves' results then move
  // up by 16. The same bits as cvt_fp8_raw.
  // vpermb is written as assembly: this file is built without -mavx512vbmi, and runs it only
  // where the CPU has it.
  static constexpr bool kFp8Quad = true;
  static bool fp8_quad_ok() {
    static const bool ok = [] {
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512vbmi") != 0;
    }();
    return ok;
  }
  static void cvt_fp8x4_raw(const uint8_t* p, V& f0, V& f1, V& f2, V& f3) {
    // dword j of the permuted bytes: elements j, 16 + j, 32 + j, 48 + j, low byte first.
    const __m512i idx = _mm512_set_epi8(
        63, 47, 31, 15, 62, 46, 30, 14, 61, 45, 29, 13, 60, 44, 28, 12, 59, 43, 27, 11, 58, 42, 26,
        10, 57, 41, 25, 9, 56, 40, 24, 8, 55, 39, 23, 7, 54, 38, 22, 6, 53, 37, 21, 5, 52, 36, 20,
        4, 51, 35, 19, 3, 50, 34, 18, 2, 49, 33, 17, 1, 48, 32, 16, 0);
    __m512i d = _mm512_loadu_si512(p);
    asm("vpermb %1, %2, %0" : "=v"(d) : "v"(d), "v"(idx));
    const __m512i m = _mm512_set1_epi32(static_cast<int>(0x87f00000u));
    const __m512i r31 = _mm512_srai_epi16(d, 4);                        // bytes 3, 1
    const __m512i r20 = _mm512_srai_epi16(_mm512_slli_epi32(d, 8), 4);  // bytes 2, 0
    f0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(r20, 16), m));
    f1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(r31, 16), m));
    f2 = _mm512_castsi512_ps(_mm512_and_si512(r20, m));
    f3 = _mm512_castsi512_ps(_mm512_and_si512(r31, m));
  }
};

// The same kernels with bf16 products on vdpbf16ps: a pair of elements per lane in one
// instruction, which computes exactly the contract's two steps (it ignores the MXCSR and always
// flushes as bf16_step does). bf16_unit_ok checks that on the running CPU.
struct Avx512Bf16 : Avx512 {
  static constexpr int kBTileM = 4, kBTileN = 6;  // 24 accumulators
  using PB = __m512i;
  static PB load_pb(const uint16_t* p) { return _mm512_loadu_si512(p); }
  static PB load_pb_fp8(const uint8_t* p) { return fp8_bf16_reg(p); }
  // 32 NaN-free e4m3 bytes as the bf16 bits of float(fp8) * 2^-120, exactly (sign, then the
  // byte's exponent and mantissa in place: three operations). A normal e4m3 value gives a
  // normal bf16; a subnormal one a bf16 subnormal, which the unit would take as zero: `sub`
  // flags those (bytes with exponent 0 and mantissa not 0), and the caller takes another path.
  static constexpr bool kFp8Raw = true;
  static PB load_pb_fp8_raw(const uint8_t* p, uint32_t& sub) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    sub = _mm256_mask_test_epi8_mask(_mm256_testn_epi8_mask(b, _mm256_set1_epi8(0x78)), b,
                                     _mm256_set1_epi8(0x07));
    return _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(b), 4),
                            _mm512_set1_epi16(static_cast<short>(0x87f0)));
  }
  // out = in * 2^120 for n (a multiple of 32) bf16 values as bf16_round gives them (zeros and
  // normals): exact, and finite, unless some |in| >= 2^8 (or is Inf / NaN): then false.
  static bool bf16_up120(const uint16_t* in, uint16_t* out, int64_t n) {
    const __m512i e = _mm512_set1_epi16(0x7f80), lim = _mm512_set1_epi16(134 << 7),
                  up = _mm512_set1_epi16(120 << 7);
    __mmask32 bad = 0;
    for (int64_t k = 0; k < n; k += 32) {
      const __m512i v = _mm512_loadu_si512(in + k);
      const __m512i ex = _mm512_and_si512(v, e);
      bad |= _mm512_cmpgt_epu16_mask(ex, lim);
      _mm512_storeu_si512(out + k, _mm512_mask_add_epi16(v, _mm512_test_epi16_mask(v, e), v, up));
    }
    return bad == 0;
  }
  static V dp(V acc, PB x, PB w) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(x), reinterpret_cast<__m512bh>(w));
  }
  struct Ftz {};
  static void fence(V&) {}
  // vcvtneps2bf16: nearest even, subnormal inputs as zero, NaN made quiet -- bf16_round
  // (bf16_unit_ok checks it on this CPU).
  static void round_bf16x16(const float* p, uint16_t* out) {
    const __m256bh r = _mm512_cvtneps_pbh(_mm512_loadu_ps(p));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<const __m256i&>(r));
  }
};

}  // namespace
}  // namespace moeserve::kernels

namespace moeserve::kernels::avx512 {
const KernelTable& table() {
  return make_table<Avx512>();
}

const KernelTable& bf16_table() {
  static const KernelTable t = [] {
    KernelTable k = make_table<Avx512>();
    k.matmul = &matmul<Avx512Vbmi>;
    k.matmul_batch = &matmul_batch<Avx512Vbmi>;
    k.matmul_bf16 = &matmul_bf16<Avx512Bf16>;
    return k;
  }();
  return t;
}

bool bf16_unit_ok() {
  // Cases at the edges (the order of the two steps, ties, subnormal inputs and results, signed
  // zeros, NaN, infinity) and then pseudo-random ones across the exponent range, through the
  // instruction and through bf16_pair.
  std::vector<float> c = {1.0f,
                          0x1p-24f,
                          -1.0f,
                          0x1p-25f,
                          0x1.8p-25f,
                          0x1p-126f,
                          -0x1p-126f,
                          0x1p-63f,
                          -0x1p-64f,
                          0x1p-75f,
                          -0x1p-76f,
                          0x1p-127f,
                          1e-40f,
                          -1e-40f,
                          0.0f,
                          -0.0f,
                          0x1p127f,
                          0x1p10f,
                          NAN,
                          INFINITY,
                          0x1.fep-64f,
                          0x1.000002p-126f,
                          3.0f,
                          -0x1p-149f,
                          1.00390625f,
                          1.01171875f,
                          -1.00390625f,
                          0x1.fffffep127f,
                          -0x1.ffp127f,
                          0x1.01p-126f,
                          0x1.fffffep-127f};
  uint32_t s = 12345;
  auto rnd = [&] {
    s = s * 1664525u + 1013904223u;
    return s;
  };
  for (int i = 0; i < 4000; ++i) {
    const uint32_t r = rnd();
    const int e = static_cast<int>(rnd() % 60) + (i % 2 ? -150 : -40);
    c.push_back(std::ldexp(static_cast<float>(r >> 8) / 16777216.0f, e) * (r & 1 ? -1 : 1));
  }
  // vcvtneps2bf16 (Avx512Bf16::round_bf16x16) against bf16_round on the same values.
  for (size_t i = 0; i + 16 <= c.size(); ++i) {
    alignas(64) uint16_t got[16];
    Avx512Bf16::round_bf16x16(&c[i], got);
    for (int l = 0; l < 16; ++l) {
      const uint16_t want = bf16_round(c[i + l]);
      const bool nan = (want & 0x7fff) > 0x7f80;
      if (nan ? (got[l] & 0x7fff) <= 0x7f80 : got[l] != want) return false;
    }
  }
  const size_t n = c.size();
  for (size_t i = 0; i + 5 <= 5 * n; i += 5) {
    float acc[16];
    uint32_t xa[16], wa[16];
    float want[16];
    for (int l = 0; l < 16; ++l) {
      const size_t b = (i + 7 * static_cast<size_t>(l)) % n;
      const uint16_t x0 = bf16_round(c[b]), x1 = bf16_round(c[(b + 1) % n]);
      const uint16_t w0 = static_cast<uint16_t>(f32_bits(c[(b + 2) % n]) >> 16);
      const uint16_t w1 = static_cast<uint16_t>(f32_bits(c[(b + 3) % n]) >> 16);
      acc[l] = c[(b + 4) % n];
      if (l % 3 == 0) acc[l] = daz(acc[l]);
      xa[l] = x0 | static_cast<uint32_t>(x1) << 16;
      wa[l] = w0 | static_cast<uint32_t>(w1) << 16;
      want[l] = bf16_pair(acc[l], bf16_value(x0), bf16_value(x1), bf16_value(w0), bf16_value(w1));
    }
    float got[16];
    _mm512_storeu_ps(
        got, Avx512Bf16::dp(_mm512_loadu_ps(acc), _mm512_loadu_si512(xa), _mm512_loadu_si512(wa)));
    for (int l = 0; l < 16; ++l)
      if (std::isnan(want[l]) ? !std::isnan(got[l]) : f32_bits(want[l]) != f32_bits(got[l]))
        return false;
  }
  return true;
}
}  // namespace moeserve::kernels::avx512
