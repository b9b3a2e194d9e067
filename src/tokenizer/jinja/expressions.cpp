#include <algorithm>

#include "core/error.h"
#include "tokenizer/jinja/interpreter.h"

namespace moeserve::tokenizer::jinja {

using K = Node::Kind;

// Expressions of the evaluator
// --------------------------------------------------------------------------------

Value Interpreter::call(const Value& fn, CallArgs& args) {
  if (fn.is_undefined()) fail(fn.str().empty() ? "call of an undefined value" : fn.str());
  MS_CHECK(fn.is_callable(), "'", fn.type_name(), "' object is not callable");
  return fn.callable()->fn(args, *this);
}

Value Interpreter::filter(const std::string& name, const Value& v, CallArgs& args) {
  return builtin_filter(name, v, args, *this);
}

bool Interpreter::test(const std::string& name, const Value& v, CallArgs& args) {
  return builtin_test(name, v, args, *this);
}

void Interpreter::eval_args(const Node& n, CallArgs& args) {
  for (const NodePtr& a : n.args) args.pos.push_back(eval(*a));
  for (const auto& [k, v] : n.kwargs) args.kw.emplace_back(k, eval(*v));
}

Value Interpreter::eval_call(const Node& n) {
  const Value fn = eval(*n.a);
  CallArgs args;
  eval_args(n, args);
  return call(fn, args);
}

Value Interpreter::get_attr(const Value& obj, const std::string& name) {
  if (obj.is_undefined()) fail(obj.str().empty() ? "attribute of an undefined value" : obj.str());
  if (obj.is_namespace() || obj.is_loop()) {
    const Value* v = obj.dict_data()->find(Value(name));
    return v ? *v : Value::undefined("'" + obj.type_name() + "' has no attribute '" + name + "'");
  }
  if (Value m = builtin_method(obj, name); !m.is_undefined()) return m;
  if (obj.is_dict()) {
    const Value* v = obj.dict_data()->find(Value(name));
    if (v) return *v;
  }
  return Value::undefined("'" + obj.type_name() + " object' has no attribute '" + name + "'");
}

Value Interpreter::get_item(const Value& obj, const Value& key) {
  if (obj.is_undefined()) fail(obj.str().empty() ? "item of an undefined value" : obj.str());
  if (obj.is_dict()) {
    if (const Value* v = obj.dict_data()->find(key)) return *v;
  } else if ((obj.is_list() || obj.is_string()) && key.is_int()) {
    int64_t i = key.as_int();
    if (obj.is_list()) {
      const int64_t n = static_cast<int64_t>(obj.items().size());
      if (i < 0) i += n;
      if (i >= 0 && i < n) return obj.items()[size_t(i)];
    } else {
      const auto chars = split_chars(obj.str());
      const int64_t n = static_cast<int64_t>(chars.size());
      if (i < 0) i += n;
      if (i >= 0 && i < n) return Value(chars[size_t(i)]);
    }
    return Value::undefined("index out of range");
  }
  if (key.is_string()) return get_attr(obj, key.str());
  return Value::undefined("'" + obj.type_name() + " object' has no item " + key.repr());
}

Value Interpreter::slice(const Value& obj, const Node& n) {
  int64_t part[3];
  bool given[3];
  for (int k = 0; k < 3; ++k) {
    const Value v = n.args[k] ? eval(*n.args[k]) : Value::none();
    given[k] = !v.is_none();
    MS_CHECK(!given[k] || v.is_int(), "slice indices must be integers or None");
    part[k] = given[k] ? v.as_int() : 0;
  }
  const int64_t step = given[2] ? part[2] : 1;
  MS_CHECK(step != 0, "slice step cannot be zero");
  if (obj.is_undefined()) fail(obj.str().empty() ? "slice of an undefined value" : obj.str());
  std::vector<Value> src;
  const bool is_str = obj.is_string();
  if (is_str) {
    for (auto& c : split_chars(obj.str())) src.emplace_back(std::move(c));
  } else {
    if (!obj.is_list())
      return Value::undefined("'" + obj.type_name() + "' object is not subscriptable");
    src = obj.items();
  }
  const int64_t len = static_cast<int64_t>(src.size());
  auto clamp = [&](int64_t v, bool is_given, int64_t dflt) {
    if (!is_given) return dflt;
    if (v < 0) v += len;
    if (step > 0) return std::clamp<int64_t>(v, 0, len);
    return std::clamp<int64_t>(v, -1, len - 1);
  };
  const int64_t start = clamp(part[0], given[0], step > 0 ? 0 : len - 1);
  const int64_t stop = clamp(part[1], given[1], step > 0 ? len : -1);
  std::vector<Value> out;
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) out.push_back(src[size_t(i)]);
  if (!is_str) return Value::list(std::move(out), obj.list_data()->tuple);
  std::string s;
  for (const Value& c : out) s += c.str();
  return Value(std::move(s));
}

Value Interpreter::eval(const Node& n) {
  DepthGuard guard(this, n.line);
  step();
  switch (n.kind) {
    case K::kLiteral:
      return n.value;
    case K::kName:
      return lookup(n.name);
    case K::kList:
    case K::kTuple: {
      std::vector<Value> items;
      for (const NodePtr& a : n.args) items.push_back(eval(*a));
      return Value::list(std::move(items), n.kind == K::kTuple);
    }
    case K::kDict: {
      Value d = Value::dict();
      for (size_t i = 0; i < n.args.size(); ++i)
        d.dict_data()->set(eval(*n.args[i]), eval(*n.args2[i]));
      return d;
    }
    case K::kGetAttr:
      return get_attr(eval(*n.a), n.name);
    case K::kGetItem: {
      const Value obj = eval(*n.a);
      return get_item(obj, eval(*n.b));
    }
    case K::kSlice:
      return slice(eval(*n.a), n);
    case K::kCall:
      return eval_call(n);
    case K::kFilter: {
      const Value v = eval(*n.a);
      CallArgs args;
      eval_args(n, args);
      return filter(n.name, v, args);
    }
    case K::kTest: {
      const Value v = eval(*n.a);
      CallArgs args;
      eval_args(n, args);
      return Value(test(n.name, v, args) != n.negated);
    }
    case K::kNot:
      return Value(!eval(*n.a).truthy());
    case K::kNeg:
    case K::kPos: {
      const Value v = eval(*n.a);
      if (v.is_undefined()) fail(v.str().empty() ? "operand is undefined" : v.str());
      MS_CHECK(v.is_number(), "bad operand type for unary ", n.kind == K::kNeg ? "-" : "+", ": '",
               v.type_name(), "'");
      if (n.kind == K::kPos) return v.is_float() ? v : Value(v.as_int());
      if (v.is_float()) return Value(-v.as_double());
      MS_CHECK(v.as_int() != INT64_MIN, "integer overflow");
      return Value(-v.as_int());
    }
    case K::kBinary:
      return eval_binary(n);
    case K::kCompare:
      return eval_compare(n);
    case K::kCondExpr:
      if (eval(*n.a).truthy()) return eval(*n.b);
      return n.c ? eval(*n.c) : Value::undefined("conditional expression had no else");
    default:
      fail("internal error: statement used as an expression");
  }
}

}  // namespace moeserve::tokenizer::jinja
