#include "engine/json_grammar.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "core/error.h"

namespace moeserve::engine {

using ojson = nlohmann::ordered_json;

namespace {

enum TypeBits : uint8_t {
  kObj = 1,
  kArr = 2,
  kStr = 4,
  kInt = 8,
  kNum = 16,
  kBool = 32,
  kNull = 64,
  kAll = 127
};

constexpr int kMaxProperties = 64;
constexpr int kMaxEnum = 64;
constexpr int kMaxIntDigits = 15, kMaxFracDigits = 6;

// One schema, compiled.
struct SNode {
  uint8_t types = kAll;
  std::vector<int> any_of;  // alternatives: the value matches one of them
  bool literal = false;     // enum / const: one of `literals` (compact JSON texts)
  std::vector<std::string> literals;
  // Object: listed properties in order ("\"name\":" texts), or any keys with `additional` values.
  bool has_props = false;
  std::vector<std::string> keys;
  std::vector<int> prop_nodes;
  std::vector<bool> required;
  int additional = -1;
  // Array.
  int items = -1;
  int64_t min_items = 0, max_items = -1;
  // String, in characters.
  int64_t min_len = 0, max_len = -1;
  // A sequence: these nodes one after the other (raw text literals around a value).
  std::vector<int> seq;
};

struct Grammar {
  std::vector<SNode> nodes;
  int root = -1, any = -1, key = -1, bools = -1, null = -1;
  std::vector<int32_t> end_ids;
  std::vector<int32_t> prefix, suffix;  // tokens forced before and after the value
};

enum class K : uint8_t { Value, Obj, Arr, Str, Num, Lit, Seq };

// A frame of the parse stack. Per kind: Obj stage 0 after '{', 1 after a value, 2 after ',',
// 3 after a key (free objects); idx the next listed property. Arr stage 0 after '[', 1 after a
// value, 2 after ','; idx the items so far. Str stage 0 in the text, 1 after '\', 2 in \u
// digits (`aux` left); idx the characters, `pending` the UTF-8 continuation bytes still due.
// Num stage 0 start, 1 after '-', 2 after a leading 0, 3 integer digits, 4 after '.', 5
// fraction digits; aux the digits of the part. Lit stage 1 for object keys (else 0); idx the
// position, `alive` the candidates still matching.
struct Frame {
  K kind = K::Value;
  uint8_t stage = 0;
  uint8_t pending = 0;
  int32_t node = 0;
  int32_t idx = 0;
  int32_t aux = 0;
  uint64_t alive = 0;
};
using Stack = std::vector<Frame>;

bool hex(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

bool num_complete(const Frame& f) {
  return f.stage == 2 || f.stage == 3 || f.stage == 5;
}

uint64_t first_bits(size_t n) {
  return n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
}

// Feeds one byte to one parse; every parse it can continue as goes to `out`.
void step(const Grammar& g, Stack& st, unsigned char c, std::vector<Stack>& out, int depth = 0) {
  if (st.empty() || depth > 64) return;
  Frame& f = st.back();
  const SNode& n = g.nodes[f.node];
  switch (f.kind) {
    case K::Value: {
      if (!n.any_of.empty()) {
        for (int a : n.any_of) {
          Stack s = st;
          s.back() = Frame{K::Value, 0, 0, a};
          step(g, s, c, out, depth + 1);
        }
        return;
      }
      if (!n.seq.empty()) {
        f = Frame{K::Seq, 0, 0, f.node};
        return step(g, st, c, out, depth + 1);
      }
      if (n.literal) {
        f = Frame{K::Lit, 0, 0, f.node};
        f.alive = first_bits(n.literals.size());
        return step(g, st, c, out, depth + 1);
      }
      const int node = f.node;
      if (c == '{' && (n.types & kObj)) {
        f = Frame{K::Obj, 0, 0, node};
      } else if (c == '[' && (n.types & kArr)) {
        f = Frame{K::Arr, 0, 0, node};
      } else if (c == '"' && (n.types & kStr)) {
        f = Frame{K::Str, 0, 0, node};
      } else if ((c == '-' || (c >= '0' && c <= '9')) && (n.types & (kInt | kNum))) {
        f = Frame{K::Num, 0, 0, node};
        return step(g, st, c, out, depth + 1);
      } else if ((c == 't' || c == 'f') && (n.types & kBool)) {
        f = Frame{K::Lit, 0, 0, g.bools};
        f.alive = 3;
        return step(g, st, c, out, depth + 1);
      } else if (c == 'n' && (n.types & kNull)) {
        f = Frame{K::Lit, 0, 0, g.null};
        f.alive = 1;
        return step(g, st, c, out, depth + 1);
      } else {
        return;
      }
      out.push_back(st);
      return;
    }
    case K::Obj: {
      if (n.has_props) {
        const int np = static_cast<int>(n.keys.size());
        auto required_left = [&] {
          for (int j = f.idx; j < np; ++j)
            if (n.required[j]) return true;
          return false;
        };
        if (c == '}' && f.stage != 2 && !required_left()) {
          st.pop_back();
          out.push_back(st);
        } else if (c == ',' && f.stage == 1 && f.idx < np) {
          f.stage = 2;
          out.push_back(st);
        } else if (c == '"' && f.stage != 1) {
          uint64_t allowed = 0;
          for (int j = f.idx; j < np; ++j) {
            allowed |= uint64_t{1} << j;
            if (n.required[j]) break;
          }
          if (!allowed) return;
          Frame k{K::Lit, 1, 0, f.node};
          k.alive = allowed;
          st.push_back(k);
          step(g, st, c, out, depth + 1);
        }
        return;
      }
      if (c == '}' && f.stage <= 1) {
        st.pop_back();
        out.push_back(st);
      } else if (c == ',' && f.stage == 1) {
        f.stage = 2;
        out.push_back(st);
      } else if (c == '"' && (f.stage == 0 || f.stage == 2)) {
        f.stage = 3;
        st.push_back(Frame{K::Str, 0, 0, g.key});
        out.push_back(st);
      } else if (c == ':' && f.stage == 3) {
        f.stage = 1;
        st.push_back(Frame{K::Value, 0, 0, n.additional});
        out.push_back(st);
      }
      return;
    }
    case K::Arr: {
      if (c == ']' &&
          ((f.stage == 0 && n.min_items == 0) || (f.stage == 1 && f.idx >= n.min_items))) {
        st.pop_back();
        out.push_back(st);
      } else if (c == ',' && f.stage == 1 && (n.max_items < 0 || f.idx < n.max_items)) {
        f.stage = 2;
        out.push_back(st);
      } else if (f.stage == 0 || f.stage == 2) {
        if (n.max_items == 0) return;
        ++f.idx;
        f.stage = 1;
        st.push_back(Frame{K::Value, 0, 0, n.items});
        step(g, st, c, out, depth + 1);
      }
      return;
    }
    case K::Str: {
      if (f.pending > 0) {
        if (c < 0x80 || c >= 0xC0) return;
        --f.pending;
        out.push_back(st);
        return;
      }
      if (f.stage == 1) {
        if (c == 'u') {
          f.stage = 2;
          f.aux = 4;
        } else if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' ||
                   c == 'r' || c == 't') {
          f.stage = 0;
        } else {
          return;
        }
        out.push_back(st);
        return;
      }
      if (f.stage == 2) {
        if (!hex(c)) return;
        if (--f.aux == 0) f.stage = 0;
        out.push_back(st);
        return;
      }
      if (c == '"') {
        if (f.idx < n.min_len) return;
        st.pop_back();
        out.push_back(st);
        return;
      }
      if (n.max_len >= 0 && f.idx >= n.max_len) return;
      if (c < 0x20) return;
      if (c == '\\') {
        f.stage = 1;
      } else if (c >= 0x80) {
        if (c >= 0xC2 && c <= 0xDF)
          f.pending = 1;
        else if (c >= 0xE0 && c <= 0xEF)
          f.pending = 2;
        else if (c >= 0xF0 && c <= 0xF4)
          f.pending = 3;
        else
          return;
      }
      ++f.idx;
      out.push_back(st);
      return;
    }
    case K::Num: {
      const bool digit = c >= '0' && c <= '9';
      const bool decimal = (n.types & kNum) != 0;
      bool took = true;
      switch (f.stage) {
        case 0:
          if (c == '-')
            f.stage = 1;
          else if (c == '0')
            f.stage = 2;
          else if (digit)
            f.stage = 3, f.aux = 1;
          else
            took = false;
          break;
        case 1:
          if (c == '0')
            f.stage = 2;
          else if (digit)
            f.stage = 3, f.aux = 1;
          else
            took = false;
          break;
        case 2:
        case 3:
          if (f.stage == 3 && digit && f.aux < kMaxIntDigits)
            ++f.aux;
          else if (c == '.' && decimal)
            f.stage = 4, f.aux = 0;
          else
            took = false;
          break;
        case 4:
          if (digit)
            f.stage = 5, f.aux = 1;
          else
            took = false;
          break;
        case 5:
          if (digit && f.aux < kMaxFracDigits)
            ++f.aux;
          else
            took = false;
          break;
      }
      if (took) {
        out.push_back(st);
      } else if (num_complete(f)) {
        st.pop_back();  // the number ended before this byte: its parent takes it
        step(g, st, c, out, depth + 1);
      }
      return;
    }
    case K::Seq: {
      if (f.idx < static_cast<int32_t>(n.seq.size())) {
        const int child = n.seq[f.idx++];
        st.push_back(Frame{K::Value, 0, 0, child});
      } else {
        st.pop_back();  // done: the parent takes the byte
      }
      return step(g, st, c, out, depth + 1);
    }
    case K::Lit: {
      const std::vector<std::string>& list = f.stage == 1 ? n.keys : n.literals;
      uint64_t next = 0;
      int complete = -1;
      for (size_t j = 0; j < list.size() && j < 64; ++j) {
        if (!(f.alive >> j & 1)) continue;
        const std::string& s = list[j];
        if (static_cast<size_t>(f.idx) < s.size() && static_cast<unsigned char>(s[f.idx]) == c) {
          if (static_cast<size_t>(f.idx) + 1 == s.size()) {
            if (complete < 0) complete = static_cast<int>(j);
          } else {
            next |= uint64_t{1} << j;
          }
        }
      }
      if (next) {
        Stack s = st;
        s.back().alive = next;
        ++s.back().idx;
        out.push_back(std::move(s));
      }
      if (complete >= 0) {
        const bool key = f.stage == 1;
        const int node = f.node;
        st.pop_back();
        if (key) {  // "name": read; its value comes next
          Frame& obj = st.back();
          obj.idx = complete + 1;
          obj.stage = 1;
          st.push_back(Frame{K::Value, 0, 0, g.nodes[node].prop_nodes[complete]});
        }
        out.push_back(std::move(st));
      }
      return;
    }
  }
}

// Whether the parse may end here: every open frame can close without more input.
bool complete(const Grammar& g, const Stack& s) {
  for (const Frame& f : s) {
    if (f.kind == K::Num && num_complete(f)) continue;
    if (f.kind == K::Seq && f.idx == static_cast<int32_t>(g.nodes[f.node].seq.size())) continue;
    return false;
  }
  return true;
}

// Schema -> nodes.
class Compiler {
 public:
  Compiler(const ojson& root, Grammar& g) : root_(root), g_(g) {}

