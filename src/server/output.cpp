#include "server/output.h"

#include <algorithm>
#include <cstdio>

#include "tokenizer/unicode.h"

namespace moeserve::server {

namespace {

constexpr std::string_view kThinkOpen = "<think>";
constexpr std::string_view kThinkClose = "</think>";

int64_t count_chars(std::string_view s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

}  // namespace

void Delta::append(Delta&& d) {
  reasoning += d.reasoning;
  content += d.content;
  for (auto& lp : d.logprobs) logprobs.push_back(std::move(lp));
}

void ReasoningSplitter::put(std::string_view text, Delta& out) {
  held_.append(text);
  for (;;) {
    if (state_ == Start::Content) {
      out.content += held_;
      held_.clear();
      return;
    }
    if (state_ == Start::MaybeThink) {
      // Skip leading whitespace before deciding; wait while the text could still be "<think>".
      const size_t b = held_.find_first_not_of(" \t\r\n");
      if (b == std::string::npos) return;
      std::string_view rest = std::string_view(held_).substr(b);
      if (rest.size() < kThinkOpen.size() && kThinkOpen.starts_with(rest)) return;
      if (rest.starts_with(kThinkOpen)) {
        held_.erase(0, b + kThinkOpen.size());
        state_ = Start::InThink;
      } else {
        state_ = Start::Content;
      }
      continue;
    }
    // Inside the reasoning block.
    const size_t close = held_.find(kThinkClose);
    if (close != std::string::npos) {
      out.reasoning.append(held_, 0, close);
      held_.erase(0, close + kThinkClose.size());
      state_ = Start::Content;
      continue;
    }
    const size_t hold = partial_suffix(held_, kThinkClose);
    out.reasoning.append(held_, 0, held_.size() - hold);
    held_.erase(0, held_.size() - hold);
    return;
  }
}

void ReasoningSplitter::flush(Delta& out) {
  (state_ == Start::InThink ? out.reasoning : out.content) += held_;
  held_.clear();
}

OutputPipeline::OutputPipeline(const tokenizer::Tokenizer& tok, OutputOptions opt)
    : opt_(std::move(opt)),
      decoder_(tok, opt_.skip_special),
      stop_(opt_.stop),
      splitter_(!opt_.reasoning        ? ReasoningSplitter::Start::Content
                : opt_.starts_in_think ? ReasoningSplitter::Start::InThink
                                       : ReasoningSplitter::Start::MaybeThink) {}

void OutputPipeline::emit_text(const std::string& text, Delta& out) {
  if (text.empty()) return;
  std::string safe;
  stop_.put(text, safe);
  splitter_.put(safe, out);
}

bool OutputPipeline::put(const engine::TokenEvent& ev, Delta& out) {
  if (stop_.stopped()) return true;
  ++tokens_;
  if (std::find(opt_.stop_ids.begin(), opt_.stop_ids.end(), ev.token) != opt_.stop_ids.end())
    return false;  // the engine finishes the request after it; no text, no logprobs
  if (opt_.logprobs) out.logprobs.push_back({ev.token, ev.logprob, ev.top, chars_});
  const std::string text = decoder_.put(ev.token);
  chars_ += count_chars(text);
  emit_text(text, out);
  return stop_.stopped();
}

void OutputPipeline::finish(Delta& out) {
  if (!stop_.stopped()) {
    emit_text(decoder_.finish(), out);
    std::string rest;
    stop_.flush(rest);
    splitter_.put(rest, out);
  }
  splitter_.flush(out);
}

std::string token_display(const tokenizer::Tokenizer& tok, int32_t id) {
  const std::string_view b = tok.token_bytes(id);
  if (tokenizer::find_invalid_utf8(b) == std::string_view::npos) return std::string(b);
  std::string s = "bytes:";
  char buf[8];
  for (unsigned char c : b) {
    std::snprintf(buf, sizeof(buf), "\\x%02x", c);
    s += buf;
  }
  return s;
}

}  // namespace moeserve::server
