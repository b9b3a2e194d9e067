// Chat templates: the Jinja `chat_template` of a Hugging Face model, rendered as transformers'
// apply_chat_template renders it (jinja2 with trim_blocks and lstrip_blocks, the special tokens
// of tokenizer_config.json as variables, raise_exception and strftime_now as functions).
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace moeserve::tokenizer {

struct ChatTemplateImpl;

struct ChatTemplateLimits {
  size_t max_output_bytes = 64u << 20;
  uint64_t max_steps = 2'000'000;
};

class ChatTemplate {
 public:
  // The "chat_template" of <dir>/tokenizer_config.json (or of <dir>/chat_template.jinja when
  // the config has none), or `override_file` when it is not empty; special tokens come from
  // the config. Throws moeserve::Error when there is no template or it does not parse.
  static ChatTemplate from_model_dir(const std::filesystem::path& dir,
                                     const std::filesystem::path& override_file = {});
  // A template from source; `special_tokens` are extra variables (name -> string), e.g.
  // {"bos_token", "<s>"}.
  static ChatTemplate from_string(
      const std::string& source,
      std::vector<std::pair<std::string, std::string>> special_tokens = {});

  // Renders the conversation. messages: [{"role": ..., "content": ..., ...}]; tools: the list
  // of tool schemas or null; extra: more variables (an object), e.g. {"enable_thinking": false}.
  // Throws moeserve::Error with the template line on any error, raise_exception included.
  std::string render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                     const nlohmann::ordered_json& tools = nullptr,
                     const nlohmann::ordered_json& extra = nlohmann::ordered_json::object()) const;

  const std::string& source() const;
  void set_limits(const ChatTemplateLimits& limits);

 private:
  std::shared_ptr<ChatTemplateImpl> impl_;
};

}  // namespace moeserve::tokenizer
