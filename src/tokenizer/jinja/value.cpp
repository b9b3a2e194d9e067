#include "tokenizer/jinja/value.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer::jinja {

const Value* DictData::find(const Value& key) const {
  for (const auto& [k, v] : items)
    if (k.equals(key)) return &v;
  return nullptr;
}

void DictData::set(Value key, Value value) {
  for (auto& [k, v] : items)
    if (k.equals(key)) {
      v = std::move(value);
      return;
    }
  items.emplace_back(std::move(key), std::move(value));
}

Value Value::list(std::vector<Value> items, bool tuple) {
  auto l = std::make_shared<ListData>();
  l->items = std::move(items);
  l->tuple = tuple;
  return Value(std::move(l));
}

Value Value::dict() {
  return Value(std::make_shared<DictData>());
}

Value Value::from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return none();
    case nlohmann::ordered_json::value_t::boolean:
      return Value(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return Value(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: {
      const uint64_t u = j.get<uint64_t>();
      return u > uint64_t(INT64_MAX) ? Value(double(u)) : Value(int64_t(u));
    }
    case nlohmann::ordered_json::value_t::number_float:
      return Value(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return Value(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& e : j) items.push_back(from_json(e));
      return list(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      auto d = std::make_shared<DictData>();
      d->items.reserve(j.size());
      for (auto it = j.begin(); it != j.end(); ++it)
        d->items.emplace_back(Value(it.key()), from_json(it.value()));
      return Value(std::move(d));
    }
    default:
      return Value::undefined("binary JSON value");
  }
}

bool Value::truthy() const {
  switch (type_) {
    case Type::kUndefined:
    case Type::kNone:
      return false;
    case Type::kBool:
    case Type::kInt:
      return i_ != 0;
    case Type::kFloat:
      return f_ != 0.0;
    case Type::kString:
      return !str_->empty();
    case Type::kList:
      return !list_->items.empty();
    case Type::kDict:
      return dict_->is_namespace || !dict_->items.empty();
    case Type::kCallable:
      return true;
  }
  return false;
}

std::string Value::type_name() const {
  switch (type_) {
    case Type::kUndefined:
      return "Undefined";
    case Type::kNone:
      return "NoneType";
    case Type::kBool:
      return "bool";
    case Type::kInt:
      return "int";
    case Type::kFloat:
      return "float";
    case Type::kString:
      return "str";
    case Type::kList:
      return list_->tuple ? "tuple" : "list";
    case Type::kDict:
      return dict_->is_namespace ? "Namespace" : dict_->is_loop ? "LoopContext" : "dict";
    case Type::kCallable:
      return "function";
  }
  return "?";
}

std::string python_float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d < 0 ? "-inf" : "inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string s(buf, res.ptr);
  std::string sign;
  if (s[0] == '-') {
    sign = "-";
    s.erase(0, 1);
  }
  const size_t e = s.find('e');
  std::string digits = s.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int decpt = std::atoi(s.c_str() + e + 1) + 1;  // value = 0.DIGITS * 10^decpt
  const int n = static_cast<int>(digits.size());
  std::string out;
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      out = "0." + std::string(-decpt, '0') + digits;
    } else if (decpt < n) {
      out = digits.substr(0, decpt) + "." + digits.substr(decpt);
    } else {
      out = digits + std::string(decpt - n, '0') + ".0";
    }
  } else {
    out = digits.substr(0, 1);
    if (n > 1) out += "." + digits.substr(1);
    const int exp = decpt - 1;
    std::snprintf(buf, sizeof buf, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += buf;
  }
  return sign + out;
}

