// kernels.h in portable C++: a 16-lane accumulator is an array, each lane updated by std::fma.
// The reference for what the vector versions must reproduce bit for bit.
#include <cmath>
#include <cstring>

#include "kernels/cpu/impl.h"

namespace moeserve::kernels {
namespace {

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half -> float as vcvtph2ps does it: exact, NaN payload kept and made quiet.
inline float half_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | man << 13 | (man ? 0x400000u : 0));
  if (exp == 0) return std::copysign(static_cast<float>(man) * 0x1p-24f, sign ? -1.0f : 1.0f);
  return bits_to_f32(sign | (exp + 112) << 23 | man << 13);
}

struct Scalar {
  struct V {
    float v[16];
  };
  static constexpr bool kFp8Direct = false;  // no cvt_fp8_direct
  static constexpr int kDotHeads = 4;        // dots: rows of a per pass (x 2 rows of b)
  static constexpr int kDotHeadsFp8 = 4, kDotRowsFp8 = 1;  // the same for fp8 rows
  static constexpr int kSumHeadsFp8 = 4,
                       kSumColsFp8 = 2;  // weighted_cached, fp8: outputs x 16 columns
  static constexpr int kTileM = 1, kTileN = 1;
  static constexpr int kTileTM = 1, kTileTN = 1;
  static constexpr int gemv_rows(int m) { return 1; }

