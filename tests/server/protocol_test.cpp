// Unit tests of the pieces under the HTTP layer: request validation, stop strings with
// hold-back, the reasoning split, the output pipeline and the metrics page.
#include <gtest/gtest.h>
#include <algorithm>

#include <random>

#include "server/api_error.h"
#include "server/metrics.h"
#include "server/output.h"
#include "server/protocol.h"
#include "server/stop_matcher.h"
#include "server_test_util.h"

using namespace moeserve;
using namespace moeserve::server;
using moeserve::testing::json;

namespace {

// The 400 error (param, message) of parsing `body`.
ApiError parse_error(Endpoint ep, const std::string& body) {
  try {
    parse_request(ep, body);
  } catch (const ApiError& e) {
    return e;
  }
  ADD_FAILURE() << "no error for " << body;
  return ApiError(0, "");
}

const char* kChat = R"({"model":"m","messages":[{"role":"user","content":"hi"}]})";

json chat_with(const std::string& key, const json& value) {
  json j = json::parse(kChat);
  j[key] = value;
  return j;
}

TEST(Protocol, ParsesChatDefaultsAndOptions) {
  GenRequest r = parse_request(Endpoint::Chat, kChat);
  EXPECT_EQ(r.model, "m");
  EXPECT_FALSE(r.stream);
  EXPECT_FALSE(r.max_tokens.has_value());
  EXPECT_EQ(r.temperature, 1.0);
  EXPECT_EQ(r.top_logprobs, -1);
  ASSERT_EQ(r.messages.size(), 1u);
  EXPECT_EQ(*r.messages[0].content, "hi");
  EXPECT_EQ(r.n, 1);
  EXPECT_EQ(r.presence_penalty, 0.0);
  EXPECT_EQ(r.frequency_penalty, 0.0);
  EXPECT_EQ(r.repetition_penalty, 1.0);
  EXPECT_TRUE(r.logit_bias.empty());
  EXPECT_EQ(r.min_tokens, 0);

  json j = json::parse(kChat);
  j["n"] = 3;
  j["best_of"] = 3;
  j["presence_penalty"] = -1.5;
  j["frequency_penalty"] = 2;
  j["repetition_penalty"] = 1.3;
  j["logit_bias"] = {{"42", -100}, {"7", 12.5}};
  j["min_tokens"] = 4;
  j["stream"] = true;
  j["stream_options"] = {{"include_usage", true}};
  j["max_tokens"] = 5;
  j["max_completion_tokens"] = 7;  // wins over max_tokens
  j["temperature"] = 0.5;
  j["top_p"] = 0.9;
  j["top_k"] = -1;
  j["seed"] = -3;
  j["stop"] = "x";
  j["logprobs"] = true;
  j["top_logprobs"] = 3;
  j["messages"] = json::array(
      {{{"role", "system"}, {"content", "s"}},
       {{"role", "user"},
        {"content",
         json::array({{{"type", "text"}, {"text", "a"}}, {{"type", "text"}, {"text", "b"}}})}},
       {{"role", "assistant"}, {"content", nullptr}, {"tool_calls", json::array()}}});
  r = parse_request(Endpoint::Chat, j.dump());
  EXPECT_TRUE(r.stream && r.include_usage);
  EXPECT_EQ(*r.max_tokens, 7);
  EXPECT_EQ(r.top_k, 0);
  EXPECT_EQ(*r.seed, static_cast<uint64_t>(-3));
  EXPECT_EQ(r.stop, std::vector<std::string>{"x"});
  EXPECT_EQ(r.top_logprobs, 3);
  EXPECT_EQ(*r.messages[1].content, "a\nb");
  EXPECT_FALSE(r.messages[2].content.has_value());
  EXPECT_EQ(r.n, 3);
  EXPECT_EQ(r.presence_penalty, -1.5);
  EXPECT_EQ(r.frequency_penalty, 2.0);
  EXPECT_DOUBLE_EQ(r.repetition_penalty, 1.3);
  std::vector<std::pair<int32_t, float>> bias = {{42, -100.0f}, {7, 12.5f}};
  std::sort(r.logit_bias.begin(), r.logit_bias.end());
  std::sort(bias.begin(), bias.end());
  EXPECT_EQ(r.logit_bias, bias);
  EXPECT_EQ(r.min_tokens, 4);
}

TEST(Protocol, ParsesCompletionPrompts) {
  auto p = [](const std::string& prompt) {
    return parse_request(Endpoint::Completions, R"({"prompt":)" + prompt + "}");
  };
  EXPECT_EQ(p(R"("abc")").prompt_text, "abc");
  EXPECT_EQ(p(R"(["abc"])").prompt_text, "abc");
  EXPECT_EQ(p("[1,2,3]").prompt_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(p("[[4,5]]").prompt_ids, (std::vector<int32_t>{4, 5}));
  EXPECT_EQ(parse_request(Endpoint::Completions, R"({"prompt":"a","logprobs":2})").top_logprobs, 2);
}

TEST(Protocol, RejectsBadInputNamingTheField) {
  struct Case {
    std::string body, param, fragment;
  };
  const std::vector<Case> cases = {
      {"", "", "not valid JSON"},
      {"{", "", "not valid JSON"},
      {"[1]", "", "JSON object"},
      {std::string(100, '[') + std::string(100, ']'), "", "deeper"},
      {chat_with("max_tokens", "5").dump(), "max_tokens", "expected an integer"},
      {chat_with("max_tokens", 0).dump(), "max_tokens", "at least 1"},
      {chat_with("max_tokens", 2.5).dump(), "max_tokens", "integer"},
      {chat_with("max_tokens", 1e300).dump(), "max_tokens", "integer"},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":99999999999999999999999})",
       "max_tokens", "integer"},
      {chat_with("temperature", "hot").dump(), "temperature", "expected a number"},
      {chat_with("temperature", 7).dump(), "temperature", "between"},
      {chat_with("top_p", 0).dump(), "top_p", "greater than 0"},
      {chat_with("n", 0).dump(), "n", "between 1 and 16"},
      {chat_with("n", 17).dump(), "n", "between 1 and 16"},
      {chat_with("n", 1.5).dump(), "n", "integer"},
      {chat_with("best_of", 3).dump(), "best_of", "equal to 'n'"},
      {chat_with("presence_penalty", 2.5).dump(), "presence_penalty", "between -2.0 and 2.0"},
      {chat_with("frequency_penalty", -3).dump(), "frequency_penalty", "between -2.0 and 2.0"},
      {chat_with("frequency_penalty", "high").dump(), "frequency_penalty", "number"},
      {chat_with("repetition_penalty", 0).dump(), "repetition_penalty", "greater than 0"},
      {chat_with("repetition_penalty", -1).dump(), "repetition_penalty", "between"},
      {chat_with("logit_bias", json::array()).dump(), "logit_bias", "object"},
      {chat_with("logit_bias", {{"abc", 1}}).dump(), "logit_bias", "not a token id"},
      {chat_with("logit_bias", {{"-5", 1}}).dump(), "logit_bias", "not a token id"},
      {chat_with("logit_bias", {{"99999999999", 1}}).dump(), "logit_bias", "not a token id"},
      {chat_with("logit_bias", {{"5", 101}}).dump(), "logit_bias", "between -100 and 100"},
      {chat_with("logit_bias", {{"5", "x"}}).dump(), "logit_bias", "number"},
      {chat_with("min_tokens", -1).dump(), "min_tokens", "between"},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":3,"min_tokens":4})",
       "min_tokens", "must not be more than"},
      {chat_with("stream", "yes").dump(), "stream", "boolean"},
      {chat_with("stream_options", {{"include_usage", true}}).dump(), "stream_options", "stream"},
      {chat_with("stop", 5).dump(), "stop", "string"},
      {chat_with("stop", json::array({"a", 1})).dump(), "stop", "string"},
      {chat_with("top_logprobs", 2).dump(), "top_logprobs", "logprobs"},
      {chat_with("logprobs", 3).dump(), "logprobs", "boolean"},
      {chat_with("model", 3).dump(), "model", "string"},
      {chat_with("tools", json::array({{{"type", "function"}}})).dump(), "tools[0].function",
       "required"},
      {chat_with("tools", json::array({{{"type", "retrieval"}}})).dump(), "tools[0].type",
       "function"},
      {chat_with("tool_choice", "required").dump(), "tool_choice", "needs 'tools'"},
      {chat_with("tool_choice", "sometimes").dump(), "tool_choice", "Supported values"},
      {chat_with("chat_template_kwargs", {{"messages", 1}}).dump(), "chat_template_kwargs",
       "may not set"},
      {R"({"model":"m"})", "messages", "required"},
      {R"({"messages":[]})", "messages", "at least one"},
      {R"({"messages":"hi"})", "messages", "array"},
      {R"({"messages":[{"role":"wizard","content":"x"}]})", "messages[0].role", "wizard"},
      {R"({"messages":[{"content":"x"}]})", "messages[0].role", "required"},
      {R"({"messages":[{"role":"user"}]})", "messages[0].content", "required"},
      {R"({"messages":[{"role":"user","content":5}]})", "messages[0].content", "string"},
      {R"({"messages":[{"role":"user","content":[{"type":"image_url"}]}]})", "messages[0].content",
       "text"},
  };
  for (const auto& c : cases) {
    const ApiError e = parse_error(Endpoint::Chat, c.body);
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_EQ(e.param, c.param) << c.body;
    EXPECT_NE(std::string(e.what()).find(c.fragment), std::string::npos)
        << c.body << " -> " << e.what();
  }
  const std::vector<Case> completion_cases = {
      {R"({})", "prompt", "required"},
      {R"({"prompt":5})", "prompt", "string"},
      {R"({"prompt":["a","b"]})", "prompt", "one prompt"},
      {R"({"prompt":[]})", "prompt", "empty"},
      {R"({"prompt":[1,-2]})", "prompt", "between"},
      {R"({"prompt":"a","logprobs":true})", "logprobs", "integer"},
      {R"({"prompt":"a","logprobs":21})", "logprobs", "between"},
      {R"({"prompt":"a","echo":true})", "echo", "not supported"},
  };
  for (const auto& c : completion_cases) {
    const ApiError e = parse_error(Endpoint::Completions, c.body);
    EXPECT_EQ(e.param, c.param) << c.body;
    EXPECT_NE(std::string(e.what()).find(c.fragment), std::string::npos)
        << c.body << " -> " << e.what();
  }
}

