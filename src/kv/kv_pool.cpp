#include "kv/kv_pool.h"

#include <cstring>

#include "core/error.h"

namespace moeserve::kv {
namespace {

size_t checked_bytes(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t kv_dim) {
  MS_CHECK(n_blocks > 0 && block_size > 0, "KV cache needs at least one block of one token");
  return static_cast<size_t>(n_blocks * n_layers * block_size * kv_dim) * 4;
}

}  // namespace

KvPool::KvPool(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t kv_dim)
    : n_blocks_(n_blocks),
      block_size_(block_size),
      n_layers_(n_layers),
      kv_dim_(kv_dim),
      mem_(checked_bytes(n_blocks, block_size, n_layers, kv_dim), "the KV cache") {
  std::memset(mem_.data(), 0, n_blocks * block_bytes());
  free_.reserve(n_blocks);
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
  in_use_.assign(n_blocks, 0);
}

bool KvPool::allocate(int64_t n, std::vector<int32_t>* out) {
  if (n > n_free()) return false;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t b = free_.back();
    free_.pop_back();
    in_use_[b] = 1;
    out->push_back(b);
  }
  return true;
}

void KvPool::release(const std::vector<int32_t>& blocks) {
  for (int32_t b : blocks) {
    MS_ASSERT(b >= 0 && b < n_blocks_ && in_use_[b]);
    in_use_[b] = 0;
    free_.push_back(b);
  }
}

}  // namespace moeserve::kv
