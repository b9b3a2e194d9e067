#include "tokenizer/word_cache.h"

namespace moeserve::tokenizer {

WordCache& WordCache::for_thread(uint64_t uid) {
  static thread_local WordCache cache;
  if (cache.owner_ != uid) {
    cache.clear();
    cache.owner_ = uid;
  }
  return cache;
}

void WordCache::clear() {
  if (entries_ == 0) return;
  std::fill(slots_.begin(), slots_.end(), Slot{0, 0, 0, 0, 0});
  keys_.clear();
  ids_.clear();
  entries_ = 0;
}

void WordCache::insert(std::string_view word, uint64_t hash, const int32_t* ids, size_t n) {
  if (n == 0 || n > 0xFFFF || word.size() > kMaxWord) return;
  if (entries_ >= kMaxEntries) clear();
  size_t i = hash & kMask;
  while (slots_[i].n_ids != 0) i = (i + 1) & kMask;
  slots_[i] = Slot{hash, static_cast<uint32_t>(keys_.size()), static_cast<uint32_t>(ids_.size()),
                   static_cast<uint16_t>(word.size()), static_cast<uint16_t>(n)};
  keys_.append(word);
  ids_.insert(ids_.end(), ids, ids + n);
  ++entries_;
}

}  // namespace moeserve::tokenizer
