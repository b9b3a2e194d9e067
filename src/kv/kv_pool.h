// The paged latent KV cache: a pool of fixed-size blocks, each holding `block_size` token
// positions of every layer. Per token per layer MLA caches only the normalized latent
// (kv_lora_rank values) and the roped key part (qk_rope_head_dim values).
//
// Block layout: [n_layers][block_size][kv_lora_rank + qk_rope_head_dim] f32, contiguous, so a
// block moves between instances as one piece.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/huge_pages.h"

namespace moeserve::kv {

class KvPool {
 public:
  KvPool(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t kv_dim);

  // Takes n free blocks (appended to `out`) or none and returns false when fewer are free.
  bool allocate(int64_t n, std::vector<int32_t>* out);
  void release(const std::vector<int32_t>& blocks);

  // [kv_dim] f32 of token slot `slot` (< block_size) of `block` in `layer`.
  float* at(int32_t block, int64_t layer, int64_t slot) {
    return data() + ((block * n_layers_ + layer) * block_size_ + slot) * kv_dim_;
  }
  const float* at(int32_t block, int64_t layer, int64_t slot) const {
    return data() + ((block * n_layers_ + layer) * block_size_ + slot) * kv_dim_;
  }

  int64_t block_size() const { return block_size_; }
  int64_t n_blocks() const { return n_blocks_; }
  int64_t n_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t n_used() const { return n_blocks_ - n_free(); }
  int64_t kv_dim() const { return kv_dim_; }
  int64_t n_layers() const { return n_layers_; }
  size_t block_bytes() const { return static_cast<size_t>(n_layers_ * block_size_ * kv_dim_) * 4; }
  float* block_data(int32_t block) { return at(block, 0, 0); }
  // Blocks needed to hold n_tokens positions.
  int64_t blocks_for(int64_t n_tokens) const { return (n_tokens + block_size_ - 1) / block_size_; }

 private:
  int64_t n_blocks_, block_size_, n_layers_, kv_dim_;
  float* data() const { return reinterpret_cast<float*>(mem_.data()); }

  // [n_blocks][n_layers][block_size][kv_dim] f32, zeroed, on huge pages: decode reads a
  // sequence's rows of a layer from blocks n_layers apart.
  HugeBuffer mem_;
  std::vector<int32_t> free_;    // stack of free block ids
  std::vector<uint8_t> in_use_;  // [n_blocks], to catch double frees
};

}  // namespace moeserve::kv
