// What the engine tests share: a request whose result can be awaited, prompts, and a chi-square
// check for samplers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <future>
#include <memory>
#include <vector>

#include "../test_util.h"
#include "core/thread_pool.h"
#include "engine/request.h"
#include "model/init_model.h"
#include "model/model.h"

namespace moeserve::engine_test {

// A request whose tokens (and their indexes) are collected and whose finish can be awaited.
struct Pending {
  std::shared_ptr<engine::Request> req = std::make_shared<engine::Request>();
  std::vector<int32_t> out;
  std::vector<int64_t> index;
  std::promise<engine::FinishEvent> done;
  Pending(std::vector<int32_t> prompt, int64_t max_tokens) {
    req->prompt = std::move(prompt);
    req->max_tokens = max_tokens;
    req->on_token = [this](const engine::TokenEvent& e) {
      out.push_back(e.token);
      index.push_back(e.index);
    };
    req->on_finish = [this](const engine::FinishEvent& e) { done.set_value(e); };
  }
};

// A random model of a preset (seed 7), with its folder and threads. kv_lora_rank: when set,
// overrides the preset's (the cache rows' width).
struct TinyModel {
  testing::TempDir dir;
  ThreadPool pool{2};
  std::unique_ptr<model::Model> m;
  explicit TinyModel(bool fp8 = false, const std::string& preset = "tiny",
                     int64_t kv_lora_rank = 0) {
    model::InitOptions o;
    o.seed = 7;
    o.fp8 = fp8;
    model::ModelConfig c = model::preset_config(preset);
    if (kv_lora_rank) c.kv_lora_rank = kv_lora_rank;
    model::write_random_model(c, dir.path(), o);
    m = std::make_unique<model::Model>(dir.path(), pool);
  }
};

// n token ids below `vocab`, different for each salt.
inline std::vector<int32_t> ids(int n, int salt, int vocab) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = (i * 37 + salt * 101 + 11) % vocab;
  return v;
}

// A prompt of n ids below `vocab`, different for each salt.
inline std::vector<int32_t> prompt_of(int n, int salt, int vocab = 512) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = (i * 31 + salt * 17 + 5) % vocab;
  return v;
}

// Pearson's statistic over the tokens p allows; infinite when a token p forbids was drawn.
// Sets *df to the degrees of freedom.
inline double chi_square(const std::vector<int64_t>& counts, const std::vector<double>& p,
                         int* df) {
  int64_t n = 0;
  for (int64_t c : counts) n += c;
  double x = 0;
  int cells = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (p[i] == 0.0) {
      if (counts[i] > 0) x = INFINITY;
      continue;
    }
    const double e = p[i] * static_cast<double>(n);
    x += (counts[i] - e) * (counts[i] - e) / e;
    ++cells;
  }
  *df = std::max(cells - 1, 1);
  return x;
}

// The chi-square quantile a correct sampler exceeds with probability ~1e-6 (Wilson-Hilferty).
inline double chi_square_limit(int df) {
  const double z = 4.75, a = 2.0 / (9.0 * df), c = 1.0 - a + z * std::sqrt(a);
  return df * c * c * c;
}

}  // namespace moeserve::engine_test