// Feeds `text` to a matcher in pieces cut at `cuts`; returns (output, stopped).
std::pair<std::string, bool> run_stop(const std::vector<std::string>& stops,
                                      const std::vector<std::string>& pieces) {
  StopMatcher m(stops);
  std::string out;
  bool stopped = false;
  for (const auto& p : pieces) {
    // Whatever has been released so far never contains the start of a stop string that the
    // rest of the text completes.
    if (m.put(p, out)) {
      stopped = true;
      break;
    }
  }
  if (!stopped) m.flush(out);
  return {out, stopped};
}

TEST(StopMatcher, MatchesAcrossPiecesAndHoldsBack) {
  EXPECT_EQ(run_stop({"STOP"}, {"abc", "ST", "O", "Pxyz"}),
            std::make_pair(std::string("abc"), true));
  EXPECT_EQ(run_stop({"STOP"}, {"abc", "ST", "Ox"}), std::make_pair(std::string("abcSTOx"), false));
  EXPECT_EQ(run_stop({"\n\n", "END"}, {"a\n", "b", "E", "N", "D"}),
            std::make_pair(std::string("a\nb"), true));
  EXPECT_EQ(run_stop({"aab"}, {"a", "a", "a", "b"}), std::make_pair(std::string("a"), true));
  // The earliest match wins, whichever string it is.
  EXPECT_EQ(run_stop({"cd", "bcde"}, {"abcdef"}), std::make_pair(std::string("a"), true));
  // A stop string completed now wins over a longer one that would start earlier.
  EXPECT_EQ(run_stop({"a", "baaa"}, {"ba", "aa"}), std::make_pair(std::string("b"), true));

  StopMatcher m({"STOP"});
  std::string out;
  m.put("xxS", out);
  EXPECT_EQ(out, "xx");  // "S" could start STOP
  m.put("T", out);
  EXPECT_EQ(out, "xx");
  m.put("AY", out);
  EXPECT_EQ(out, "xxSTAY");
}

