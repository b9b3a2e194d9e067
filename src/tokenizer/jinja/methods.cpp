// Python methods of str, list and dict that templates call (the immutable sandbox refuses the
// mutating ones), and jinja2's / transformers' global functions.
#include <ctime>
#include <initializer_list>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "tokenizer/jinja/interpreter.h"
#include "tokenizer/jinja/pystr.h"

namespace moeserve::tokenizer::jinja {
namespace {

std::optional<std::string> opt_str(const CallArgs& a, size_t i, const char* name) {
  const Value* v = a.get(i, name);
  if (!v || v->is_none()) return std::nullopt;
  MS_CHECK(v->is_string(), name, " must be a string or None");
  return v->str();
}

std::string arg_str(const CallArgs& a, size_t i, const char* method) {
  MS_CHECK(i < a.pos.size() && a.pos[i].is_string(), method, "() needs a string argument");
  return a.pos[i].str();
}

Value str_list(const std::vector<std::string>& parts) {
  std::vector<Value> out;
  for (const auto& p : parts) out.emplace_back(p);
  return Value::list(std::move(out));
}

// "{} {0} {name}".format(...): fields without format specs.
std::string py_format(const std::string& fmt, const CallArgs& a) {
  std::string out;
  size_t auto_index = 0;
  int numbering = 0;  // 1: automatic ({}), 2: manual ({0}); Python refuses to mix them
  for (size_t i = 0; i < fmt.size(); ++i) {
    const char c = fmt[i];
    if ((c == '{' || c == '}') && i + 1 < fmt.size() && fmt[i + 1] == c) {
      out += c;
      ++i;
      continue;
    }
    MS_CHECK(c != '}', "format: single '}' encountered");
    if (c != '{') {
      out += c;
      continue;
    }
    const size_t close = fmt.find('}', i);
    MS_CHECK(close != std::string::npos, "format: single '{' encountered");
    std::string field = fmt.substr(i + 1, close - i - 1);
    i = close;
    bool repr = false;
    if (field.size() >= 2 && field[field.size() - 2] == '!') {
      repr = field.back() == 'r';
      field.resize(field.size() - 2);
    }
    MS_CHECK(field.find(':') == std::string::npos, "format: format specs are not supported");
    const Value* v;
    if (field.empty() || std::isdigit(static_cast<unsigned char>(field[0]))) {
      const int mode = field.empty() ? 1 : 2;
      MS_CHECK(numbering == 0 || numbering == mode,
               "format: cannot switch between automatic and manual field numbering");
      numbering = mode;
    }
    if (field.empty()) {
      v = auto_index < a.pos.size() ? &a.pos[auto_index] : nullptr;
      ++auto_index;
    } else if (std::isdigit(static_cast<unsigned char>(field[0]))) {
      const size_t k = std::stoul(field);
      v = k < a.pos.size() ? &a.pos[k] : nullptr;
    } else {
      v = a.get(SIZE_MAX, field.c_str());
    }
    MS_CHECK(v, "format: no argument for field {", field, "}");
    out += repr ? v->repr() : v->to_str();
  }
  return out;
}

bool prefix_test(const Value& s, const CallArgs& a, bool suffix) {
  MS_CHECK(!a.pos.empty(), suffix ? "endswith" : "startswith", "() needs an argument");
  std::vector<Value> options = a.pos[0].is_list() ? a.pos[0].items() : std::vector<Value>{a.pos[0]};
  for (const Value& o : options) {
    MS_CHECK(o.is_string(), "startswith/endswith arguments must be strings");
    const std::string& x = s.str();
    const std::string& p = o.str();
    if (x.size() >= p.size() && x.compare(suffix ? x.size() - p.size() : 0, p.size(), p) == 0)
      return true;
  }
  return false;
}

struct Arity {
  size_t max_pos;
  std::vector<const char*> kw;
};

// Python's signatures: how many positional arguments, which keywords.
Arity arity(const std::string& m) {
  static const std::unordered_map<std::string, size_t> pos = {
      {"strip", 1},        {"lstrip", 1},     {"rstrip", 1},     {"split", 2},
      {"rsplit", 2},       {"splitlines", 1}, {"startswith", 3}, {"endswith", 3},
      {"replace", 3},      {"find", 3},       {"rfind", 3},      {"index", 3},
      {"rindex", 3},       {"count", 3},      {"join", 1},       {"center", 2},
      {"ljust", 2},        {"rjust", 2},      {"zfill", 1},      {"removeprefix", 1},
      {"removesuffix", 1}, {"partition", 1},  {"rpartition", 1}, {"get", 2}};
  if (m == "split" || m == "rsplit") return {2, {"sep", "maxsplit"}};
  if (m == "splitlines") return {1, {"keepends"}};
  if (m == "format") return {SIZE_MAX, {}};
  auto it = pos.find(m);
  return {it == pos.end() ? 0 : it->second, {}};
}

Value string_method(const Value& s, const std::string& m, CallArgs& a, Interpreter& in) {
  const std::string& x = s.str();
  if (m == "strip" || m == "lstrip" || m == "rstrip")
    return Value(pystr::strip(x, opt_str(a, 0, "chars"), m != "rstrip", m != "lstrip"));
  if (m == "split" || m == "rsplit") {
    const Value maxsplit = a.get_or(1, "maxsplit", Value(-1));
    return str_list(pystr::split(x, opt_str(a, 0, "sep"), maxsplit.as_int(), m == "rsplit"));
  }
  if (m == "splitlines")
    return str_list(pystr::splitlines(x, a.get_or(0, "keepends", Value(false)).truthy()));
  if (m == "startswith") return Value(prefix_test(s, a, false));
  if (m == "endswith") return Value(prefix_test(s, a, true));
  if (m == "upper") return Value(pystr::upper(x));
  if (m == "lower" || m == "casefold") return Value(pystr::lower(x));
  if (m == "title") return Value(pystr::title(x));
  if (m == "capitalize") return Value(pystr::capitalize(x));
  if (m == "swapcase") return Value(pystr::swapcase(x));
  if (m == "replace") {
    std::string out = pystr::replace(x, arg_str(a, 0, "replace"), arg_str(a, 1, "replace"),
                                     a.get_or(2, "", Value(-1)).as_int());
    in.check_size(out.size());
    return Value(std::move(out));
  }
  if (m == "find" || m == "rfind" || m == "index" || m == "rindex") {
    const int64_t at = pystr::find(x, arg_str(a, 0, m.c_str()), m[0] == 'r');
    MS_CHECK(at >= 0 || m == "find" || m == "rfind", "substring not found");
    return Value(at);
  }
  if (m == "count") return Value(pystr::count(x, arg_str(a, 0, "count")));
  if (m == "join") {
    MS_CHECK(!a.pos.empty(), "join() needs an argument");
    std::string out;
    bool first = true;
    for (const Value& v : a.pos[0].is_list() ? a.pos[0].items() : std::vector<Value>{}) {
      MS_CHECK(v.is_string(), "join: sequence item must be str, not ", v.type_name());
      if (!first) out += x;
      first = false;
      out += v.str();
      in.check_size(out.size());
    }
    return Value(std::move(out));
  }
  if (m == "format") return Value(py_format(x, a));
  if (m.rfind("is", 0) == 0) return Value(pystr::is(x, m));
  if (m == "center" || m == "ljust" || m == "rjust") {
    const Value fill_v = a.get_or(1, "fillchar", Value(" "));
    MS_CHECK(fill_v.is_string() && pystr::length(fill_v.str()) == 1,
             "the fill character must be exactly one character long");
    const std::string& fill = fill_v.str();
    return Value(pystr::pad(x, a.get_or(0, "width", Value(0)).as_int(), fill,
                            m == "center"  ? 0
                            : m == "ljust" ? -1
                                           : 1));
  }
  if (m == "zfill") {
    const int64_t w = a.get_or(0, "width", Value(0)).as_int();
    const bool sign = !x.empty() && (x[0] == '-' || x[0] == '+');
    const std::string body = pystr::pad(x.substr(sign), w - sign, "0", 1);
    return Value((sign ? x.substr(0, 1) : "") + body);
  }
  if (m == "removeprefix" || m == "removesuffix") {
    const std::string p = arg_str(a, 0, m.c_str());
    if (m == "removeprefix") return Value(x.rfind(p, 0) == 0 ? x.substr(p.size()) : x);
    return Value(x.size() >= p.size() && x.compare(x.size() - p.size(), p.size(), p) == 0
                     ? x.substr(0, x.size() - p.size())
                     : x);
  }
  if (m == "partition" || m == "rpartition") {
    const std::string sep = arg_str(a, 0, m.c_str());
    MS_CHECK(!sep.empty(), "empty separator");
    const size_t at = m == "partition" ? x.find(sep) : x.rfind(sep);
    if (at == std::string::npos)
      return m == "partition" ? Value::list({Value(x), Value(""), Value("")}, true)
                              : Value::list({Value(""), Value(""), Value(x)}, true);
    return Value::list({Value(x.substr(0, at)), Value(sep), Value(x.substr(at + sep.size()))},
                       true);
  }
  fail("str has no method '", m, "'");
}

Value list_method(const Value& l, const std::string& m, CallArgs& a) {
  MS_CHECK(!a.pos.empty(), m, "() needs an argument");
  int64_t n = 0, i = 0;
  for (const Value& v : l.items()) {
    if (v.equals(a.pos[0])) {
      if (m == "index") return Value(i);
      ++n;
    }
    ++i;
  }
  MS_CHECK(m == "count", "value is not in list");
  return Value(n);
}

Value dict_method(const Value& d, const std::string& m, CallArgs& a) {
  std::vector<Value> out;
  if (m == "get") {
    MS_CHECK(!a.pos.empty(), "get() needs a key");
    const Value* v = d.dict_data()->find(a.pos[0]);
    return v ? *v : a.get_or(1, "default", Value::none());
  }
  for (const auto& [k, v] : d.dict_data()->items) {
    if (m == "items") out.push_back(Value::list({k, v}, true));
    if (m == "keys") out.push_back(k);
    if (m == "values") out.push_back(v);
  }
  return Value::list(std::move(out));
}

const std::unordered_set<std::string> kStrMethods = {
    "strip",        "lstrip",       "rstrip",    "split",     "rsplit",  "splitlines", "startswith",
    "endswith",     "upper",        "lower",     "casefold",  "title",   "capitalize", "swapcase",
    "replace",      "find",         "rfind",     "index",     "rindex",  "count",      "join",
    "format",       "isdigit",      "isalpha",   "isalnum",   "isspace", "isupper",    "islower",
    "istitle",      "isnumeric",    "isdecimal", "center",    "ljust",   "rjust",      "zfill",
    "removeprefix", "removesuffix", "partition", "rpartition"};
const std::unordered_set<std::string> kListMethods = {"index", "count"};
const std::unordered_set<std::string> kDictMethods = {"items", "keys", "values", "get"};
const std::unordered_set<std::string> kMutators = {
    "append",  "extend", "insert",     "pop",     "remove",      "clear",      "sort",
    "reverse", "update", "setdefault", "popitem", "__setitem__", "__delitem__"};

Value make_fn(std::string name, std::function<Value(CallArgs&, Interpreter&)> fn) {
  auto c = std::make_shared<Callable>();
  c->name = std::move(name);
  c->fn = std::move(fn);
  return Value(c);
}

}  // namespace

Value builtin_method(const Value& obj, const std::string& name) {
  const bool str = obj.is_string() && kStrMethods.count(name);
  const bool list = obj.is_list() && kListMethods.count(name);
  const bool dict = obj.is_dict() && kDictMethods.count(name);
  if (str || list || dict) {
    return make_fn(name, [obj, name, str, list](CallArgs& a, Interpreter& in) {
      const Arity ar = arity(name);
      if (ar.max_pos != SIZE_MAX) a.check(name.c_str(), ar.max_pos, ar.kw);
      if (str) return string_method(obj, name, a, in);
      if (list) return list_method(obj, name, a);
      return dict_method(obj, name, a);
    });
  }
  if ((obj.is_list() || obj.is_dict()) && kMutators.count(name)) {
    const std::string type = obj.type_name();
    return make_fn(name, [name, type](CallArgs&, Interpreter&) -> Value {
      fail("access to attribute '", name, "' of '", type,
           "' object is unsafe (chat templates run in an immutable sandbox)");
    });
  }
  return Value();
}

Value builtin_global(const std::string& name) {
  static const std::unordered_map<std::string, Value> globals = [] {
    std::unordered_map<std::string, Value> g;
    g["range"] = make_fn("range", [](CallArgs& a, Interpreter& in) {
      a.check("range", 3, {});
      MS_CHECK(!a.pos.empty(), "range expected at least 1 argument");
      for (const Value& v : a.pos) MS_CHECK(v.is_int(), "range() arguments must be integers");
      int64_t start = 0, stop, step = 1;
      if (a.pos.size() == 1) {
        stop = a.pos[0].as_int();
      } else {
        start = a.pos[0].as_int();
        stop = a.pos[1].as_int();
        if (a.pos.size() == 3) step = a.pos[2].as_int();
      }
      MS_CHECK(step != 0, "range() arg 3 must not be zero");
      std::vector<Value> out;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        MS_CHECK(out.size() < 100000, "range too big: the sandbox allows at most 100000 items");
        out.emplace_back(i);
      }
      in.step();
      return Value::list(std::move(out));
    });
    auto dict_like = [](bool ns) {
      return [ns](CallArgs& a, Interpreter&) {
        auto d = std::make_shared<DictData>();
        d->is_namespace = ns;
        MS_CHECK(a.pos.size() <= 1, ns ? "namespace" : "dict",
                 "() takes at most 1 positional argument");
        if (!a.pos.empty()) {
          MS_CHECK(a.pos[0].is_dict(), "namespace()/dict() positional argument must be a dict");
          d->items = a.pos[0].dict_data()->items;
        }
        for (const auto& [k, v] : a.kw) d->set(Value(k), v);
        return Value(d);
      };
    };
    g["namespace"] = make_fn("namespace", dict_like(true));
    g["dict"] = make_fn("dict", dict_like(false));
    g["raise_exception"] = make_fn("raise_exception", [](CallArgs& a, Interpreter&) -> Value {
      fail("raise_exception: ", a.pos.empty() ? std::string() : a.pos[0].to_str());
    });
    g["strftime_now"] = make_fn("strftime_now", [](CallArgs& a, Interpreter&) {
      const std::string fmt = a.pos.empty() ? "" : a.pos[0].to_str();
      const std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[256];
      const size_t n = std::strftime(buf, sizeof buf, fmt.c_str(), &tm);
      return Value(std::string(buf, n));
    });
    g["joiner"] = make_fn("joiner", [](CallArgs& a, Interpreter&) {
      const std::string sep = a.get_or(0, "sep", Value(", ")).to_str();
      auto used = std::make_shared<bool>(false);
      return make_fn("joiner", [sep, used](CallArgs&, Interpreter&) {
        if (!*used) {
          *used = true;
          return Value("");
        }
        return Value(sep);
      });
    });
    return g;
  }();
  auto it = globals.find(name);
  return it == globals.end() ? Value() : it->second;
}

}  // namespace moeserve::tokenizer::jinja
