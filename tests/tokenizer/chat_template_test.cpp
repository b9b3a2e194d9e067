// Chat-template rendering against fixtures rendered by Python jinja2 with transformers' settings
// (tools/make_tokenizer_fixtures.py): DeepSeek-V3's template, the R1 template in
// assets/deepseek-r1, and small templates covering the interpreter.
#include <gtest/gtest.h>

#include "core/error.h"
#include "test_util.h"
#include "tokenizer/chat_template.h"

namespace moeserve::tokenizer {
namespace {

using ojson = nlohmann::ordered_json;
using testing::read_fixture;

ChatTemplate make_template(const ojson& c, const ojson& special) {
  if (c.contains("template")) {
    if (c["template"] == "v3") return ChatTemplate::from_model_dir(testing::v3_dir());
    return ChatTemplate::from_model_dir(testing::v3_dir(),
                                        testing::r1_dir() / "chat_template.jinja");
  }
  std::vector<std::pair<std::string, std::string>> tokens;
  for (auto it = special.begin(); it != special.end(); ++it)
    tokens.emplace_back(it.key(), it.value().get<std::string>());
  return ChatTemplate::from_string(c["source"].get<std::string>(), tokens);
}

std::string render_case(const ojson& c, const ojson& special) {
  const ChatTemplate t = make_template(c, special);
  return t.render(c["messages"], c["add_generation_prompt"].get<bool>(),
                  c.contains("tools") ? c["tools"] : ojson(nullptr));
}

TEST(ChatTemplate, MatchesJinja2) {
  const ojson fixture = read_fixture("chat_templates.json");
  int rendered = 0, refused = 0;
  for (const auto& c : fixture["cases"]) {
    const std::string name = c["name"];
    if (c.contains("error")) {
      try {
        const std::string out = render_case(c, fixture["special_tokens"]);
        ADD_FAILURE() << name << ": rendered " << out.substr(0, 80) << " but jinja2 failed with "
                      << c["error"].get<std::string>();
      } catch (const Error& e) {
        ++refused;
        EXPECT_NE(std::string(e.what()).find("chat template"), std::string::npos) << e.what();
      }
      continue;
    }
    try {
      EXPECT_EQ(render_case(c, fixture["special_tokens"]), c["expected"].get<std::string>())
          << name;
      ++rendered;
    } catch (const Error& e) {
      ADD_FAILURE() << name << ": " << e.what();
    }
  }
  EXPECT_GT(rendered, 50);
  EXPECT_GT(refused, 10);
}

TEST(ChatTemplate, R1DropsEarlierReasoningAndOpensThink) {
  const auto t =
      ChatTemplate::from_model_dir(testing::v3_dir(), testing::r1_dir() / "chat_template.jinja");
  const ojson messages = ojson::parse(R"([
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "<think>secret</think>A1"},
    {"role": "user", "content": "Q2"}])");
  const std::string out = t.render(messages, true);
  EXPECT_EQ(out.find("secret"), std::string::npos);
  EXPECT_NE(out.find("<｜Assistant｜>A1<｜end▁of▁sentence｜>"), std::string::npos);
  EXPECT_EQ(out.substr(out.size() - std::string("<｜Assistant｜><think>\n").size()),
            "<｜Assistant｜><think>\n");
}

TEST(ChatTemplate, ErrorsCarryTheLine) {
  try {
    ChatTemplate::from_string("line one\n{% if x %}\n{{ 1 + }}\n{% endif %}");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("line 3"), std::string::npos) << e.what();
  }
  const auto t = ChatTemplate::from_string("a\nb\n{{ raise_exception('bad role') }}");
  try {
    t.render(ojson::array(), false);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("line 3"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("bad role"), std::string::npos) << e.what();
  }
}

TEST(ChatTemplate, LimitsStopRunawayTemplates) {
  auto loop = ChatTemplate::from_string(
      "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
  EXPECT_THROW(loop.render(ojson::array(), false), Error);
  auto big = ChatTemplate::from_string(
      "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}");
  EXPECT_THROW(big.render(ojson::array(), false), Error);
  auto recursive =
      ChatTemplate::from_string("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
  EXPECT_THROW(recursive.render(ojson::array(), false), Error);
  std::string deep(5000, '(');
  EXPECT_THROW(ChatTemplate::from_string("{{ " + deep + " }}"), Error);
}

TEST(ChatTemplate, MissingTemplateIsAnError) {
  EXPECT_THROW(ChatTemplate::from_model_dir(testing::fixture_dir() / "synthetic"), Error);
  EXPECT_THROW(ChatTemplate::from_model_dir("/nonexistent/model"), Error);
}

TEST(ChatTemplate, ExtraVariablesAndTools) {
  const auto t = ChatTemplate::from_string(
      "{{ flag }}|{{ tools | length if tools else 'none' }}|{{ bos_token }}",
      {{"bos_token", "<s>"}});
  EXPECT_EQ(t.render(ojson::array(), false, nullptr, ojson{{"flag", 7}}), "7|none|<s>");
  EXPECT_EQ(t.render(ojson::array(), false, ojson::array({1, 2}), ojson{{"flag", "x"}}), "x|2|<s>");
}

}  // namespace
}  // namespace moeserve::tokenizer
