// jinja2's builtin filters over sequences: first, last, list, join, sort, dictsort, unique,
// min, max, sum, map, select, reject, selectattr, rejectattr, attr, batch, items, reverse.
#include <algorithm>

#include "core/error.h"
#include "tokenizer/jinja/filters_impl.h"

namespace moeserve::tokenizer::jinja::filters_impl {
namespace {

Value f_first(const Value& v, CallArgs&, Interpreter&) {
  const auto s = as_seq(v, "first");
  return s.empty() ? Value::undefined("first of an empty sequence") : s.front();
}

Value f_last(const Value& v, CallArgs&, Interpreter&) {
  const auto s = as_seq(v, "last");
  return s.empty() ? Value::undefined("last of an empty sequence") : s.back();
}

Value f_list(const Value& v, CallArgs&, Interpreter&) {
  return Value::list(as_seq(v, "list"));
}

Value f_join(const Value& v, CallArgs& a, Interpreter& in) {
  a.check("join", 2, {"d", "attribute"});
  const std::string sep = a.get_or(0, "d", Value("")).to_str();
  const Value* attr = a.get(1, "attribute");
  std::string out;
  bool first = true;
  for (const Value& x : as_seq(v, "join")) {
    if (!first) out += sep;
    first = false;
    out += (attr ? attr_path(x, *attr, in) : x).to_str();
    in.check_size(out.size());
  }
  return Value(std::move(out));
}

Value f_reverse(const Value& v, CallArgs&, Interpreter&) {
  if (v.is_string()) {
    auto chars = split_chars(v.str());
    std::string out;
    for (auto it = chars.rbegin(); it != chars.rend(); ++it) out += *it;
    return Value(std::move(out));
  }
  auto s = as_seq(v, "reverse");
  std::reverse(s.begin(), s.end());
  return Value::list(std::move(s));
}

Value f_items(const Value& v, CallArgs&, Interpreter&) {
  if (v.is_undefined()) return Value::list({});
  MS_CHECK(v.is_dict(), "items: expected a mapping, got ", v.type_name());
  std::vector<Value> out;
  for (const auto& [k, x] : v.dict_data()->items) out.push_back(Value::list({k, x}, true));
  return Value::list(std::move(out));
}

Value f_dictsort(const Value& v, CallArgs& a, Interpreter& in) {
  a.check("dictsort", 3, {"case_sensitive", "by", "reverse"});
  const bool cs = a.get_or(0, "case_sensitive", Value(false)).truthy();
  const std::string by = a.get_or(1, "by", Value("key")).to_str();
  const bool rev = a.get_or(2, "reverse", Value(false)).truthy();
  MS_CHECK(by == "key" || by == "value", "dictsort: by must be 'key' or 'value'");
  auto items = f_items(v, a, in).items();
  const size_t k = by == "key" ? 0 : 1;
  std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
    const int c = fold(x.items()[k], cs).compare(fold(y.items()[k], cs));
    return rev ? c > 0 : c < 0;
  });
  return Value::list(std::move(items));
}

Value f_sort(const Value& v, CallArgs& a, Interpreter& in) {
  a.check("sort", 3, {"reverse", "case_sensitive", "attribute"});
  const bool rev = a.get_or(0, "reverse", Value(false)).truthy();
  const bool cs = a.get_or(1, "case_sensitive", Value(false)).truthy();
  const Value* attr = a.get(2, "attribute");
  auto s = as_seq(v, "sort");
  std::vector<std::pair<Value, Value>> keyed;
  for (const Value& x : s) keyed.emplace_back(fold(attr ? attr_path(x, *attr, in) : x, cs), x);
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
    const int c = x.first.compare(y.first);
    return rev ? c > 0 : c < 0;
  });
  std::vector<Value> out;
  for (auto& [k, x] : keyed) out.push_back(x);
  return Value::list(std::move(out));
}

Value f_unique(const Value& v, CallArgs& a, Interpreter& in) {
  const bool cs = a.get_or(0, "case_sensitive", Value(false)).truthy();
  const Value* attr = a.get(1, "attribute");
  std::vector<Value> seen, out;
  for (const Value& x : as_seq(v, "unique")) {
    const Value key = fold(attr ? attr_path(x, *attr, in) : x, cs);
    if (std::any_of(seen.begin(), seen.end(), [&](const Value& s) { return s.equals(key); }))
      continue;
    seen.push_back(key);
    out.push_back(x);
  }
  return Value::list(std::move(out));
}

Value min_max(const Value& v, CallArgs& a, Interpreter& in, bool want_max) {
  const bool cs = a.get_or(0, "case_sensitive", Value(false)).truthy();
  const Value* attr = a.get(1, "attribute");
  Value best, best_key;
  bool any = false;
  for (const Value& x : as_seq(v, want_max ? "max" : "min")) {
    const Value key = fold(attr ? attr_path(x, *attr, in) : x, cs);
    if (!any || (want_max ? key.compare(best_key) > 0 : key.compare(best_key) < 0)) {
      best = x;
      best_key = key;
      any = true;
    }
  }
  return any ? best : Value::undefined("min/max of an empty sequence");
}
Value f_max(const Value& v, CallArgs& a, Interpreter& in) {
  return min_max(v, a, in, true);
}
Value f_min(const Value& v, CallArgs& a, Interpreter& in) {
  return min_max(v, a, in, false);
}

