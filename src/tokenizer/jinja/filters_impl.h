// Helpers shared by the filter files (internal to src/tokenizer/jinja).
#pragma once

#include <string>
#include <unordered_map>
#include <vector>

#include "tokenizer/jinja/interpreter.h"

namespace moeserve::tokenizer::jinja::filters_impl {

using FilterFn = Value (*)(const Value&, CallArgs&, Interpreter&);

const std::string& need_str(const Value& v, const char* fn);
std::vector<Value> as_seq(const Value& v, const char* fn);
int64_t length_of(const Value& v);
// make_attrgetter: "a.b.0" looked up item by item (jinja's environment.getitem).
Value attr_path(const Value& item, const Value& attribute, Interpreter& in);
int64_t to_int64(double d);
// The sort key of case-insensitive filters (sort, dictsort, unique, min, max).
Value fold(const Value& v, bool case_sensitive);

// Adds the filters over sequences (filters_seq.cpp).
void add_sequence_filters(std::unordered_map<std::string, FilterFn>& table);

}  // namespace moeserve::tokenizer::jinja::filters_impl
