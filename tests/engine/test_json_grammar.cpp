// The JSON-schema matcher of structured output: which texts it takes (complete values, prefixes)
// and refuses, and that sampling under its token mask, whatever the logits, yields values of the
// schema.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "engine/json_grammar.h"
#include "engine/sampler.h"

using namespace moeserve;
using ojson = nlohmann::ordered_json;

namespace {

std::string spec(const std::string& schema) {
  const ojson s = ojson::parse(schema);
  return engine::json_constraint_spec(&s, {0});
}

bool complete(const std::string& schema, const std::string& text) {
  return engine::json_grammar_accepts(spec(schema), text, true);
}
bool prefix(const std::string& schema, const std::string& text) {
  return engine::json_grammar_accepts(spec(schema), text, false);
}

const char* kPerson = R"({"type": "object", "properties": {
  "name": {"type": "string", "maxLength": 5},
  "age": {"type": "integer"},
  "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}, "maxItems": 2},
  "ok": {"type": "boolean"}},
  "required": ["name", "ok"], "additionalProperties": false})";

}  // namespace

TEST(JsonGrammar, ObjectsInOrderRequiredPresentOptionalSkippable) {
  EXPECT_TRUE(complete(kPerson, R"({"name":"Al","age":-30,"tags":["a",3],"ok":true})"));
  EXPECT_TRUE(complete(kPerson, R"({"name":"","ok":false})"));
  EXPECT_FALSE(complete(kPerson, R"({"ok":false})"));                 // name required
  EXPECT_FALSE(prefix(kPerson, R"({"age":1,"name")"));                // out of order
  EXPECT_FALSE(prefix(kPerson, R"({"name":"Alexander")"));            // maxLength 5
  EXPECT_FALSE(prefix(kPerson, R"({"name":"A","age":1.5)"));          // integer
  EXPECT_FALSE(prefix(kPerson, R"({"name":"A","tags":["c")"));        // enum
  EXPECT_FALSE(prefix(kPerson, R"({"name":"A","tags":["a","b",3)"));  // maxItems 2
  EXPECT_FALSE(prefix(kPerson, R"({"name":"A","extra")"));            // not listed
  EXPECT_FALSE(prefix(kPerson, R"({ "name")"));                       // compact only
  EXPECT_TRUE(prefix(kPerson, R"({"name":"A","ag)"));
  EXPECT_FALSE(complete(kPerson, R"({"name":"A","ok":true)"));
  EXPECT_FALSE(prefix(kPerson, R"({"name":"A","ok":true}x)"));  // nothing after the value
}

TEST(JsonGrammar, ScalarsStringsNumbersAndEscapes) {
  const char* s = R"({"type": "string", "minLength": 2})";
  EXPECT_TRUE(complete(s, R"("h\u00e9\n")"));
  EXPECT_TRUE(complete(s, "\"\xc3\xa9t\xc3\xa9\""));  // UTF-8 counts characters
  EXPECT_FALSE(complete(s, R"("a")"));
  EXPECT_FALSE(prefix(s, "\"a\x01"));  // control character
  EXPECT_FALSE(prefix(s, R"("\q)"));
  EXPECT_FALSE(prefix(s, "\"\xc3("));  // broken UTF-8
  const char* n = R"({"type": "number"})";
  EXPECT_TRUE(complete(n, "-0.25"));
  EXPECT_TRUE(complete(n, "12"));
  EXPECT_FALSE(prefix(n, "01"));
  EXPECT_FALSE(complete(n, "1."));
  EXPECT_TRUE(prefix(n, "1."));
  EXPECT_FALSE(prefix(n, "1234567890123456"));  // 16 integer digits
  EXPECT_TRUE(complete(R"({"type": ["integer", "null"]})", "null"));
  EXPECT_FALSE(complete(R"({"type": "integer"})", "1.0"));
  EXPECT_TRUE(complete(R"({"const": {"a": [1, "x"]}})", R"({"a":[1,"x"]})"));
  EXPECT_TRUE(complete(R"({"enum": [1, 12, "12"]})", "1"));
  EXPECT_TRUE(complete(R"({"enum": [1, 12, "12"]})", "12"));
  EXPECT_FALSE(complete(R"({"enum": [1, 12, "12"]})", "123"));
}

TEST(JsonGrammar, AnyOfRefsAndFreeObjects) {
  const char* u = R"({"anyOf": [{"type": "integer"}, {"type": "object", "properties":
      {"x": {"type": "string"}}, "required": ["x"]}]})";
  EXPECT_TRUE(complete(u, "7"));
  EXPECT_TRUE(complete(u, R"({"x":"y"})"));
  EXPECT_FALSE(complete(u, R"("s")"));
  const char* tree = R"({"$defs": {"node": {"type": "object", "properties": {
      "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
      "required": ["v"]}}, "$ref": "#/$defs/node"})";
  EXPECT_TRUE(complete(tree, R"({"v":1,"kids":[{"v":2},{"v":3,"kids":[]}]})"));
  EXPECT_FALSE(prefix(tree, R"({"v":1,"kids":[{"w")"));
  const std::string any = engine::json_constraint_spec(nullptr, {0});
  EXPECT_TRUE(engine::json_grammar_accepts(any, R"({"a":[1,{"b":null}],"c":"d"})", true));
  EXPECT_FALSE(engine::json_grammar_accepts(any, R"([1])", false));  // an object
  EXPECT_TRUE(complete(R"({"type": "object", "additionalProperties": {"type": "integer"}})",
                       R"({"a":1,"b":2})"));
  EXPECT_FALSE(
      prefix(R"({"type": "object", "additionalProperties": {"type": "integer"}})", R"({"a":"x)"));
}

