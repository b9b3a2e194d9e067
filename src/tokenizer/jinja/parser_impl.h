// The Jinja parser's class, shared by parser.cpp (statements) and parser_expr.cpp (expressions).
// Internal to src/tokenizer/jinja.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <string>
#include <vector>

#include "core/error.h"
#include "tokenizer/jinja/ast.h"
#include "tokenizer/jinja/lexer.h"
#include "tokenizer/jinja/parser.h"

namespace moeserve::tokenizer::jinja {

using K = Node::Kind;
using T = Token::Type;

// Recursive descent over the token list, following jinja2's parser (parser.py) function by
// function, so precedence and the odd corners (tests without parentheses, loop filters,
// tuples without parentheses) behave the same.
class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : toks_(std::move(tokens)) {}

  NodeList parse_all() {
    NodeList body = subparse({});
    if (cur().type != T::kEof) error("unexpected end tag");
    return body;
  }

 private:
  struct DepthGuard {
    explicit DepthGuard(Parser* p) : p(p) {
      if (++p->depth_ > kMaxDepth) p->error("template is nested too deeply");
    }
    ~DepthGuard() { --p->depth_; }
    Parser* p;
  };

  const Token& cur() const { return toks_[pos_]; }
  const Token& peek(size_t k = 1) const { return toks_[std::min(pos_ + k, toks_.size() - 1)]; }
  const Token& next() {
    const Token& t = toks_[pos_];
    if (pos_ + 1 < toks_.size()) ++pos_;
    return t;
  }
  bool is_op(const char* op) const { return cur().type == T::kOp && cur().text == op; }
  bool is_name(const char* n) const { return cur().type == T::kName && cur().text == n; }
  bool skip_op(const char* op) { return is_op(op) ? (next(), true) : false; }
  bool skip_name(const char* n) { return is_name(n) ? (next(), true) : false; }
  [[noreturn]] void error(const std::string& msg) const {
    fail("chat template syntax error at line ", cur().line, ": ", msg, describe());
  }
  std::string describe() const {
    switch (cur().type) {
      case T::kEof:
        return " (at end of template)";
      case T::kBlockEnd:
        return " (at '%}')";
      case T::kVarEnd:
        return " (at '}}')";
      default:
        return " (at '" + cur().text.substr(0, 40) + "')";
    }
  }
  void expect_op(const char* op) {
    if (!skip_op(op)) error(std::string("expected '") + op + "'");
  }
  void expect(T type, const char* what) {
    if (cur().type != type) error(std::string("expected ") + what);
    next();
  }
  std::string expect_name() {
    if (cur().type != T::kName) error("expected a name");
    return next().text;
  }
  NodePtr make(K k) const { return std::make_unique<Node>(k, cur().line); }

  // Statements ------------------------------------------------------------------------------

  // Parses until a block whose first name is one of `ends` (left unconsumed) or the end.
  NodeList subparse(std::initializer_list<const char*> ends);
  NodeList statements(std::initializer_list<const char*> ends, bool drop_end);

  NodePtr parse_statement();

  NodePtr parse_if();

  NodePtr parse_for();

  NodePtr parse_set();

  void parse_signature(Node& n);

  NodePtr parse_macro();

  NodePtr parse_call_block();

  // Assignment targets: names, tuples of names, and (for set) namespace attributes.
  NodePtr parse_assign_target(bool with_tuple, bool with_namespace,
                              std::initializer_list<const char*> extra_end);

  // Expressions -----------------------------------------------------------------------------

  bool tuple_end(std::initializer_list<const char*> extra) const;

  NodePtr parse_tuple(bool explicit_parens, bool with_condexpr,
                      std::initializer_list<const char*> extra_end);

  NodePtr parse_expression(bool with_condexpr);

  NodePtr binary(const std::string& op, NodePtr l, NodePtr r);

  NodePtr parse_or();
  NodePtr parse_and();
  NodePtr parse_not();
  NodePtr parse_compare();
  NodePtr parse_math1();
  NodePtr parse_concat();
  NodePtr parse_math2();
  NodePtr parse_pow();
  NodePtr parse_unary(bool with_filter);

  NodePtr parse_primary();

  NodePtr parse_postfix(NodePtr node);

  NodePtr parse_subscript(NodePtr obj);

  void parse_call_args(Node& n);

  NodePtr parse_call(NodePtr callee);

  NodePtr parse_filter(NodePtr value, bool start_inline = false);

  NodePtr parse_filter_expr(NodePtr node);

  std::vector<Token> toks_;
  size_t pos_ = 0;
  int depth_ = 0;
  int loop_depth_ = 0;
};

}  // namespace moeserve::tokenizer::jinja
