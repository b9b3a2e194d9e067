#include "tokenizer/added_tokens.h"

#include <algorithm>
#include <cstring>

#include "tokenizer/pretokenizer.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer {
namespace {

bool is_white_space(uint32_t c) {  // Unicode White_Space, what Rust's regex \s matches
  return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

bool starts_with_word(std::string_view s) {
  static const Regex word("\\A\\w");
  size_t b, e;
  return !s.empty() && word.next_match(s, 0, b, e);
}

bool ends_with_word(std::string_view s) {
  if (s.empty()) return false;
  size_t i = s.size() - 1;
  while (i > 0 && (uint8_t(s[i]) & 0xC0) == 0x80) --i;
  return starts_with_word(s.substr(i));
}

// Start of the run of whitespace that ends `s` (s.size() when there is none).
size_t trailing_space_start(std::string_view s) {
  size_t end = s.size();
  while (end > 0) {
    size_t i = end - 1;
    while (i > 0 && (uint8_t(s[i]) & 0xC0) == 0x80) --i;
    size_t j = i;
    if (!is_white_space(utf8_next(s, j))) break;
    end = i;
  }
  return end;
}

// End of the run of whitespace that starts `s`.
size_t leading_space_end(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    size_t j = i;
    if (!is_white_space(utf8_next(s, j))) break;
    i = j;
  }
  return i;
}

}  // namespace

AddedTokenMatcher::AddedTokenMatcher(const std::vector<AddedToken>& tokens, bool normalized) {
  nodes_.emplace_back();
  for (const AddedToken& t : tokens) {
    if (t.normalized != normalized || t.content.empty()) continue;
    int32_t node = 0;
    for (char ch : t.content) {
      const uint8_t b = static_cast<uint8_t>(ch);
      int32_t c = child(node, b);
      if (c < 0) {
        c = static_cast<int32_t>(nodes_.size());
        auto& next = nodes_[node].next;
        next.insert(std::lower_bound(next.begin(), next.end(), std::make_pair(b, int32_t(-1))),
                    {b, c});
        nodes_.emplace_back();
      }
      node = c;
    }
    if (nodes_[node].token < 0) {  // the first of two identical contents wins
      nodes_[node].token = static_cast<int32_t>(tokens_.size());
      tokens_.push_back(t);
    }
    first_byte_[uint8_t(t.content[0])] = true;
  }
}

int32_t AddedTokenMatcher::child(int32_t node, uint8_t b) const {
  for (const auto& [byte, c] : nodes_[node].next) {
    if (byte == b) return c;
    if (byte > b) break;
  }
  return -1;
}

int32_t AddedTokenMatcher::longest_at(std::string_view text, size_t i, size_t end,
                                      size_t* len) const {
  int32_t node = 0, best = -1;
  for (size_t k = i; k < end; ++k) {
    node = child(node, uint8_t(text[k]));
    if (node < 0) break;
    if (nodes_[node].token >= 0) {
      best = nodes_[node].token;
      *len = k + 1 - i;
    }
  }
  return best;
}

void AddedTokenMatcher::split(std::string_view text, size_t begin, size_t end, bool skip_special,
                              std::vector<Piece>& out) const {
  if (tokens_.empty() || begin == end) {
    if (end > begin) out.push_back({begin, end, -1});
    return;
  }
  const std::string_view s = text.substr(begin, end - begin);  // HF's `sentence`
  size_t start_offset = 0, pos = 0;
  while (pos < s.size()) {
    // Leftmost start with any match, then the longest token there.
    size_t len = 0;
    int32_t t = -1;
    for (; pos < s.size(); ++pos) {
      if (!first_byte_[uint8_t(s[pos])]) continue;
      t = longest_at(s, pos, s.size(), &len);
      if (t >= 0) break;
    }
    if (t < 0) break;
    size_t start = pos, stop = pos + len;
    pos = stop;  // matches never overlap, whether or not this one is kept
    const AddedToken& tok = tokens_[t];
    if (skip_special && tok.special) continue;
    if (tok.single_word && ((start > 0 && ends_with_word(s.substr(0, start))) ||
                            (stop < s.size() && starts_with_word(s.substr(stop)))))
      continue;
    if (tok.lstrip) start = std::max(trailing_space_start(s.substr(0, start)), start_offset);
    if (tok.rstrip) stop += leading_space_end(s.substr(stop));
    start = std::max(start, start_offset);
    if (start_offset < start) out.push_back({begin + start_offset, begin + start, -1});
    out.push_back({begin + start, begin + stop, tok.id});
    start_offset = stop;
    pos = std::max(pos, stop);
  }
  if (start_offset < s.size()) out.push_back({begin + start_offset, end, -1});
}

}  // namespace moeserve::tokenizer