TEST(JsonGrammar, UnsupportedKeywordsAreRefusedByName) {
  auto fails_with = [](const std::string& schema, const std::string& what) {
    try {
      engine::json_grammar_accepts(spec(schema), "", false);
    } catch (const moeserve::Error& e) {
      return std::string(e.what()).find(what) != std::string::npos;
    }
    return false;
  };
  EXPECT_TRUE(fails_with(R"({"type": "string", "pattern": "a+"})", "'pattern'"));
  EXPECT_TRUE(fails_with(R"({"type": "integer", "minimum": 3})", "'minimum'"));
  EXPECT_TRUE(fails_with(R"({"type": "strin"})", "unknown type"));
  EXPECT_TRUE(fails_with(R"({"$ref": "http://x"})", "$ref"));
  EXPECT_TRUE(fails_with(R"({"properties": {"a": {}}, "required": ["b"]})", "not in 'properties'"));
}

// A small vocabulary of JSON pieces; random logits under the mask always give a valid value.
TEST(JsonGrammar, MaskedSamplingAlwaysYieldsAValue) {
  std::vector<std::string> bytes = {
      "<end>",    "{",         "}",       "[",     "]",     ",",    ":",   "\"",  "\"name\":",
      "\"age\":", "\"tags\":", "\"ok\":", "\"a\"", "\"b\"", "3",    "1",   "0",   "-",
      ".",        "x",         "yz",      "true",  "false", "null", "\",", "\"}", "{\"",
      "a",        "b",         "\\n",     "\\",    "é",     "ab\"", " ",   "\n"};
  bytes[0] = "";  // a special token: never inside JSON
  // Every printable byte alone too, as byte-level BPE vocabularies have: any prefix the grammar
  // takes can then go on.
  for (char c = 0x20; c < 0x7f; ++c) bytes.push_back(std::string(1, c));
  auto trie = std::make_shared<engine::TokenTrie>(bytes);
  const ojson schema = ojson::parse(kPerson);
  auto c = engine::compile_json_constraint(engine::json_constraint_spec(&schema, {0}), trie);
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  int finished = 0;
  for (int seed = 0; seed < 200; ++seed) {
    engine::SamplingParams p;
    p.temperature = 1.0f;
    p.seed = seed;
    p.constraint = c;
    engine::Sampler s(p);
    std::vector<int32_t> toks = {0};
    std::string text;
    bool ended = false;
    for (int i = 0; i < 200 && !ended; ++i) {
      std::vector<float> l(bytes.size());
      for (float& x : l) x = nd(rng);
      const int32_t t = s.sample(l.data(), static_cast<int64_t>(l.size()), toks, 1);
      toks.push_back(t);
      if (t == 0)
        ended = true;
      else
        text += bytes[t];
    }
    ASSERT_TRUE(prefix(kPerson, text)) << text;
    if (!ended) continue;
    ++finished;
    ASSERT_TRUE(complete(kPerson, text)) << text;
    const ojson v = ojson::parse(text);
    EXPECT_TRUE(v.contains("name") && v["name"].is_string() && v.contains("ok")) << text;
  }
  EXPECT_GE(finished, 150);
}

// A tool call: forced special tokens, one of several names each with its arguments' schema,
// forced closing tokens, then the end.
TEST(JsonGrammar, ToolCallShapeWithForcedTokens) {
  std::vector<std::string> bytes = {"", "", "", "", "{", "}", "\"a\":", "\n", "f", "g", "\n."};
  for (char c = 0x20; c < 0x7f; ++c) bytes.push_back(std::string(1, c));
  auto trie = std::make_shared<engine::TokenTrie>(bytes);
  const ojson spec = {
      {"prefix", {1, 2}},
      {"choices",
       {{{"text", "f\n"},
         {"schema", ojson::parse(R"({"type":"object","properties":{"a":{"type":"integer"}},
                                    "required":["a"]})")},
         {"after", "\n."}},
        {{"text", "g\n"}, {"schema", ojson::parse(R"({"enum":[true]})")}, {"after", "\n."}}}},
      {"suffix", {3}},
      {"end", {0}}};
  auto c = engine::compile_json_constraint(spec.dump(), trie);
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  int f = 0, g = 0;
  for (int seed = 0; seed < 100; ++seed) {
    engine::SamplingParams p;
    p.temperature = 1.0f;
    p.seed = seed;
    p.constraint = c;
    engine::Sampler s(p);
    std::vector<int32_t> toks = {5};
    for (int i = 0; i < 300 && toks.back() != 0; ++i) {
      std::vector<float> l(bytes.size());
      for (float& x : l) x = nd(rng);
      toks.push_back(s.sample(l.data(), static_cast<int64_t>(l.size()), toks, 1));
    }
    ASSERT_EQ(toks.back(), 0) << "did not end";
    ASSERT_GE(toks.size(), 6u);
    EXPECT_EQ(toks[1], 1);
    EXPECT_EQ(toks[2], 2);
    EXPECT_EQ(toks[toks.size() - 2], 3);
    std::string text;
    for (size_t i = 3; i + 2 < toks.size(); ++i) text += bytes[toks[i]];
    if (text.rfind("f\n", 0) == 0) {
      ++f;
      ASSERT_EQ(text.substr(text.size() - 2), "\n.") << text;
      const ojson v = ojson::parse(text.substr(2, text.size() - 4));
      EXPECT_TRUE(v["a"].is_number_integer()) << text;
    } else {
      ++g;
      EXPECT_EQ(text, "g\ntrue\n.");
    }
  }
  EXPECT_GT(f, 10);
  EXPECT_GT(g, 10);
}
