#include "model/rope.h"

#include <algorithm>
#include <cmath>

namespace moeserve::model {

namespace {
// Dimension index at which a rotation count is reached (the YaRN correction range).
double correction_dim(double rotations, double dim, double base, double max_pos) {
  return (dim * std::log(max_pos / (rotations * 2.0 * M_PI))) / (2.0 * std::log(base));
}
}  // namespace

Rope::Rope(const ModelConfig& c) : dim_(c.qk_rope_head_dim) {
  const int64_t half = dim_ / 2;
  const float base = static_cast<float>(c.rope_theta);
  std::vector<float> pos_freqs(half);
  for (int64_t i = 0; i < half; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(dim_);
    pos_freqs[i] = static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(e)));
  }
  inv_freq_.resize(half);
  if (!c.rope_scaling) {
    for (int64_t i = 0; i < half; ++i) inv_freq_[i] = 1.0f / pos_freqs[i];
    return;
  }
  const RopeScaling& r = *c.rope_scaling;
  const float factor = static_cast<float>(r.factor);
  const double d = static_cast<double>(dim_);
  const double max_pos = static_cast<double>(r.original_max_position_embeddings);
  double low = std::floor(correction_dim(r.beta_fast, d, c.rope_theta, max_pos));
  double high = std::ceil(correction_dim(r.beta_slow, d, c.rope_theta, max_pos));
  low = std::max(low, 0.0);
  high = std::min(high, d - 1);
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < half; ++i) {
    const float extrapolation = 1.0f / pos_freqs[i];
    const float interpolation = 1.0f / (factor * pos_freqs[i]);
    float ramp = (static_cast<float>(i) - static_cast<float>(low)) / static_cast<float>(high - low);
    ramp = std::clamp(ramp, 0.0f, 1.0f);
    const float extrapolation_factor = 1.0f - ramp;
    inv_freq_[i] =
        interpolation * (1.0f - extrapolation_factor) + extrapolation * extrapolation_factor;
  }
  attention_factor_ = static_cast<float>(r.mscale != 0.0 && r.mscale_all_dim != 0.0
                                             ? yarn_get_mscale(r.factor, r.mscale) /
                                                   yarn_get_mscale(r.factor, r.mscale_all_dim)
                                             : yarn_get_mscale(r.factor, 1.0));
}

void Rope::table(int64_t pos, float* cos_sin) const {
  const int64_t half = dim_ / 2;
  const float p = static_cast<float>(pos);
  for (int64_t i = 0; i < half; ++i) {
    const float angle = inv_freq_[i] * p;
    cos_sin[i] = static_cast<float>(std::cos(static_cast<double>(angle))) * attention_factor_;
    cos_sin[half + i] =
        static_cast<float>(std::sin(static_cast<double>(angle))) * attention_factor_;
  }
}

void Rope::apply(const float* cos_sin, float* x, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1], c = cos_sin[i], s = cos_sin[half + i];
    x[2 * i] = a * c + (-b) * s;
    x[2 * i + 1] = b * c + a * s;
  }
}

}  // namespace moeserve::model