  int add(SNode n = {}) {
    g_.nodes.push_back(std::move(n));
    return static_cast<int>(g_.nodes.size()) - 1;
  }

  int compile(const ojson& s, const std::string& at, int depth) {
    MS_CHECK(depth <= 32, "the JSON schema nests deeper than 32 levels at ", at);
    if (s.is_boolean()) {
      MS_CHECK(s.get<bool>(), "the JSON schema at ", at, " is false: no value matches it");
      return g_.any;
    }
    MS_CHECK(s.is_object(), "the JSON schema at ", at, " must be an object");
    for (auto it = s.begin(); it != s.end(); ++it) {
      static const char* known[] = {"type",      "properties",  "required", "additionalProperties",
                                    "items",     "minItems",    "maxItems", "minLength",
                                    "maxLength", "enum",        "const",    "anyOf",
                                    "oneOf",     "$ref",        "title",    "description",
                                    "default",   "examples",    "$schema",  "$id",
                                    "$defs",     "definitions", "$comment", "strict",
                                    "name"};
      MS_CHECK(std::find_if(std::begin(known), std::end(known),
                            [&](const char* k) { return it.key() == k; }) != std::end(known),
               "the JSON schema keyword '", it.key(), "' (at ", at, ") is not supported");
    }
    if (auto r = s.find("$ref"); r != s.end()) return ref(*r, at, depth);
    for (const char* k : {"anyOf", "oneOf"})
      if (auto a = s.find(k); a != s.end()) {
        MS_CHECK(a->is_array() && !a->empty(), "'", k, "' at ", at, " must be a non-empty list");
        SNode n;
        const int id = add();
        for (size_t i = 0; i < a->size(); ++i)
          n.any_of.push_back(compile((*a)[i], at + "/" + k + "/" + std::to_string(i), depth + 1));
        g_.nodes[id] = std::move(n);
        return id;
      }
    SNode n;
    if (auto e = s.find("enum"); e != s.end()) {
      MS_CHECK(e->is_array() && !e->empty() && e->size() <= kMaxEnum, "'enum' at ", at,
               " must be a list of 1 to ", kMaxEnum, " values");
      n.literal = true;
      for (const ojson& v : *e) n.literals.push_back(v.dump());
      return add(std::move(n));
    }
    if (auto c = s.find("const"); c != s.end()) {
      n.literal = true;
      n.literals.push_back(c->dump());
      return add(std::move(n));
    }
    if (auto t = s.find("type"); t != s.end()) {
      n.types = 0;
      const std::vector<ojson> list =
          t->is_array() ? t->get<std::vector<ojson>>() : std::vector{*t};
      for (const ojson& x : list) {
        MS_CHECK(x.is_string(), "'type' at ", at, " must be a string or a list of strings");
        const std::string name = x.get<std::string>();
        if (name == "object")
          n.types |= kObj;
        else if (name == "array")
          n.types |= kArr;
        else if (name == "string")
          n.types |= kStr;
        else if (name == "integer")
          n.types |= kInt;
        else if (name == "number")
          n.types |= kNum;
        else if (name == "boolean")
          n.types |= kBool;
        else if (name == "null")
          n.types |= kNull;
        else
          MS_CHECK(false, "unknown type '", name, "' at ", at);
      }
    } else if (s.contains("properties")) {
      n.types = kObj;
    } else if (s.contains("items")) {
      n.types = kArr;
    }
    const int id = add();  // before the children: keeps ids in order of appearance
    // Object.
    const ojson* props = s.contains("properties") ? &s["properties"] : nullptr;
    const ojson* extra = s.contains("additionalProperties") ? &s["additionalProperties"] : nullptr;
    if (props) {
      MS_CHECK(props->is_object(), "'properties' at ", at, " must be an object");
      MS_CHECK(props->size() <= kMaxProperties, "at most ", kMaxProperties,
               " properties per object are supported (at ", at, ")");
    }
    std::vector<std::string> req;
    if (auto r = s.find("required"); r != s.end()) {
      MS_CHECK(r->is_array(), "'required' at ", at, " must be a list of names");
      for (const ojson& x : *r) {
        MS_CHECK(x.is_string() && props && props->contains(x.get<std::string>()), "'required' at ",
                 at, " names ", x.dump(), ", which is not in 'properties'");
        req.push_back(x.get<std::string>());
      }
    }
    if ((props && !props->empty()) || (extra && extra->is_boolean() && !extra->get<bool>())) {
      n.has_props = true;
      if (props)
        for (auto it = props->begin(); it != props->end(); ++it) {
          n.keys.push_back(ojson(it.key()).dump() + ":");
          n.prop_nodes.push_back(compile(*it, at + "/properties/" + it.key(), depth + 1));
          n.required.push_back(std::find(req.begin(), req.end(), it.key()) != req.end());
        }
    } else {
      n.additional = extra && extra->is_object()
                         ? compile(*extra, at + "/additionalProperties", depth + 1)
                         : g_.any;
    }
    // Array.
    if (auto it = s.find("items"); it != s.end())
      n.items = compile(*it, at + "/items", depth + 1);
    else
      n.items = g_.any;
    n.min_items = count(s, "minItems", at);
    n.max_items = s.contains("maxItems") ? count(s, "maxItems", at) : -1;
    MS_CHECK(n.max_items < 0 || n.max_items >= n.min_items, "maxItems < minItems at ", at);
    // String.
    n.min_len = count(s, "minLength", at);
    n.max_len = s.contains("maxLength") ? count(s, "maxLength", at) : -1;
    MS_CHECK(n.max_len < 0 || n.max_len >= n.min_len, "maxLength < minLength at ", at);
    MS_CHECK(n.types != 0, "'type' at ", at, " lists no type");
    g_.nodes[id] = std::move(n);
    return id;
  }