namespace {

bool python_printable(uint32_t c) {
  if (c < 0x20 || (c >= 0x7F && c <= 0xA0) || c == 0xAD) return false;
  if (c == 0x1680 || (c >= 0x2000 && c <= 0x200F) || (c >= 0x2028 && c <= 0x202F)) return false;
  if ((c >= 0x205F && c <= 0x206F) || c == 0x3000 || c == 0xFEFF) return false;
  if ((c >= 0xE000 && c <= 0xF8FF) || (c >= 0xFFF9 && c <= 0xFFFB) || c >= 0xF0000) return false;
  return true;
}

std::string string_repr(const std::string& s) {
  const char q =
      (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
  std::string out(1, q);
  size_t i = 0;
  char buf[16];
  while (i < s.size()) {
    const uint32_t c = utf8_next(s, i);
    if (c == '\\' || c == uint32_t(q)) {
      out += '\\';
      out += char(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (!python_printable(c)) {
      std::snprintf(buf, sizeof buf,
                    c < 0x100     ? "\\x%02x"
                    : c < 0x10000 ? "\\u%04x"
                                  : "\\U%08x",
                    c);
      out += buf;
    } else {
      utf8_append(out, c);
    }
  }
  out += q;
  return out;
}

void json_string(std::string& out, const std::string& s, bool ensure_ascii) {
  out += '"';
  char buf[16];
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      const size_t start = i;
      const uint32_t cp = utf8_next(s, i);
      if (!ensure_ascii) {
        out.append(s, start, i - start);
      } else if (cp < 0x10000) {
        std::snprintf(buf, sizeof buf, "\\u%04x", cp);
        out += buf;
      } else {
        const uint32_t v = cp - 0x10000;
        std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
        out += buf;
      }
      continue;
    }
    ++i;
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20) {
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);
        }
    }
  }
  out += '"';
}

void json_dump(std::string& out, const Value& v, const JsonStyle& st, int level) {
  MS_CHECK(level < 512, "tojson: value nested too deeply");
  const auto newline = [&](int lvl) {
    if (st.indent >= 0) {
      out += '\n';
      if (st.indent_str.empty()) {
        out.append(size_t(st.indent) * lvl, ' ');
      } else {
        for (int i = 0; i < lvl; ++i) out += st.indent_str;
      }
    }
  };
  const std::string& item_sep = st.item_sep;
  switch (v.type()) {
    case Value::Type::kNone:
      out += "null";
      return;
    case Value::Type::kBool:
      out += v.as_int() ? "true" : "false";
      return;
    case Value::Type::kInt:
      out += std::to_string(v.as_int());
      return;
    case Value::Type::kFloat: {
      const double d = v.as_double();
      out += std::isnan(d)   ? "NaN"
             : std::isinf(d) ? (d < 0 ? "-Infinity" : "Infinity")
                             : python_float_repr(d);
      return;
    }
    case Value::Type::kString:
      json_string(out, v.str(), st.ensure_ascii);
      return;
    case Value::Type::kList: {
      if (v.items().empty()) {
        out += "[]";
        return;
      }
      out += '[';
      bool first = true;
      for (const Value& e : v.items()) {
        if (!first) out += item_sep;
        first = false;
        newline(level + 1);
        json_dump(out, e, st, level + 1);
      }
      newline(level);
      out += ']';
      return;
    }
    case Value::Type::kDict: {
      if (!v.is_dict()) fail("tojson: Object of type ", v.type_name(), " is not JSON serializable");
      std::vector<std::pair<std::string, const Value*>> kv;
      for (const auto& [k, val] : v.dict_data()->items) {
        std::string key;
        if (k.is_string()) {
          key = k.str();
        } else if (k.is_none() || k.is_bool() || k.is_number()) {
          key = k.is_string() ? k.str() : k.to_json();
        } else {
          fail("tojson: keys must be str, int, float, bool or None, not ", k.type_name());
        }
        kv.emplace_back(std::move(key), &val);
      }
      if (st.sort_keys)
        std::stable_sort(kv.begin(), kv.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      if (kv.empty()) {
        out += "{}";
        return;
      }
      out += '{';
      bool first = true;
      for (const auto& [k, val] : kv) {
        if (!first) out += item_sep;
        first = false;
        newline(level + 1);
        json_string(out, k, st.ensure_ascii);
        out += st.key_sep;
        json_dump(out, *val, st, level + 1);
      }
      newline(level);
      out += '}';
      return;
    }
    default:
      fail("tojson: Object of type ", v.type_name(), " is not JSON serializable");
  }
}

}  // namespace

