// Byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json (+ tokenizer_config.json),
// producing exactly the ids of the `tokenizers` library. Immutable once loaded: copies are cheap
// (shared state) and every method may be called from several threads at once.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moeserve::tokenizer {

struct TokenizerImpl;

class Tokenizer {
 public:
  // Loads <dir>/tokenizer.json and, when present, <dir>/tokenizer_config.json. Throws
  // moeserve::Error for a missing file or an unsupported model/normalizer/pre-tokenizer/decoder.
  static Tokenizer load(const std::filesystem::path& dir);
  // The same from the two files' contents (config_json may be empty).
  static Tokenizer from_json(const std::string& tokenizer_json, const std::string& config_json);

  // Text -> ids. add_special: add BOS/EOS as the model's config says (HF add_special_tokens).
  // parse_special: special tokens written in the text become their ids; when false they are
  // tokenized as plain text (HF encode_special_tokens = true), which is what untrusted user text
  // should get. Throws moeserve::Error when `text` is not valid UTF-8.
  std::vector<int32_t> encode(std::string_view text, bool add_special = true,
                              bool parse_special = true) const;

  // Ids -> text, as HF `decode`: invalid UTF-8 becomes U+FFFD, ids with no token are dropped.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  // The token's string as stored in tokenizer.json (byte-level alphabet), "" for unknown ids.
  std::string id_to_token(int32_t id) const;
  // The raw bytes the token decodes to (what `decode` concatenates), "" for unknown ids.
  std::string_view token_bytes(int32_t id) const;
  bool is_special(int32_t id) const;

  int32_t bos_id() const;  // -1 when the model has none
  int32_t eos_id() const;  // -1 when the model has none
  const std::string& bos_token() const;
  const std::string& eos_token() const;
  bool add_bos() const;
  // One past the largest id (model vocabulary plus added tokens).
  int32_t vocab_size() const;

 private:
  std::shared_ptr<const TokenizerImpl> impl_;
};

}  // namespace moeserve::tokenizer
