// The sampling controls, n > 1 and /tokenize, /detokenize over HTTP against the demo model.
#include <gtest/gtest.h>

#include <set>

#include "engine/json_grammar.h"
#include "server_test_util.h"

using namespace moeserve;
using namespace moeserve::testing;

namespace {

class SamplingApi : public SharedServerTest<SamplingApi> {
 protected:
  static void SetUpTestSuite() { server_ = new TestServer(); }
};

}  // namespace

int count_of(const std::string& text, const std::string& word) {
  int n = 0;
  for (size_t at = text.find(word); at != std::string::npos; at = text.find(word, at + 1)) ++n;
  return n;
}

TEST_F(SamplingApi, LogitBiasForcesAndBansTokens) {
  const auto& tok = demo_tokenizer();
  const int32_t hello = tok.encode(" hello", false).at(0);
  const int32_t world = tok.encode(" world", false).at(0);
  json body = completion_body("Tell me something:", 5);
  body["temperature"] = 0;
  body["ignore_eos"] = true;
  body["logit_bias"] = {{std::to_string(hello), 100}};
  Reply r = post(port(), "/v1/completions", body);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.j["choices"][0]["text"], " hello hello hello hello hello");
  // Both forced, one banned: only the other is left.
  body["logit_bias"] = {{std::to_string(hello), -100}, {std::to_string(world), 100}};
  Reply w = post(port(), "/v1/completions", body);
  EXPECT_EQ(w.j["choices"][0]["text"], " world world world world world");
  // Sampling at a temperature obeys it too.
  body["temperature"] = 1.5;
  body["seed"] = 3;
  body["logit_bias"] = {{std::to_string(hello), 100}};
  Reply t = post(port(), "/v1/completions", body);
  EXPECT_EQ(t.j["choices"][0]["text"], " hello hello hello hello hello");
}

TEST_F(SamplingApi, PenaltiesActOnRepeatsAndStaySeededReproducible) {
  // A bias of 10 makes " hello" the greedy choice at every step; the penalties then push it
  // down as it repeats.
  const auto& tok = demo_tokenizer();
  const int32_t hello = tok.encode(" hello", false).at(0);
  json body = completion_body("Say:", 12);
  body["temperature"] = 0;
  body["ignore_eos"] = true;
  body["logit_bias"] = {{std::to_string(hello), 10}};
  Reply plain = post(port(), "/v1/completions", body);
  ASSERT_EQ(plain.status, 200) << plain.body;
  ASSERT_EQ(count_of(plain.j["choices"][0]["text"], " hello"), 12) << plain.body;
  // repetition_penalty 1000 divides its (positive) logit once it occurred: once only.
  body["repetition_penalty"] = 1000;
  Reply rep = post(port(), "/v1/completions", body);
  ASSERT_EQ(rep.status, 200) << rep.body;
  EXPECT_EQ(count_of(rep.j["choices"][0]["text"], " hello"), 1) << rep.body;
  // frequency_penalty 2 lowers it by 2 per occurrence: after 5 the bias is spent.
  body.erase("repetition_penalty");
  body["frequency_penalty"] = 2.0;
  Reply freq = post(port(), "/v1/completions", body);
  ASSERT_EQ(freq.status, 200) << freq.body;
  const int n_freq = count_of(freq.j["choices"][0]["text"], " hello");
  EXPECT_GE(n_freq, 1);
  EXPECT_LE(n_freq, 6);
  // Seeded sampling with penalties reproduces.
  json c = chat_body("Write something", 12);
  c["temperature"] = 1.0;
  c["seed"] = 99;
  c["frequency_penalty"] = 1.0;
  c["presence_penalty"] = -0.5;
  c["repetition_penalty"] = 1.2;
  c["ignore_eos"] = true;
  Reply a = post(port(), "/v1/chat/completions", c);
  Reply a2 = post(port(), "/v1/chat/completions", c);
  ASSERT_EQ(a.status, 200) << a.body;
  EXPECT_EQ(a.j["choices"][0]["message"]["content"], a2.j["choices"][0]["message"]["content"]);
}

