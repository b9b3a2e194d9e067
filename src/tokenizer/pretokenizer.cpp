#include "tokenizer/pretokenizer.h"

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer {
namespace {

const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

SplitBehavior parse_behavior(const std::string& s) {
  if (s == "Removed") return SplitBehavior::kRemoved;
  if (s == "Isolated") return SplitBehavior::kIsolated;
  if (s == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (s == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (s == "Contiguous") return SplitBehavior::kContiguous;
  fail("tokenizer.json: unsupported Split behavior \"", s, "\"");
}

struct Span {
  size_t b, e;
  bool match;
};

// HF's SplitDelimiterBehavior applied to the list of (span, is_match) covering a piece.
std::vector<Span> apply_behavior(std::vector<Span> in, SplitBehavior behavior) {
  std::vector<Span> out;
  bool prev = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      return in;
    case SplitBehavior::kRemoved:
      for (const Span& s : in)
        if (!s.match) out.push_back(s);
      return out;
    case SplitBehavior::kMergedWithPrevious:
      for (const Span& s : in) {
        if (s.match && !prev && !out.empty()) {
          out.back().e = s.e;
        } else {
          out.push_back({s.b, s.e, false});
        }
        prev = s.match;
      }
      return out;
    case SplitBehavior::kMergedWithNext:
      for (auto it = in.rbegin(); it != in.rend(); ++it) {
        if (it->match && !prev && !out.empty()) {
          out.back().b = it->b;
        } else {
          out.push_back({it->b, it->e, false});
        }
        prev = it->match;
      }
      return {out.rbegin(), out.rend()};
    case SplitBehavior::kContiguous:
      for (const Span& s : in) {
        if (s.match == prev && !out.empty()) {
          out.back().e = s.e;
        } else {
          out.push_back({s.b, s.e, true});
        }
        prev = s.match;
      }
      return out;
  }
  return in;
}

}  // namespace

PreTokenizer::PreTokenizer(const nlohmann::json& config) {
  MS_CHECK(config.is_object(),
           "tokenizer.json: pre_tokenizer is missing (byte-level BPE needs one)");
  add(config);
  MS_CHECK(has_byte_level_,
           "tokenizer.json: pre_tokenizer has no ByteLevel step; only byte-level "
           "BPE tokenizers are supported");
}

void PreTokenizer::add(const nlohmann::json& step) {
  const std::string type = step.value("type", "");
  if (type == "Sequence") {
    for (const auto& s : step.at("pretokenizers")) add(s);
    return;
  }
  PreTokenizerStep out;
  if (type == "Split") {
    const auto& pattern = step.at("pattern");
    if (pattern.contains("Regex")) {
      out.regex = std::make_unique<Regex>(pattern.at("Regex").get<std::string>());
    } else if (pattern.contains("String")) {
      out.literal = pattern.at("String").get<std::string>();
      MS_CHECK(!out.literal.empty(), "tokenizer.json: Split with an empty String pattern");
    } else {
      fail("tokenizer.json: Split pattern must be Regex or String");
    }
    out.behavior = parse_behavior(step.value("behavior", "Isolated"));
    out.invert = step.value("invert", false);
  } else if (type == "ByteLevel") {
    MS_CHECK(!has_byte_level_, "tokenizer.json: more than one ByteLevel pre-tokenizer");
    out.kind = PreTokenizerStep::Kind::kByteLevel;
    out.add_prefix_space = step.value("add_prefix_space", false);
    if (step.value("use_regex", true)) out.regex = std::make_unique<Regex>(kGpt2Pattern);
    has_byte_level_ = true;
  } else {
    fail("tokenizer.json: unsupported pre-tokenizer type \"", type,
         "\" (supported: Sequence, Split, ByteLevel)");
  }
  steps_.push_back(std::move(out));
}

void PreTokenizer::run(std::string_view text,
                       const std::function<void(std::string_view)>& word) const {
  if (!text.empty()) run_from(0, text, word);
}

void PreTokenizer::run_from(size_t k, std::string_view piece,
                            const std::function<void(std::string_view)>& word) const {
  if (k == steps_.size()) {
    word(piece);
    return;
  }
  const PreTokenizerStep& step = steps_[k];
  std::string prefixed;  // must outlive every sub-piece of `piece`
  if (step.kind == PreTokenizerStep::Kind::kByteLevel) {
    if (step.add_prefix_space && piece[0] != ' ') {
      prefixed = " " + std::string(piece);
      piece = prefixed;
    }
    if (!step.regex) return run_from(k + 1, piece, word);
  }
  const bool fast = step.behavior == SplitBehavior::kIsolated && !step.invert && step.regex;
  if (fast) {  // the common case, streamed without building a list
    size_t prev = 0;
    step.regex->find_all(piece, [&](size_t b, size_t e) {
      if (b > prev) run_from(k + 1, piece.substr(prev, b - prev), word);
      if (e > b) run_from(k + 1, piece.substr(b, e - b), word);
      prev = e;
    });
    if (prev < piece.size()) run_from(k + 1, piece.substr(prev), word);
    return;
  }
  std::vector<Span> spans;
  size_t prev = 0;
  auto on_match = [&](size_t b, size_t e) {
    if (b > prev) spans.push_back({prev, b, false});
    spans.push_back({b, e, true});
    prev = e;
  };
  if (step.regex) {
    step.regex->find_all(piece, on_match);
  } else {
    for (size_t at = piece.find(step.literal); at != std::string_view::npos;
         at = piece.find(step.literal, at + step.literal.size()))
      on_match(at, at + step.literal.size());
  }
  if (prev < piece.size()) spans.push_back({prev, piece.size(), false});
  if (step.invert)
    for (Span& s : spans) s.match = !s.match;
  for (const Span& s : apply_behavior(std::move(spans), step.behavior))
    if (s.e > s.b) run_from(k + 1, piece.substr(s.b, s.e - s.b), word);
}

}  // namespace moeserve::tokenizer
