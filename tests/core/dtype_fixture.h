// tests/fixtures/dtypes/dtypes.json (made by tools/make_dtype_fixture.py with ml_dtypes): the
// scalar conversions of core/dtype.h computed independently, and the helpers to compare with it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moeserve::testing {

inline const nlohmann::json& dtype_fixture() {
  static const nlohmann::json j = [] {
    std::ifstream in(std::string(MOESERVE_SOURCE_DIR) + "/tests/fixtures/dtypes/dtypes.json");
    return in ? nlohmann::json::parse(in) : nlohmann::json();
  }();
  return j;
}

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// NaN results are compared as "NaN" only: the fixture's digests use these canonical values.
inline uint32_t canonical_f32(float f) {
  return std::isnan(f) ? 0x7fc00000u : f32_bits(f);
}

// The fixture's digest: FNV-1a over 32-bit words.
struct Fnv1a {
  uint64_t h = 0xcbf29ce484222325ull;
  void add(uint32_t w) { h = (h ^ w) * 0x100000001b3ull; }
  std::string hex() const {
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
    return buf;
  }
};

// The sweep's float32 inputs: k << 12 for k in [0, 2^20), then (i * 2654435761) mod 2^32 for i
// in [0, 2^17).
template <typename Fn>
void for_each_sweep_input(Fn&& fn) {
  for (uint32_t k = 0; k < (1u << 20); ++k) fn(k << 12);
  for (uint32_t i = 0; i < (1u << 17); ++i) fn(static_cast<uint32_t>(i * 2654435761ull));
}

}  // namespace moeserve::testing
