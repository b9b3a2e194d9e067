// Hidden rows as fp8 e4m3 with one f32 scale per row: the optional quantized dispatch
// (Dispatcher::set_fp8_dispatch). A row x becomes scale = amax(|x|) / 448 (1 for a zero row) and
// codes e4m3(x * (1 / scale)), rounded to nearest even, saturating at +-448; it comes back as
// float(code) * scale. A row with a NaN or infinity comes back as NaN.
#pragma once

#include <cstdint>
#include <cstring>

namespace moeserve::moe {

// e4m3 of f (round to nearest even, saturating at +-448, NaN -> 0x7f): f32_to_fp8e4m3 of
// core/dtype.h, as integer selects without branches, which the compiler vectorizes.
inline uint32_t fp8_encode_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 24) & 0x80u;
  u &= 0x7fffffffu;
  // Below 2^-6: subnormal, in units of 2^-9 (adding 2^23 rounds to an integer, to even).
  float a;
  std::memcpy(&a, &u, 4);
  const float t = a * 512.0f + 8388608.0f;
  uint32_t ti;
  std::memcpy(&ti, &t, 4);
  const uint32_t sub = ti - 0x4b000000u;
  // Normal: keep 3 mantissa bits, to nearest even; then (exponent - 120) << 3 | mantissa,
  // saturating at 0x7e (448; infinities too).
  const uint32_t r = (u + 0x7ffffu + ((u >> 20) & 1u)) >> 20;
  const uint32_t normal = r - (120u << 3) < 0x7eu ? r - (120u << 3) : 0x7eu;
  const uint32_t code = u < 0x3c800000u ? sub : normal;
  return u > 0x7f800000u ? 0x7fu : sign | code;
}
inline uint8_t fp8_encode(float f) {
  return static_cast<uint8_t>(fp8_encode_bits(f));
}

// Writes the codes of x [n] to q [n] and returns the scale.
float fp8_quantize_row(const float* x, int64_t n, uint8_t* q);
// out [n] = float(q) * scale.
void fp8_dequantize_row(const uint8_t* q, float scale, int64_t n, float* out);

}  // namespace moeserve::moe
