// Pre-tokenization: the `Sequence` of `Split` (regex or literal) and `ByteLevel` steps from
// tokenizer.json, run as a pipeline over spans of the input so no piece is copied.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/regex.h"

namespace moeserve::tokenizer {

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel } kind = Kind::kSplit;
  std::unique_ptr<Regex> regex;  // kSplit with a regex pattern, or kByteLevel with use_regex
  std::string literal;           // kSplit with a string pattern
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;  // kByteLevel
};

class PreTokenizer {
 public:
  // Parses the "pre_tokenizer" object of tokenizer.json; throws moeserve::Error naming any
  // unsupported type. A byte-level tokenizer must end with (or contain) a ByteLevel step.
  explicit PreTokenizer(const nlohmann::json& config);

  // Calls word(piece) for each final pre-token of `text` (valid UTF-8), in order. Pieces are raw
  // bytes; the byte-level mapping is left to the BPE model.
  void run(std::string_view text, const std::function<void(std::string_view)>& word) const;

  bool has_byte_level() const { return has_byte_level_; }

 private:
  void add(const nlohmann::json& step);
  void run_from(size_t step, std::string_view piece,
                const std::function<void(std::string_view)>& word) const;

  std::vector<PreTokenizerStep> steps_;
  bool has_byte_level_ = false;
};

}  // namespace moeserve::tokenizer
