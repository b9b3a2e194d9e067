// The state behind a Tokenizer (internal to src/tokenizer).
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "tokenizer/added_tokens.h"
#include "tokenizer/bpe.h"
#include "tokenizer/pretokenizer.h"

namespace moeserve::tokenizer {

struct TokenizerImpl {
  uint64_t uid = 0;  // distinguishes instances in the per-thread word cache
  std::unique_ptr<BpeModel> bpe;
  std::unique_ptr<PreTokenizer> pre;
  std::unique_ptr<AddedTokenMatcher> raw_matcher;   // added tokens with normalized = false
  std::unique_ptr<AddedTokenMatcher> norm_matcher;  // added tokens with normalized = true
  std::unordered_map<std::string, int32_t> added;   // content -> id

  // Indexed by id, [0, vocab_size).
  std::vector<std::string> tokens;  // token string as in tokenizer.json
  std::vector<std::string> bytes;   // what the ByteLevel decoder makes of it
  std::vector<uint8_t> present;     // 1 when the id has a token
  std::vector<uint8_t> special;     // 1 for special added tokens (skipped by skip_special)

  std::vector<int32_t> prefix_ids, suffix_ids;  // added around the text when add_special
  int32_t bos_id = -1, eos_id = -1;
  std::string bos_token, eos_token;
  bool add_bos = false;
};

// Builds the state from the parsed contents of tokenizer.json and tokenizer_config.json.
std::shared_ptr<TokenizerImpl> build_tokenizer(const std::string& tokenizer_json,
                                               const std::string& config_json);

}  // namespace moeserve::tokenizer
