// Syntax tree of a Jinja template: one node type, its fields used as the kind says.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tokenizer/jinja/value.h"

namespace moeserve::tokenizer::jinja {

struct Node;
using NodePtr = std::unique_ptr<Node>;
using NodeList = std::vector<NodePtr>;

struct Node {
  enum class Kind {
    // Expressions.
    kLiteral,   // value
    kName,      // name
    kList,      // args = items
    kTuple,     // args = items
    kDict,      // args = keys, args2 = values
    kGetAttr,   // a.name
    kGetItem,   // a[b]
    kSlice,     // a[b:c:d]; absent parts are null
    kCall,      // a(args, kwargs)
    kFilter,    // a | name(args, kwargs); a is null inside {% filter %}
    kTest,      // a is [not] name(args); negated
    kNot,       // not a
    kNeg,       // -a
    kPos,       // +a
    kBinary,    // a name b, name one of + - * / // % ** ~ and or
    kCompare,   // a (ops[i] args[i])...
    kCondExpr,  // b if a else c (c may be null)
    // Statements.
    kOutput,       // body: text and expressions printed in order
    kText,         // name = the text
    kIf,           // args = conditions, bodies = branch bodies, body = else
    kFor,          // a = target, b = iterable, c = filter (or null), body, else_body, recursive
    kSet,          // a = target, b = value
    kSetBlock,     // a = target, body; args = filters applied to the captured text
    kMacro,        // name, params (args2 = defaults, null when none), body
    kFilterBlock,  // args = filters, body
    kWith,         // args = targets, args2 = values, body
    kBreak,
    kContinue,
    kCallBlock,  // a = call expression, params/args2 = caller's parameters, body = caller
    kScope,      // body (also {% generation %})
  };

  Kind kind;
  int line = 0;
  std::string name;
  Value value;
  NodePtr a, b, c;
  NodeList args, args2;
  std::vector<std::pair<std::string, NodePtr>> kwargs;
  std::vector<std::string> ops;     // kCompare operators: == != < <= > >= in notin
  std::vector<std::string> params;  // kMacro / kCallBlock parameter names
  std::vector<NodeList> bodies;     // kIf branches
  NodeList body, else_body;
  bool negated = false, recursive = false;

  Node(Kind k, int l) : kind(k), line(l) {}
};

}  // namespace moeserve::tokenizer::jinja
