// Small row operations shared by the forward pass.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace moeserve::model {

// v.data() with room for at least n elements (grows, never shrinks).
template <typename T, typename A>
T* sized(std::vector<T, A>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// out = w * (x / sqrt(mean(x^2) + eps)) over one row of `dim`; out may alias x.
inline void rms_row(const float* x, const float* w, int64_t dim, float eps, float* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(dim)) + eps);
  for (int64_t i = 0; i < dim; ++i) out[i] = w[i] * (x[i] * inv);
}

}  // namespace moeserve::model
