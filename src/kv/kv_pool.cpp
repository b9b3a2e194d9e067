#include "kv/kv_pool.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace moeserve::kv {

KvPool::KvPool(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t kv_dim)
    : n_blocks_(n_blocks), block_size_(block_size), n_layers_(n_layers), kv_dim_(kv_dim) {
  MS_CHECK(n_blocks > 0 && block_size > 0, "KV cache needs at least one block of one token");
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(n_blocks * n_layers * block_size * kv_dim) * 4;
  const size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
  data_.reset(static_cast<float*>(std::aligned_alloc(kHuge, size)));
  MS_CHECK(data_ != nullptr, "cannot allocate ", size, " bytes for the KV cache");
  ::madvise(data_.get(), size, MADV_HUGEPAGE);  // advice: the cache works without it
  std::memset(data_.get(), 0, bytes);
  free_.reserve(n_blocks);
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
  in_use_.assign(n_blocks, 0);
}

void KvPool::Free::operator()(float* p) const {
  std::free(p);
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
