#include "server/structured.h"

#include <mutex>

namespace moeserve::server {

std::shared_ptr<const engine::TokenTrie> make_token_trie(const tokenizer::Tokenizer& tok) {
  std::vector<std::string> bytes(tok.vocab_size());
  for (int32_t id = 0; id < tok.vocab_size(); ++id)
    if (!tok.is_special(id)) bytes[id] = std::string(tok.token_bytes(id));
  return std::make_shared<engine::TokenTrie>(bytes);
}

std::shared_ptr<const engine::TokenConstraint> tool_call_constraint(
    const tokenizer::Tokenizer& tok, std::shared_ptr<const engine::TokenTrie> trie,
    const std::vector<ToolDef>& tools, const std::string& only,
    const std::vector<int32_t>& end_ids) {
  nlohmann::ordered_json choices = nlohmann::ordered_json::array();
  for (const ToolDef& t : tools)
    if (only.empty() || t.name == only)
      choices.push_back(
          {{"text", t.name + "\n```json\n"},
           {"schema",
            t.parameters.is_null() ? nlohmann::ordered_json{{"type", "object"}} : t.parameters},
           {"after", "\n```"}});
  const nlohmann::ordered_json spec = {
      {"prefix", tok.encode("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>",
                            false, true)},
      {"choices", choices},
      {"suffix", tok.encode("<｜tool▁call▁end｜><｜tool▁calls▁end｜>", false, true)},
      {"end", end_ids}};
  return engine::compile_json_constraint(spec.dump(), std::move(trie));
}

engine::ConstraintCompiler lazy_constraint_compiler(std::string model_dir) {
  struct Lazy {
    std::string dir;
    std::once_flag once;
    std::shared_ptr<const engine::TokenTrie> trie;
  };
  auto lazy = std::make_shared<Lazy>();
  lazy->dir = std::move(model_dir);
  return [lazy](const std::string& spec) {
    std::call_once(lazy->once,
                   [&] { lazy->trie = make_token_trie(tokenizer::Tokenizer::load(lazy->dir)); });
    return engine::compile_json_constraint(spec, lazy->trie);
  };
}

}  // namespace moeserve::server
