#include <cstdlib>

#include "tokenizer/jinja/interpreter.h"
#include "tokenizer/jinja/parser_impl.h"

namespace moeserve::tokenizer::jinja {

NodeList Parser::subparse(std::initializer_list<const char*> ends) {
  NodeList body;
  NodePtr output;
  auto flush = [&] {
    if (output) body.push_back(std::move(output));
  };
  while (cur().type != T::kEof) {
    if (cur().type == T::kText) {
      if (!output) output = make(K::kOutput);
      NodePtr t = make(K::kText);
      t->name = next().text;
      output->body.push_back(std::move(t));
    } else if (cur().type == T::kVarBegin) {
      next();
      if (!output) output = make(K::kOutput);
      output->body.push_back(parse_tuple(false, true, {}));
      expect(T::kVarEnd, "'}}'");
    } else if (cur().type == T::kBlockBegin) {
      flush();
      next();
      for (const char* e : ends)
        if (is_name(e)) return body;
      body.push_back(parse_statement());
      expect(T::kBlockEnd, "'%}'");
    } else {
      error("unexpected token");
    }
  }
  flush();
  if (ends.size()) {
    std::string want;
    for (const char* e : ends) want += std::string(want.empty() ? "" : " or ") + "'" + e + "'";
    error("unexpected end of template, expected " + want);
  }
  return body;
}

NodeList Parser::statements(std::initializer_list<const char*> ends, bool drop_end) {
  expect(T::kBlockEnd, "'%}'");
  NodeList body = subparse(ends);
  if (drop_end) next();
  return body;
}

NodePtr Parser::parse_statement() {
  DepthGuard guard(this);
  if (cur().type != T::kName) error("tag name expected");
  const std::string tag = cur().text;
  if (tag == "if") return parse_if();
  if (tag == "for") return parse_for();
  if (tag == "set") return parse_set();
  if (tag == "macro") return parse_macro();
  if (tag == "call") return parse_call_block();
  if (tag == "filter") {
    NodePtr n = make(K::kFilterBlock);
    next();
    n->args.push_back(parse_filter(nullptr, true));
    while (is_op("|")) n->args.push_back(parse_filter(nullptr, false));
    n->body = statements({"endfilter"}, true);
    return n;
  }
  if (tag == "with") {
    NodePtr n = make(K::kWith);
    next();
    while (cur().type != T::kBlockEnd) {
      if (!n->args.empty()) expect_op(",");
      NodePtr t = make(K::kName);
      t->name = expect_name();
      n->args.push_back(std::move(t));
      expect_op("=");
      n->args2.push_back(parse_expression(true));
    }
    n->body = statements({"endwith"}, true);
    return n;
  }
  if (tag == "generation") {  // transformers' AssistantTracker: renders its body as is
    NodePtr n = make(K::kScope);
    next();
    n->body = statements({"endgeneration"}, true);
    return n;
  }
  if (tag == "print") {
    NodePtr n = make(K::kOutput);
    next();
    n->body.push_back(parse_tuple(false, true, {}));
    return n;
  }
  if (tag == "break" || tag == "continue") {
    if (loop_depth_ == 0) error("'" + tag + "' outside of a loop");
    NodePtr n = make(tag == "break" ? K::kBreak : K::kContinue);
    next();
    return n;
  }
  error("encountered unknown or unsupported tag '" + tag + "'");
}

NodePtr Parser::parse_if() {
  NodePtr n = make(K::kIf);
  next();
  while (true) {
    n->args.push_back(parse_tuple(false, false, {}));
    n->bodies.push_back(statements({"elif", "else", "endif"}, false));
    const std::string t = next().text;
    if (t == "elif") continue;
    if (t == "else") n->body = statements({"endif"}, true);
    break;
  }
  return n;
}

NodePtr Parser::parse_for() {
  NodePtr n = make(K::kFor);
  next();
  n->a = parse_assign_target(true, false, {"in"});
  if (!skip_name("in")) error("expected 'in'");
  n->b = parse_tuple(false, false, {"recursive"});
  if (skip_name("if")) n->c = parse_expression(true);
  n->recursive = skip_name("recursive");
  ++loop_depth_;
  n->body = statements({"endfor", "else"}, false);
  --loop_depth_;
  if (next().text == "else") n->else_body = statements({"endfor"}, true);
  return n;
}

NodePtr Parser::parse_set() {
  const int line = cur().line;
  next();
  NodePtr target = parse_assign_target(true, true, {});
  if (skip_op("=")) {
    NodePtr n = std::make_unique<Node>(K::kSet, line);
    n->a = std::move(target);
    n->b = parse_tuple(false, true, {});
    return n;
  }
  NodePtr n = std::make_unique<Node>(K::kSetBlock, line);
  n->a = std::move(target);
  while (is_op("|")) n->args.push_back(parse_filter(nullptr));
  n->body = statements({"endset"}, true);
  return n;
}

void Parser::parse_signature(Node& n) {
  expect_op("(");
  while (!is_op(")")) {
    if (!n.params.empty()) expect_op(",");
    n.params.push_back(expect_name());
    n.args2.push_back(skip_op("=") ? parse_expression(true) : nullptr);
  }
  expect_op(")");
}

NodePtr Parser::parse_macro() {
  NodePtr n = make(K::kMacro);
  next();
  n->name = expect_name();
  parse_signature(*n);
  const int saved = loop_depth_;
  loop_depth_ = 0;
  n->body = statements({"endmacro"}, true);
  loop_depth_ = saved;
  return n;
}

NodePtr Parser::parse_call_block() {
  NodePtr n = make(K::kCallBlock);
  next();
  if (is_op("(")) parse_signature(*n);
  n->a = parse_expression(true);
  if (n->a->kind != K::kCall) error("expected a call in {% call %}");
  n->body = statements({"endcall"}, true);
  return n;
}

NodePtr Parser::parse_assign_target(bool with_tuple, bool with_namespace,
                                    std::initializer_list<const char*> extra_end) {
  NodePtr tuple = make(K::kTuple);
  bool is_tuple = false;
  while (true) {
    if (!tuple->args.empty()) expect_op(",");
    if (tuple_end(extra_end)) break;
    NodePtr t = make(K::kName);
    t->name = expect_name();
    if (with_namespace && is_op(".")) {
      next();
      NodePtr attr = make(K::kGetAttr);
      attr->a = std::move(t);
      attr->name = expect_name();
      t = std::move(attr);
    }
    tuple->args.push_back(std::move(t));
    if (!with_tuple || !is_op(",")) break;
    is_tuple = true;
  }
  if (tuple->args.empty()) error("expected an assignment target");
  return is_tuple ? std::move(tuple) : std::move(tuple->args[0]);
}

namespace {

// jinja2 rejects unknown filters and tests when it compiles a template, not when it runs it.
void check_names(const NodeList& list);
void check_names(const Node* n) {
  if (!n) return;
  if (n->kind == K::kFilter && !has_filter(n->name))
    fail("chat template error at line ", n->line, ": no filter named '", n->name, "'");
  if (n->kind == K::kTest && !has_test(n->name))
    fail("chat template error at line ", n->line, ": no test named '", n->name, "'");
  for (const Node* k : {n->a.get(), n->b.get(), n->c.get()}) check_names(k);
  check_names(n->args);
  check_names(n->args2);
  for (const auto& [k, v] : n->kwargs) check_names(v.get());
  for (const NodeList& b : n->bodies) check_names(b);
  check_names(n->body);
  check_names(n->else_body);
}
void check_names(const NodeList& list) {
  for (const NodePtr& n : list) check_names(n.get());
}

}  // namespace

NodeList parse_template(const std::string& source) {
  Parser p(tokenize(source));
  NodeList body = p.parse_all();
  check_names(body);
  return body;
}

}  // namespace moeserve::tokenizer::jinja
