#include "server/output.h"

#include <algorithm>
#include <cstdio>
#include <random>

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
  for (auto& t : d.tool_calls) tool_calls.push_back(std::move(t));
}

ToolTokens ToolTokens::of(const tokenizer::Tokenizer& tok) {
  ToolTokens t;
  auto id = [&](const char* s) {
    auto v = tok.token_to_id(s);
    return v ? *v : -1;
  };
  t.calls_begin = id("<｜tool▁calls▁begin｜>");
  t.calls_end = id("<｜tool▁calls▁end｜>");
  t.call_begin = id("<｜tool▁call▁begin｜>");
  t.call_end = id("<｜tool▁call▁end｜>");
  t.sep = id("<｜tool▁sep｜>");
  return t;
}

namespace {

std::string call_id() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  static const char* digits = "0123456789abcdef";
  std::string s = "call_";
  for (int i = 0; i < 24; ++i) s += digits[rng() & 15];
  return s;
}

}  // namespace

bool OutputPipeline::tool_token(int32_t id, Delta& out) {
  const ToolTokens& t = opt_.tool_tokens;
  if (tool_mode_ == ToolMode::Outside) {
    if (id != t.calls_begin) return false;
    tool_mode_ = ToolMode::Calls;
    return true;
  }
  if (tool_mode_ != ToolMode::Calls) return false;
  if (id == t.calls_end) {
    tool_mode_ = ToolMode::After;
  } else if (id == t.call_begin) {
    calls_.push_back({call_id(), "", ""});
    in_body_ = announced_ = false;
    call_text_.clear();
  } else if (id == t.sep) {
    in_body_ = true;
    call_text_.clear();
  } else if (id == t.call_end) {
    if (calls_.empty() || !in_body_) return true;
    // NAME\n```json\nARGS\n```
    ToolCall& c = calls_.back();
    const size_t nl = call_text_.find('\n');
    if (!announced_) c.name = call_text_.substr(0, nl);
    std::string args = nl == std::string::npos ? "" : call_text_.substr(nl + 1);
    if (args.rfind("```json\n", 0) == 0)
      args.erase(0, 8);
    else if (args.rfind("```json", 0) == 0)
      args.erase(0, 7);
    if (args.size() >= 4 && args.compare(args.size() - 4, 4, "\n```") == 0)
      args.resize(args.size() - 4);
    else if (args.size() >= 3 && args.compare(args.size() - 3, 3, "```") == 0)
      args.resize(args.size() - 3);
    c.arguments = args;
    ToolCallDelta d;
    d.index = static_cast<int>(calls_.size()) - 1;
    if (!announced_) d.id = c.id, d.name = c.name;
    d.arguments = args;
    out.tool_calls.push_back(std::move(d));
    announced_ = true;
    in_body_ = false;
  } else if (in_body_) {
    call_text_ += tok_bytes(id);
    // The name is known at the first line break: announce the call.
    if (!announced_ && !calls_.empty()) {
      const size_t nl = call_text_.find('\n');
      if (nl != std::string::npos) {
        calls_.back().name = call_text_.substr(0, nl);
        out.tool_calls.push_back(
            {static_cast<int>(calls_.size()) - 1, calls_.back().id, calls_.back().name, ""});
        announced_ = true;
      }
    }
  }
  return true;
}

OutputPipeline::OutputPipeline(const tokenizer::Tokenizer& tok, OutputOptions opt)
    : tok_(tok),
      opt_(std::move(opt)),
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
  if (opt_.tool_calls && tool_token(ev.token, out)) return false;
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
