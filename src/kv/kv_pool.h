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
//
// Prefix caching: a full block whose rows are computed can be published under the token prefix
// it ends (its own block_size tokens, chained to its parent block's key). Later sequences whose
// tokens start with the same prefix share it (match) instead of computing it again. Blocks are
// reference-counted; a published block nobody holds stays cached and is evicted, least recently
// released first, only when allocate() finds no never-used or unpublished free block. The cached
// bits depend only on the tokens, the model and the pool's dtype and block size (the numerical
// contract, docs/design.md), and a pool has one model, dtype and block size, so the tokens are
// the whole key. Under speculative decoding a block also holds the MTP module's rows, and the
// one at its last position read the token after the block: then that token is part of the key
// too (set_key_next_token).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
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

  // Takes n free blocks (appended to `out`), each with one reference, or none and returns
  // false when fewer are free. Unpublished free blocks go first, then cached blocks nobody
  // holds, least recently released first (they leave the cache).
  bool allocate(int64_t n, std::vector<int32_t>* out);
  // Drops one reference to each block, the last one first (so a sequence's later blocks are
  // evicted before its earlier ones). A block nobody holds becomes free; a published one stays
  // cached until it is evicted.
  void release(const std::vector<int32_t>& blocks);

  // Prefix cache. The longest run of published blocks holding tokens[0, k * block_size) for
  // k <= max_blocks, each given one more reference and appended to `out`; returns k. A hit
  // compares the token ids and the parent block, never only a hash.
  int64_t match(const int32_t* tokens, int64_t max_blocks, std::vector<int32_t>* out);
  // Publishes `block` (held, full, its rows computed) as holding `tokens` (block_size ids) after
  // the prefix that `parent` holds (-1: at the start; else a published block). Returns the
  // block that holds this prefix from now on: `block` itself, or an equal block published
  // earlier, which then takes over `block`'s reference (and `block` is released). When a
  // different prefix already holds the same key (a hash collision), `block` stays unpublished
  // and is returned; is_published() tells.
  int32_t publish(int32_t block, int32_t parent, const int32_t* tokens);
  // With `on`, a block's key also holds the token after it: match() and publish() then read
  // one token past each block (tokens[k * block_size] for match's k-th, tokens[block_size] for
  // publish), which the caller must have. Set before anything is published.
  void set_key_next_token(bool on);
  bool key_next_token() const { return key_len_ > block_size_; }
  bool is_published(int32_t block) const { return meta_[block].published; }
  // Published blocks (held or not), and those of them nobody holds (evictable).
  int64_t n_cached() const { return static_cast<int64_t>(index_.size()); }
  int64_t n_evictable() const { return lru_size_; }
  int32_t refs(int32_t block) const { return meta_[block].refs; }

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
  // Blocks allocate() can hand out: never-used or unpublished free ones plus evictable ones.
  int64_t n_free() const { return static_cast<int64_t>(free_.size()) + lru_size_; }
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
  int64_t key_len_;  // tokens in a block's key: block_size_, or one more (set_key_next_token)
  KvDtype dtype_;
  int64_t row_bytes_;
  uint8_t* data() const { return reinterpret_cast<uint8_t*>(mem_.data()); }

  // [n_blocks][n_layers][block_size][row_bytes], zeroed, on huge pages: decode reads a
  // sequence's rows of a layer from blocks n_layers apart.
  HugeBuffer mem_;
  struct Meta {
    int32_t refs = 0;
    bool published = false;
    uint64_t key = 0;     // when published: the chained hash of the prefix it ends
    int32_t parent = -1;  // when published: the block before it (-1: none)
    uint64_t parent_generation = 0;
    uint64_t generation = 0;       // counts the times it left the cache
    int32_t prev = -1, next = -1;  // the LRU list of evictable blocks
  };
  void lru_remove(int32_t b);
  void lru_push(int32_t b);  // as the most recently released
  void unpublish(int32_t b);
  void take_ref(int32_t b);
  bool holds(int32_t b, int32_t parent, const int32_t* tokens) const;

  std::vector<int32_t> free_;    // stack of free, unpublished block ids
  std::vector<Meta> meta_;       // [n_blocks]
  std::vector<int32_t> tokens_;  // [n_blocks][key_len]: a published block's key's token ids
  std::unordered_map<uint64_t, int32_t> index_;  // key -> published block
  int32_t lru_head_ = -1, lru_tail_ = -1;        // oldest, newest
  int64_t lru_size_ = 0;
};

// The key of a block holding tokens[0, n) after a prefix whose key is `parent` (0 at the start):
// a 64-bit hash, chained. Equal keys are only candidates (KvPool::match compares the tokens).
uint64_t prefix_block_key(uint64_t parent, const int32_t* tokens, int64_t n);

}  // namespace moeserve::kv
