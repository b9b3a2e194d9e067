// Values of the Jinja interpreter, with Python's semantics (what jinja2 runs on): None, bool,
// int, float, str, list/tuple, dict (insertion ordered), namespace, callables and Undefined.
// Strings, lists and dicts are shared and immutable once built, except a namespace's attributes.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace moeserve::tokenizer::jinja {

class Value;
struct JsonStyle;
struct CallArgs;
class Interpreter;

struct ListData {
  std::vector<Value> items;
  bool tuple = false;
};

struct DictData {
  std::vector<std::pair<Value, Value>> items;  // insertion order, unique keys
  bool is_namespace = false;
  bool is_loop = false;  // the `loop` of a for loop: attributes only, like jinja2's LoopContext
  const Value* find(const Value& key) const;
  void set(Value key, Value value);
};

struct Callable {
  std::string name;
  std::function<Value(CallArgs&, Interpreter&)> fn;
};

class Value {
 public:
  enum class Type : uint8_t {
    kUndefined,
    kNone,
    kBool,
    kInt,
    kFloat,
    kString,
    kList,
    kDict,
    kCallable
  };

  Value() = default;  // Undefined
  static Value undefined(std::string hint = "") {
    Value v;
    v.str_ = std::make_shared<const std::string>(std::move(hint));
    return v;
  }
  static Value none() { return Value(Type::kNone); }
  Value(bool b) : type_(Type::kBool), i_(b) {}
  Value(int v) : type_(Type::kInt), i_(v) {}
  Value(int64_t v) : type_(Type::kInt), i_(v) {}
  Value(double v) : type_(Type::kFloat), f_(v) {}
  Value(std::string s)
      : type_(Type::kString), str_(std::make_shared<const std::string>(std::move(s))) {}
  Value(const char* s) : Value(std::string(s)) {}
  Value(std::shared_ptr<ListData> l) : type_(Type::kList), list_(std::move(l)) {}
  Value(std::shared_ptr<DictData> d) : type_(Type::kDict), dict_(std::move(d)) {}
  Value(std::shared_ptr<Callable> c) : type_(Type::kCallable), fn_(std::move(c)) {}
  static Value list(std::vector<Value> items, bool tuple = false);
  static Value dict();
  static Value from_json(const nlohmann::ordered_json& j);

  Type type() const { return type_; }
  bool is_undefined() const { return type_ == Type::kUndefined; }
  bool is_none() const { return type_ == Type::kNone; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_int() const { return type_ == Type::kInt || type_ == Type::kBool; }  // bool is an int
  bool is_number() const { return is_int() || type_ == Type::kFloat; }
  bool is_float() const { return type_ == Type::kFloat; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_list() const { return type_ == Type::kList; }
  bool is_dict() const { return type_ == Type::kDict && !dict_->is_namespace && !dict_->is_loop; }
  bool is_loop() const { return type_ == Type::kDict && dict_->is_loop; }
  bool is_namespace() const { return type_ == Type::kDict && dict_->is_namespace; }
  bool is_callable() const { return type_ == Type::kCallable; }

  int64_t as_int() const { return type_ == Type::kFloat ? int64_t(f_) : i_; }
  double as_double() const { return type_ == Type::kFloat ? f_ : double(i_); }
  const std::string& str() const { return *str_; }  // kString, or the hint of kUndefined
  const std::vector<Value>& items() const { return list_->items; }
  const std::shared_ptr<ListData>& list_data() const { return list_; }
  const std::shared_ptr<DictData>& dict_data() const { return dict_; }
  const std::shared_ptr<Callable>& callable() const { return fn_; }

  bool truthy() const;
  // Python's type name ("str", "int", "list", ...), for error messages.
  std::string type_name() const;
  // str(value) as Jinja prints it ("" for Undefined, "None", "True", Python repr of floats...).
  std::string to_str() const;
  // repr(value) as Python writes it (quotes strings, used inside lists and dicts).
  std::string repr() const;
  // json.dumps(value, ...) with Python's formatting.
  std::string to_json(const JsonStyle& style) const;
  std::string to_json() const;

  bool equals(const Value& o) const;  // Python ==
  // Python <: -1 / 0 / 1; throws moeserve::Error for unorderable types.
  int compare(const Value& o) const;

 private:
  explicit Value(Type t) : type_(t) {}
  Type type_ = Type::kUndefined;
  union {
    int64_t i_ = 0;
    double f_;
  };
  std::shared_ptr<const std::string> str_;
  std::shared_ptr<ListData> list_;
  std::shared_ptr<DictData> dict_;
  std::shared_ptr<Callable> fn_;
};

// json.dumps options. indent < 0: on one line. Separators default as Python's do: ", " and
// ": ", or "," and ": " when indenting.
struct JsonStyle {
  int indent = -1;
  std::string indent_str;  // used instead of `indent` spaces when not empty
  bool sort_keys = false;
  bool ensure_ascii = false;
  std::string item_sep = ", ", key_sep = ": ";
};

inline std::string Value::to_json() const {
  return to_json(JsonStyle{});
}

// Python float repr (shortest round-trip digits, exponent outside [1e-4, 1e16)).
std::string python_float_repr(double d);

}  // namespace moeserve::tokenizer::jinja