  static V zero() { return V{}; }
  static V set1(float a) {
    V r;
    for (float& l : r.v) l = a;
    return r;
  }
  static V load(const float* p) {
    V r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static V load_reg(const float* p) { return load(p); }
  static void store(float* p, const V& v) { std::memcpy(p, v.v, sizeof v.v); }
  static V add_mul(const V& a, const V& b, const V& c) {  // -ffp-contract=off: two roundings
    V r;
    for (int l = 0; l < 16; ++l) r.v[l] = a.v[l] + b.v[l] * c.v[l];
    return r;
  }
  static V mul(const V& a, const V& b) {
    V r;
    for (int l = 0; l < 16; ++l) r.v[l] = a.v[l] * b.v[l];
    return r;
  }
  static V max(const V& a, const V& b) {
    V r;
    for (int l = 0; l < 16; ++l) r.v[l] = a.v[l] > b.v[l] ? a.v[l] : b.v[l];
    return r;
  }
  static V pow2(const V& n) {  // as the vector versions: the exponent field n + 127
    V r;
    for (int l = 0; l < 16; ++l) {
      const uint32_t e =
          (static_cast<uint32_t>(std::isnan(n.v[l]) ? INT32_MIN : static_cast<int32_t>(n.v[l])) +
           127u)
          << 23;
      std::memcpy(&r.v[l], &e, 4);
    }
    return r;
  }
  static bool below_2p8(const V& v) {  // every |lane| < 2^8 (NaN is not)
    for (float l : v.v)
      if (!(std::fabs(l) < 256.0f)) return false;
    return true;
  }
  static V fma(const V& a, const V& b, const V& c) {
    V r;
    for (int l = 0; l < 16; ++l) r.v[l] = std::fma(a.v[l], b.v[l], c.v[l]);
    return r;
  }

  // lane[l] += lane[l + s] for s = 8, 4, 2, 1; lane 0.
  static float reduce(V v) {
    for (int s = 8; s >= 1; s /= 2)
      for (int l = 0; l < s; ++l) v.v[l] = v.v[l] + v.v[l + s];
    return v.v[0];
  }

  // (The 16-bit values may lie at any byte address, as the vector loads allow.)
  static V cvt_bf16(const uint16_t* p) {
    uint16_t h[16];
    std::memcpy(h, p, sizeof h);
    V r;
    for (int l = 0; l < 16; ++l) r.v[l] = bf16_to_f32(h[l]);
    return r;
  }
  static V cvt_f16(const uint16_t* p) {
    uint16_t h[16];
    std::memcpy(h, p, sizeof h);
    V r;
    for (int l = 0; l < 16; ++l) r.v[l] = half_to_f32(h[l]);
    return r;
  }
  // float(e4m3) * scale rounded once, computed as the vector versions do: the e4m3 bits
  // re-read as an f16 (exactly value * 2^-8) times scale * 256. 0x7f / 0xff: quiet NaN.
  static V cvt_fp8(const uint8_t* p, const V& s256) {
    V r;
    for (int l = 0; l < 16; ++l) {
      const uint32_t b = p[l];
      const float f = (b & 0x7f) == 0x7f
                          ? bits_to_f32((b & 0x80) << 24 | 0x7fc00000u)
                          : half_to_f32(static_cast<uint16_t>((b & 0x80) << 8 | (b & 0x7f) << 7));
      r.v[l] = f * s256.v[l];
    }
    return r;
  }
  static V cvt_fp8_nonan(const uint8_t* p, const V& s256) { return cvt_fp8(p, s256); }
  static void cvt_fp8x2_nonan(const uint8_t* p, const V& s256, V& lo, V& hi) {
    lo = cvt_fp8(p, s256);
    hi = cvt_fp8(p + 16, s256);
  }
  // float(e4m3) * 2^-120 exactly, as the vector versions compute it: the bits
  // (b & 0x80) << 24 | (b & 0x7f) << 20. Not for NaN bytes.
  static V cvt_fp8_raw(const uint8_t* p) {
    V r;
    for (int l = 0; l < 16; ++l) r.v[l] = bits_to_f32((p[l] & 0x80u) << 24 | (p[l] & 0x7fu) << 20);
    return r;
  }
  // Integer weights (kernels.h, Weight): float(q) * scale, q = u - 2^(bits-1).
  static float f16(uint16_t h) { return half_to_f32(h); }
  static V q4_prep(float scale) { return set1(scale); }
  static constexpr bool kPrepBf16 = false;  // no q4_prep_bf16 / q8_prep_bf16
  static V q8_prep(float scale) { return set1(scale); }
  static constexpr bool kQ8Fma = false;  // no cvt_q8_fma
  static V cvt_q4(const uint8_t* p, int half, const V& s) {
    V r;
    for (int l = 0; l < 16; ++l)
      r.v[l] = static_cast<float>(((p[l] >> (4 * half)) & 15) - 8) * s.v[l];
    return r;
  }
  static void cvt_q4x2(const uint8_t* p, const V& s, V& lo, V& hi) {
    lo = cvt_q4(p, 0, s);
    hi = cvt_q4(p, 1, s);
  }
  static V cvt_q8(const uint8_t* p, const V& s) {
    V r;
    for (int l = 0; l < 16; ++l) r.v[l] = static_cast<float>(p[l] - 128) * s.v[l];
    return r;
  }
  using NanAcc = bool;  // whether an e4m3 NaN (0x7f / 0xff) was seen
  static NanAcc nan_init() { return false; }
  static NanAcc nan_scan128(NanAcc acc, const uint8_t* p) {
    for (int i = 0; i < 128; ++i) acc = acc || (p[i] & 0x7f) == 0x7f;
    return acc;
  }
  static bool nan_found(NanAcc acc) { return acc; }
  // bf16 products (matmul_bf16.h) by bf16_math.h, value by value.
  static constexpr bool kFp8Bf16 = false;  // no fp8_bf16x32
  static constexpr int kBTileM = 1, kBTileN = 1;
  struct PB {
    float even[16], odd[16];
  };
  static PB load_pb(const uint16_t* p) {
    PB r;
    for (int l = 0; l < 16; ++l) {
      uint16_t e, o;
      std::memcpy(&e, p + 2 * l, 2);
      std::memcpy(&o, p + 2 * l + 1, 2);
      r.even[l] = bf16_value(e);
      r.odd[l] = bf16_value(o);
    }
    return r;
  }
  static V dp(const V& acc, const PB& x, const PB& w) {
    V r;
    for (int l = 0; l < 16; ++l)
      r.v[l] = bf16_step(bf16_step(acc.v[l], x.odd[l], w.odd[l]), x.even[l], w.even[l]);
    return r;
  }
  struct Ftz {};
  static void fence(V&) {}
  static void round_bf16x16(const float* p, uint16_t* out) {
    for (int l = 0; l < 16; ++l) out[l] = bf16_round(p[l]);
  }
};

}  // namespace
}  // namespace moeserve::kernels

namespace moeserve::kernels::scalar {
const KernelTable& table() {
  return make_table<Scalar>();
}
}  // namespace moeserve::kernels::scalar
