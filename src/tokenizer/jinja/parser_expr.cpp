#include <cerrno>
#include <cstdlib>

#include "tokenizer/jinja/parser_impl.h"

namespace moeserve::tokenizer::jinja {

bool Parser::tuple_end(std::initializer_list<const char*> extra) const {
  if (cur().type == T::kVarEnd || cur().type == T::kBlockEnd || cur().type == T::kEof || is_op(")"))
    return true;
  for (const char* e : extra)
    if (is_name(e)) return true;
  return false;
}

NodePtr Parser::parse_tuple(bool explicit_parens, bool with_condexpr,
                            std::initializer_list<const char*> extra_end) {
  NodePtr tuple = make(K::kTuple);
  bool is_tuple = false;
  while (true) {
    if (!tuple->args.empty()) expect_op(",");
    if (tuple_end(extra_end)) break;
    tuple->args.push_back(parse_expression(with_condexpr));
    if (!is_op(",")) break;
    is_tuple = true;
  }
  if (!is_tuple) {
    if (!tuple->args.empty()) return std::move(tuple->args[0]);
    if (!explicit_parens) error("expected an expression");
  }
  return tuple;
}

NodePtr Parser::parse_expression(bool with_condexpr) {
  DepthGuard guard(this);
  if (!with_condexpr) return parse_or();
  NodePtr expr = parse_or();
  while (is_name("if")) {
    NodePtr n = make(K::kCondExpr);
    next();
    n->a = parse_or();
    n->b = std::move(expr);
    if (skip_name("else")) n->c = parse_expression(true);
    expr = std::move(n);
  }
  return expr;
}

NodePtr Parser::binary(const std::string& op, NodePtr l, NodePtr r) {
  NodePtr n = std::make_unique<Node>(K::kBinary, l->line);
  n->name = op;
  n->a = std::move(l);
  n->b = std::move(r);
  return n;
}

NodePtr Parser::parse_or() {
  NodePtr l = parse_and();
  while (skip_name("or")) l = binary("or", std::move(l), parse_and());
  return l;
}

NodePtr Parser::parse_and() {
  NodePtr l = parse_not();
  while (skip_name("and")) l = binary("and", std::move(l), parse_not());
  return l;
}

NodePtr Parser::parse_not() {
  if (is_name("not")) {
    DepthGuard guard(this);
    NodePtr n = make(K::kNot);
    next();
    n->a = parse_not();
    return n;
  }
  return parse_compare();
}

NodePtr Parser::parse_compare() {
  NodePtr first = parse_math1();
  NodePtr n;
  while (true) {
    std::string op;
    if (cur().type == T::kOp && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                 cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
      op = next().text;
    } else if (is_name("in")) {
      next();
      op = "in";
    } else if (is_name("not") && peek().type == T::kName && peek().text == "in") {
      next();
      next();
      op = "notin";
    } else {
      break;
    }
    if (!n) {
      n = std::make_unique<Node>(K::kCompare, first->line);
      n->a = std::move(first);
    }
    n->ops.push_back(op);
    n->args.push_back(parse_math1());
  }
  return n ? std::move(n) : std::move(first);
}

NodePtr Parser::parse_math1() {
  NodePtr l = parse_concat();
  while (is_op("+") || is_op("-")) {
    const std::string op = next().text;
    l = binary(op, std::move(l), parse_concat());
  }
  return l;
}

NodePtr Parser::parse_concat() {
  NodePtr l = parse_math2();
  while (skip_op("~")) l = binary("~", std::move(l), parse_math2());
  return l;
}

NodePtr Parser::parse_math2() {
  NodePtr l = parse_pow();
  while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
    const std::string op = next().text;
    l = binary(op, std::move(l), parse_pow());
  }
  return l;
}

NodePtr Parser::parse_pow() {
  NodePtr l = parse_unary(true);
  while (skip_op("**")) l = binary("**", std::move(l), parse_unary(true));
  return l;
}

NodePtr Parser::parse_unary(bool with_filter) {
  DepthGuard guard(this);
  NodePtr node;
  if (is_op("-") || is_op("+")) {
    node = make(is_op("-") ? K::kNeg : K::kPos);
    next();
    node->a = parse_unary(false);
  } else {
    node = parse_primary();
  }
  node = parse_postfix(std::move(node));
  if (with_filter) node = parse_filter_expr(std::move(node));
  return node;
}