 private:
  int64_t count(const ojson& s, const char* key, const std::string& at) {
    auto it = s.find(key);
    if (it == s.end()) return 0;
    MS_CHECK(it->is_number_integer() && it->get<int64_t>() >= 0 && it->get<int64_t>() <= 1 << 20,
             "'", key, "' at ", at, " must be a non-negative integer");
    return it->get<int64_t>();
  }

  int ref(const ojson& r, const std::string& at, int depth) {
    MS_CHECK(r.is_string(), "'$ref' at ", at, " must be a string");
    const std::string path = r.get<std::string>();
    if (auto it = refs_.find(path); it != refs_.end()) return it->second;
    const ojson* target = nullptr;
    for (const char* prefix : {"#/$defs/", "#/definitions/"}) {
      const std::string p = prefix;
      if (path.compare(0, p.size(), p) == 0) {
        const std::string section = p.substr(2, p.size() - 3), name = path.substr(p.size());
        if (root_.contains(section) && root_[section].contains(name))
          target = &root_[section][name];
      }
    }
    if (path == "#") target = &root_;
    MS_CHECK(target, "'$ref' ", path, " at ", at,
             " is not supported (refer to \"#\", \"#/$defs/NAME\" or \"#/definitions/NAME\")");
    // An alternative of one, allocated first: a schema that refers to itself ends here.
    const int id = add();
    refs_[path] = id;
    const int body = compile(*target, path, depth + 1);
    g_.nodes[id].any_of = {body};
    return id;
  }

