#include "kv/kv_pool.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "core/error.h"

namespace moeserve::kv {
namespace {

size_t checked_bytes(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t row_bytes) {
  MS_CHECK(n_blocks > 0 && block_size > 0, "KV cache needs at least one block of one token");
  return static_cast<size_t>(n_blocks * n_layers * block_size * row_bytes);
}

}  // namespace

const char* kv_dtype_name(KvDtype d) {
  switch (d) {
    case KvDtype::F32:
      return "f32";
    case KvDtype::BF16:
      return "bf16";
    case KvDtype::FP8:
      return "fp8";
  }
  return "?";
}

bool parse_kv_dtype(const std::string& s, KvDtype* out) {
  for (KvDtype d : kKvDtypes)
    if (s == kv_dtype_name(d)) return *out = d, true;
  return false;
}

int64_t kv_row_bytes(KvDtype d, int64_t dim) {
  switch (d) {
    case KvDtype::F32:
      return dim * 4;
    case KvDtype::BF16:
      return dim * 2;
    case KvDtype::FP8:
      return dim + (dim + kKvFp8Block - 1) / kKvFp8Block * 4;
  }
  return 0;
}

void encode_row(KvDtype d, const float* x, int64_t dim, uint8_t* out) {
  switch (d) {
    case KvDtype::F32:
      std::memcpy(out, x, dim * sizeof(float));
      return;
    case KvDtype::BF16:
      for (int64_t k = 0; k < dim; ++k) {
        const uint16_t h = f32_to_bf16(x[k]);
        std::memcpy(out + 2 * k, &h, 2);
      }
      return;
    case KvDtype::FP8:
      for (int64_t b = 0; b * kKvFp8Block < dim; ++b) {
        const int64_t k0 = b * kKvFp8Block, k1 = std::min(dim, k0 + kKvFp8Block);
        float amax = 0;
        bool finite = true;
        for (int64_t k = k0; k < k1; ++k) {
          finite &= std::isfinite(x[k]);
          amax = std::max(amax, std::fabs(x[k]));
        }
        float scale = !finite ? NAN : amax > 0 ? amax / 448.0f : 1.0f;
        // A subnormal amax / 448 would make x / scale overflow to infinity: saturate instead.
        if (finite && scale < 0x1p-126f) scale = 0x1p-126f;
        for (int64_t k = k0; k < k1; ++k) out[k] = finite ? f32_to_fp8e4m3(x[k] / scale) : 0;
        std::memcpy(out + dim + 4 * b, &scale, 4);
      }
      return;
  }
}

void decode_row(KvDtype d, const uint8_t* row, int64_t dim, float* out) {
  switch (d) {
    case KvDtype::F32:
      std::memcpy(out, row, dim * sizeof(float));
      return;
    case KvDtype::BF16:
      for (int64_t k = 0; k < dim; ++k) {
        uint16_t h;
        std::memcpy(&h, row + 2 * k, 2);
        out[k] = bf16_to_f32(h);
      }
      return;
    case KvDtype::FP8:
      for (int64_t k = 0; k < dim; ++k) {
        float s;
        std::memcpy(&s, row + dim + 4 * (k / kKvFp8Block), 4);
        out[k] = fp8e4m3_to_f32(row[k]) * s;
      }
      return;
  }
}

KvPool::KvPool(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t kv_dim,
               KvDtype dtype)
    : n_blocks_(n_blocks),
      block_size_(block_size),
      n_layers_(n_layers),
      kv_dim_(kv_dim),
      key_len_(block_size),
      dtype_(dtype),
      row_bytes_(kv_row_bytes(dtype, kv_dim)),
      mem_(checked_bytes(n_blocks, block_size, n_layers, row_bytes_), "the KV cache") {
  std::memset(mem_.data(), 0, n_blocks * block_bytes());
  free_.reserve(n_blocks);
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
  meta_.assign(n_blocks, Meta{});
}

uint64_t prefix_block_key(uint64_t parent, const int32_t* tokens, int64_t n) {
  // A multiply-xorshift mix per token over the parent's key and the count.
  auto mix = [](uint64_t x) {
    x ^= x >> 31;
    x *= 0x7fb5d329728ea185ull;
    x ^= x >> 27;
    x *= 0x81dadef4bc2dd44dull;
    x ^= x >> 33;
    return x;
  };
  uint64_t h = mix(parent ^ 0x9e3779b97f4a7c15ull) ^ static_cast<uint64_t>(n);
  for (int64_t i = 0; i < n; ++i)
    h = mix(h + static_cast<uint64_t>(static_cast<uint32_t>(tokens[i])) + 0x632be59bd9b4e019ull);
  return h == 0 ? 1 : h;  // 0 is the empty prefix's
}

void KvPool::lru_remove(int32_t b) {
  Meta& m = meta_[b];
  (m.prev >= 0 ? meta_[m.prev].next : lru_head_) = m.next;
  (m.next >= 0 ? meta_[m.next].prev : lru_tail_) = m.prev;
  m.prev = m.next = -1;
  --lru_size_;
}

void KvPool::lru_push(int32_t b) {
  Meta& m = meta_[b];
  m.prev = lru_tail_;
  m.next = -1;
  (lru_tail_ >= 0 ? meta_[lru_tail_].next : lru_head_) = b;
  lru_tail_ = b;
  ++lru_size_;
}

void KvPool::unpublish(int32_t b) {
  Meta& m = meta_[b];
  index_.erase(m.key);
  m.published = false;
  m.parent = -1;
  ++m.generation;
}

void KvPool::take_ref(int32_t b) {
  if (meta_[b].refs++ == 0 && meta_[b].published) lru_remove(b);
}

bool KvPool::allocate(int64_t n, std::vector<int32_t>* out) {
  if (n > n_free()) return false;
  for (int64_t i = 0; i < n; ++i) {
    int32_t b;
    if (!free_.empty()) {
      b = free_.back();
      free_.pop_back();
    } else {
      b = lru_head_;
      lru_remove(b);
      unpublish(b);
    }
    meta_[b].refs = 1;
    out->push_back(b);
  }
  return true;
}

void KvPool::release(const std::vector<int32_t>& blocks) {
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    const int32_t b = *it;
    MS_ASSERT(b >= 0 && b < n_blocks_ && meta_[b].refs > 0);
    if (--meta_[b].refs > 0) continue;
    if (meta_[b].published)
      lru_push(b);
    else
      free_.push_back(b);
  }
}

