// jinja2's builtin tests (`x is defined`, `x is divisibleby 3`, ...).
#include <unordered_map>

#include "core/error.h"
#include "tokenizer/jinja/interpreter.h"
#include "tokenizer/jinja/pystr.h"

namespace moeserve::tokenizer::jinja {
namespace {

using TestFn = bool (*)(const Value&, CallArgs&, Interpreter&);

// Python's `value % n` for the number tests: Undefined and non-numbers fail.
int64_t int_of(const Value& v, const char* test) {
  if (v.is_undefined()) fail(v.str().empty() ? "operand is undefined" : v.str());
  MS_CHECK(v.is_number(), "test '", test, "': unsupported operand type '", v.type_name(), "'");
  return v.as_int();
}

bool cmp_test(const Value& v, CallArgs& a, const char* op) {
  MS_CHECK(!a.pos.empty(), "test '", op, "' needs an argument");
  const Value& o = a.pos[0];
  const std::string s = op;
  if (s == "eq") return v.equals(o);
  if (s == "ne") return !v.equals(o);
  const int c = v.compare(o);
  return s == "lt" ? c < 0 : s == "le" ? c <= 0 : s == "gt" ? c > 0 : c >= 0;
}

const std::unordered_map<std::string, TestFn>& tests() {
  static const std::unordered_map<std::string, TestFn> table = {
      {"defined", [](const Value& v, CallArgs&, Interpreter&) { return !v.is_undefined(); }},
      {"undefined", [](const Value& v, CallArgs&, Interpreter&) { return v.is_undefined(); }},
      {"none", [](const Value& v, CallArgs&, Interpreter&) { return v.is_none(); }},
      {"boolean", [](const Value& v, CallArgs&, Interpreter&) { return v.is_bool(); }},
      {"true", [](const Value& v, CallArgs&, Interpreter&) { return v.is_bool() && v.as_int(); }},
      {"false", [](const Value& v, CallArgs&, Interpreter&) { return v.is_bool() && !v.as_int(); }},
      {"integer",
       [](const Value& v, CallArgs&, Interpreter&) { return v.is_int() && !v.is_bool(); }},
      {"float", [](const Value& v, CallArgs&, Interpreter&) { return v.is_float(); }},
      {"number", [](const Value& v, CallArgs&, Interpreter&) { return v.is_number(); }},
      {"string", [](const Value& v, CallArgs&, Interpreter&) { return v.is_string(); }},
      {"mapping", [](const Value& v, CallArgs&, Interpreter&) { return v.is_dict(); }},
      {"callable", [](const Value& v, CallArgs&, Interpreter&) { return v.is_callable(); }},
      {"iterable",
       [](const Value& v, CallArgs&, Interpreter&) {
         return v.is_undefined() || v.is_string() || v.is_list() || v.is_dict();
       }},
      {"sequence",
       [](const Value& v, CallArgs&, Interpreter&) {
         return v.is_undefined() || v.is_string() || v.is_list() || v.is_dict();
       }},
      {"even", [](const Value& v, CallArgs&, Interpreter&) { return int_of(v, "even") % 2 == 0; }},
      {"odd", [](const Value& v, CallArgs&, Interpreter&) { return int_of(v, "odd") % 2 != 0; }},
      {"divisibleby",
       [](const Value& v, CallArgs& a, Interpreter&) {
         const int64_t n = a.get_or(0, "num", Value(0)).as_int();
         MS_CHECK(n != 0, "divisibleby 0");
         return int_of(v, "divisibleby") % n == 0;
       }},
      {"lower", [](const Value& v, CallArgs&,
                   Interpreter&) { return v.is_string() && pystr::is(v.str(), "islower"); }},
      {"upper", [](const Value& v, CallArgs&,
                   Interpreter&) { return v.is_string() && pystr::is(v.str(), "isupper"); }},
      {"in",
       [](const Value& v, CallArgs& a, Interpreter&) {
         MS_CHECK(!a.pos.empty(), "test 'in' needs an argument");
         const Value& c = a.pos[0];
         if (c.is_string()) return v.is_string() && c.str().find(v.str()) != std::string::npos;
         if (c.is_dict()) return c.dict_data()->find(v) != nullptr;
         for (const Value& x : iterate(c))
           if (x.equals(v)) return true;
         return false;
       }},
      {"sameas",
       [](const Value& v, CallArgs& a, Interpreter&) {
         MS_CHECK(!a.pos.empty(), "test 'sameas' needs an argument");
         const Value& o = a.pos[0];
         if (v.type() != o.type()) return false;
         if (v.is_undefined()) return false;  // two Undefined objects are never the same one
         if (v.is_none() || v.is_bool()) return v.equals(o);
         if (v.is_list()) return v.list_data() == o.list_data();
         if (v.is_dict()) return v.dict_data() == o.dict_data();
         return v.equals(o) && (v.is_int() || v.is_string());
       }},
      {"escaped", [](const Value&, CallArgs&, Interpreter&) { return false; }},
      {"filter", [](const Value& v, CallArgs&,
                    Interpreter&) { return v.is_string() && has_filter(v.str()); }},
      {"test",
       [](const Value& v, CallArgs&, Interpreter&) { return v.is_string() && has_test(v.str()); }},
      {"eq", [](const Value& v, CallArgs& a, Interpreter&) { return cmp_test(v, a, "eq"); }},
      {"ne", [](const Value& v, CallArgs& a, Interpreter&) { return cmp_test(v, a, "ne"); }},
      {"lt", [](const Value& v, CallArgs& a, Interpreter&) { return cmp_test(v, a, "lt"); }},
      {"le", [](const Value& v, CallArgs& a, Interpreter&) { return cmp_test(v, a, "le"); }},
      {"gt", [](const Value& v, CallArgs& a, Interpreter&) { return cmp_test(v, a, "gt"); }},
      {"ge", [](const Value& v, CallArgs& a, Interpreter&) { return cmp_test(v, a, "ge"); }},
  };
  return table;
}

std::string test_alias(const std::string& name) {
  static const std::unordered_map<std::string, std::string> aliases = {
      {"equalto", "eq"}, {"==", "eq"}, {"!=", "ne"},          {"<", "lt"}, {"lessthan", "lt"},
      {"<=", "le"},      {">", "gt"},  {"greaterthan", "gt"}, {">=", "ge"}};
  auto it = aliases.find(name);
  return it == aliases.end() ? name : it->second;
}

}  // namespace

bool has_test(const std::string& name) {
  return tests().count(test_alias(name)) > 0;
}

bool builtin_test(const std::string& name, const Value& v, CallArgs& args, Interpreter& in) {
  const std::string canonical = test_alias(name);
  auto it = tests().find(canonical);
  MS_CHECK(it != tests().end(), "no test named '", name, "'");
  static const std::unordered_map<std::string, size_t> one_arg = {
      {"divisibleby", 1}, {"in", 1}, {"sameas", 1}, {"eq", 1}, {"ne", 1},
      {"lt", 1},          {"le", 1}, {"gt", 1},     {"ge", 1}};
  const auto n = one_arg.find(canonical);
  const size_t want = n == one_arg.end() ? 0 : n->second;
  MS_CHECK(args.pos.size() + args.kw.size() == want, "test '", name, "' takes ", want,
           " argument(s), got ", args.pos.size() + args.kw.size());
  return it->second(v, args, in);
}

}  // namespace moeserve::tokenizer::jinja
