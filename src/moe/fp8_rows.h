// Hidden rows as fp8 e4m3 with one f32 scale per row: the optional quantized dispatch
// (Dispatcher::set_fp8_dispatch). A row x becomes scale = amax(|x|) / 448 (1 for a zero row) and
// codes e4m3(x / scale), rounded to nearest even, saturating at +-448; it comes back as
// float(code) * scale. A row with a NaN or infinity comes back as NaN.
#pragma once

#include <cstdint>
#include <cstring>

namespace moeserve::moe {

// e4m3 of f (round to nearest even, saturating at +-448, NaN -> 0x7f): f32_to_fp8e4m3 of
// core/dtype.h, in integer steps that the compiler vectorizes.
inline uint8_t fp8_encode(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 24) & 0x80u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return 0x7f;                                 // NaN
  if (u >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);  // >= 448: saturate
  if (u < 0x3c800000u) {  // below 2^-6: subnormal, in units of 2^-9
    float a;
    std::memcpy(&a, &u, 4);
    const float t = a * 512.0f + 8388608.0f;  // adding 2^23 rounds to an integer, to even
    uint32_t ti;
    std::memcpy(&ti, &t, 4);
    return static_cast<uint8_t>(sign | (ti - 0x4b000000u));
  }
  u += 0x7ffffu + ((u >> 20) & 1u);  // keep 3 mantissa bits, to nearest even
  const uint32_t exp = (u >> 23) - 127 + 7, mant = (u >> 20) & 7u;
  if (exp > 15 || (exp == 15 && mant == 7)) return static_cast<uint8_t>(sign | 0x7eu);
  return static_cast<uint8_t>(sign | (exp << 3) | mant);
}

// Writes the codes of x [n] to q [n] and returns the scale.
float fp8_quantize_row(const float* x, int64_t n, uint8_t* q);
// out [n] = float(q) * scale.
void fp8_dequantize_row(const uint8_t* q, float scale, int64_t n, float* out);

}  // namespace moeserve::moe
