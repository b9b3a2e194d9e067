#include "tokenizer/stream_decoder.h"

#include "tokenizer/unicode.h"

namespace moeserve::tokenizer {

std::string StreamDecoder::put(int32_t id) {
  if (skip_special_ && tok_.is_special(id)) return "";
  const std::string_view bytes = tok_.token_bytes(id);
  if (bytes.empty()) return "";
  pending_.append(bytes);
  std::string out;
  const size_t held = utf8_lossy_append(out, pending_, /*final_chunk=*/false);
  pending_.erase(0, pending_.size() - held);
  return out;
}

std::string StreamDecoder::finish() {
  std::string out;
  utf8_lossy_append(out, pending_, /*final_chunk=*/true);
  pending_.clear();
  return out;
}

}  // namespace moeserve::tokenizer