  const ojson& root_;
  Grammar& g_;
  std::map<std::string, int> refs_;
};

std::shared_ptr<const Grammar> build(const std::string& spec_text) {
  const ojson spec = ojson::parse(spec_text, nullptr, false);
  MS_CHECK(spec.is_object(), "invalid structured-output spec");
  auto g = std::make_shared<Grammar>();
  // Shared nodes: any value, a free key, the literals of booleans and null.
  g->any = static_cast<int>(g->nodes.size());
  g->nodes.push_back({});
  g->nodes[g->any].additional = g->any;
  g->nodes[g->any].items = g->any;
  g->key = static_cast<int>(g->nodes.size());
  g->nodes.push_back({});
  g->nodes[g->key].types = kStr;
  g->bools = static_cast<int>(g->nodes.size());
  g->nodes.push_back({});
  g->nodes[g->bools].literal = true;
  g->nodes[g->bools].literals = {"true", "false"};
  g->null = static_cast<int>(g->nodes.size());
  g->nodes.push_back({});
  g->nodes[g->null].literal = true;
  g->nodes[g->null].literals = {"null"};
  const ojson& schema = spec.contains("schema") ? spec["schema"] : ojson();
  if (spec.contains("choices")) {
    // One of several values, each between raw texts: {"text", "schema", "after"}.
    SNode root;
    for (const ojson& ch : spec["choices"]) {
      SNode before, after, seq;
      before.literal = after.literal = true;
      before.literals = {ch.value("text", "")};
      after.literals = {ch.value("after", "")};
      const int b = static_cast<int>(g->nodes.size());
      g->nodes.push_back(std::move(before));
      const ojson& sc = ch.contains("schema") ? ch["schema"] : ojson::object();
      Compiler c(sc, *g);
      const int v = c.compile(sc, "#", 0);
      const int a = static_cast<int>(g->nodes.size());
      g->nodes.push_back(std::move(after));
      seq.seq = {b, v, a};
      root.any_of.push_back(static_cast<int>(g->nodes.size()));
      g->nodes.push_back(std::move(seq));
    }
    MS_CHECK(!root.any_of.empty(), "no choices in the structured-output spec");
    g->root = static_cast<int>(g->nodes.size());
    g->nodes.push_back(std::move(root));
  } else if (schema.is_null()) {  // any JSON object
    SNode n;
    n.types = kObj;
    n.additional = g->any;
    g->root = static_cast<int>(g->nodes.size());
    g->nodes.push_back(std::move(n));
  } else {
    Compiler c(schema, *g);
    g->root = c.compile(schema, "#", 0);
  }
  for (const char* k : {"end", "prefix", "suffix"})
    if (spec.contains(k))
      for (const ojson& id : spec[k])
        (std::string(k) == "end"      ? g->end_ids
         : std::string(k) == "prefix" ? g->prefix
                                      : g->suffix)
            .push_back(id.get<int32_t>());
  return g;
}

class JsonState final : public ConstraintState {
 public:
  JsonState(std::shared_ptr<const Grammar> g, std::shared_ptr<const TokenTrie> trie)
      : g_(std::move(g)), trie_(std::move(trie)) {
    parses_.push_back(Stack{Frame{K::Value, 0, 0, g_->root}});
  }

