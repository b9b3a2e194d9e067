// jinja2's builtin filters on strings and numbers (with transformers' tojson); the filters over
// sequences are in filters_seq.cpp.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <unordered_map>

#include "core/error.h"
#include "tokenizer/jinja/filters_impl.h"
#include "tokenizer/jinja/lexer.h"
#include "tokenizer/jinja/pystr.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer::jinja {
namespace filters_impl {

const std::string& need_str(const Value& v, const char* fn) {
  MS_CHECK(v.is_string(), fn, ": expected a string, got ", v.type_name());
  return v.str();
}

std::vector<Value> as_seq(const Value& v, const char*) {
  return iterate(v);
}

int64_t length_of(const Value& v) {
  if (v.is_undefined()) return 0;
  if (v.is_string()) return static_cast<int64_t>(pystr::length(v.str()));
  if (v.is_list()) return static_cast<int64_t>(v.items().size());
  if (v.is_dict() || v.is_namespace()) return static_cast<int64_t>(v.dict_data()->items.size());
  fail("object of type '", v.type_name(), "' has no len()");
}

Value attr_path(const Value& item, const Value& attribute, Interpreter& in) {
  if (!attribute.is_string()) return in.get_item(item, attribute);
  Value v = item;
  for (const std::string& part : pystr::split(attribute.str(), std::string("."), -1)) {
    const bool digits = !part.empty() && std::all_of(part.begin(), part.end(), ::isdigit);
    v = in.get_item(v, digits ? Value(int64_t(std::stoll(part))) : Value(part));
  }
  return v;
}

int64_t to_int64(double d) {
  MS_CHECK(std::fabs(d) < 9.2e18, "int: ", python_float_repr(d), " is too large for an integer");
  return static_cast<int64_t>(d);
}

Value fold(const Value& v, bool case_sensitive) {
  return (!case_sensitive && v.is_string()) ? Value(pystr::lower(v.str())) : v;
}

}  // namespace filters_impl

namespace {

using namespace filters_impl;

// transformers' tojson: json.dumps(x, ensure_ascii=False, indent=None, separators=None,
// sort_keys=False), positional arguments in that order.
Value f_tojson(const Value& v, CallArgs& a, Interpreter&) {
  a.check("tojson", 4, {"ensure_ascii", "indent", "separators", "sort_keys"});
  JsonStyle style;
  style.ensure_ascii = a.get_or(0, "ensure_ascii", Value(false)).truthy();
  const Value indent = a.get_or(1, "indent", Value::none());
  MS_CHECK(indent.is_none() || indent.is_int() || indent.is_string(),
           "tojson: indent must be an integer, a string or None");
  if (!indent.is_none()) {
    style.indent = indent.is_string() ? 0 : int(std::clamp<int64_t>(indent.as_int(), 0, 64));
    if (indent.is_string()) style.indent_str = indent.str();
    style.item_sep.pop_back();  // ", " -> "," as json.dumps does with an indent
  }
  const Value seps = a.get_or(2, "separators", Value::none());
  if (!seps.is_none()) {
    MS_CHECK(seps.is_list() && seps.items().size() == 2 && seps.items()[0].is_string() &&
                 seps.items()[1].is_string(),
             "tojson: separators must be a pair of strings");
    style.item_sep = seps.items()[0].str();
    style.key_sep = seps.items()[1].str();
  }
  style.sort_keys = a.get_or(3, "sort_keys", Value(false)).truthy();
  return Value(v.to_json(style));
}

Value f_length(const Value& v, CallArgs&, Interpreter&) {
  return Value(length_of(v));
}

Value f_default(const Value& v, CallArgs& a, Interpreter&) {
  a.check("default", 2, {"default_value", "boolean"});
  const bool boolean = a.get_or(1, "boolean", Value(false)).truthy();
  if (v.is_undefined() || (boolean && !v.truthy())) return a.get_or(0, "default_value", Value(""));
  return v;
}

Value f_trim(const Value& v, CallArgs& a, Interpreter&) {
  const Value chars = a.get_or(0, "chars", Value::none());
  return Value(pystr::strip(
      v.to_str(), chars.is_none() ? std::nullopt : std::optional(chars.to_str()), true, true));
}

Value f_string(const Value& v, CallArgs&, Interpreter&) {
  return Value(v.to_str());
}
Value f_safe(const Value& v, CallArgs&, Interpreter&) {
  return v;
}
Value f_upper(const Value& v, CallArgs&, Interpreter&) {
  return Value(pystr::upper(v.to_str()));
}
Value f_lower(const Value& v, CallArgs&, Interpreter&) {
  return Value(pystr::lower(v.to_str()));
}
// jinja2's title: each chunk after -, whitespace, (, {, [ or < gets its first character upper-
// cased and the rest lower-cased (not str.title()).
Value f_title(const Value& v, CallArgs&, Interpreter&) {
  const auto chars = split_chars(v.to_str());
  std::string out;
  bool start = true;
  for (const std::string& c : chars) {
    size_t i = 0;
    const bool sep = c.size() == 1 ? (std::strchr("-({[<", c[0]) != nullptr && c[0] != 0) ||
                                         py_isspace(uint8_t(c[0]))
                                   : py_isspace(utf8_next(c, i));
    if (sep) {
      out += c;
      start = true;
    } else {
      out += start ? pystr::upper(c) : pystr::lower(c);
      start = false;
    }
  }
  return Value(std::move(out));
}
Value f_capitalize(const Value& v, CallArgs&, Interpreter&) {
  return Value(pystr::capitalize(v.to_str()));
}

Value f_escape(const Value& v, CallArgs&, Interpreter&) {
  std::string out;
  for (const char c : v.to_str()) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return Value(std::move(out));
}

Value f_replace(const Value& v, CallArgs& a, Interpreter& in) {
  a.check("replace", 3, {"old", "new", "count"});
  const Value* old = a.get(0, "old");
  const Value* repl = a.get(1, "new");
  MS_CHECK(old && repl, "replace() needs the old and the new string");
  const Value count = a.get_or(2, "count", Value::none());
  std::string out = pystr::replace(v.to_str(), old->to_str(), repl->to_str(),
                                   count.is_none() ? -1 : count.as_int());
  in.check_size(out.size());
  return Value(std::move(out));
}

Value f_indent(const Value& v, CallArgs& a, Interpreter& in) {
  a.check("indent", 3, {"width", "first", "blank"});
  const Value width = a.get_or(0, "width", Value(4));
  MS_CHECK(width.is_string() || width.is_int(), "indent: width must be a number or a string, not ",
           width.type_name());
  const std::string ind =
      width.is_string() ? width.str()
                        : std::string(size_t(std::clamp<int64_t>(width.as_int(), 0, 1 << 16)), ' ');
  const bool first = a.get_or(1, "first", Value(false)).truthy();
  const bool blank = a.get_or(2, "blank", Value(false)).truthy();
  const auto lines = pystr::splitlines(need_str(v, "indent") + "\n", false);
  std::string out;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (i > 0) out += "\n";
    if (i > 0 && (blank || !lines[i].empty())) out += ind;
    out += lines[i];
    in.check_size(out.size());
  }
  if (first) out = ind + out;
  return Value(std::move(out));
}

