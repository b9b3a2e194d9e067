// The response side of the OpenAI API: chat.completion / text_completion objects, their
// streaming chunks, usage and logprobs in both formats (chat: logprobs.content[]; completions:
// tokens / token_logprobs / top_logprobs / text_offset), and error bodies.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "server/output.h"
#include "server/protocol.h"
#include "tokenizer/tokenizer.h"

namespace moeserve::server {

struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
  int64_t cached_tokens = 0;  // of the prompt, from the prefix cache
};

// Serializes JSON for the wire: compact, invalid UTF-8 replaced (never throws).
std::string to_wire(const nlohmann::ordered_json& j);

// Builds the objects of one response; all share its id, creation time and model name.
class ResponseBuilder {
 public:
  // reasoning: chat messages carry reasoning_content; logprobs: the client asked for them.
  ResponseBuilder(Endpoint endpoint, std::string model, const tokenizer::Tokenizer& tok,
                  bool reasoning, bool logprobs, bool usage_in_chunks);

  // Chat streams open with a chunk carrying only the role (one per choice).
  nlohmann::ordered_json role_chunk(int index = 0) const;
  // One streamed chunk of choice `index`; finish_reason nullptr while the stream goes on.
  nlohmann::ordered_json chunk(const Delta& d, const char* finish_reason, int index = 0) const;
  // The last chunk of a stream with stream_options.include_usage: no choices, only usage.
  nlohmann::ordered_json usage_chunk(const Usage& u) const;
  // The whole non-streamed response: one choice per output, in order.
  struct Choice {
    const Delta* all;
    const char* finish_reason;
  };
  nlohmann::ordered_json full(const std::vector<Choice>& choices, const Usage& u) const;

  const std::string& id() const { return id_; }
  Endpoint endpoint() const { return endpoint_; }

 private:
  nlohmann::ordered_json base(const char* object) const;
  nlohmann::ordered_json logprobs(const std::vector<TokenLogprob>& lps) const;

  Endpoint endpoint_;
  std::string model_, id_;
  int64_t created_;
  const tokenizer::Tokenizer& tok_;
  bool reasoning_, logprobs_, usage_in_chunks_;
};

nlohmann::ordered_json usage_json(const Usage& u);

}  // namespace moeserve::server
