// Element types of weights and their scalar conversions to float.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace moeserve {

// Q8 and Q4 are not file dtypes but the kernels' names for integer weights as compressed-tensors'
// pack-quantized format stores them (kernels::Weight): offset binary, packed densely in int32
// words. parse_dtype never yields them.
enum class DType : uint8_t { F32, F16, BF16, F8_E4M3, I64, I32, U8, I8, Q8, Q4 };

// Bytes per element; 0 for Q4 (half a byte: use row_bytes).
size_t dtype_size(DType t);
// Bytes of `cols` elements of a row (Q4: cols / 2, cols even).
inline int64_t row_bytes(DType t, int64_t cols) {
  return t == DType::Q4 ? cols / 2 : cols * static_cast<int64_t>(dtype_size(t));
}
const char* dtype_name(DType t);  // safetensors spelling: "F32", "BF16", "F8_E4M3", ...
bool parse_dtype(const std::string& s, DType* out);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// float8 e4m3fn (no infinities; 0x7f/0xff are NaN), exponent bias 7.
float fp8e4m3_to_f32(uint8_t b);
// Round to nearest even, saturating at +-448 (as torch's float8_e4m3fn cast of finite values).
uint8_t f32_to_fp8e4m3(float f);

}  // namespace moeserve
