// Added and special tokens, found in the text before pre-tokenization the way HF's
// AddedVocabulary does: leftmost-longest matching, first the tokens with normalized=false on the
// raw text, then those with normalized=true on the pieces in between; single_word, lstrip and
// rstrip adjust or discard a match.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moeserve::tokenizer {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
};

// A piece of the input: either an added token (id >= 0) or text to pre-tokenize (id == -1).
struct Piece {
  size_t begin, end;
  int32_t id;
};

class AddedTokenMatcher {
 public:
  // `tokens` is the whole added vocabulary; `normalized` selects which half this matcher finds.
  AddedTokenMatcher(const std::vector<AddedToken>& tokens, bool normalized);

  // Splits text[begin, end) into pieces covering it, appending them to `out`. With
  // skip_special, special tokens are left in the text (HF's encode_special_tokens).
  void split(std::string_view text, size_t begin, size_t end, bool skip_special,
             std::vector<Piece>& out) const;

  bool empty() const { return tokens_.empty(); }

 private:
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> next;  // sorted by byte
    int32_t token = -1;                             // index into tokens_ when a token ends here
  };
  int32_t child(int32_t node, uint8_t b) const;
  // Longest token starting at text[i] (within [.., end)), or -1; sets *len.
  int32_t longest_at(std::string_view text, size_t i, size_t end, size_t* len) const;

  std::vector<AddedToken> tokens_;
  std::vector<Node> nodes_;
  bool first_byte_[256] = {};
};

}  // namespace moeserve::tokenizer