bool KvPool::holds(int32_t b, int32_t parent, const int32_t* tokens) const {
  const Meta& m = meta_[b];
  if (!m.published || m.parent != parent) return false;
  if (parent >= 0 && m.parent_generation != meta_[parent].generation) return false;
  return std::equal(tokens, tokens + key_len_, tokens_.begin() + b * key_len_);
}

void KvPool::set_key_next_token(bool on) {
  if (on == key_next_token()) return;
  MS_CHECK(index_.empty(), "the KV pool's keys change only before anything is published");
  key_len_ = block_size_ + (on ? 1 : 0);
  tokens_.clear();
}

int64_t KvPool::match(const int32_t* tokens, int64_t max_blocks, std::vector<int32_t>* out) {
  uint64_t key = 0;
  int32_t parent = -1;
  int64_t k = 0;
  for (; k < max_blocks; ++k) {
    const int32_t* t = tokens + k * block_size_;
    key = prefix_block_key(key, t, key_len_);
    const auto it = index_.find(key);
    if (it == index_.end() || !holds(it->second, parent, t)) break;
    parent = it->second;
    take_ref(parent);
    out->push_back(parent);
  }
  return k;
}

int32_t KvPool::publish(int32_t block, int32_t parent, const int32_t* tokens) {
  MS_ASSERT(block >= 0 && block < n_blocks_ && meta_[block].refs > 0 && !meta_[block].published);
  MS_ASSERT(parent < n_blocks_ && (parent < 0 || meta_[parent].published));
  const uint64_t key = prefix_block_key(parent < 0 ? 0 : meta_[parent].key, tokens, key_len_);
  const auto it = index_.find(key);
  if (it != index_.end()) {
    const int32_t other = it->second;
    if (!holds(other, parent, tokens)) return block;  // a collision: leave it unpublished
    take_ref(other);
    release({block});
    return other;
  }
  Meta& m = meta_[block];
  m.published = true;
  m.key = key;
  m.parent = parent;
  m.parent_generation = parent < 0 ? 0 : meta_[parent].generation;
  if (tokens_.empty()) tokens_.resize(static_cast<size_t>(n_blocks_ * key_len_));
  std::copy(tokens, tokens + key_len_, tokens_.begin() + block * key_len_);
  index_.emplace(key, block);
  return block;
}

}  // namespace moeserve::kv
