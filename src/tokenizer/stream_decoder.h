// Incremental detokenization for streaming: feed ids one at a time, get back the text they
// complete. Only whole UTF-8 characters are emitted; bytes of a character split across tokens
// wait for the rest. The concatenation of all pieces plus finish() equals Tokenizer::decode of
// all the ids (invalid bytes become U+FFFD exactly where decode puts them).
#pragma once

#include <cstdint>
#include <string>

#include "tokenizer/tokenizer.h"

namespace moeserve::tokenizer {

class StreamDecoder {
 public:
  explicit StreamDecoder(Tokenizer tokenizer, bool skip_special = false)
      : tok_(std::move(tokenizer)), skip_special_(skip_special) {}

  // Returns the text made complete by `id` (often "", e.g. for half of a CJK character).
  std::string put(int32_t id);
  // Flushes what is left (an unfinished character becomes U+FFFD) and resets the decoder.
  std::string finish();
  // Bytes held back, waiting for the rest of a character (0..3).
  size_t pending() const { return pending_.size(); }

 private:
  Tokenizer tok_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace moeserve::tokenizer
