// The request side of the OpenAI API: JSON bodies of /v1/chat/completions and /v1/completions,
// parsed and validated into one GenRequest. Everything a client can get wrong (bad JSON, wrong
// types, out-of-range values, unsupported options) is an ApiError(400) naming the field; nothing
// past this point needs to check the request again.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace moeserve::server {

enum class Endpoint { Chat, Completions };

// One chat message, normalized: content parts are joined into one string.
struct ChatMessage {
  std::string role;  // system, developer, user, assistant, tool
  std::optional<std::string> content;
  nlohmann::ordered_json extra = nlohmann::ordered_json::object();  // name, tool_calls, ...
};

// A function the model may call (tools[i].function).
struct ToolDef {
  std::string name;
  nlohmann::ordered_json parameters;  // its arguments' JSON schema; null: any object
};

struct GenRequest {
  Endpoint endpoint = Endpoint::Chat;
  std::string model;  // "" when the client sent none
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage

  std::optional<int64_t> max_tokens;  // max_completion_tokens, else max_tokens
  double temperature = 1.0;           // OpenAI's default
  double top_p = 1.0;
  int64_t top_k = 0;  // 0: all
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;                       // non-empty strings
  std::vector<int32_t> stop_token_ids;                 // vLLM extension
  bool ignore_eos = false;                             // vLLM extension
  bool skip_special_tokens = true;                     // vLLM extension
  double presence_penalty = 0, frequency_penalty = 0;  // [-2, 2]
  double repetition_penalty = 1;                       // > 0 (vLLM extension)
  std::vector<std::pair<int32_t, float>> logit_bias;   // token id -> bias in [-100, 100]
  int64_t min_tokens = 0;                              // vLLM extension
  int64_t n = 1;                                       // choices
  // response_format json_object (json_output, no schema) or json_schema (with its schema, the
  // keys in the order the client wrote them).
  bool json_output = false;
  std::optional<nlohmann::ordered_json> json_schema;
  // Chat tool calling: the tools (also as sent, for the template) and tool_choice: "none",
  // "auto", "required", or "function" (the one named in tool_choice_name).
  std::vector<ToolDef> tools;
  nlohmann::ordered_json tools_json;  // null without tools
  std::string tool_choice = "none";
  std::string tool_choice_name;

  // -1: no logprobs. Otherwise the number of alternatives per token (chat: top_logprobs with
  // logprobs true; completions: the logprobs integer).
  int top_logprobs = -1;

  // Chat.
  std::vector<ChatMessage> messages;
  bool add_generation_prompt = true;
  nlohmann::ordered_json template_kwargs = nlohmann::ordered_json::object();

  // Completions: text, or token ids when prompt_is_ids.
  std::string prompt_text;
  std::vector<int32_t> prompt_ids;
  bool prompt_is_ids = false;
};

// Limits enforced while parsing.
struct ProtocolLimits {
  int max_stop_strings = 16;
  size_t max_stop_length = 1024;  // bytes
  int max_top_logprobs = 20;
  int max_json_depth = 64;
  int max_n = 16;                // choices per request
  size_t max_logit_bias = 1024;  // entries
};

// Parses and validates a request body; throws ApiError(400) on any problem.
GenRequest parse_request(Endpoint endpoint, std::string_view body,
                         const ProtocolLimits& limits = {});

// The messages of a chat request ("messages"), as parse_request reads them; throws ApiError(400).
std::vector<ChatMessage> parse_messages(const nlohmann::json& obj);

// Parses a JSON object body, rejecting invalid JSON and nesting deeper than max_depth (so that
// no recursive walk over a hostile body can exhaust the stack). Throws ApiError(400).
nlohmann::json parse_json_object(std::string_view body, int max_depth);

}  // namespace moeserve::server