TEST_F(SamplingApi, MinTokensHoldsOffTheEndToken) {
  // With the eos token forced by logit_bias the output ends at once, unless min_tokens.
  const auto& tok = demo_tokenizer();
  const int32_t eos = tok.eos_id();
  ASSERT_GE(eos, 0);
  json body = completion_body("Hi", 10);
  body["temperature"] = 0;
  body["logit_bias"] = {{std::to_string(eos), 100}};
  Reply r = post(port(), "/v1/completions", body);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.j["usage"]["completion_tokens"], 1);
  EXPECT_EQ(r.j["choices"][0]["finish_reason"], "stop");
  body["min_tokens"] = 6;
  Reply m = post(port(), "/v1/completions", body);
  ASSERT_EQ(m.status, 200) << m.body;
  EXPECT_EQ(m.j["usage"]["completion_tokens"], 7);  // 6, then the eos token
  EXPECT_EQ(m.j["choices"][0]["finish_reason"], "stop");
}

TEST_F(SamplingApi, NChoicesStreamedAndNot) {
  json body = chat_body("Tell a story", 6);
  body["n"] = 3;
  body["temperature"] = 1.0;
  body["seed"] = 5;
  body["ignore_eos"] = true;
  Reply r = post(port(), "/v1/chat/completions", body);
  ASSERT_EQ(r.status, 200) << r.body;
  ASSERT_EQ(r.j["choices"].size(), 3u);
  std::set<std::string> texts;
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(r.j["choices"][i]["index"], i);
    EXPECT_EQ(r.j["choices"][i]["finish_reason"], "length");
    texts.insert(r.j["choices"][i]["message"]["content"].get<std::string>());
  }
  EXPECT_EQ(texts.size(), 3u) << "the choices are seeded differently";
  EXPECT_EQ(r.j["usage"]["completion_tokens"], 18);
  // Choice i is the request with seed 5 + i alone.
  json one = body;
  one["n"] = 1;
  one["seed"] = 6;
  Reply r1 = post(port(), "/v1/chat/completions", one);
  EXPECT_EQ(r1.j["choices"][0]["message"]["content"], r.j["choices"][1]["message"]["content"]);
  // Streamed: the same texts, per index, each with its own finish chunk.
  body["stream"] = true;
  body["stream_options"] = {{"include_usage", true}};
  Reply s = post(port(), "/v1/chat/completions", body);
  ASSERT_EQ(s.status, 200);
  std::vector<std::string> got(3);
  std::vector<int> roles(3), finishes(3);
  json usage;
  const auto payloads = sse_payloads(s.body);
  ASSERT_EQ(payloads.back(), "[DONE]");
  for (size_t k = 0; k + 1 < payloads.size(); ++k) {
    json c = json::parse(payloads[k]);
    if (c["choices"].empty()) {
      usage = c["usage"];
      continue;
    }
    const int i = c["choices"][0]["index"];
    ASSERT_TRUE(i >= 0 && i < 3);
    const json& d = c["choices"][0]["delta"];
    if (d.contains("role")) ++roles[i];
    if (d.contains("content")) got[i] += d["content"].get<std::string>();
    if (!c["choices"][0]["finish_reason"].is_null()) ++finishes[i];
  }
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(got[i], r.j["choices"][i]["message"]["content"]) << i;
    EXPECT_EQ(roles[i], 1);
    EXPECT_EQ(finishes[i], 1);
  }
  EXPECT_EQ(usage["completion_tokens"], 18);
  EXPECT_TRUE(wait_idle(port()));
}

TEST_F(SamplingApi, NChoicesForCompletions) {
  json body = completion_body("Once", 4);
  body["n"] = 2;
  body["temperature"] = 0;
  body["ignore_eos"] = true;
  Reply r = post(port(), "/v1/completions", body);
  ASSERT_EQ(r.status, 200) << r.body;
  ASSERT_EQ(r.j["choices"].size(), 2u);
  EXPECT_EQ(r.j["choices"][0]["text"], r.j["choices"][1]["text"]);  // greedy: the same
  EXPECT_EQ(r.j["choices"][1]["index"], 1);
}

