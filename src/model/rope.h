// Rotary position embedding as DeepSeek applies it: on interleaved pairs (x[2i], x[2i+1]) of the
// qk_rope_head_dim part, with YaRN frequencies and magnitude correction under rope_scaling.
#pragma once

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace moeserve::model {

class Rope {
 public:
  explicit Rope(const ModelConfig& cfg);

  int64_t dim() const { return dim_; }
  // cos_sin: [dim] f32, cos of pair i at [i], sin at [dim/2 + i], both times attention_factor.
  void table(int64_t pos, float* cos_sin) const;
  // Rotates x: [dim] in place with a table from table().
  static void apply(const float* cos_sin, float* x, int64_t dim);
  const std::vector<float>& inv_freq() const { return inv_freq_; }
  float attention_factor() const { return attention_factor_; }

 private:
  int64_t dim_;
  std::vector<float> inv_freq_;  // [dim / 2]
  float attention_factor_ = 1.0f;
};

}  // namespace moeserve::model
