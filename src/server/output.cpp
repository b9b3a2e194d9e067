#include "server/output.h"

#include <algorithm>
#include <cstdio>

#include "tokenizer/unicode.h"

namespace moeserve::server {

namespace {

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

OutputPipeline::OutputPipeline(const tokenizer::Tokenizer& tok, OutputOptions opt)
    : opt_(std::move(opt)),
      decoder_(tok, opt_.skip_special),
      stop_(opt_.stop),
      reasoning_(opt_.reasoning ? std::optional<tokenizer::ReasoningParser>(
                                      tokenizer::ReasoningParser::Options{.starts_in_reasoning =
                                                                              opt_.starts_in_think})
                                : std::nullopt) {}

void OutputPipeline::split(std::string_view text, Delta& out) {
  if (!reasoning_) {
    out.content += text;
    return;
  }
  tokenizer::ReasoningDelta d = reasoning_->feed(text);
  out.reasoning += d.reasoning;
  out.content += d.content;
}

void OutputPipeline::emit_text(const std::string& text, Delta& out) {
  if (text.empty()) return;
  std::string safe;
  stop_.put(text, safe);
  split(safe, out);
}

bool OutputPipeline::put(const engine::TokenEvent& ev, Delta& out) {
  if (stop_.stopped()) return true;
  ++tokens_;
  if (std::find(opt_.stop_ids.begin(), opt_.stop_ids.end(), ev.token) != opt_.stop_ids.end())
    return false;  // the engine finishes the request after it; no text, no logprobs
  if (opt_.logprobs) out.logprobs.push_back({ev.token, ev.logprob, ev.top, chars_});
  const std::string text = decoder_.put(ev.token);
  chars_ += count_chars(text);
  if (tokens_ <= opt_.min_tokens)
    split(text, out);  // before min_tokens, stop strings do not end the output
  else
    emit_text(text, out);
  return stop_.stopped();
}

void OutputPipeline::finish(Delta& out) {
  if (!stop_.stopped()) {
    emit_text(decoder_.finish(), out);
    std::string rest;
    stop_.flush(rest);
    split(rest, out);
  }
  if (reasoning_) {
    tokenizer::ReasoningDelta d = reasoning_->finish();
    out.reasoning += d.reasoning;
    out.content += d.content;
  }
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