// Reference: after each piece, the output ends before the earliest stop string present in the
// text so far (generation stops as soon as one is complete).
TEST(StopMatcher, RandomizedAgainstReference) {
  std::mt19937 rng(5);
  for (int iter = 0; iter < 3000; ++iter) {
    std::string text;
    const int n = rng() % 30;
    for (int i = 0; i < n; ++i) text += "abc"[rng() % 3];
    std::vector<std::string> stops(1 + rng() % 3);
    for (auto& st : stops)
      for (int i = 1 + rng() % 4; i > 0; --i) st += "abc"[rng() % 3];
    std::vector<std::string> pieces;
    for (size_t i = 0; i < text.size();) {
      const size_t len = 1 + rng() % 4;
      pieces.push_back(text.substr(i, len));
      i += len;
    }
    std::string seen, expected = text;
    bool expect_stop = false;
    for (const auto& p : pieces) {
      seen += p;
      size_t first = std::string::npos;
      for (const auto& s : stops) first = std::min(first, seen.find(s));
      if (first != std::string::npos) {
        expected = seen.substr(0, first);
        expect_stop = true;
        break;
      }
    }
    const auto [out, stopped] = run_stop(stops, pieces);
    EXPECT_EQ(stopped, expect_stop) << text;
    EXPECT_EQ(out, expected) << text;
  }
}