  void mask(float* logits, int64_t vocab) override {
    // The forced tokens before and after the value.
    const int32_t forced = forced_next();
    if (forced >= 0 || (suffix_at_ > 0 && suffix_at_ == g_->suffix.size())) {
      for (int64_t i = 0; i < vocab; ++i)
        if (i != forced && !(forced < 0 && is_end(static_cast<int32_t>(i)))) logits[i] = -INFINITY;
      return;
    }
    allowed_.assign(vocab, 0);
    // Inside a string (the common case and the costly one: most tokens fit), the tokens of
    // plain text are allowed by their length alone; the walk then only visits the trie where
    // other tokens (quotes, escapes, partial characters) are.
    int64_t room = -2;  // -2: not every parse is in plain string text; -1: no length limit
    for (const Stack& s : parses_) {
      if (s.empty() || s.back().kind != K::Str || s.back().stage != 0 || s.back().pending) {
        room = -2;
        break;
      }
      const SNode& n = g_->nodes[s.back().node];
      const int64_t r = n.max_len < 0 ? -1 : n.max_len - s.back().idx;
      room = room == -2 ? r : (room == -1 || r == -1 ? -1 : std::max(room, r));
    }
    plain_only_ = room != -2;
    if (plain_only_)
      for (int64_t t = 0; t < vocab && t < trie_->vocab(); ++t) {
        const int32_t n = trie_->plain_chars(static_cast<int32_t>(t));
        if (n > 0 && (room < 0 || n <= room)) allowed_[t] = 1;
      }
    walk(0, parses_);
    if (is_complete()) {
      if (!g_->suffix.empty()) {
        if (g_->suffix[0] < vocab) allowed_[g_->suffix[0]] = 1;
      } else {
        for (int32_t id : g_->end_ids)
          if (id >= 0 && id < vocab) allowed_[id] = 1;
      }
    }
    for (int64_t i = 0; i < vocab; ++i)
      if (!allowed_[i]) logits[i] = -INFINITY;
  }

