// Jinja evaluator: walks the syntax tree with Python/jinja2 semantics (scoping of loops and
// macros, Undefined, truthiness, operators), bounded in output size, steps and recursion so a
// hostile template cannot hang or exhaust memory.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <unordered_map>
#include <vector>

#include "tokenizer/jinja/ast.h"
#include "tokenizer/jinja/value.h"

namespace moeserve::tokenizer::jinja {

struct RenderLimits {
  size_t max_output_bytes = 64u << 20;  // rendered text, and any string or list built on the way
  uint64_t max_steps = 2'000'000;       // evaluated nodes and loop iterations
  int max_depth = 1000;                 // nested evaluation (macro recursion included)
};

// Arguments of a call, a filter or a test.
struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;

  // The argument at position `index` or named `name`; nullptr when absent.
  const Value* get(size_t index, const char* name) const;
  Value get_or(size_t index, const char* name, Value fallback) const {
    const Value* v = get(index, name);
    return v ? *v : fallback;
  }
  // Throws when more than `n_pos` positional arguments or an unknown keyword is given.
  void check(const char* fn, size_t n_pos, const std::vector<const char*>& names) const;
};

class Interpreter {
 public:
  explicit Interpreter(RenderLimits limits) : limits_(limits) {}

  // Renders `tmpl` with the variables of `context` (a dict). Throws moeserve::Error with the
  // template line for any error, including raise_exception().
  std::string render(const NodeList& tmpl, const Value& context);

  // Used by the builtins.
  Value call(const Value& fn, CallArgs& args);
  Value filter(const std::string& name, const Value& v, CallArgs& args);
  bool test(const std::string& name, const Value& v, CallArgs& args);
  void check_size(size_t bytes) const;
  void step();
  Value get_attr(const Value& obj, const std::string& name);  // obj.name
  Value get_item(const Value& obj, const Value& key);         // obj[key]

 private:
  enum class Flow { kNormal, kBreak, kContinue };
  struct Frame {
    std::unordered_map<std::string, Value> vars;
    int parent;
  };
  struct DepthGuard {
    DepthGuard(Interpreter* in, int line);
    ~DepthGuard();
    Interpreter* in;
    int saved_line;
  };

  Flow exec(const NodeList& body);
  Flow exec(const Node& n);
  Value eval(const Node& n);
  Value eval_binary(const Node& n);
  Value eval_compare(const Node& n);
  Value slice(const Value& obj, const Node& n);
  Value eval_call(const Node& n);
  void eval_args(const Node& n, CallArgs& args);
  Flow exec_for(const Node& n);
  void assign(const Node& target, const Value& v);
  Value make_macro(const Node& n);
  std::string capture(const NodeList& body);
  void emit(const std::string& s);

  Value lookup(const std::string& name) const;
  int push_frame(int parent);
  void pop_frame(int previous);

  RenderLimits limits_;
  std::vector<Frame> frames_;
  int current_ = 0;
  std::string out_;
  uint64_t steps_ = 0;
  int depth_ = 0;
  int line_ = 0;
};

// Builtins (builtins.cpp). Unknown names throw.
Value builtin_filter(const std::string& name, const Value& v, CallArgs& args, Interpreter& in);
bool builtin_test(const std::string& name, const Value& v, CallArgs& args, Interpreter& in);
bool has_filter(const std::string& name);
bool has_test(const std::string& name);
// obj.name as a bound method of a str, list or dict, or Undefined when there is none.
Value builtin_method(const Value& obj, const std::string& name);
// Global functions: range, namespace, dict, raise_exception, strftime_now, joiner, cycler.
Value builtin_global(const std::string& name);

// Python's printf-style `fmt % args` (args a tuple, or one value) for %s %r %d %i %x %o %f %e %g.
std::string percent_format(const std::string& fmt, const Value& args);

// Python's iteration: list items, dict keys, string characters; Undefined is empty.
std::vector<Value> iterate(const Value& v);

// Code points of a UTF-8 string (Python indexes strings by code point).
std::vector<std::string> split_chars(const std::string& s);

}  // namespace moeserve::tokenizer::jinja