Value f_sum(const Value& v, CallArgs& a, Interpreter& in) {
  const Value* attr = a.get(0, "attribute");
  Value total = a.get_or(1, "start", Value(0));
  for (const Value& x : as_seq(v, "sum")) {
    const Value item = attr ? attr_path(x, *attr, in) : x;
    MS_CHECK(item.is_number() && total.is_number(), "sum: unsupported operand types");
    total = (item.is_int() && total.is_int()) ? Value(total.as_int() + item.as_int())
                                              : Value(total.as_double() + item.as_double());
  }
  return total;
}

Value f_map(const Value& v, CallArgs& a, Interpreter& in) {
  std::vector<Value> out;
  if (a.pos.empty()) {
    const Value* attr = a.get(1000, "attribute");
    MS_CHECK(attr, "map requires a filter name or attribute=");
    const Value* dflt = a.get(1000, "default");
    for (const Value& x : as_seq(v, "map")) {
      Value r = attr_path(x, *attr, in);
      out.push_back(r.is_undefined() && dflt ? *dflt : r);
    }
    return Value::list(std::move(out));
  }
  const std::string name = a.pos[0].to_str();
  CallArgs rest;
  rest.pos.assign(a.pos.begin() + 1, a.pos.end());
  rest.kw = a.kw;
  for (const Value& x : as_seq(v, "map")) out.push_back(in.filter(name, x, rest));
  return Value::list(std::move(out));
}

// select / reject / selectattr / rejectattr.
Value select(const Value& v, CallArgs& a, Interpreter& in, bool want, bool by_attr) {
  size_t next = 0;
  Value attr;
  if (by_attr) {
    MS_CHECK(!a.pos.empty(), "selectattr/rejectattr need an attribute name");
    attr = a.pos[next++];
  }
  std::string test;
  CallArgs rest;
  if (next < a.pos.size()) {
    test = a.pos[next++].to_str();
    rest.pos.assign(a.pos.begin() + long(next), a.pos.end());
  }
  std::vector<Value> out;
  for (const Value& x : as_seq(v, "select")) {
    const Value item = by_attr ? attr_path(x, attr, in) : x;
    const bool ok = test.empty() ? item.truthy() : in.test(test, item, rest);
    if (ok == want) out.push_back(x);
  }
  return Value::list(std::move(out));
}
Value f_select(const Value& v, CallArgs& a, Interpreter& in) {
  return select(v, a, in, true, false);
}
Value f_reject(const Value& v, CallArgs& a, Interpreter& in) {
  return select(v, a, in, false, false);
}
Value f_selectattr(const Value& v, CallArgs& a, Interpreter& in) {
  return select(v, a, in, true, true);
}
Value f_rejectattr(const Value& v, CallArgs& a, Interpreter& in) {
  return select(v, a, in, false, true);
}

Value f_attr(const Value& v, CallArgs& a, Interpreter& in) {
  MS_CHECK(!a.pos.empty(), "attr needs a name");
  return in.get_attr(v, a.pos[0].to_str());
}

Value f_batch(const Value& v, CallArgs& a, Interpreter&) {
  const Value count = a.get_or(0, "linecount", Value(1));
  // A batch ends when len(tmp) == linecount, which never holds for a non-number.
  const int64_t n = count.is_int() ? count.as_int() : INT64_MAX;
  const Value* fill = a.get(1, "fill_with");
  std::vector<Value> out, cur;
  for (const Value& x : as_seq(v, "batch")) {
    cur.push_back(x);
    if (int64_t(cur.size()) == n) {
      out.push_back(Value::list(std::move(cur)));
      cur.clear();
    }
  }
  if (!cur.empty()) {
    while (fill && !fill->is_none() && int64_t(cur.size()) < n) cur.push_back(*fill);
    out.push_back(Value::list(std::move(cur)));
  }
  return Value::list(std::move(out));
}

}  // namespace

void add_sequence_filters(std::unordered_map<std::string, FilterFn>& t) {
  t["reverse"] = f_reverse;
  t["items"] = f_items;
  t["dictsort"] = f_dictsort;
  t["sort"] = f_sort;
  t["unique"] = f_unique;
  t["max"] = f_max;
  t["min"] = f_min;
  t["sum"] = f_sum;
  t["map"] = f_map;
  t["select"] = f_select;
  t["reject"] = f_reject;
  t["selectattr"] = f_selectattr;
  t["rejectattr"] = f_rejectattr;
  t["attr"] = f_attr;
  t["batch"] = f_batch;
  t["first"] = f_first;
  t["last"] = f_last;
  t["list"] = f_list;
  t["join"] = f_join;
}

}  // namespace moeserve::tokenizer::jinja::filters_impl
