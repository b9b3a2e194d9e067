#include "tokenizer/chat_template.h"

#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/json_file.h"
#include "tokenizer/jinja/interpreter.h"
#include "tokenizer/jinja/parser.h"

namespace moeserve::tokenizer {

struct ChatTemplateImpl {
  std::string source;
  jinja::NodeList tree;
  std::vector<std::pair<std::string, jinja::Value>> globals;  // special tokens
  ChatTemplateLimits limits;
};

namespace {

// The string of a special token entry: "text" or {"content": "text", ...}.
std::optional<std::string> token_string(const nlohmann::ordered_json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

ChatTemplate ChatTemplate::from_model_dir(const std::filesystem::path& dir,
                                          const std::filesystem::path& override_file) {
  nlohmann::ordered_json cfg = nlohmann::ordered_json::object();
  const auto cfg_path = dir / "tokenizer_config.json";
  if (std::filesystem::is_regular_file(cfg_path)) {
    try {
      cfg = nlohmann::ordered_json::parse(read_text_file(cfg_path));
    } catch (const nlohmann::json::exception& e) {
      fail("cannot parse ", cfg_path.string(), ": ", e.what());
    }
  } else {
    MS_CHECK(!override_file.empty() || std::filesystem::is_directory(dir), "model folder ",
             dir.string(), " does not exist");
  }
  std::string source;
  if (!override_file.empty()) {
    source = read_text_file(override_file);
  } else if (cfg.contains("chat_template")) {
    const auto& t = cfg["chat_template"];
    if (t.is_string()) {
      source = t.get<std::string>();
    } else if (t.is_array()) {  // [{"name": "default", "template": ...}, ...]
      for (const auto& e : t)
        if (e.value("name", "") == "default") source = e.value("template", "");
    }
    MS_CHECK(!source.empty(), cfg_path.string(), ": chat_template has no default template");
  } else if (std::filesystem::is_regular_file(dir / "chat_template.jinja")) {
    source = read_text_file(dir / "chat_template.jinja");
  } else {
    fail("no chat template: ", cfg_path.string(), " has no \"chat_template\" and there is no ",
         (dir / "chat_template.jinja").string());
  }
  std::vector<std::pair<std::string, std::string>> tokens;
  for (const char* name : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                           "cls_token", "mask_token"}) {
    if (!cfg.contains(name)) continue;
    if (auto s = token_string(cfg[name])) tokens.emplace_back(name, *s);
  }
  ChatTemplate t = from_string(source, tokens);
  if (cfg.contains("additional_special_tokens") && cfg["additional_special_tokens"].is_array()) {
    std::vector<jinja::Value> extra;
    for (const auto& v : cfg["additional_special_tokens"])
      if (auto s = token_string(v)) extra.emplace_back(*s);
    t.impl_->globals.emplace_back("additional_special_tokens",
                                  jinja::Value::list(std::move(extra)));
  }
  return t;
}

ChatTemplate ChatTemplate::from_string(
    const std::string& source, std::vector<std::pair<std::string, std::string>> special_tokens) {
  ChatTemplate t;
  t.impl_ = std::make_shared<ChatTemplateImpl>();
  t.impl_->source = source;
  t.impl_->tree = jinja::parse_template(source);
  for (auto& [k, v] : special_tokens) t.impl_->globals.emplace_back(k, jinja::Value(v));
  return t;
}

std::string ChatTemplate::render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                 const nlohmann::ordered_json& tools,
                                 const nlohmann::ordered_json& extra) const {
  MS_CHECK(messages.is_array(), "chat template: messages must be a JSON array");
  MS_CHECK(extra.is_object() || extra.is_null(),
           "chat template: extra variables must be an object");
  jinja::Value ctx = jinja::Value::dict();
  auto& d = *ctx.dict_data();
  for (const auto& [k, v] : impl_->globals) d.set(jinja::Value(k), v);
  d.set(jinja::Value("messages"), jinja::Value::from_json(messages));
  d.set(jinja::Value("tools"), jinja::Value::from_json(tools));
  d.set(jinja::Value("documents"), jinja::Value::none());
  d.set(jinja::Value("add_generation_prompt"), jinja::Value(add_generation_prompt));
  if (extra.is_object())
    for (auto it = extra.begin(); it != extra.end(); ++it)
      d.set(jinja::Value(it.key()), jinja::Value::from_json(it.value()));
  jinja::RenderLimits limits;
  limits.max_output_bytes = impl_->limits.max_output_bytes;
  limits.max_steps = impl_->limits.max_steps;
  jinja::Interpreter in(limits);
  return in.render(impl_->tree, ctx);
}

const std::string& ChatTemplate::source() const {
  return impl_->source;
}

void ChatTemplate::set_limits(const ChatTemplateLimits& limits) {
  auto copy = std::make_shared<ChatTemplateImpl>();
  copy->source = impl_->source;
  copy->tree = jinja::parse_template(impl_->source);
  copy->globals = impl_->globals;
  copy->limits = limits;
  impl_ = std::move(copy);
}

}  // namespace moeserve::tokenizer
