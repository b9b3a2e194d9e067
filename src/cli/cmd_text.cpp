// moeserve tokenize / detokenize / chat-template: the text side of a model, from a Hugging Face
// model folder (tokenizer.json, tokenizer_config.json).
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace moeserve::cli {
namespace {

// The whole of standard input, as bytes. A terminal gets a note saying what is awaited.
std::string read_stdin(const char* what) {
  if (::isatty(STDIN_FILENO))
    std::fprintf(stderr, "reading %s from standard input (end it with Ctrl-D)\n", what);
  std::ostringstream os;
  os << std::cin.rdbuf();
  return os.str();
}

std::string read_text_file(const std::string& path, const char* flag) {
  if (path == "-") return read_stdin("the text");
  std::ifstream in(path, std::ios::binary);
  MS_CHECK(in, flag, ": cannot read ", path);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

nlohmann::ordered_json read_json_file(const std::string& path, const char* flag) {
  try {
    return nlohmann::ordered_json::parse(read_text_file(path, flag));
  } catch (const nlohmann::json::exception& e) {
    fail(flag, ": ", path, " is not valid JSON: ", e.what());
  }
}

struct TokenizeArgs {
  std::string model, text, file;
  bool no_special = false, no_parse_special = false;
  const CLI::Option* text_opt = nullptr;  // --text "" is an empty text, not "read stdin"
};

struct DetokenizeArgs {
  std::string model, ids;
  bool skip_special = false;
};

struct TemplateArgs {
  std::string model, messages, tools, chat_template;
  bool add_generation_prompt = false;
};

void run_tokenize(const TokenizeArgs& a) {
  const bool have_text = a.text_opt->count() > 0;
  MS_CHECK(!have_text || a.file.empty(), "tokenize: give --text or --file, not both");
  const auto tok = tokenizer::Tokenizer::load(a.model);
  // The text exactly as given: from a file or standard input, a final newline is part of it.
  const std::string text = have_text         ? a.text
                           : !a.file.empty() ? read_text_file(a.file, "--file")
                                             : read_stdin("the text");
  const auto ids = tok.encode(text, !a.no_special, !a.no_parse_special);
  std::cout << nlohmann::json(ids).dump() << "\n";
}

void run_detokenize(const DetokenizeArgs& a) {
  const auto tok = tokenizer::Tokenizer::load(a.model);
  std::string list = a.ids.empty() ? read_stdin("the token ids") : a.ids;
  list.erase(0, list.find_first_not_of(" \t\r\n"));
  list.erase(list.find_last_not_of(" \t\r\n") + 1);
  // A JSON array (what `tokenize` prints) is accepted too.
  if (!list.empty() && list.front() == '[') {
    MS_CHECK(list.back() == ']', "--ids: unterminated [");
    list = list.substr(1, list.size() - 2);
  }
  const auto ids = parse_ids(list, "--ids");
  for (const int32_t id : ids)
    MS_CHECK(id < tok.vocab_size() && !tok.token_bytes(id).empty(), "--ids: ", id,
             " is not a token of this tokenizer (vocabulary size ", tok.vocab_size(), ")");
  std::cout << tok.decode(ids, a.skip_special);
  std::cout.flush();
}

void run_chat_template(const TemplateArgs& a) {
  const auto tmpl = tokenizer::ChatTemplate::from_model_dir(a.model, a.chat_template);
  nlohmann::ordered_json doc = read_json_file(a.messages, "--messages");
  nlohmann::ordered_json messages, tools = nullptr, extra = nlohmann::ordered_json::object();
  if (doc.is_array()) {
    messages = doc;
  } else {
    MS_CHECK(doc.is_object() && doc.contains("messages"),
             "--messages: expected a JSON array of messages or an object with \"messages\"");
    for (auto it = doc.begin(); it != doc.end(); ++it) {
      if (it.key() == "messages") {
        messages = it.value();
      } else if (it.key() == "tools") {
        tools = it.value();
      } else if (it.key() != "add_generation_prompt") {
        extra[it.key()] = it.value();
      }
    }
  }
  MS_CHECK(messages.is_array(), "--messages: \"messages\" must be an array");
  for (const auto& m : messages)
    MS_CHECK(m.is_object() && m.contains("role"), "--messages: each message needs a \"role\"");
  if (!a.tools.empty()) tools = read_json_file(a.tools, "--tools");
  std::cout << tmpl.render(messages, a.add_generation_prompt, tools, extra);
  std::cout.flush();
}

}  // namespace

void register_text_commands(CLI::App& app) {
  auto tk = std::make_shared<TokenizeArgs>();
  CLI::App* t = app.add_subcommand("tokenize", "Print the token ids of a text as a JSON array");
  t->add_option("--model", tk->model)->required()->check(CLI::ExistingDirectory);
  tk->text_opt = t->add_option("--text", tk->text, "Text to tokenize (default: standard input)");
  t->add_option("--file", tk->file, "Read the text from this file instead (-: standard input)");
  t->add_flag("--no-special", tk->no_special, "Do not add BOS/EOS (add_special_tokens=False)");
  t->add_flag("--no-parse-special", tk->no_parse_special,
              "Tokenize special-token strings in the text as plain text");
  t->callback([tk] { run_tokenize(*tk); });

  auto dk = std::make_shared<DetokenizeArgs>();
  CLI::App* d = app.add_subcommand("detokenize", "Print the text of a list of token ids");
  d->add_option("--model", dk->model)->required()->check(CLI::ExistingDirectory);
  d->add_option("--ids", dk->ids,
                "Token ids: 1,2,3 or [1,2,3], what tokenize prints (default: standard input)");
  d->add_flag("--skip-special", dk->skip_special, "Leave out special tokens");
  d->callback([dk] { run_detokenize(*dk); });

  auto ck = std::make_shared<TemplateArgs>();
  CLI::App* c = app.add_subcommand("chat-template", "Print the prompt a chat template makes");
  c->add_option("--model", ck->model)->required()->check(CLI::ExistingDirectory);
  c->add_option("--messages", ck->messages,
                "JSON file: [messages] or {\"messages\": [...], \"tools\": [...], ...} "
                "(-: standard input)")
      ->required();
  c->add_option("--tools", ck->tools, "JSON file with the list of tool schemas");
  c->add_option("--chat-template", ck->chat_template,
                "Jinja chat template file (default: the model's, from tokenizer_config.json)");
  c->add_flag("--add-generation-prompt", ck->add_generation_prompt,
              "End with the prompt that starts the assistant's turn");
  c->callback([ck] { run_chat_template(*ck); });
}

}  // namespace moeserve::cli