TEST_F(SamplingApi, TokenizeAndDetokenize) {
  const auto& tok = demo_tokenizer();
  Reply t = post(port(), "/tokenize", json{{"model", "demo"}, {"prompt", "Hello world"}});
  ASSERT_EQ(t.status, 200) << t.body;
  const auto want = tok.encode("Hello world", true);
  EXPECT_EQ(t.j["tokens"].get<std::vector<int32_t>>(), want);
  EXPECT_EQ(t.j["count"], want.size());
  EXPECT_EQ(t.j["max_model_len"], test_engine_config().max_model_len);
  Reply n =
      post(port(), "/tokenize", json{{"prompt", "Hello world"}, {"add_special_tokens", false}});
  EXPECT_EQ(n.j["tokens"].get<std::vector<int32_t>>(), tok.encode("Hello world", false));
  // Chat: the prompt /v1/chat/completions would run (its usage says how long it is).
  json msgs = json::array({{{"role", "user"}, {"content", "Hello there"}}});
  Reply c = post(port(), "/tokenize", json{{"model", "demo"}, {"messages", msgs}});
  ASSERT_EQ(c.status, 200) << c.body;
  Reply g = post(port(), "/v1/chat/completions", chat_body("Hello there", 1));
  EXPECT_EQ(c.j["count"], g.j["usage"]["prompt_tokens"]);
  Reply d = post(port(), "/detokenize", json{{"model", "demo"}, {"tokens", n.j["tokens"]}});
  ASSERT_EQ(d.status, 200) << d.body;
  EXPECT_EQ(d.j["prompt"], "Hello world");
  // Errors.
  EXPECT_EQ(post(port(), "/detokenize", json{{"tokens", {1, 99999999}}}).status, 400);
  EXPECT_EQ(post(port(), "/detokenize", json{{"tokens", "x"}}).status, 400);
  EXPECT_EQ(post(port(), "/tokenize", json{{"model", "other"}, {"prompt", "x"}}).status, 400);
  EXPECT_EQ(post(port(), "/tokenize", json{{"prompt", 5}}).status, 400);
  EXPECT_EQ(get(port(), "/tokenize").status, 405);
}

namespace {

// Every schema's outputs, over seeds, are complete values the grammar takes (the e2e test
// validates them with the `jsonschema` package too).
const char* kSchemas[] = {
    R"({"type":"object","properties":{"name":{"type":"string","maxLength":10},"age":{"type":"integer"},"ok":{"type":"boolean"}},"required":["name","age","ok"],"additionalProperties":false})",
    R"({"type":"array","items":{"type":"integer"},"minItems":1,"maxItems":4})",
    R"({"enum":["red","green","blue"]})",
    R"({"anyOf":[{"type":"number"},{"type":"object","properties":{"k":{"type":"string","maxLength":4}},"required":["k"]}]})",
    R"({"$defs":{"p":{"type":"object","properties":{"x":{"type":"integer"},"y":{"type":["integer","null"]}},"required":["x","y"]}},"type":"object","properties":{"points":{"type":"array","items":{"$ref":"#/$defs/p"},"maxItems":3}},"required":["points"]})",
};

}  // namespace

TEST_F(SamplingApi, StructuredOutputFollowsTheSchema) {
  for (const char* text : kSchemas) {
    const nlohmann::ordered_json schema = nlohmann::ordered_json::parse(text);
    const std::string spec = engine::json_constraint_spec(&schema, {0});
    for (int seed = 0; seed < 3; ++seed) {
      json body = chat_body("Answer in JSON", 120);
      body["temperature"] = seed == 0 ? 0.0 : 1.0;
      body["seed"] = seed;
      body["response_format"] = {
          {"type", "json_schema"},
          {"json_schema", {{"name", "t"}, {"strict", true}, {"schema", json::parse(text)}}}};
      // The body keeps the schema's key order (nlohmann's json sorts keys: write it by hand).
      std::string raw = body.dump();
      const std::string sorted = json::parse(text).dump();
      raw.replace(raw.find(sorted), sorted.size(), schema.dump());
      Reply r = post(port(), "/v1/chat/completions", raw);
      ASSERT_EQ(r.status, 200) << r.body;
      const std::string out = r.j["choices"][0]["message"]["content"];
      EXPECT_EQ(r.j["choices"][0]["finish_reason"], "stop") << text << "\n" << out;
      EXPECT_TRUE(engine::json_grammar_accepts(spec, out, true)) << text << "\n" << out;
      EXPECT_FALSE(json::parse(out, nullptr, false).is_discarded()) << out;
    }
  }
  // json_object: any object.
  json body = completion_body("JSON:", 150);
  body["temperature"] = 0;
  body["response_format"] = {{"type", "json_object"}};
  Reply r = post(port(), "/v1/completions", body);
  ASSERT_EQ(r.status, 200) << r.body;
  const std::string out = r.j["choices"][0]["text"];
  EXPECT_TRUE(engine::json_grammar_accepts(engine::json_constraint_spec(nullptr, {0}), out,
                                           r.j["choices"][0]["finish_reason"] == "stop"))
      << out;
  EXPECT_EQ(out.substr(0, 1), "{");
  EXPECT_TRUE(wait_idle(port()));
}

