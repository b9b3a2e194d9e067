// Cache of BPE results for pre-token words: words repeat a lot in any text, so most skip the
// merge loop. Open addressing over flat arrays (one probe usually hits); one cache per thread,
// so no lock. Emptied when full, or when used with another tokenizer.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace moeserve::tokenizer {

class WordCache {
 public:
  static constexpr size_t kMaxWord = 64;  // longer words are not cached

  // This thread's cache, emptied first if it last served another tokenizer (uid).
  static WordCache& for_thread(uint64_t uid);

  // Appends the cached ids of `word` to `out`; false when not cached.
  bool lookup(std::string_view word, uint64_t hash, std::vector<int32_t>& out) const {
    for (size_t i = hash & kMask;; i = (i + 1) & kMask) {
      const Slot& s = slots_[i];
      if (s.n_ids == 0) return false;
      if (s.hash == hash && s.key_len == word.size() &&
          std::memcmp(keys_.data() + s.key_off, word.data(), word.size()) == 0) {
        out.insert(out.end(), ids_.begin() + s.ids_off, ids_.begin() + s.ids_off + s.n_ids);
        return true;
      }
    }
  }
  // Remembers ids[first..] as the encoding of `word`.
  void insert(std::string_view word, uint64_t hash, const int32_t* ids, size_t n);

  static uint64_t hash(std::string_view s) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (s.size() * 0xff51afd7ed558ccdull);
    size_t i = 0;
    for (; i + 8 <= s.size(); i += 8) {
      uint64_t w;
      std::memcpy(&w, s.data() + i, 8);
      h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
      h ^= h >> 31;
    }
    uint64_t tail = 0;
    std::memcpy(&tail, s.data() + i, s.size() - i);
    h = (h ^ tail) * 0x94d049bb133111ebull;
    return h ^ (h >> 29);
  }

 private:
  static constexpr size_t kSlots = 1 << 17, kMask = kSlots - 1, kMaxEntries = kSlots / 2;
  struct Slot {
    uint64_t hash;
    uint32_t key_off, ids_off;
    uint16_t key_len, n_ids;  // n_ids == 0: free slot
  };
  void clear();

  uint64_t owner_ = 0;
  size_t entries_ = 0;
  std::vector<Slot> slots_ = std::vector<Slot>(kSlots, Slot{0, 0, 0, 0, 0});
  std::string keys_;
  std::vector<int32_t> ids_;
};

}  // namespace moeserve::tokenizer
