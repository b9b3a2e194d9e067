#include "tokenizer/jinja/interpreter.h"

#include <algorithm>
#include <cmath>
#include <exception>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer::jinja {

using K = Node::Kind;

const Value* CallArgs::get(size_t index, const char* name) const {
  if (index < pos.size()) return &pos[index];
  for (const auto& [k, v] : kw)
    if (k == name) return &v;
  return nullptr;
}

void CallArgs::check(const char* fn, size_t n_pos, const std::vector<const char*>& names) const {
  MS_CHECK(pos.size() <= n_pos, fn, "() takes at most ", n_pos, " positional argument(s), got ",
           pos.size());
  for (const auto& [k, v] : kw) {
    bool known = false;
    size_t i = 0;
    for (const char* n : names) {
      if (k == n) {
        known = true;
        MS_CHECK(i >= pos.size(), fn, "() got multiple values for argument '", k, "'");
      }
      ++i;
    }
    MS_CHECK(known, fn, "() got an unexpected keyword argument '", k, "'");
  }
}

std::vector<std::string> split_chars(const std::string& s) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < s.size()) {
    const size_t n = std::max<size_t>(1, utf8_seq_len(s, i));
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

std::vector<Value> iterate(const Value& v) {
  switch (v.type()) {
    case Value::Type::kUndefined:
      return {};
    case Value::Type::kList:
      return v.items();
    case Value::Type::kDict: {
      MS_CHECK(v.is_dict(), "'", v.type_name(), "' object is not iterable");
      std::vector<Value> keys;
      for (const auto& [k, val] : v.dict_data()->items) keys.push_back(k);
      return keys;
    }
    case Value::Type::kString: {
      std::vector<Value> out;
      for (auto& c : split_chars(v.str())) out.emplace_back(std::move(c));
      return out;
    }
    default:
      fail("'", v.type_name(), "' object is not iterable");
  }
}

Interpreter::DepthGuard::DepthGuard(Interpreter* in, int line) : in(in), saved_line(in->line_) {
  if (++in->depth_ > in->limits_.max_depth) fail("template recursion is too deep");
  if (line > 0) in->line_ = line;
}

Interpreter::DepthGuard::~DepthGuard() {
  --in->depth_;
  // On an exception, keep the line of the node that failed for the error message.
  if (!std::uncaught_exceptions()) in->line_ = saved_line;
}

std::string Interpreter::render(const NodeList& tmpl, const Value& context) {
  frames_.clear();
  frames_.push_back({{}, -1});
  current_ = 0;
  out_.clear();
  steps_ = 0;
  depth_ = 0;
  line_ = 1;
  if (context.is_dict())
    for (const auto& [k, v] : context.dict_data()->items)
      if (k.is_string()) frames_[0].vars[k.str()] = v;
  try {
    exec(tmpl);
  } catch (const Error& e) {
    fail("chat template error at line ", line_, ": ", e.what());
  }
  return std::move(out_);
}

void Interpreter::step() {
  if (++steps_ > limits_.max_steps)
    fail("template ran for more than ", limits_.max_steps, " steps (infinite loop?)");
}

void Interpreter::check_size(size_t bytes) const {
  if (bytes > limits_.max_output_bytes)
    fail("template output or a value in it exceeds ", limits_.max_output_bytes, " bytes");
}

void Interpreter::emit(const std::string& s) {
  check_size(out_.size() + s.size());
  out_ += s;
}

int Interpreter::push_frame(int parent) {
  frames_.push_back({{}, parent});
  const int previous = current_;
  current_ = static_cast<int>(frames_.size()) - 1;
  return previous;
}

void Interpreter::pop_frame(int previous) {
  frames_.pop_back();
  current_ = previous;
}

Value Interpreter::lookup(const std::string& name) const {
  for (int f = current_; f >= 0; f = frames_[f].parent) {
    auto it = frames_[f].vars.find(name);
    if (it != frames_[f].vars.end()) return it->second;
  }
  Value g = builtin_global(name);
  return g.is_undefined() ? Value::undefined("'" + name + "' is undefined") : g;
}

std::string Interpreter::capture(const NodeList& body) {
  std::string saved;
  saved.swap(out_);
  try {
    exec(body);
  } catch (...) {
    out_.swap(saved);
    throw;
  }
  out_.swap(saved);
  return saved;
}

// Statements ---------------------------------------------------------------------------------

Interpreter::Flow Interpreter::exec(const NodeList& body) {
  for (const NodePtr& n : body) {
    const Flow f = exec(*n);
    if (f != Flow::kNormal) return f;
  }
  return Flow::kNormal;
}

Interpreter::Flow Interpreter::exec(const Node& n) {
  DepthGuard guard(this, n.line);
  step();
  switch (n.kind) {
    case K::kOutput:
      for (const NodePtr& part : n.body) {
        if (part->kind == K::kText) {
          emit(part->name);
        } else {
          emit(eval(*part).to_str());
        }
      }
      return Flow::kNormal;
    case K::kIf:
      for (size_t i = 0; i < n.args.size(); ++i)
        if (eval(*n.args[i]).truthy()) return exec(n.bodies[i]);
      return exec(n.body);
    case K::kFor:
      return exec_for(n);
    case K::kSet:
      assign(*n.a, eval(*n.b));
      return Flow::kNormal;
    case K::kSetBlock: {
      Value v(capture(n.body));
      for (const NodePtr& f : n.args) {
        CallArgs args;
        eval_args(*f, args);
        v = filter(f->name, v, args);
      }
      assign(*n.a, v);
      return Flow::kNormal;
    }
    case K::kMacro:
      frames_[current_].vars[n.name] = make_macro(n);
      return Flow::kNormal;
    case K::kFilterBlock: {
      Value v(capture(n.body));
      for (const NodePtr& f : n.args) {
        CallArgs args;
        eval_args(*f, args);
        v = filter(f->name, v, args);
      }
      emit(v.to_str());
      return Flow::kNormal;
    }
    case K::kWith: {
      std::vector<Value> values;
      for (const NodePtr& v : n.args2) values.push_back(eval(*v));
      const int prev = push_frame(current_);
      for (size_t i = 0; i < n.args.size(); ++i) assign(*n.args[i], values[i]);
      const Flow f = exec(n.body);
      pop_frame(prev);
      return f;
    }
    case K::kCallBlock: {
      CallArgs args;
      eval_args(*n.a, args);
      args.kw.emplace_back("caller", make_macro(n));
      emit(call(eval(*n.a->a), args).to_str());
      return Flow::kNormal;
    }
    case K::kScope:
      return exec(n.body);
    case K::kBreak:
      return Flow::kBreak;
    case K::kContinue:
      return Flow::kContinue;
    default:
      fail("internal error: expression used as a statement");
  }
}

Interpreter::Flow Interpreter::exec_for(const Node& n) {
  MS_CHECK(!n.recursive, "recursive for loops are not supported");
  std::vector<Value> items = iterate(eval(*n.b));
  if (n.c) {  // the loop filter runs before the loop, so loop.length counts what is kept
    std::vector<Value> kept;
    for (const Value& item : items) {
      step();
      const int prev = push_frame(current_);
      assign(*n.a, item);
      const bool keep = eval(*n.c).truthy();
      pop_frame(prev);
      if (keep) kept.push_back(item);
    }
    items.swap(kept);
  }
  if (items.empty()) return exec(n.else_body);
  const int64_t len = static_cast<int64_t>(items.size());
  // One loop object per loop, updated in place (jinja2's LoopContext is one object too), and one
  // frame cleared at each iteration: what the body sets does not survive to the next one.
  auto loop = std::make_shared<DictData>();
  loop->is_loop = true;
  auto index = std::make_shared<int64_t>(0);
  auto cycle = std::make_shared<Callable>();
  cycle->name = "cycle";
  cycle->fn = [index](CallArgs& args, Interpreter&) -> Value {
    MS_CHECK(!args.pos.empty(), "loop.cycle() needs at least one argument");
    return args.pos[size_t(*index) % args.pos.size()];
  };
  for (const char* key : {"index", "index0", "revindex", "revindex0", "first", "last", "length",
                          "previtem", "nextitem", "depth", "depth0", "cycle"})
    loop->items.emplace_back(Value(key), Value());
  loop->items[6].second = Value(len);
  loop->items[9].second = Value(1);
  loop->items[10].second = Value(0);
  loop->items[11].second = Value(cycle);
  const Value loop_value(loop);
  const int prev = push_frame(current_);
  Flow flow = Flow::kNormal;
  for (int64_t i = 0; i < len && flow != Flow::kBreak; ++i) {
    step();
    *index = i;
    auto& f = loop->items;
    f[0].second = Value(i + 1);
    f[1].second = Value(i);
    f[2].second = Value(len - i);
    f[3].second = Value(len - i - 1);
    f[4].second = Value(i == 0);
    f[5].second = Value(i == len - 1);
    f[7].second = i > 0 ? items[i - 1] : Value::undefined("no previtem");
    f[8].second = i + 1 < len ? items[i + 1] : Value::undefined("no nextitem");
    frames_[current_].vars.clear();
    frames_[current_].vars["loop"] = loop_value;
    assign(*n.a, items[i]);
    flow = exec(n.body);
  }
  pop_frame(prev);
  return Flow::kNormal;
}

void Interpreter::assign(const Node& target, const Value& v) {
  switch (target.kind) {
    case K::kName:
      frames_[current_].vars[target.name] = v;
      return;
    case K::kTuple: {
      const std::vector<Value> items = iterate(v);
      MS_CHECK(items.size() == target.args.size(), "cannot unpack ", items.size(),
               " value(s) into ", target.args.size(), " names");
      for (size_t i = 0; i < items.size(); ++i) assign(*target.args[i], items[i]);
      return;
    }
    case K::kGetAttr: {
      const Value ns = lookup(target.a->name);
      MS_CHECK(ns.is_namespace(), "cannot assign attribute '", target.name, "' on '",
               target.a->name, "', which is not a namespace()");
      ns.dict_data()->set(Value(target.name), v);
      return;
    }
    default:
      fail("cannot assign to this expression");
  }
}

Value Interpreter::make_macro(const Node& n) {
  auto fn = std::make_shared<Callable>();
  fn->name = n.name.empty() ? "caller" : n.name;
  const Node* node = &n;
  const int defining_frame = n.kind == K::kCallBlock ? current_ : 0;
  fn->fn = [node, defining_frame](CallArgs& args, Interpreter& in) -> Value {
    MS_CHECK(args.pos.size() <= node->params.size(), "macro '", node->name, "' takes at most ",
             node->params.size(), " argument(s)");
    const int prev = in.push_frame(defining_frame);
    std::string out;
    try {
      for (size_t i = 0; i < node->params.size(); ++i) {
        const Value* v = args.get(i, node->params[i].c_str());
        Value value;
        if (v) {
          value = *v;
        } else if (node->args2[i]) {
          value = in.eval(*node->args2[i]);
        } else {
          value = Value::undefined("parameter '" + node->params[i] + "' was not given");
        }
        in.frames_[in.current_].vars[node->params[i]] = value;
      }
      for (const auto& [k, v] : args.kw) {
        bool known = k == "caller";
        for (const auto& p : node->params) known = known || p == k;
        MS_CHECK(known, "macro '", node->name, "' has no argument '", k, "'");
        if (k == "caller") in.frames_[in.current_].vars[k] = v;
      }
      out = in.capture(node->body);
    } catch (...) {
      in.pop_frame(prev);
      throw;
    }
    in.pop_frame(prev);
    return Value(std::move(out));
  };
  return Value(fn);
}

}  // namespace moeserve::tokenizer::jinja
