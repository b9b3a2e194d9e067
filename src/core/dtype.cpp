#include "core/dtype.h"

#include <cmath>

namespace moeserve {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32:
      return 4;
    case DType::F16:
      return 2;
    case DType::BF16:
      return 2;
    case DType::F8_E4M3:
      return 1;
    case DType::I64:
      return 8;
    case DType::I32:
      return 4;
    case DType::U8:
    case DType::I8:
    case DType::Q8:
      return 1;
    case DType::Q4:
      return 0;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::F8_E4M3:
      return "F8_E4M3";
    case DType::I64:
      return "I64";
    case DType::I32:
      return "I32";
    case DType::U8:
      return "U8";
    case DType::I8:
      return "I8";
    case DType::Q8:
      return "Q8";
    case DType::Q4:
      return "Q4";
  }
  return "?";
}

bool parse_dtype(const std::string& s, DType* out) {
  static const struct {
    const char* name;
    DType t;
  } table[] = {{"F32", DType::F32},         {"F16", DType::F16}, {"BF16", DType::BF16},
               {"F8_E4M3", DType::F8_E4M3}, {"I64", DType::I64}, {"I32", DType::I32},
               {"U8", DType::U8},           {"I8", DType::I8}};
  for (const auto& e : table) {
    if (s == e.name) {
      *out = e.t;
      return true;
    }
  }
  return false;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    v = man ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000;
  const float a = std::fabs(f);
  if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7e00);
  if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7c00);
  if (a < std::ldexp(1.0f, -14)) {  // subnormal: units of 2^-24
    const float q = std::nearbyint(a * std::ldexp(1.0f, 24));
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(q));
  }
  int e;
  std::frexp(a, &e);                                      // a = m * 2^e, m in [0.5, 1)
  const float q = std::nearbyint(std::ldexp(a, 11 - e));  // 11 significant bits
  uint32_t mant = static_cast<uint32_t>(q);
  int exp = e - 1 + 15;
  if (mant == 2048) {
    mant = 1024;
    exp += 1;
  }
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00);
  return static_cast<uint16_t>(sign | (static_cast<uint32_t>(exp) << 10) | (mant & 0x3ff));
}

float fp8e4m3_to_f32(uint8_t b) {
  const uint32_t sign = b >> 7, exp = (b >> 3) & 0xf, man = b & 7;
  float v;
  if (exp == 0xf && man == 7) {
    v = NAN;
  } else if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -9);
  } else {
    v = std::ldexp(static_cast<float>(man | 8), static_cast<int>(exp) - 10);
  }
  return sign ? -v : v;
}

uint8_t f32_to_fp8e4m3(float f) {
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  if (std::isnan(f)) return 0x7f;
  float a = std::fabs(f);
  if (a >= 448.0f) return sign | 0x7e;
  if (a < std::ldexp(1.0f, -6)) {  // subnormal: units of 2^-9
    const float q = std::nearbyint(a * 512.0f);
    return sign | static_cast<uint8_t>(q);  // q == 8 is the smallest normal, encoded the same
  }
  int e;
  std::frexp(a, &e);
  const float q = std::nearbyint(std::ldexp(a, 4 - e));  // 4 significant bits
  uint32_t mant = static_cast<uint32_t>(q);
  int exp = e - 1 + 7;
  if (mant == 16) {
    mant = 8;
    exp += 1;
  }
  if (exp > 15 || (exp == 15 && (mant & 7) == 7)) return sign | 0x7e;
  return sign | static_cast<uint8_t>((exp << 3) | (mant & 7));
}

}  // namespace moeserve
