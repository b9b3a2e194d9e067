// The chat side of the tokenizer as the server uses it: the model's chat template (from
// tokenizer_config.json, or a file given with --chat-template) rendering a conversation into the
// prompt text, and whether the model writes DeepSeek-R1-style <think> reasoning.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "server/protocol.h"
#include "tokenizer/tokenizer.h"

namespace moeserve::server {

class ChatFormat {
 public:
  // The template of `template_file` when given, else the chat_template of
  // <model_dir>/tokenizer_config.json; nullopt when neither has one. Throws moeserve::Error for
  // an unreadable file or a template that does not parse.
  static std::optional<ChatFormat> load(const std::string& model_dir,
                                        const std::string& template_file,
                                        const tokenizer::Tokenizer& tok);
  // The same from the template's source text.
  static ChatFormat from_source(const std::string& source, const tokenizer::Tokenizer& tok);

  // Renders the conversation (with the tokenizer's bos/eos tokens and any extra variables from
  // chat_template_kwargs). Throws ApiError(400) when the template rejects it (raise_exception,
  // a message it cannot format).
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                     const nlohmann::ordered_json& kwargs,
                     const nlohmann::ordered_json& tools = nullptr) const;

  // The template writes or expects <think> blocks (DeepSeek-R1 and its kind).
  bool reasoning() const { return reasoning_; }

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
  bool reasoning_ = false;
};

// True when a rendered prompt ends inside an opened <think> block (R1's generation prompt ends
// with "<think>\n"), so the output starts as reasoning.
bool opens_think(std::string_view prompt);

}  // namespace moeserve::server
