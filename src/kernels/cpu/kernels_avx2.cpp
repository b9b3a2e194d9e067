// kernels.h for AVX2 + FMA + F16C: a 16-lane accumulator is two ymm registers (lanes 0-7, 8-15).
#include <immintrin.h>

#include "kernels/cpu/impl.h"

namespace moeserve::kernels {
namespace {

struct Avx2 {
  struct V {
    __m256 lo, hi;  // lanes 0-7, lanes 8-15
  };
  static constexpr bool kFp8Direct = true;
  static constexpr int kDotHeads = 4;  // dots: rows of a per pass (x 2 rows of b)
  static constexpr int kDotHeadsFp8 = 4, kDotRowsFp8 = 1;  // the same for fp8 rows
  static constexpr int kSumHeadsFp8 = 4,
                       kSumColsFp8 = 1;           // weighted_cached, fp8: outputs x 16 columns
  static constexpr int kTileM = 1, kTileN = 6;    // 12 ymm accumulators; x read once per 6 rows
  static constexpr int kTileTM = 2, kTileTN = 2;  // 8 ymm accumulators
  static constexpr int gemv_rows(int m) { return m == 1 ? 4 : m == 2 ? 2 : 1; }

  static V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static V set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
  static V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static V load_reg(const float* p) { return load(p); }  // 16 registers: let the compiler fold
  static void store(float* p, V v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
  }
  static V fma(V a, V b, V c) {
    return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
  }
  static V add_mul(V a, V b, V c) {
    return {_mm256_add_ps(a.lo, _mm256_mul_ps(b.lo, c.lo)),
            _mm256_add_ps(a.hi, _mm256_mul_ps(b.hi, c.hi))};
  }
  static V mul(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  static V max(V a, V b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
  static __m256 pow2x8(__m256 n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static V pow2(V n) { return {pow2x8(n.lo), pow2x8(n.hi)}; }
  static bool below_2p8(V v) {  // every |lane| < 2^8 (NaN is not)
    const __m256 lim = _mm256_set1_ps(256.0f), sign = _mm256_set1_ps(-0.0f);
    return (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v.lo), lim, _CMP_LT_OQ)) &
            _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v.hi), lim, _CMP_LT_OQ))) ==
           0xff;
  }

  // lane[l] += lane[l + s] for s = 8, 4, 2, 1; lane 0.
  static float reduce(V v) {
    const __m256 a = _mm256_add_ps(v.lo, v.hi);
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
  }

  static __m256 bf16x8(const uint16_t* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  static V cvt_bf16(const uint16_t* p) { return {bf16x8(p), bf16x8(p + 8)}; }
  static V cvt_f16(const uint16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
  }
  // As kernels_avx512.cpp: e4m3 -> f16 bits (exact, value * 2^-8), one multiply.
  static V fp8_to_f32x16(__m128i b) {
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7),
                                       _mm256_set1_epi16(static_cast<short>(0xbfff)));
    return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)),
            _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
  }
  static V cvt_fp8_nonan(const uint8_t* p, V s256) {
    const V f = fp8_to_f32x16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_mul_ps(f.lo, s256.lo), _mm256_mul_ps(f.hi, s256.hi)};
  }
  static void cvt_fp8x2_nonan(const uint8_t* p, V s256, V& lo, V& hi) {
    lo = cvt_fp8_nonan(p, s256);
    hi = cvt_fp8_nonan(p + 16, s256);
  }
  // As kernels_avx512.cpp: e4m3 byte b -> the f32 with bits (b & 0x80) << 24 | (b & 0x7f) << 20,
  // exactly float(fp8) * 2^-120 (three operations per 8 values, each conversion reading its 8
  // bytes itself). Not for NaN bytes.
  static __m256 fp8_raw8(const uint8_t* p) {
    const __m256i d = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(d, 20),
                                                _mm256_set1_epi32(static_cast<int>(0x87f00000u))));
  }
  static V cvt_fp8_raw(const uint8_t* p) { return {fp8_raw8(p), fp8_raw8(p + 8)}; }
  // cvt_fp8_raw times s = scale * 2^120: float(fp8) * scale rounded once (as kernels_avx512.cpp).
  static V cvt_fp8_direct(const uint8_t* p, V s) { return mul(cvt_fp8_raw(p), s); }
  // NaN scan as kernels_avx512.cpp: running unsigned max of b | 0x80; 0xff marks a NaN.
  using NanAcc = __m256i;
  static NanAcc nan_init() { return _mm256_setzero_si256(); }
  static NanAcc nan_scan128(NanAcc acc, const uint8_t* p) {
    const __m256i top = _mm256_set1_epi8(static_cast<char>(0x80));
    for (int i = 0; i < 128; i += 32) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
      acc = _mm256_max_epu8(acc, _mm256_or_si256(b, top));
    }
    return acc;
  }
  static bool nan_found(NanAcc acc) {
    return _mm256_movemask_epi8(_mm256_cmpeq_epi8(acc, _mm256_set1_epi8(-1))) != 0;
  }
  // Integer weights (kernels.h, Weight): float(u - offset) * scale, u the stored value.
  static float f16(uint16_t h) { return _cvtsh_ss(h); }
  static V q4_prep(float scale) { return set1(scale); }
  static constexpr bool kPrepBf16 = false;  // no q4_prep_bf16 / q8_prep_bf16
  static V q8_prep(float scale) { return set1(scale); }
  static constexpr bool kQ8Fma = false;  // no cvt_q8_fma
  // 8 stored values, one per dword, minus `off`, times s.
  static __m256 int8x(__m256i u, __m256i off, __m256 s) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(u, off)), s);
  }
  // 16 bytes: their low nibbles (lo) and high nibbles (hi) as weights. The 16 bytes go to both
  // halves of a ymm; one byte shuffle puts bytes 0-7 (another bytes 8-15) in the 8 dwords, and
  // each dword gives its low nibble by a mask and its high one by a shift: two shuffles per 32
  // weights instead of six widening ones.
  static void cvt_q4x2(const uint8_t* p, V s, V& lo, V& hi) {
    const __m256i b =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i d0 = _mm256_shuffle_epi8(
        b, _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1, 4, -1, -1,
                            -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1));
    const __m256i d1 = _mm256_shuffle_epi8(
        b, _mm256_setr_epi8(8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1, 12, -1,
                            -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1));
    const __m256i m = _mm256_set1_epi32(15), off = _mm256_set1_epi32(8);
    lo = {int8x(_mm256_and_si256(d0, m), off, s.lo), int8x(_mm256_and_si256(d1, m), off, s.hi)};
    hi = {int8x(_mm256_srli_epi32(d0, 4), off, s.lo), int8x(_mm256_srli_epi32(d1, 4), off, s.hi)};
  }
  static V cvt_q4(const uint8_t* p, int half, V s) {
    V lo, hi;
    cvt_q4x2(p, s, lo, hi);
    return half ? hi : lo;
  }
  // Bytes 0-7 and 8-15 widened straight from memory (no shuffle to reach the upper 8).
  static V cvt_q8(const uint8_t* p, V s) {
    const __m256i off = _mm256_set1_epi32(128);
    auto u = [](const uint8_t* q) {
      return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    };
    return {int8x(u(p), off, s.lo), int8x(u(p + 8), off, s.hi)};
  }
  // NaN-exact: NaN bytes become the quiet NaN of their sign.
  static V cvt_fp8(const uint8_t* p, V s256) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    V f = fp8_to_f32x16(b);
    const int nan = _mm_movemask_epi8(
        _mm_cmpeq_epi8(_mm_and_si128(b, _mm_set1_epi8(0x7f)), _mm_set1_epi8(0x7f)));
    if (__builtin_expect(nan != 0, 0)) {
      alignas(32) float t[16];
      store(t, f);
      for (int l = 0; l < 16; ++l) {
        if (nan >> l & 1) {
          const uint32_t u = (p[l] & 0x80u) << 24 | 0x7fc00000u;
          __builtin_memcpy(&t[l], &u, 4);
        }
      }
      f = load(t);
    }
    return {_mm256_mul_ps(f.lo, s256.lo), _mm256_mul_ps(f.hi, s256.hi)};
  }
  // bf16 products (matmul_bf16.h), emulated as in kernels_avx512.cpp: two FMAs per pair under
  // the MXCSR's FTZ and DAZ bits.
  static constexpr bool kFp8Bf16 = false;  // no fp8_bf16x32
  static constexpr int kBTileM = 1, kBTileN = 2;
  struct PB {
    V even, odd;
  };
  static PB load_pb(const uint16_t* p) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    const __m256i m = _mm256_set1_epi32(-65536);
    return {
        {_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)),
         _mm256_castsi256_ps(_mm256_slli_epi32(b, 16))},
        {_mm256_castsi256_ps(_mm256_and_si256(a, m)), _mm256_castsi256_ps(_mm256_and_si256(b, m))}};
  }
  static V dp(V acc, const PB& x, const PB& w) {
    return fma(x.even, w.even, fma(x.odd, w.odd, acc));
  }
  using Ftz = FtzDazScope;
  static void fence(V& v) { asm volatile("" : "+x"(v.lo), "+x"(v.hi)); }
  static void round_bf16x16(const float* p, uint16_t* out) {
    for (int l = 0; l < 16; ++l) out[l] = bf16_round(p[l]);
  }
};

}  // namespace
}  // namespace moeserve::kernels

namespace moeserve::kernels::avx2 {
const KernelTable& table() {
  return make_table<Avx2>();
}
}  // namespace moeserve::kernels::avx2