  bool advance(int32_t token) override {
    if (prefix_at_ < g_->prefix.size()) return token == g_->prefix[prefix_at_++];
    if (suffix_at_ > 0) {
      if (suffix_at_ < g_->suffix.size()) return token == g_->suffix[suffix_at_++];
      return is_end(token);
    }
    if (is_complete()) {
      if (!g_->suffix.empty() && token == g_->suffix[0]) {
        suffix_at_ = 1;
        return true;
      }
      if (g_->suffix.empty() && is_end(token)) return true;
    }
    if (token < 0 || token >= trie_->vocab() || trie_->bytes(token).empty()) return false;
    for (unsigned char c : trie_->bytes(token)) {
      std::vector<Stack> next;
      for (Stack& s : parses_) step(*g_, s, c, next);
      parses_ = std::move(next);
      if (parses_.empty()) return false;
    }
    return true;
  }

  // For the byte-level check.
  bool feed(const std::string& text) {
    for (unsigned char c : text) {
      std::vector<Stack> next;
      for (Stack& s : parses_) step(*g_, s, c, next);
      parses_ = std::move(next);
      if (parses_.empty()) return false;
    }
    return true;
  }
  bool is_complete() const {
    for (const Stack& s : parses_)
      if (complete(*g_, s)) return true;
    return false;
  }

 private:
  // The token that must come next (a forced prefix or suffix token), or -1.
  int32_t forced_next() const {
    if (prefix_at_ < g_->prefix.size()) return g_->prefix[prefix_at_];
    if (suffix_at_ > 0 && suffix_at_ < g_->suffix.size()) return g_->suffix[suffix_at_];
    return -1;
  }
  bool is_end(int32_t t) const {
    return std::find(g_->end_ids.begin(), g_->end_ids.end(), t) != g_->end_ids.end();
  }

