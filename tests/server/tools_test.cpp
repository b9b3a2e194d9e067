// Tool calling with the DeepSeek-V3 chat template: tools and tool results rendered as jinja2
// renders them (the fixtures of tools/make_tokenizer_fixtures.py), the tool-call tokens parsed
// into OpenAI tool_calls (whole and streamed), and tool_choice required / named generating a
// call whose arguments follow the function's schema even on a random-weight model.
#include <gtest/gtest.h>

#include <fstream>

#include "engine/json_grammar.h"
#include "server/output.h"
#include "server_test_util.h"

using namespace moeserve;
using namespace moeserve::testing;

namespace {

class Tools : public SharedServerTest<Tools> {
 protected:
  static void SetUpTestSuite() { server_ = new TestServer(); }
};

json weather_tool() {
  return {
      {"type", "function"},
      {"function",
       {{"name", "get_weather"},
        {"description", "Weather of a city"},
        {"parameters",
         {{"type", "object"},
          {"properties",
           {{"city", {{"type", "string"}, {"maxLength", 12}}}, {"days", {{"type", "integer"}}}}},
          {"required", {"city", "days"}}}}}}};
}

json time_tool() {
  return {{"type", "function"},
          {"function",
           {{"name", "get_time"},
            {"parameters",
             {{"type", "object"},
              {"properties", {{"zone", {{"enum", {"UTC", "CET", "JST"}}}}}},
              {"required", {"zone"}}}}}}};
}

}  // namespace

TEST_F(Tools, ToolCallsAndResultsRenderAsJinja2Renders) {
  std::ifstream in(source_dir() + "/tests/fixtures/tokenizer/chat_templates.json");
  const json fixture = json::parse(in);
  const auto& tok = demo_tokenizer();
  int checked = 0;
  for (const json& c : fixture["cases"]) {
    const std::string name = c["name"];
    if (c.value("template", "") != "v3" || name.find("tool") == std::string::npos) continue;
    // As an OpenAI client sends them: ids on the calls, tool_call_id on the results.
    json msgs = c["messages"];
    int n = 0;
    for (json& m : msgs) {
      if (m.contains("tool_calls"))
        for (json& t : m["tool_calls"]) t["id"] = "call_" + std::to_string(n++);
      if (m["role"] == "tool") m["tool_call_id"] = "call_0";
    }
    json body = {{"model", "demo"},
                 {"messages", msgs},
                 {"add_generation_prompt", c["add_generation_prompt"]},
                 {"tools", json::array({weather_tool()})}};
    Reply r = post(port(), "/tokenize", body);
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(r.j["tokens"].get<std::vector<int32_t>>(),
              tok.encode(c["expected"].get<std::string>(), false, true))
        << name;
    ++checked;
  }
  EXPECT_GE(checked, 4);
}

TEST(ToolCallParser, SplitsCallsFromContentAndStreamsThem) {
  const auto& tok = demo_tokenizer();
  server::OutputOptions o;
  o.tool_calls = true;
  o.tool_tokens = server::ToolTokens::of(tok);
  ASSERT_TRUE(o.tool_tokens.found());
  server::OutputPipeline p(tok, o);
  const std::string text =
      "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
      "{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>"
      "get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
  server::Delta all;
  std::vector<server::Delta> steps;
  for (int32_t id : tok.encode(text, false, true)) {
    server::Delta d;
    engine::TokenEvent ev;
    ev.token = id;
    EXPECT_FALSE(p.put(ev, d));
    steps.push_back(d);
    all.append(std::move(d));
  }
  server::Delta end;
  p.finish(end);
  all.append(std::move(end));
  EXPECT_EQ(all.content, "Sure.");
  ASSERT_EQ(p.tool_calls().size(), 2u);
  EXPECT_EQ(p.tool_calls()[0].name, "get_weather");
  EXPECT_EQ(p.tool_calls()[0].arguments, "{\"city\": \"Paris\"}");
  EXPECT_EQ(p.tool_calls()[1].name, "get_time");
  EXPECT_EQ(p.tool_calls()[1].arguments, "{}");
  EXPECT_NE(p.tool_calls()[0].id, p.tool_calls()[1].id);
  // Streamed: each call announced once (id and name), then its arguments.
  ASSERT_EQ(all.tool_calls.size(), 4u);
  EXPECT_EQ(all.tool_calls[0].index, 0);
  EXPECT_EQ(all.tool_calls[0].name, "get_weather");
  EXPECT_EQ(all.tool_calls[0].arguments, "");
  EXPECT_TRUE(all.tool_calls[1].id.empty());
  EXPECT_EQ(all.tool_calls[1].arguments, "{\"city\": \"Paris\"}");
  EXPECT_EQ(all.tool_calls[2].index, 1);
  EXPECT_EQ(all.tool_calls[2].id, p.tool_calls()[1].id);
}

