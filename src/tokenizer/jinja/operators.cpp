// Binary operators and comparisons with Python's semantics.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "tokenizer/jinja/interpreter.h"

namespace moeserve::tokenizer::jinja {
namespace {

[[noreturn]] void bad_operands(const std::string& op, const Value& l, const Value& r) {
  fail("unsupported operand type(s) for ", op, ": '", l.type_name(), "' and '", r.type_name(), "'");
}

void check_defined(const Value& v) {
  if (v.is_undefined()) fail(v.str().empty() ? "operand is undefined" : v.str());
}

void check_overflow(bool overflow) {
  MS_CHECK(!overflow, "integer overflow");
}

std::string repeat(const std::string& s, int64_t n, Interpreter& in) {
  if (n <= 0 || s.empty()) return "";
  in.check_size(s.size() * size_t(std::min<int64_t>(n, int64_t(1) << 40)));
  std::string out;
  out.reserve(s.size() * size_t(n));
  for (int64_t i = 0; i < n; ++i) out += s;
  return out;
}

bool contains(const Value& container, const Value& item) {
  if (container.is_undefined()) return false;  // Undefined iterates as empty
  if (container.is_string()) {
    MS_CHECK(item.is_string(), "'in <string>' requires string as left operand, not ",
             item.type_name());
    return container.str().find(item.str()) != std::string::npos;
  }
  if (container.is_list()) {
    for (const Value& v : container.items())
      if (v.equals(item)) return true;
    return false;
  }
  if (container.is_dict()) return container.dict_data()->find(item) != nullptr;
  fail("argument of type '", container.type_name(), "' is not iterable");
}

}  // namespace

// Python's printf-style "fmt % args" for the common conversions.
std::string percent_format(const std::string& fmt, const Value& arg) {
  std::vector<Value> args =
      arg.is_list() && arg.list_data()->tuple ? arg.items() : std::vector<Value>{arg};
  std::string out;
  size_t next = 0;
  for (size_t i = 0; i < fmt.size(); ++i) {
    if (fmt[i] != '%') {
      out += fmt[i];
      continue;
    }
    MS_CHECK(i + 1 < fmt.size(), "incomplete format");
    std::string spec = "%";
    size_t j = i + 1;
    while (j < fmt.size() && fmt[j] && std::strchr("-+ 0#.123456789", fmt[j])) spec += fmt[j++];
    MS_CHECK(j < fmt.size(), "incomplete format");
    const char conv = fmt[j];
    i = j;
    if (conv == '%') {
      out += '%';
      continue;
    }
    MS_CHECK(next < args.size(), "not enough arguments for format string");
    const Value& v = args[next++];
    char buf[512];
    if (conv == 's' || conv == 'r') {
      const std::string s = conv == 's' ? v.to_str() : v.repr();
      if (spec == "%") {
        out += s;
      } else {
        std::snprintf(buf, sizeof buf, (spec + "s").c_str(), s.c_str());
        out += buf;
      }
    } else if (conv == 'd' || conv == 'i' || conv == 'x' || conv == 'X' || conv == 'o') {
      MS_CHECK(v.is_number(), "%", conv, " format: a number is required, not ", v.type_name());
      std::snprintf(buf, sizeof buf, (spec + "ll" + (conv == 'i' ? 'd' : conv)).c_str(),
                    static_cast<long long>(v.as_int()));
      out += buf;
    } else if (conv && std::strchr("feEgG", conv)) {
      MS_CHECK(v.is_number(), "%", conv, " format: a number is required, not ", v.type_name());
      std::snprintf(buf, sizeof buf, (spec + conv).c_str(), v.as_double());
      out += buf;
    } else {
      fail("unsupported format character '", conv, "'");
    }
  }
  MS_CHECK(next == args.size(), "not all arguments converted during string formatting");
  return out;
}

Value Interpreter::eval_binary(const Node& n) {
  const std::string& op = n.name;
  if (op == "and") {
    Value l = eval(*n.a);
    return l.truthy() ? eval(*n.b) : l;
  }
  if (op == "or") {
    Value l = eval(*n.a);
    return l.truthy() ? l : eval(*n.b);
  }
  const Value l = eval(*n.a);
  const Value r = eval(*n.b);
  if (op == "~") {
    std::string s = l.to_str();
    const std::string rs = r.to_str();
    check_size(s.size() + rs.size());
    return Value(s + rs);
  }
  check_defined(l);
  check_defined(r);
  const bool ints = l.is_int() && r.is_int(), nums = l.is_number() && r.is_number();
  int64_t iv = 0;
  if (op == "+") {
    if (ints) {
      check_overflow(__builtin_add_overflow(l.as_int(), r.as_int(), &iv));
      return Value(iv);
    }
    if (nums) return Value(l.as_double() + r.as_double());
    if (l.is_string() && r.is_string()) {
      check_size(l.str().size() + r.str().size());
      return Value(l.str() + r.str());
    }
    if (l.is_list() && r.is_list() && l.list_data()->tuple == r.list_data()->tuple) {
      std::vector<Value> items = l.items();
      items.insert(items.end(), r.items().begin(), r.items().end());
      check_size(items.size() * sizeof(Value));
      return Value::list(std::move(items), l.list_data()->tuple);
    }
    bad_operands(op, l, r);
  }
  if (op == "-") {
    if (ints) {
      check_overflow(__builtin_sub_overflow(l.as_int(), r.as_int(), &iv));
      return Value(iv);
    }
    if (nums) return Value(l.as_double() - r.as_double());
    bad_operands(op, l, r);
  }
  if (op == "*") {
    if (ints) {
      check_overflow(__builtin_mul_overflow(l.as_int(), r.as_int(), &iv));
      return Value(iv);
    }
    if (nums) return Value(l.as_double() * r.as_double());
    if (l.is_string() && r.is_int()) return Value(repeat(l.str(), r.as_int(), *this));
    if (r.is_string() && l.is_int()) return Value(repeat(r.str(), l.as_int(), *this));
    if ((l.is_list() && r.is_int()) || (r.is_list() && l.is_int())) {
      const Value& list = l.is_list() ? l : r;
      const int64_t times = l.is_list() ? r.as_int() : l.as_int();
      std::vector<Value> items;
      if (times > 0)
        check_size(list.items().size() * sizeof(Value) * size_t(std::min<int64_t>(times, 1 << 30)));
      for (int64_t i = 0; i < times; ++i)
        items.insert(items.end(), list.items().begin(), list.items().end());
      return Value::list(std::move(items), list.list_data()->tuple);
    }
    bad_operands(op, l, r);
  }
  if (op == "/" || op == "//" || op == "%") {
    if (op == "%" && l.is_string()) return Value(percent_format(l.str(), r));
    if (!nums) bad_operands(op, l, r);
    if (op == "/") {
      MS_CHECK(r.as_double() != 0.0, "division by zero");
      return Value(l.as_double() / r.as_double());
    }
    if (ints) {
      const int64_t a = l.as_int(), b = r.as_int();
      MS_CHECK(b != 0, "integer division or modulo by zero");
      MS_CHECK(!(a == INT64_MIN && b == -1), "integer overflow");
      int64_t q = a / b, m = a % b;
      if (m != 0 && ((m < 0) != (b < 0))) {
        --q;
        m += b;
      }
      return Value(op == "//" ? q : m);
    }
    const double a = l.as_double(), b = r.as_double();
    MS_CHECK(b != 0.0, "float division by zero");
    if (op == "//") return Value(std::floor(a / b));
    double m = std::fmod(a, b);
    if (m != 0.0 && ((m < 0) != (b < 0))) m += b;
    return Value(m);
  }
  if (op == "**") {
    if (!nums) bad_operands(op, l, r);
    if (ints && r.as_int() >= 0) {
      int64_t result = 1, base = l.as_int(), e = r.as_int();
      while (e > 0) {
        if (e & 1) check_overflow(__builtin_mul_overflow(result, base, &result));
        e >>= 1;
        if (e) check_overflow(__builtin_mul_overflow(base, base, &base));
      }
      return Value(result);
    }
    const double p = std::pow(l.as_double(), r.as_double());
    MS_CHECK(std::isfinite(p) || !std::isfinite(l.as_double()) || !std::isfinite(r.as_double()),
             "numerical result out of range");
    return Value(p);
  }
  fail("unknown operator ", op);
}

Value Interpreter::eval_compare(const Node& n) {
  Value left = eval(*n.a);
  for (size_t i = 0; i < n.ops.size(); ++i) {
    Value right = eval(*n.args[i]);
    const std::string& op = n.ops[i];
    bool ok;
    if (op == "==") {
      ok = left.equals(right);
    } else if (op == "!=") {
      ok = !left.equals(right);
    } else if (op == "in") {
      ok = contains(right, left);
    } else if (op == "notin") {
      ok = !contains(right, left);
    } else {
      check_defined(left);
      check_defined(right);
      if (left.equals(right) && (op == "<=" || op == ">=")) {
        ok = true;
      } else {
        const int c = left.compare(right);
        ok = op == "<" ? c < 0 : op == "<=" ? c <= 0 : op == ">" ? c > 0 : c >= 0;
      }
    }
    if (!ok) return Value(false);
    left = std::move(right);
  }
  return Value(true);
}

}  // namespace moeserve::tokenizer::jinja
