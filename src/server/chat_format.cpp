#include "server/chat_format.h"

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "server/api_error.h"
#include "tokenizer/chat_template.h"

namespace moeserve::server {

namespace fs = std::filesystem;

struct ChatFormat::Impl {
  tokenizer::ChatTemplate tmpl;
};

namespace {

// Whether the model folder has a chat template at all (a missing one is not an error: the
// completions endpoint still works).
bool has_template(const fs::path& dir) {
  if (fs::is_regular_file(dir / "chat_template.jinja")) return true;
  std::ifstream in(dir / "tokenizer_config.json");
  if (!in) return false;
  const auto cfg = nlohmann::json::parse(in, nullptr, false);
  return cfg.is_object() && cfg.contains("chat_template") && !cfg["chat_template"].is_null();
}

}  // namespace

std::optional<ChatFormat> ChatFormat::load(const std::string& model_dir,
                                           const std::string& template_file,
                                           const tokenizer::Tokenizer& tok) {
  if (template_file.empty() && !has_template(model_dir)) return std::nullopt;
  ChatFormat f;
  auto impl = std::make_shared<Impl>(
      Impl{tokenizer::ChatTemplate::from_model_dir(model_dir, template_file)});
  f.reasoning_ = impl->tmpl.source().find("think>") != std::string::npos;
  f.impl_ = std::move(impl);
  return f;
}

ChatFormat ChatFormat::from_source(const std::string& source, const tokenizer::Tokenizer& tok) {
  std::vector<std::pair<std::string, std::string>> specials;
  if (!tok.bos_token().empty()) specials.emplace_back("bos_token", tok.bos_token());
  if (!tok.eos_token().empty()) specials.emplace_back("eos_token", tok.eos_token());
  ChatFormat f;
  f.impl_ = std::make_shared<Impl>(Impl{tokenizer::ChatTemplate::from_string(source, specials)});
  f.reasoning_ = source.find("think>") != std::string::npos;
  return f;
}

std::string ChatFormat::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                               const nlohmann::ordered_json& kwargs,
                               const nlohmann::ordered_json& tools) const {
  nlohmann::ordered_json ms = nlohmann::ordered_json::array();
  for (const auto& m : messages) {
    nlohmann::ordered_json j = {{"role", m.role}};
    j["content"] = m.content ? nlohmann::ordered_json(*m.content) : nlohmann::ordered_json();
    for (auto it = m.extra.begin(); it != m.extra.end(); ++it) j[it.key()] = it.value();
    ms.push_back(std::move(j));
  }
  try {
    return impl_->tmpl.render(ms, add_generation_prompt, tools, kwargs);
  } catch (const moeserve::Error& e) {
    throw ApiError(400, std::string("The chat template could not format the messages: ") + e.what(),
                   "messages", "chat_template_error");
  }
}

bool opens_think(std::string_view prompt) {
  const size_t end = prompt.find_last_not_of(" \t\r\n");
  if (end == std::string_view::npos) return false;
  return prompt.substr(0, end + 1).ends_with("<think>");
}

}  // namespace moeserve::server