TEST_F(Tools, RequiredAndNamedToolChoiceGiveValidCalls) {
  const json weather_params = weather_tool()["function"]["parameters"];
  for (int seed = 0; seed < 4; ++seed) {
    json body = chat_body("What is the weather?", 80);
    body["tools"] = json::array({weather_tool(), time_tool()});
    body["temperature"] = seed == 0 ? 0.0 : 1.0;
    body["seed"] = seed;
    body["tool_choice"] = seed % 2
                              ? json("required")
                              : json{{"type", "function"}, {"function", {{"name", "get_weather"}}}};
    Reply r = post(port(), "/v1/chat/completions", body);
    ASSERT_EQ(r.status, 200) << r.body;
    const json& c = r.j["choices"][0];
    EXPECT_EQ(c["finish_reason"], "tool_calls") << r.body;
    ASSERT_EQ(c["message"]["tool_calls"].size(), 1u) << r.body;
    EXPECT_TRUE(c["message"]["content"].is_null());
    const json& call = c["message"]["tool_calls"][0];
    EXPECT_EQ(call["type"], "function");
    EXPECT_EQ(call["id"].get<std::string>().rfind("call_", 0), 0u);
    const std::string name = call["function"]["name"];
    if (seed % 2 == 0) EXPECT_EQ(name, "get_weather");
    const json args = json::parse(call["function"]["arguments"].get<std::string>());
    if (name == "get_weather") {
      EXPECT_TRUE(args["city"].is_string() && args["days"].is_number_integer()) << args;
    } else {
      ASSERT_EQ(name, "get_time");
      EXPECT_TRUE(args["zone"] == "UTC" || args["zone"] == "CET" || args["zone"] == "JST");
    }
    // Streamed: the same call.
    body["stream"] = true;
    Reply s = post(port(), "/v1/chat/completions", body);
    std::string sname, sargs, finish;
    for (const auto& payload : sse_payloads(s.body)) {
      if (payload == "[DONE]") break;
      const json ch = json::parse(payload);
      const json& d = ch["choices"][0]["delta"];
      if (d.contains("tool_calls"))
        for (const json& t : d["tool_calls"]) {
          if (t["function"].contains("name")) sname += t["function"]["name"].get<std::string>();
          sargs += t["function"]["arguments"].get<std::string>();
        }
      if (!ch["choices"][0]["finish_reason"].is_null()) finish = ch["choices"][0]["finish_reason"];
    }
    EXPECT_EQ(sname, name);
    EXPECT_EQ(sargs, call["function"]["arguments"]);
    EXPECT_EQ(finish, "tool_calls");
  }
  EXPECT_TRUE(wait_idle(port()));
}

TEST_F(Tools, AutoParsesCallsAndNoneLeavesThemText) {
  const auto& tok = demo_tokenizer();
  const int32_t begin = *tok.token_to_id("<｜tool▁calls▁begin｜>");
  // A random model never opens a call by itself: force the opening token with logit_bias.
  json body = chat_body("Call something", 30);
  body["tools"] = json::array({weather_tool()});
  body["temperature"] = 0;
  body["logit_bias"] = {{std::to_string(begin), 100}};
  body["max_tokens"] = 3;
  body["skip_special_tokens"] = false;  // special tokens the parser does not take show as text
  Reply a = post(port(), "/v1/chat/completions", body);
  ASSERT_EQ(a.status, 200) << a.body;
  // auto: the opening tokens go to the tool-call parser, not to the content.
  EXPECT_EQ(a.j["choices"][0]["message"]["content"].get<std::string>().find("<｜tool"),
            std::string::npos)
      << a.body;
  body["tool_choice"] = "none";
  Reply n = post(port(), "/v1/chat/completions", body);
  ASSERT_EQ(n.status, 200) << n.body;
  EXPECT_FALSE(n.j["choices"][0]["message"].contains("tool_calls"));
  EXPECT_EQ(n.j["choices"][0]["finish_reason"], "length");
  // none: they are text.
  EXPECT_EQ(
      n.j["choices"][0]["message"]["content"].get<std::string>().rfind("<｜tool▁calls▁begin｜>", 0),
      0u)
      << n.body;
}

TEST_F(Tools, Errors) {
  json b = chat_body("x", 4);
  b["tools"] = json::array({weather_tool()});
  b["tool_choice"] = {{"type", "function"}, {"function", {{"name", "nope"}}}};
  Reply r = post(port(), "/v1/chat/completions", b);
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.j["error"]["param"], "tool_choice");
  json c = completion_body("x", 4);
  c["tools"] = json::array({weather_tool()});
  EXPECT_EQ(post(port(), "/v1/completions", c).status, 400);
  b = chat_body("x", 4);
  json t = weather_tool();
  t["function"]["parameters"]["properties"]["city"]["pattern"] = "a+";
  b["tools"] = json::array({t});
  b["tool_choice"] = "required";
  r = post(port(), "/v1/chat/completions", b);
  EXPECT_EQ(r.status, 400);
  EXPECT_NE(r.j["error"]["message"].get<std::string>().find("pattern"), std::string::npos);
  b = chat_body("x", 4);
  b["tools"] = json::array({weather_tool(), weather_tool()});
  EXPECT_EQ(post(port(), "/v1/chat/completions", b).status, 400);
}