Value f_int(const Value& v, CallArgs& a, Interpreter&) {
  if (v.is_undefined()) fail(v.str().empty() ? "int of an undefined value" : v.str());
  const Value dflt = a.get_or(0, "default", Value(0));
  if (v.is_int()) return Value(v.as_int());
  if (v.is_float()) return std::isfinite(v.as_double()) ? Value(to_int64(v.as_double())) : dflt;
  if (v.is_string()) {
    const std::string s = pystr::strip(v.str(), std::nullopt, true, true);
    char* end = nullptr;
    errno = 0;
    const long long i = std::strtoll(s.c_str(), &end, 10);
    if (!s.empty() && *end == 0 && errno == 0) return Value(int64_t(i));
    const double d = std::strtod(s.c_str(), &end);
    if (!s.empty() && *end == 0 && std::isfinite(d)) return Value(to_int64(d));
  }
  return dflt;
}

Value f_float(const Value& v, CallArgs& a, Interpreter&) {
  if (v.is_undefined()) fail(v.str().empty() ? "float of an undefined value" : v.str());
  const Value dflt = a.get_or(0, "default", Value(0.0));
  if (v.is_number()) return Value(v.as_double());
  if (v.is_string()) {
    const std::string s = pystr::strip(v.str(), std::nullopt, true, true);
    char* end = nullptr;
    const double d = std::strtod(s.c_str(), &end);
    if (!s.empty() && *end == 0) return Value(d);
  }
  return dflt;
}

Value f_abs(const Value& v, CallArgs&, Interpreter&) {
  MS_CHECK(v.is_number(), "bad operand type for abs(): '", v.type_name(), "'");
  if (v.is_float()) return Value(std::fabs(v.as_double()));
  MS_CHECK(v.as_int() != INT64_MIN, "integer overflow");
  return Value(v.as_int() < 0 ? -v.as_int() : v.as_int());
}

// jinja2's round: Python's round() (correctly rounded, half to even) for "common", otherwise
// math.ceil / math.floor of value * 10**precision, scaled back.
Value f_round(const Value& v, CallArgs& a, Interpreter&) {
  a.check("round", 2, {"precision", "method"});
  MS_CHECK(v.is_number(), "round: expected a number, got ", v.type_name());
  const int64_t prec = std::clamp<int64_t>(a.get_or(0, "precision", Value(0)).as_int(), -300, 300);
  const std::string method = a.get_or(1, "method", Value("common")).to_str();
  MS_CHECK(method == "common" || method == "ceil" || method == "floor",
           "round: method must be common, ceil or floor");
  if (method == "common") {
    if (v.is_int()) {  // round(int, n) stays an int
      if (prec >= 0) return Value(v.as_int());
      int64_t p = 1;
      for (int64_t i = 0; i < -prec && p < INT64_MAX / 10; ++i) p *= 10;
      const int64_t x = v.as_int(), q = x / p, r = x % p;
      int64_t lo = q - (r < 0), rem = x - lo * p;  // x = lo * p + rem, 0 <= rem < p
      if (rem * 2 > p || (rem * 2 == p && (lo & 1))) ++lo;
      return Value(lo * p);
    }
    if (prec >= 0 && std::isfinite(v.as_double())) {
      std::vector<char> buf(700);
      std::snprintf(buf.data(), buf.size(), "%.*f", int(prec), v.as_double());
      return Value(std::strtod(buf.data(), nullptr));
    }
    const double scale = std::pow(10.0, double(prec));
    return Value(std::nearbyint(v.as_double() * scale) / scale);
  }
  const double scale = std::pow(10.0, double(prec)), x = v.as_double() * scale;
  return Value((method == "ceil" ? std::ceil(x) : std::floor(x)) / scale);
}

