// The arithmetic of the bf16 precision (kernels.h, Precision::Bf16), one value at a time: what
// the AVX512-BF16 dot-product instruction (vdpbf16ps) does to each of its lanes, written out in
// portable C++. The reference kernels and the scalar kernels compute with these; the vector
// kernels reproduce them (the AVX-512F and AVX2 ones by FMA with the MXCSR's flush-to-zero and
// denormals-are-zero bits set, which gives the same bits).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace moeserve::kernels {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// An activation (or an f32 / f16 weight) entering a bf16 product: rounded to the nearest bf16,
// ties to even; a subnormal f32 (exponent field 0) becomes the zero of its sign; NaN stays NaN
// (made quiet); values past the largest bf16 round to infinity. A normal f32 never rounds to
// a subnormal bf16 (the two share their exponent range), so the result is never subnormal.
inline uint16_t bf16_round(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// A stored bf16 as the product takes it: exactly, except that a subnormal is the zero of its
// sign (vdpbf16ps treats subnormal inputs as zero).
inline float bf16_value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  return bits_f32((u & 0x7f800000u) ? u : u & 0x80000000u);
}

// f32 flush of a subnormal input to the zero of its sign.
inline float daz(float f) {
  const uint32_t u = f32_bits(f);
  return (u & 0x7f800000u) ? f : bits_f32(u & 0x80000000u);
}

// One step of a lane: acc + a * b with the product exact and one rounding (to nearest even),
// subnormal inputs taken as zero, and a result that is tiny -- below 2^-126 in magnitude once
// rounded to 24 bits with an unbounded exponent -- replaced by the zero of its sign. (The
// double FMA decides tininess: a product of two bf16 values has 16 significant bits and acc
// 24, so where their exact sum needs more than 53 bits its low part lies far below the f32
// rounding point and cannot move the decision.)
inline float bf16_step(float acc, float a, float b) {
  acc = daz(acc), a = daz(a), b = daz(b);
  const float r = std::fma(a, b, acc);
  if (!(std::fabs(r) <= 0x1p-126f)) return r;  // normal, infinite or NaN
  const double d =
      std::fma(static_cast<double>(a), static_cast<double>(b), static_cast<double>(acc));
  if (d != 0.0 && std::fabs(d) < 0x1p-126 - 0x1p-151) return d < 0 ? -0.0f : 0.0f;
  return r;
}

// One lane of vdpbf16ps: a pair of elements (2l, 2l + 1) of x and w, the odd one first.
inline float bf16_pair(float acc, float x0, float x1, float w0, float w1) {
  return bf16_step(bf16_step(acc, x1, w1), x0, w0);
}

}  // namespace moeserve::kernels
