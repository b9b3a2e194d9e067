// The paged latent KV cache: a pool of fixed-size blocks, each holding `block_size` token
// positions of every layer. Per token per layer MLA caches only the normalized latent
// (kv_lora_rank values) and the roped key part (qk_rope_head_dim values): one row of kv_dim
// values, stored as the pool's dtype says (the row formats of kernels::CachedRows):
//   f32:  kv_dim floats;
//   bf16: kv_dim bf16 values, each the float rounded to nearest even;
//   fp8:  kv_dim e4m3 bytes, then ceil(kv_dim / 128) f32 scales, one per 128 values (for
//         DeepSeek-V3's 512 + 64: four for the latent, one for the rope part).
//
// Block layout: [n_layers][block_size][row_bytes], contiguous, so a block moves between
// instances as one piece of stored bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/huge_pages.h"

namespace moeserve::kv {

enum class KvDtype { F32, BF16, FP8 };
inline constexpr KvDtype kKvDtypes[] = {KvDtype::F32, KvDtype::BF16, KvDtype::FP8};
// The dtype a pool takes when none is named (--kv-cache-dtype's default): docs/design.md.
inline constexpr KvDtype kDefaultKvDtype = KvDtype::BF16;
const char* kv_dtype_name(KvDtype d);  // "f32", "bf16", "fp8"
bool parse_kv_dtype(const std::string& s, KvDtype* out);

// Values per fp8 scale.
inline constexpr int64_t kKvFp8Block = 128;
// Bytes of one cached row of `dim` values.
int64_t kv_row_bytes(KvDtype d, int64_t dim);

// Stores x[0, dim) as a row of dtype d (out: kv_row_bytes(d, dim) bytes). fp8: per block of
// 128 values, scale = amax / 448 (1 when the block is all zeros; NaN when it holds a NaN or an
// infinity, so that those reach the outputs), each value the e4m3 of x / scale, rounded to
// nearest even (never a NaN byte).
void encode_row(KvDtype d, const float* x, int64_t dim, uint8_t* out);
// The values a row holds: f32 and bf16 exactly, fp8 as float(e4m3) * scale.
void decode_row(KvDtype d, const uint8_t* row, int64_t dim, float* out);

class KvPool {
 public:
  KvPool(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t kv_dim,
         KvDtype dtype = KvDtype::F32);

  // Takes n free blocks (appended to `out`) or none and returns false when fewer are free.
  bool allocate(int64_t n, std::vector<int32_t>* out);
  void release(const std::vector<int32_t>& blocks);

  // The stored row (row_bytes()) of token slot `slot` (< block_size) of `block` in `layer`.
  uint8_t* at(int32_t block, int64_t layer, int64_t slot) {
    return data() + ((block * n_layers_ + layer) * block_size_ + slot) * row_bytes_;
  }
  const uint8_t* at(int32_t block, int64_t layer, int64_t slot) const {
    return data() + ((block * n_layers_ + layer) * block_size_ + slot) * row_bytes_;
  }
  // Writes x[0, kv_dim) into that row (encode_row).
  void store(const float* x, int32_t block, int64_t layer, int64_t slot) {
    encode_row(dtype_, x, kv_dim_, at(block, layer, slot));
  }

  KvDtype dtype() const { return dtype_; }
  int64_t block_size() const { return block_size_; }
  int64_t n_blocks() const { return n_blocks_; }
  int64_t n_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t n_used() const { return n_blocks_ - n_free(); }
  int64_t kv_dim() const { return kv_dim_; }
  int64_t n_layers() const { return n_layers_; }
  int64_t row_bytes() const { return row_bytes_; }
  // Token positions the pool holds.
  int64_t capacity_tokens() const { return n_blocks_ * block_size_; }
  size_t block_bytes() const { return static_cast<size_t>(n_layers_ * block_size_ * row_bytes_); }
  uint8_t* block_data(int32_t block) { return at(block, 0, 0); }
  // Blocks needed to hold n_tokens positions.
  int64_t blocks_for(int64_t n_tokens) const { return (n_tokens + block_size_ - 1) / block_size_; }

 private:
  int64_t n_blocks_, block_size_, n_layers_, kv_dim_;
  KvDtype dtype_;
  int64_t row_bytes_;
  uint8_t* data() const { return reinterpret_cast<uint8_t*>(mem_.data()); }

  // [n_blocks][n_layers][block_size][row_bytes], zeroed, on huge pages: decode reads a
  // sequence's rows of a layer from blocks n_layers apart.
  HugeBuffer mem_;
  std::vector<int32_t> free_;    // stack of free block ids
  std::vector<uint8_t> in_use_;  // [n_blocks], to catch double frees
};

}  // namespace moeserve::kv