Value f_center(const Value& v, CallArgs& a, Interpreter&) {
  return Value(pystr::pad(v.to_str(), a.get_or(0, "width", Value(80)).as_int(), " ", 0));
}

// len(re.findall(r"\w+", s)).
Value f_wordcount(const Value& v, CallArgs&, Interpreter&) {
  int64_t n = 0;
  bool in_word = false;
  for (const std::string& c : split_chars(v.to_str())) {
    size_t i = 0;
    const uint32_t cp = utf8_next(c, i);
    const bool w = cp == '_' || (cp >= '0' && cp <= '9') || pystr::is_alpha_cp(cp);
    n += w && !in_word;
    in_word = w;
  }
  return Value(n);
}

Value f_truncate(const Value& v, CallArgs& a, Interpreter&) {
  if (v.is_undefined()) return v;  // len(Undefined) is 0: returned as is
  const std::string s = need_str(v, "truncate");
  const int64_t length = a.get_or(0, "length", Value(255)).as_int();
  const bool killwords = a.get_or(1, "killwords", Value(false)).truthy();
  const std::string end = a.get_or(2, "end", Value("...")).to_str();
  const int64_t leeway = a.get_or(3, "leeway", Value(5)).as_int();
  const auto chars = split_chars(s);
  const int64_t end_len = static_cast<int64_t>(pystr::length(end));
  MS_CHECK(length >= end_len && leeway >= 0, "truncate: bad length or leeway");
  if (int64_t(chars.size()) <= length + leeway) return Value(s);
  std::string head;
  for (int64_t i = 0; i < length - end_len; ++i) head += chars[size_t(i)];
  if (killwords) return Value(head + end);
  return Value(pystr::split(head, std::string(" "), 1, true)[0] + end);
}

Value f_format(const Value& v, CallArgs& a, Interpreter&) {
  MS_CHECK(a.pos.empty() || a.kw.empty(), "format: positional and keyword arguments cannot mix");
  return Value(percent_format(v.to_str(), Value::list(a.pos, true)));
}

const std::unordered_map<std::string, FilterFn>& filters() {
  static const std::unordered_map<std::string, FilterFn> table = [] {
    std::unordered_map<std::string, FilterFn> t = {
        {"tojson", f_tojson},
        {"length", f_length},
        {"count", f_length},
        {"default", f_default},
        {"d", f_default},
        {"trim", f_trim},
        {"string", f_string},
        {"safe", f_safe},
        {"upper", f_upper},
        {"lower", f_lower},
        {"title", f_title},
        {"capitalize", f_capitalize},
        {"escape", f_escape},
        {"e", f_escape},
        {"forceescape", f_escape},
        {"replace", f_replace},
        {"indent", f_indent},
        {"int", f_int},
        {"float", f_float},
        {"abs", f_abs},
        {"round", f_round},
        {"center", f_center},
        {"wordcount", f_wordcount},
        {"truncate", f_truncate},
        {"format", f_format},
        {"pprint", [](const Value& v, CallArgs&, Interpreter&) { return Value(v.repr()); }},
    };
    add_sequence_filters(t);
    return t;
  }();
  return table;
}

}  // namespace

bool has_filter(const std::string& name) {
  return filters().count(name) > 0;
}
Value builtin_filter(const std::string& name, const Value& v, CallArgs& args, Interpreter& in) {
  auto it = filters().find(name);
  MS_CHECK(it != filters().end(), "no filter named '", name, "'");
  static const std::unordered_map<std::string, int> no_args = {
      {"length", 0},      {"count", 0}, {"string", 0},     {"safe", 0},   {"upper", 0},
      {"lower", 0},       {"title", 0}, {"capitalize", 0}, {"escape", 0}, {"e", 0},
      {"forceescape", 0}, {"first", 0}, {"last", 0},       {"list", 0},   {"abs", 0},
      {"reverse", 0},     {"items", 0}, {"wordcount", 0},  {"pprint", 0}};
  MS_CHECK(!no_args.count(name) || (args.pos.empty() && args.kw.empty()), "filter '", name,
           "' takes no arguments");
  return it->second(v, args, in);
}

}  // namespace moeserve::tokenizer::jinja
