#include "tokenizer/reasoning_parser.h"

#include "core/error.h"

namespace moeserve::tokenizer {
namespace {

// Length of the longest suffix of `s` that is a proper prefix of `tag` (a tag that may still be
// completed by the next piece).
size_t partial_tag_suffix(std::string_view s, std::string_view tag) {
  const size_t max = std::min(s.size(), tag.size() - 1);
  for (size_t n = max; n > 0; --n)
    if (s.substr(s.size() - n) == tag.substr(0, n)) return n;
  return 0;
}

bool is_space(char c) {
  return c == ' ' || c == '\n' || c == '\t' || c == '\r';
}

}  // namespace

ReasoningParser::ReasoningParser(Options options) : opt_(std::move(options)) {
  MS_CHECK(!opt_.start_tag.empty() && !opt_.end_tag.empty(), "reasoning tags must not be empty");
  state_ = opt_.starts_in_reasoning ? State::kReasoning : State::kStart;
}

ReasoningDelta ReasoningParser::feed(std::string_view piece) {
  buf_.append(piece);
  ReasoningDelta out;
  step(out, false);
  return out;
}

ReasoningDelta ReasoningParser::finish() {
  ReasoningDelta out;
  step(out, true);
  return out;
}

ReasoningDelta ReasoningParser::parse(std::string_view text, Options options) {
  ReasoningParser p(std::move(options));
  ReasoningDelta out = p.feed(text);
  ReasoningDelta rest = p.finish();
  out.reasoning += rest.reasoning;
  out.content += rest.content;
  return out;
}

void ReasoningParser::step(ReasoningDelta& out, bool final) {
  while (!buf_.empty()) {
    if (state_ == State::kContent) {
      out.content += buf_;
      buf_.clear();
      return;
    }
    if (state_ == State::kStart) {
      // Content unless the output opens with the start tag after optional whitespace.
      size_t ws = 0;
      while (ws < buf_.size() && is_space(buf_[ws])) ++ws;
      const std::string_view rest = std::string_view(buf_).substr(ws);
      const std::string_view tag = opt_.start_tag;
      if (rest.size() >= tag.size() && rest.substr(0, tag.size()) == tag) {
        buf_.erase(0, ws + tag.size());
        state_ = State::kReasoning;
        reasoning_started_ = true;  // a second start tag would be text
        continue;
      }
      if (!final && rest.size() < tag.size() && tag.substr(0, rest.size()) == rest) return;
      state_ = State::kContent;
      continue;
    }
    // Reasoning: a start tag the model repeats at the very beginning is dropped.
    if (!reasoning_started_) {
      const std::string_view tag = opt_.start_tag;
      if (buf_.size() >= tag.size() && std::string_view(buf_).substr(0, tag.size()) == tag) {
        buf_.erase(0, tag.size());
        reasoning_started_ = true;
        continue;
      }
      if (!final && buf_.size() < tag.size() && tag.substr(0, buf_.size()) == buf_) return;
      reasoning_started_ = true;
    }
    const size_t end = buf_.find(opt_.end_tag);
    if (end != std::string::npos) {
      out.reasoning.append(buf_, 0, end);
      buf_.erase(0, end + opt_.end_tag.size());
      state_ = State::kContent;
      saw_end_ = true;
      continue;
    }
    const size_t hold = final ? 0 : partial_tag_suffix(buf_, opt_.end_tag);
    out.reasoning.append(buf_, 0, buf_.size() - hold);
    buf_.erase(0, buf_.size() - hold);
    return;
  }
}

}  // namespace moeserve::tokenizer