std::string Value::to_str() const {
  switch (type_) {
    case Type::kUndefined:
      return "";
    case Type::kString:
      return *str_;
    case Type::kNone:
      return "None";
    case Type::kBool:
      return i_ ? "True" : "False";
    case Type::kInt:
      return std::to_string(i_);
    case Type::kFloat:
      return python_float_repr(f_);
    default:
      return repr();
  }
}

std::string Value::repr() const {
  switch (type_) {
    case Type::kString:
      return string_repr(*str_);
    case Type::kUndefined:
      return "Undefined";
    case Type::kList: {
      std::string out = list_->tuple ? "(" : "[";
      for (size_t i = 0; i < list_->items.size(); ++i) {
        if (i) out += ", ";
        out += list_->items[i].repr();
      }
      if (list_->tuple && list_->items.size() == 1) out += ",";
      return out + (list_->tuple ? ")" : "]");
    }
    case Type::kDict: {
      if (dict_->is_loop) {
        return "<LoopContext " + dict_->items[0].second.to_str() + "/" +
               dict_->items[6].second.to_str() + ">";
      }
      std::string out = dict_->is_namespace ? "<Namespace {" : "{";
      bool first = true;
      for (const auto& [k, v] : dict_->items) {
        if (!first) out += ", ";
        first = false;
        out += k.repr() + ": " + v.repr();
      }
      return out + (dict_->is_namespace ? "}>" : "}");
    }
    case Type::kCallable:
      return "<function " + fn_->name + ">";
    default:
      return to_str();
  }
}

std::string Value::to_json(const JsonStyle& style) const {
  std::string out;
  json_dump(out, *this, style, 0);
  return out;
}

bool Value::equals(const Value& o) const {
  if (is_number() && o.is_number()) {
    if (is_int() && o.is_int()) return i_ == o.i_;
    return as_double() == o.as_double();
  }
  if (type_ != o.type_) return false;
  switch (type_) {
    case Type::kUndefined:
    case Type::kNone:
      return true;
    case Type::kString:
      return str_ == o.str_ || *str_ == *o.str_;
    case Type::kList: {
      if (list_->tuple != o.list_->tuple || list_->items.size() != o.list_->items.size())
        return false;
      for (size_t i = 0; i < list_->items.size(); ++i)
        if (!list_->items[i].equals(o.list_->items[i])) return false;
      return true;
    }
    case Type::kDict: {
      if (dict_ == o.dict_) return true;
      if (dict_->is_namespace || o.dict_->is_namespace || dict_->is_loop || o.dict_->is_loop)
        return false;
      if (dict_->items.size() != o.dict_->items.size()) return false;
      for (const auto& [k, v] : dict_->items) {
        const Value* ov = o.dict_->find(k);
        if (!ov || !v.equals(*ov)) return false;
      }
      return true;
    }
    case Type::kCallable:
      return fn_ == o.fn_;
    default:
      return false;
  }
}

int Value::compare(const Value& o) const {
  if (is_number() && o.is_number()) {
    if (is_int() && o.is_int()) return i_ < o.i_ ? -1 : i_ > o.i_ ? 1 : 0;
    const double a = as_double(), b = o.as_double();
    return a < b ? -1 : a > b ? 1 : 0;
  }
  if (is_string() && o.is_string()) {
    const int c = str_->compare(*o.str_);
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (is_list() && o.is_list()) {
    const auto &a = items(), &b = o.items();
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
      if (a[i].equals(b[i])) continue;
      return a[i].compare(b[i]);
    }
    return a.size() < b.size() ? -1 : a.size() > b.size() ? 1 : 0;
  }
  fail("'<' not supported between instances of '", type_name(), "' and '", o.type_name(), "'");
}

}  // namespace moeserve::tokenizer::jinja
