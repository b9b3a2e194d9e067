#include "tokenizer/bpe.h"

#include <algorithm>
#include <queue>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer {

void MergeTable::reserve(size_t n) {
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  slots_.assign(cap, Entry{kEmpty, 0, 0});
  mask_ = cap - 1;
  size_ = 0;
}

bool MergeTable::insert(int32_t left, int32_t right, uint32_t rank, int32_t merged) {
  if ((size_ + 1) * 2 > slots_.size()) {
    std::vector<Entry> old;
    old.swap(slots_);
    reserve(std::max<size_t>(16, (size_ + 1) * 2));
    for (const Entry& e : old)
      if (e.key != kEmpty)
        insert(int32_t(e.key >> 32), int32_t(e.key & 0xffffffffu), e.rank, e.merged);
  }
  const uint64_t key = make_key(left, right);
  for (size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
    Entry& e = slots_[i];
    if (e.key == key) {
      e.rank = rank;  // a repeated pair: the later line wins, as in HF's HashMap collect
      e.merged = merged;
      return false;
    }
    if (e.key == kEmpty) {
      e = Entry{key, rank, merged};
      ++size_;
      return true;
    }
  }
}

BpeModel::BpeModel(std::unordered_map<std::string, int32_t> vocab,
                   const std::vector<std::pair<std::string, std::string>>& merges,
                   bool ignore_merges, int32_t unk_id)
    : vocab_(std::move(vocab)), ignore_merges_(ignore_merges), unk_id_(unk_id) {
  const ByteLevelAlphabet& alphabet = byte_level_alphabet();
  for (int b = 0; b < 256; ++b) {
    auto it = vocab_.find(alphabet.byte_to_utf8[b]);
    byte_id_[b] = it == vocab_.end() ? -1 : it->second;
  }
  merges_.reserve(merges.size());
  std::string joined;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    auto ia = vocab_.find(a), ib = vocab_.find(b);
    MS_CHECK(ia != vocab_.end() && ib != vocab_.end(), "tokenizer.json: merge ", rank, " (\"", a,
             " ", b, "\") names a token that is not in the vocabulary");
    joined = a + b;
    auto im = vocab_.find(joined);
    MS_CHECK(im != vocab_.end(), "tokenizer.json: merge ", rank, " (\"", a, " ", b,
             "\") makes a token that is not in the vocabulary");
    merges_.insert(ia->second, ib->second, static_cast<uint32_t>(rank), im->second);
  }
}

void BpeModel::encode_word(std::string_view bytes, std::vector<int32_t>& out) const {
  if (bytes.size() == 1 && byte_id_[uint8_t(bytes[0])] >= 0) {
    out.push_back(byte_id_[uint8_t(bytes[0])]);
    return;
  }
  if (ignore_merges_) {
    std::string mapped;
    for (char c : bytes) mapped += byte_level_alphabet().byte_to_utf8[uint8_t(c)];
    auto it = vocab_.find(mapped);
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<int32_t> syms;
  syms.reserve(bytes.size());
  for (char c : bytes) {
    const int32_t id = byte_id_[uint8_t(c)];
    if (id >= 0) {
      syms.push_back(id);
    } else if (unk_id_ >= 0) {
      syms.push_back(unk_id_);
    }  // else: dropped, as HF does when there is no unk token
  }
  if (syms.size() <= 48) {
    merge_small(syms);
  } else {
    merge_large(syms);
  }
  out.insert(out.end(), syms.begin(), syms.end());
}

// O(n^2) scan: best for the short words that make up almost all text.
void BpeModel::merge_small(std::vector<int32_t>& syms) const {
  constexpr uint32_t kNone = ~0u;
  size_t n = syms.size();
  if (n < 2) return;
  uint32_t rank[48];
  int32_t merged[48];
  auto look = [&](size_t i) {
    const MergeTable::Entry* e = merges_.find(syms[i], syms[i + 1]);
    rank[i] = e ? e->rank : kNone;
    merged[i] = e ? e->merged : -1;
  };
  for (size_t i = 0; i + 1 < n; ++i) look(i);
  while (n > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < n; ++i)
      if (rank[i] < rank[best]) best = i;
    if (rank[best] == kNone) break;
    syms[best] = merged[best];
    for (size_t i = best + 1; i + 1 < n; ++i) syms[i] = syms[i + 1];
    for (size_t i = best + 1; i + 2 < n; ++i) {
      rank[i] = rank[i + 1];
      merged[i] = merged[i + 1];
    }
    --n;
    if (best > 0) look(best - 1);
    if (best + 1 < n) look(best);
  }
  syms.resize(n);
}

// Heap of candidate merges ordered by (rank, position) over a linked list of symbols, with
// stale entries skipped on pop: O(n log n) for long words.
void BpeModel::merge_large(std::vector<int32_t>& syms) const {
  const size_t n = syms.size();
  std::vector<int32_t> prev(n), next(n);
  std::vector<char> alive(n, 1);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = int32_t(i) - 1;
    next[i] = i + 1 < n ? int32_t(i + 1) : -1;
  }
  struct Cand {
    uint32_t rank;
    int32_t pos;
    int32_t left, right;  // the symbols the pair was made of, to detect stale entries
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int32_t i) {
    if (i < 0 || next[i] < 0) return;
    if (const MergeTable::Entry* e = merges_.find(syms[i], syms[next[i]]))
      heap.push({e->rank, i, syms[i], syms[next[i]]});
  };
  for (size_t i = 0; i + 1 < n; ++i) push(int32_t(i));
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    const int32_t i = c.pos;
    if (!alive[i] || next[i] < 0 || syms[i] != c.left || syms[next[i]] != c.right) continue;
    const int32_t j = next[i];
    syms[i] = merges_.find(c.left, c.right)->merged;
    alive[j] = 0;
    next[i] = next[j];
    if (next[j] >= 0) prev[next[j]] = i;
    push(prev[i]);
    push(i);
  }
  size_t w = 0;
  for (int32_t i = 0; i >= 0; i = next[i]) syms[w++] = syms[i];
  syms.resize(w);
}

}  // namespace moeserve::tokenizer