NodePtr Parser::parse_primary() {
  const Token& t = cur();
  NodePtr n;
  switch (t.type) {
    case T::kName:
      if (t.text == "true" || t.text == "True" || t.text == "false" || t.text == "False") {
        n = make(K::kLiteral);
        n->value = Value(t.text == "true" || t.text == "True");
      } else if (t.text == "none" || t.text == "None") {
        n = make(K::kLiteral);
        n->value = Value::none();
      } else {
        n = make(K::kName);
        n->name = t.text;
      }
      next();
      return n;
    case T::kString: {
      n = make(K::kLiteral);
      std::string s;
      while (cur().type == T::kString) s += next().text;
      n->value = Value(std::move(s));
      return n;
    }
    case T::kInt: {
      n = make(K::kLiteral);
      errno = 0;
      const long long v = std::strtoll(t.text.c_str(), nullptr, 10);
      if (errno == ERANGE) error("integer literal too large");
      n->value = Value(int64_t(v));
      next();
      return n;
    }
    case T::kFloat:
      n = make(K::kLiteral);
      n->value = Value(std::strtod(t.text.c_str(), nullptr));
      next();
      return n;
    case T::kOp:
      if (t.text == "(") {
        next();
        n = parse_tuple(true, true, {});
        expect_op(")");
        return n;
      }
      if (t.text == "[") {
        n = make(K::kList);
        next();
        while (!is_op("]")) {
          if (!n->args.empty()) expect_op(",");
          if (is_op("]")) break;
          n->args.push_back(parse_expression(true));
        }
        expect_op("]");
        return n;
      }
      if (t.text == "{") {
        n = make(K::kDict);
        next();
        while (!is_op("}")) {
          if (!n->args.empty()) expect_op(",");
          if (is_op("}")) break;
          n->args.push_back(parse_expression(true));
          expect_op(":");
          n->args2.push_back(parse_expression(true));
        }
        expect_op("}");
        return n;
      }
      break;
    default:
      break;
  }
  error("unexpected token");
}

NodePtr Parser::parse_postfix(NodePtr node) {
  while (true) {
    if (is_op(".")) {
      next();
      if (cur().type == T::kName) {
        NodePtr n = make(K::kGetAttr);
        n->name = next().text;
        n->a = std::move(node);
        node = std::move(n);
      } else if (cur().type == T::kInt) {
        NodePtr n = make(K::kGetItem);
        n->a = std::move(node);
        n->b = make(K::kLiteral);
        n->b->value = Value(int64_t(std::strtoll(next().text.c_str(), nullptr, 10)));
        node = std::move(n);
      } else {
        error("expected name or number after '.'");
      }
    } else if (is_op("[")) {
      next();
      node = parse_subscript(std::move(node));
    } else if (is_op("(")) {
      node = parse_call(std::move(node));
    } else {
      return node;
    }
  }
}

NodePtr Parser::parse_subscript(NodePtr obj) {
  NodePtr parts[3];
  bool slice = false;
  int idx = 0;
  if (!is_op(":")) parts[0] = parse_expression(true);
  if (is_op(":")) {
    slice = true;
    next();
    idx = 1;
    if (!is_op(":") && !is_op("]")) parts[1] = parse_expression(true);
    if (skip_op(":")) {
      idx = 2;
      if (!is_op("]")) parts[2] = parse_expression(true);
    }
  }
  (void)idx;
  expect_op("]");
  NodePtr n = std::make_unique<Node>(slice ? K::kSlice : K::kGetItem, obj->line);
  n->a = std::move(obj);
  if (slice) {
    n->args.push_back(std::move(parts[0]));
    n->args.push_back(std::move(parts[1]));
    n->args.push_back(std::move(parts[2]));
  } else {
    n->b = std::move(parts[0]);
  }
  return n;
}

void Parser::parse_call_args(Node& n) {
  expect_op("(");
  while (!is_op(")")) {
    if (!n.args.empty() || !n.kwargs.empty()) {
      expect_op(",");
      if (is_op(")")) break;
    }
    if (is_op("*") || is_op("**")) error("*args and **kwargs are not supported");
    if (cur().type == T::kName && peek().type == T::kOp && peek().text == "=") {
      std::string key = next().text;
      next();
      n.kwargs.emplace_back(std::move(key), parse_expression(true));
    } else {
      if (!n.kwargs.empty()) error("positional argument after keyword argument");
      n.args.push_back(parse_expression(true));
    }
  }
  expect_op(")");
}

NodePtr Parser::parse_call(NodePtr callee) {
  NodePtr n = make(K::kCall);
  n->a = std::move(callee);
  parse_call_args(*n);
  return n;
}

NodePtr Parser::parse_filter(NodePtr value, bool start_inline) {
  if (!start_inline) expect_op("|");
  NodePtr n = make(K::kFilter);
  n->name = expect_name();
  while (skip_op(".")) n->name += "." + expect_name();
  n->a = std::move(value);
  if (is_op("(")) parse_call_args(*n);
  return n;
}

NodePtr Parser::parse_filter_expr(NodePtr node) {
  while (true) {
    if (is_op("|")) {
      node = parse_filter(std::move(node));
    } else if (is_name("is")) {
      next();
      NodePtr n = make(K::kTest);
      n->negated = skip_name("not");
      n->name = expect_name();
      n->a = std::move(node);
      if (is_op("(")) {
        parse_call_args(*n);
      } else if ((cur().type == T::kName || cur().type == T::kString || cur().type == T::kInt ||
                  cur().type == T::kFloat || is_op("(") || is_op("[") || is_op("{")) &&
                 !is_name("else") && !is_name("or") && !is_name("and")) {
        if (is_name("is")) error("cannot chain multiple tests with 'is'");
        n->args.push_back(parse_postfix(parse_primary()));
      }
      node = std::move(n);
    } else if (is_op("(")) {
      node = parse_call(std::move(node));
    } else {
      return node;
    }
  }
}

}  // namespace moeserve::tokenizer::jinja
