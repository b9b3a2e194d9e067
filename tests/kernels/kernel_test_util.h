// What the kernel tests share: the instruction sets to compare, random inputs, float bits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "core/aligned.h"
#include "core/dtype.h"
#include "kernels/cpu/isa.h"

namespace moeserve::kernels {

// Every instruction set of the kernels that this CPU runs.
inline std::vector<Isa> isas() {
  std::vector<Isa> v;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16})
    if (isa_available(isa)) v.push_back(isa);
  return v;
}

// The weight dtypes of the float kernels.
inline constexpr DType kDtypes[] = {DType::F32, DType::F16, DType::BF16, DType::F8_E4M3};

inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// n values uniform in [-1, 1), 64-byte aligned, so the kernels' direct path (aligned rows, K a
// multiple of 16) is reached as well as their copy path.
inline AlignedFloats random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  AlignedFloats v(n);
  for (float& f : v) f = u(rng);
  return v;
}

}  // namespace moeserve::kernels
