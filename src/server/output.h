// From generated token ids to what a client receives: incremental detokenization, stop strings
// (held back, never sent), the split of reasoning ("<think> ... </think>") from content, and the
// per-token log-probabilities that go with the text.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/engine.h"
#include "server/stop_matcher.h"
#include "tokenizer/reasoning_parser.h"
#include "tokenizer/stream_decoder.h"
#include "tokenizer/tokenizer.h"

namespace moeserve::server {

struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;
  int64_t text_offset = 0;  // characters of completion text before this token
};

// A tool call as it streams: the first piece of a call carries its id and name, later ones
// more of its arguments (a JSON text).
struct ToolCallDelta {
  int index = 0;
  std::string id, name;  // "" after the first piece
  std::string arguments;
};

// What one step of the pipeline releases.
struct Delta {
  std::string reasoning, content;
  std::vector<TokenLogprob> logprobs;
  std::vector<ToolCallDelta> tool_calls;
  bool empty() const {
    return reasoning.empty() && content.empty() && logprobs.empty() && tool_calls.empty();
  }
  void append(Delta&& d);
};

// The special tokens of DeepSeek-V3/R1 tool calls:
//   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```
//   <｜tool▁call▁end｜> (more calls, each after "\n") <｜tool▁calls▁end｜>
struct ToolTokens {
  int32_t calls_begin = -1, calls_end = -1, call_begin = -1, call_end = -1, sep = -1;
  bool found() const {
    return calls_begin >= 0 && calls_end >= 0 && call_begin >= 0 && call_end >= 0 && sep >= 0;
  }
  static ToolTokens of(const tokenizer::Tokenizer& tok);
};

struct OutputOptions {
  std::vector<std::string> stop;
  std::vector<int32_t> stop_ids;  // eos and friends: they end the output and add no text
  bool skip_special = true;
  bool reasoning = false;  // split reasoning_content from content
  bool starts_in_think = false;
  bool logprobs = false;
  int64_t min_tokens = 0;  // stop strings are not looked for in the text of the first ones
  // Parse tool calls out of the output (chat with tools, tool_choice other than none).
  bool tool_calls = false;
  ToolTokens tool_tokens;
};

class OutputPipeline {
 public:
  OutputPipeline(const tokenizer::Tokenizer& tok, OutputOptions opt);

  // Consumes one generated token; appends what may be sent to `out`. Returns true when a stop
  // string ended the output (the token counts; later tokens must not be fed).
  bool put(const engine::TokenEvent& ev, Delta& out);
  // Releases held-back text at the end of generation.
  void finish(Delta& out);

  int64_t tokens() const { return tokens_; }
  bool stopped_by_string() const { return stop_.stopped(); }
  // The tool calls parsed so far, whole.
  struct ToolCall {
    std::string id, name, arguments;
  };
  const std::vector<ToolCall>& tool_calls() const { return calls_; }

 private:
  void emit_text(const std::string& text, Delta& out);
  void split(std::string_view text, Delta& out);  // into reasoning and content
  bool tool_token(int32_t id, Delta& out);        // true when the tool-call parser took it
  std::string tok_bytes(int32_t id) const { return std::string(tok_.token_bytes(id)); }

  const tokenizer::Tokenizer& tok_;
  OutputOptions opt_;
  tokenizer::StreamDecoder decoder_;
  StopMatcher stop_;
  std::optional<tokenizer::ReasoningParser> reasoning_;  // when opt_.reasoning
  int64_t tokens_ = 0;
  int64_t chars_ = 0;  // characters decoded so far (before stop truncation)
  // Tool calls: outside, inside <｜tool▁calls▁begin｜> ... <｜tool▁calls▁end｜>, or after.
  enum class ToolMode { Outside, Calls, After } tool_mode_ = ToolMode::Outside;
  bool in_body_ = false;  // after <｜tool▁sep｜> of the current call
  bool announced_ = false;
  std::string call_text_;
  std::vector<ToolCall> calls_;
};

// The token's text for logprobs: its bytes when they are valid UTF-8, else "bytes:\xNN..." as
// vLLM and OpenAI write partial characters.
std::string token_display(const tokenizer::Tokenizer& tok, int32_t id);

}  // namespace moeserve::server
