// Byte-level BPE model: vocabulary, ranked merges, and the merge loop that turns one pre-token
// (raw bytes) into token ids. Merges are applied lowest rank first, leftmost first among equal
// ranks, exactly as Hugging Face `tokenizers` does.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace moeserve::tokenizer {

// Open-addressing map from a token pair (left id, right id) to (rank, merged id).
class MergeTable {
 public:
  struct Entry {
    uint64_t key;  // (left << 32) | right; kEmpty when the slot is free
    uint32_t rank;
    int32_t merged;
  };
  static constexpr uint64_t kEmpty = ~0ull;

  void reserve(size_t n);
  // False when the pair is already present (the first rank wins, as in HF).
  bool insert(int32_t left, int32_t right, uint32_t rank, int32_t merged);
  const Entry* find(int32_t left, int32_t right) const {
    if (slots_.empty()) return nullptr;
    const uint64_t key = make_key(left, right);
    for (size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
      const Entry& e = slots_[i];
      if (e.key == key) return &e;
      if (e.key == kEmpty) return nullptr;
    }
  }
  size_t size() const { return size_; }

 private:
  static uint64_t make_key(int32_t l, int32_t r) {
    return (uint64_t(uint32_t(l)) << 32) | uint32_t(r);
  }
  static size_t hash(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return static_cast<size_t>(k);
  }
  std::vector<Entry> slots_;
  size_t mask_ = 0, size_ = 0;
};

class BpeModel {
 public:
  // vocab: token string (byte-level alphabet) -> id. merges: pairs of token strings in rank order.
  // Throws moeserve::Error when a merge names an unknown token or its result is not in vocab.
  BpeModel(std::unordered_map<std::string, int32_t> vocab,
           const std::vector<std::pair<std::string, std::string>>& merges, bool ignore_merges,
           int32_t unk_id);

  // Appends the ids of one pre-token given as raw bytes.
  void encode_word(std::string_view bytes, std::vector<int32_t>& out) const;

  const std::unordered_map<std::string, int32_t>& vocab() const { return vocab_; }

 private:
  void merge_small(std::vector<int32_t>& syms) const;
  void merge_large(std::vector<int32_t>& syms) const;

  std::unordered_map<std::string, int32_t> vocab_;
  MergeTable merges_;
  int32_t byte_id_[256];  // id of the one-char token of each byte, or -1
  bool ignore_merges_;
  int32_t unk_id_;
};

}  // namespace moeserve::tokenizer