  void walk(int32_t node, const std::vector<Stack>& parses) {
    const auto& nodes = trie_->nodes();
    for (const auto& [byte, child] : nodes[node].children) {
      if (plain_only_ && !trie_->has_other(child)) continue;
      std::vector<Stack> next;
      for (const Stack& s : parses) {
        Stack copy = s;
        step(*g_, copy, byte, next);
      }
      if (next.empty()) continue;
      for (int32_t t : nodes[child].tokens) allowed_[t] = 1;
      walk(child, next);
    }
  }

  std::shared_ptr<const Grammar> g_;
  std::shared_ptr<const TokenTrie> trie_;
  std::vector<Stack> parses_;
  std::vector<uint8_t> allowed_;
  bool plain_only_ = false;
  size_t prefix_at_ = 0, suffix_at_ = 0;
};

class JsonConstraint final : public TokenConstraint {
 public:
  JsonConstraint(std::string spec, std::shared_ptr<const Grammar> g,
                 std::shared_ptr<const TokenTrie> trie)
      : spec_(std::move(spec)), g_(std::move(g)), trie_(std::move(trie)) {}
  std::unique_ptr<ConstraintState> start() const override {
    return std::make_unique<JsonState>(g_, trie_);
  }
  const std::string& spec() const override { return spec_; }

 private:
  std::string spec_;
  std::shared_ptr<const Grammar> g_;
  std::shared_ptr<const TokenTrie> trie_;
};

}  // namespace

namespace {

// The characters of `b` when a JSON string takes all of it as plain text, else -1.
int32_t plain_text_chars(const std::string& b) {
  int32_t chars = 0;
  int pending = 0;
  for (unsigned char c : b) {
    if (pending > 0) {
      if (c < 0x80 || c >= 0xC0) return -1;
      --pending;
      continue;
    }
    if (c < 0x20 || c == '"' || c == '\\') return -1;
    if (c >= 0x80) {
      if (c >= 0xC2 && c <= 0xDF)
        pending = 1;
      else if (c >= 0xE0 && c <= 0xEF)
        pending = 2;
      else if (c >= 0xF0 && c <= 0xF4)
        pending = 3;
      else
        return -1;
    }
    ++chars;
  }
  return pending == 0 && chars > 0 ? chars : -1;
}

}  // namespace

TokenTrie::TokenTrie(const std::vector<std::string>& token_bytes)
    : bytes_(token_bytes), plain_(token_bytes.size(), -1) {
  nodes_.emplace_back();
  std::vector<std::vector<int32_t>> paths;  // nodes on each token's path
  for (size_t id = 0; id < bytes_.size(); ++id) {
    const std::string& b = bytes_[id];
    if (b.empty()) continue;
    plain_[id] = plain_text_chars(b);
    int32_t at = 0;
    std::vector<int32_t> path = {0};
    for (unsigned char c : b) {
      auto& ch = nodes_[at].children;
      auto it = std::lower_bound(ch.begin(), ch.end(), std::make_pair(c, int32_t{-1}));
      if (it != ch.end() && it->first == c) {
        at = it->second;
      } else {
        const int32_t fresh = static_cast<int32_t>(nodes_.size());
        ch.insert(it, {c, fresh});
        nodes_.emplace_back();
        at = fresh;
      }
      path.push_back(at);
    }
    nodes_[at].tokens.push_back(static_cast<int32_t>(id));
    if (plain_[id] < 0) paths.push_back(std::move(path));
  }
  other_.assign(nodes_.size(), 0);
  for (const auto& path : paths)
    for (int32_t n : path) other_[n] = 1;
}

std::string json_constraint_spec(const ojson* schema, const std::vector<int32_t>& end_ids) {
  ojson spec = {{"schema", schema ? *schema : ojson()}, {"end", end_ids}};
  return spec.dump();
}

std::shared_ptr<const TokenConstraint> compile_json_constraint(
    const std::string& spec, std::shared_ptr<const TokenTrie> trie) {
  MS_CHECK(trie, "structured output needs the tokenizer's vocabulary");
  return std::make_shared<JsonConstraint>(spec, build(spec), std::move(trie));
}

bool json_grammar_accepts(const std::string& spec, const std::string& text, bool complete) {
  JsonState s(build(spec), std::make_shared<TokenTrie>(std::vector<std::string>{}));
  if (!s.feed(text)) return false;
  return !complete || s.is_complete();
}

}  // namespace moeserve::engine
