// Logits of every position of `tokens`, computed in one forward on a fresh KV pool.
#pragma once

#include <cstdint>
#include <vector>

#include "kv/kv_pool.h"
#include "model/model.h"

namespace moeserve::testing {

inline std::vector<float> full_logits(model::Model& m, const std::vector<int32_t>& tokens,
                                      kv::KvDtype dtype = kv::KvDtype::F32) {
  const auto& c = m.config();
  const int64_t n = static_cast<int64_t>(tokens.size());
  kv::KvPool kv((n + 15) / 16, 16, c.num_hidden_layers, c.kv_cache_dim(), dtype);
  std::vector<int32_t> blocks;
  kv.allocate(kv.n_blocks(), &blocks);
  model::Batch b;
  b.tokens = tokens;
  b.seqs = {{0, n, 0, blocks.data()}};
  for (int64_t i = 0; i < n; ++i) b.logit_rows.push_back(i);
  std::vector<float> out(n * c.vocab_size);
  m.forward(b, kv, out.data());
  return out;
}

}  // namespace moeserve::testing
