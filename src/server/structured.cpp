#include "server/structured.h"

#include <mutex>

namespace moeserve::server {

std::shared_ptr<const engine::TokenTrie> make_token_trie(const tokenizer::Tokenizer& tok) {
  std::vector<std::string> bytes(tok.vocab_size());
  for (int32_t id = 0; id < tok.vocab_size(); ++id)
    if (!tok.is_special(id)) bytes[id] = std::string(tok.token_bytes(id));
  return std::make_shared<engine::TokenTrie>(bytes);
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