TEST_F(SamplingApi, StructuredOutputErrors) {
  auto with = [](json rf) {
    json b = chat_body("x", 4);
    b["response_format"] = std::move(rf);
    return b;
  };
  auto schema = [](json s) {
    return json{{"type", "json_schema"}, {"json_schema", {{"name", "n"}, {"schema", s}}}};
  };
  struct Case {
    json body;
    std::string param, fragment;
  };
  std::vector<Case> cases = {
      {with({{"type", "yaml"}}), "response_format", "Supported values"},
      {with({{"type", "json_schema"}}), "response_format", "json_schema"},
      {with(schema({{"type", "string"}, {"pattern", "a+"}})), "response_format", "'pattern'"},
      {with(schema({{"type", "wat"}})), "response_format", "unknown type"},
      {with(schema(5)), "response_format.json_schema.schema", "object"},
  };
  json b = with({{"type", "json_object"}});
  b["ignore_eos"] = true;
  cases.push_back({b, "response_format", "ignore_eos"});
  b = with({{"type", "json_object"}});
  b["min_tokens"] = 2;
  cases.push_back({b, "min_tokens", "response_format"});
  for (const auto& c : cases) {
    Reply r = post(port(), "/v1/chat/completions", c.body);
    EXPECT_EQ(r.status, 400) << c.body.dump();
    EXPECT_EQ(r.j["error"]["param"], c.param) << r.body;
    EXPECT_NE(r.j["error"]["message"].get<std::string>().find(c.fragment), std::string::npos)
        << r.body;
  }
  // text is the default and allowed.
  EXPECT_EQ(post(port(), "/v1/chat/completions", with({{"type", "text"}})).status, 200);
}

TEST_F(SamplingApi, NChoicesShareThePromptsBlocks) {
  // Choice 0 computes the prompt; the others start once its first token came, from the
  // prompt's cached blocks (all but the last token's), and give what they give alone.
  std::string text;
  for (int i = 0; i < 10; ++i) text += "Line " + std::to_string(i) + " of a shared prompt. ";
  const int64_t n = static_cast<int64_t>(demo_tokenizer().encode(text, true).size());
  ASSERT_GE(n, 40);
  const int64_t cached = (n - 1) / 16 * 16;
  const double hits0 = metric(port(), "moeserve_prefix_cache_hits_total");
  json body = completion_body(text, 5);
  body["n"] = 4;
  body["temperature"] = 0.8;
  body["seed"] = 11;
  body["ignore_eos"] = true;
  Reply r = post(port(), "/v1/completions", body);
  ASSERT_EQ(r.status, 200) << r.body;
  ASSERT_EQ(r.j["choices"].size(), 4u);
  EXPECT_EQ(r.j["usage"]["prompt_tokens"], n);
  EXPECT_EQ(r.j["usage"]["completion_tokens"], 20);
  EXPECT_EQ(metric(port(), "moeserve_prefix_cache_hits_total"), hits0 + 3 * cached);
  json one = body;
  one["n"] = 1;
  one["seed"] = 14;
  Reply r3 = post(port(), "/v1/completions", one);
  ASSERT_EQ(r3.status, 200) << r3.body;
  EXPECT_EQ(r3.j["choices"][0]["text"], r.j["choices"][3]["text"]);
  EXPECT_TRUE(wait_idle(port()));
}