// The pipeline's reasoning split, fed text through a tokenizer round trip piece by piece.
Delta split(bool reasoning, bool starts_in_think, const std::vector<std::string>& pieces) {
  const auto& tok = moeserve::testing::demo_tokenizer();
  OutputOptions o;
  o.reasoning = reasoning;
  o.starts_in_think = starts_in_think;
  OutputPipeline p(tok, o);
  Delta d;
  for (const auto& piece : pieces)
    for (int32_t id : tok.encode(piece, false)) {
      engine::TokenEvent ev;
      ev.token = id;
      p.put(ev, d);
    }
  p.finish(d);
  return d;
}

TEST(OutputPipeline, SeparatesThinkBlock) {
  Delta d = split(true, true, {"let me ", "think</th", "ink>\n\nAnswer"});
  EXPECT_EQ(d.reasoning, "let me think");
  EXPECT_EQ(d.content, "\n\nAnswer");
  d = split(true, false, {"<th", "ink>", "hmm</think>ok"});
  EXPECT_EQ(d.reasoning, "hmm");
  EXPECT_EQ(d.content, "ok");
  d = split(true, false, {"<tha", "nks>"});
  EXPECT_EQ(d.reasoning, "");
  EXPECT_EQ(d.content, "<thanks>");
  d = split(true, true, {"cut off mid-thought </thi"});
  EXPECT_EQ(d.reasoning, "cut off mid-thought </thi");
  d = split(false, false, {"<think>x</think>"});
  EXPECT_EQ(d.content, "<think>x</think>");
  EXPECT_EQ(d.reasoning, "");
}

TEST(OutputPipeline, DetokenizesStopsAndCountsTokens) {
  const auto& tok = moeserve::testing::demo_tokenizer();
  const std::vector<int32_t> ids = tok.encode("Hello world, this is a test.", false);
  OutputOptions o;
  o.stop = {"is a"};
  o.stop_ids = {tok.eos_id()};
  o.logprobs = true;
  OutputPipeline p(tok, o);
  Delta all;
  size_t consumed = 0;
  for (int32_t id : ids) {
    engine::TokenEvent ev;
    ev.token = id;
    ++consumed;
    if (p.put(ev, all)) break;
  }
  p.finish(all);
  EXPECT_EQ(all.content, "Hello world, this ");
  EXPECT_EQ(p.tokens(), static_cast<int64_t>(consumed));
  EXPECT_EQ(all.logprobs.size(), consumed);
  EXPECT_TRUE(p.stopped_by_string());

  // The eos token ends the text without adding to it, but counts as generated.
  OutputPipeline q(tok, o);
  Delta d;
  engine::TokenEvent a, eos;
  a.token = ids[0];
  eos.token = tok.eos_id();
  q.put(a, d);
  q.put(eos, d);
  q.finish(d);
  EXPECT_EQ(d.content, "Hello");
  EXPECT_EQ(q.tokens(), 2);
  EXPECT_EQ(d.logprobs.size(), 1u);
}

TEST(Metrics, RendersPrometheusText) {
  Metrics m;
  m.record_request("chat", Outcome::Stop);
  m.record_tokens(10, 4);
  m.record_ttft(0.02);
  m.record_itl(0.003);
  m.record_http_status(200);
  engine::EngineStats st;
  st.kv_blocks_total = 10;
  st.kv_blocks_used = 3;
  st.expert_tokens = {1, 2, 3, 4, 5, 6};
  const std::string page = m.render(st, 2, {false, true, true});
  for (const char* line : {
           "moeserve_requests_total{endpoint=\"chat\",outcome=\"stop\"} 1",
           "moeserve_prompt_tokens_total 10",
           "moeserve_generation_tokens_total 4",
           "moeserve_time_to_first_token_seconds_bucket{le=\"0.02\"} 1",
           "moeserve_time_to_first_token_seconds_bucket{le=\"0.01\"} 0",
           "moeserve_inter_token_latency_seconds_count 1",
           "moeserve_kv_blocks_free 7",
           "moeserve_http_responses_total{status=\"200\"} 1",
           "moeserve_expert_routed_tokens_total{layer=\"2\",expert=\"1\"} 6",
       })
    EXPECT_NE(page.find(std::string(line) + "\n"), std::string::npos) << line;
  EXPECT_EQ(page.find("layer=\"0\""), std::string::npos);  // dense layer: no experts
}

}  // namespace
