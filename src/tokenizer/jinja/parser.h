// Jinja parser: tokens -> syntax tree, following jinja2's grammar and operator precedence.
#pragma once

#include <string>

#include "tokenizer/jinja/ast.h"

namespace moeserve::tokenizer::jinja {

// Parses a whole template. Throws moeserve::Error ("chat template syntax error at line N: ...")
// for bad syntax, unknown tags, or nesting deeper than kMaxDepth.
NodeList parse_template(const std::string& source);

constexpr int kMaxDepth = 200;

}  // namespace moeserve::tokenizer::jinja
