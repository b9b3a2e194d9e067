// Jinja lexer, a port of jinja2's with the settings transformers uses for chat templates:
// trim_blocks (drop the newline after a block tag), lstrip_blocks (drop the indentation before
// one), {%- -%} / {{- -}} / {#- -#} whitespace control, {%+ +%} to opt out, {% raw %}, and one
// trailing newline of the template removed (keep_trailing_newline = False).
#pragma once

#include <string>
#include <vector>

namespace moeserve::tokenizer::jinja {

struct Token {
  enum class Type {
    kText,
    kVarBegin,
    kVarEnd,
    kBlockBegin,
    kBlockEnd,
    kName,
    kString,
    kInt,
    kFloat,
    kOp,
    kEof
  };
  Type type;
  std::string text;  // text, name, operator, or the decoded string literal / number spelling
  int line;
};

// Throws moeserve::Error ("chat template syntax error at line N: ...") on bad input.
std::vector<Token> tokenize(const std::string& source);

// Python's str.isspace() for one code point.
bool py_isspace(uint32_t c);

}  // namespace moeserve::tokenizer::jinja
