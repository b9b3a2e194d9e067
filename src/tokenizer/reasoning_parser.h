// Splits a reasoning model's output (DeepSeek-R1 style) into reasoning_content, the text inside
// <think>...</think>, and content, the text after it. Works on streamed pieces: a tag split
// across pieces is recognised, and text that might be the start of a tag is held back until the
// next piece (or finish()) decides. Every byte fed in comes out once, except the tags (and
// whitespace before an opening tag).
#pragma once

#include <string>
#include <string_view>

namespace moeserve::tokenizer {

struct ReasoningDelta {
  std::string reasoning;
  std::string content;
};

class ReasoningParser {
 public:
  struct Options {
    std::string start_tag = "<think>";
    std::string end_tag = "</think>";
    // True when the prompt already opened the reasoning block (R1's template ends with
    // "<｜Assistant｜><think>\n"): output is reasoning until the end tag. A start tag the model
    // still writes at the very beginning is dropped. False: output is content unless it begins
    // with the start tag (after optional whitespace).
    bool starts_in_reasoning = true;
  };

  ReasoningParser() : ReasoningParser(Options{}) {}
  explicit ReasoningParser(Options options);

  // Feeds the next piece of output; returns what it makes certain.
  ReasoningDelta feed(std::string_view piece);
  // End of output: releases text held back as a possible partial tag.
  ReasoningDelta finish();

  bool in_reasoning() const { return state_ == State::kReasoning; }
  bool reasoning_ended() const { return state_ == State::kContent && saw_end_; }

  // Whole-text convenience: feed(text) + finish().
  static ReasoningDelta parse(std::string_view text, Options options);

 private:
  enum class State { kStart, kReasoning, kContent };
  void step(ReasoningDelta& out, bool final);

  Options opt_;
  State state_;
  std::string buf_;                 // text not yet assigned to a channel
  bool reasoning_started_ = false;  // some reasoning text has been emitted
  bool saw_end_ = false;
};

}  // namespace moeserve::tokenizer
