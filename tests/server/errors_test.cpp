// Every error the server answers with (400, 401, 404, 405, 413, 429), its OpenAI error object,
// and clients that disconnect in the middle of a request: their generation is cancelled and the
// KV blocks come back.
#include <gtest/gtest.h>

#include "server_test_util.h"

using namespace moeserve;
using namespace moeserve::testing;

namespace {

void expect_error(const Reply& r, int status, const std::string& param = "",
                  const std::string& code = "") {
  EXPECT_EQ(r.status, status) << r.body;
  ASSERT_TRUE(r.j.is_object()) << r.body;
  ASSERT_TRUE(r.j.contains("error")) << r.body;
  const json& e = r.j["error"];
  EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty()) << r.body;
  EXPECT_TRUE(e["type"].is_string()) << r.body;
  EXPECT_TRUE(e.contains("param") && e.contains("code")) << r.body;
  if (!param.empty()) {
    EXPECT_EQ(e["param"], param) << r.body;
  }
  if (!code.empty()) {
    EXPECT_EQ(e["code"], code) << r.body;
  }
}

class Errors : public SharedServerTest<Errors> {
 protected:
  static void SetUpTestSuite() { server_ = new TestServer(); }
};

TEST_F(Errors, BadRequests) {
  const std::string chat = "/v1/chat/completions", comp = "/v1/completions";
  expect_error(post(port(), chat, std::string("{not json")), 400, "", "invalid_json");
  expect_error(post(port(), chat, std::string("")), 400);
  json b = chat_body("x");
  b["max_tokens"] = "ten";
  expect_error(post(port(), chat, b), 400, "max_tokens");
  b = chat_body("x");
  b["max_tokens"] = 0;
  expect_error(post(port(), chat, b), 400, "max_tokens");
  b = chat_body("x");
  b["model"] = "gpt-4";
  expect_error(post(port(), chat, b), 400, "model", "model_not_found");
  b = chat_body("x");
  b["messages"] = json::array();
  expect_error(post(port(), chat, b), 400, "messages");
  b = chat_body("x");
  b["messages"][0]["role"] = "narrator";
  expect_error(post(port(), chat, b), 400, "messages[0].role");
  b = chat_body("x");
  b["n"] = 0;
  expect_error(post(port(), chat, b), 400, "n");
  b = chat_body("x");
  b["logit_bias"] = {{"129280", 5}};  // one past the demo vocabulary
  expect_error(post(port(), chat, b), 400, "logit_bias");
  b = chat_body("x");
  b["presence_penalty"] = 2.5;
  expect_error(post(port(), chat, b), 400, "presence_penalty");
  b = completion_body("x");
  b["temperature"] = -1;
  expect_error(post(port(), comp, b), 400, "temperature");
  b = completion_body("x");
  b["prompt"] = json::array({1, 2, 99999999});
  expect_error(post(port(), comp, b), 400, "prompt");
  b = completion_body("x");
  b["stop_token_ids"] = json::array({1 << 30});
  expect_error(post(port(), comp, b), 400, "stop_token_ids");
}

TEST_F(Errors, PromptLongerThanMaxModelLen) {
  std::string words;
  for (int i = 0; i < 300; ++i) words += " apple";  // one token each
  expect_error(post(port(), "/v1/completions", completion_body(words, 4)), 400, "prompt",
               "context_length_exceeded");
  expect_error(post(port(), "/v1/chat/completions", chat_body(words, 4)), 400, "messages",
               "context_length_exceeded");
  // Fits alone, but not with the requested completion.
  expect_error(post(port(), "/v1/completions", completion_body(words.substr(0, 600), 200)), 400,
               "max_tokens", "context_length_exceeded");
}

TEST_F(Errors, UnknownRouteAndMethod) {
  expect_error(get(port(), "/v1/nothing"), 404, "", "not_found");
  expect_error(post(port(), "/v2/chat/completions", chat_body("x")), 404);
  expect_error(get(port(), "/v1/chat/completions"), 405);
  expect_error(post(port(), "/v1/models", std::string("{}")), 405);
}

TEST_F(Errors, BodyTooLarge) {
  const std::string huge = "{\"prompt\":\"" + std::string(5u << 20, 'a') + "\"}";
  expect_error(post(port(), "/v1/completions", huge), 413, "", "request_too_large");
  // A chunked body is decoded under the same limit, then judged on its content.
  RawConn c(port());
  c.send(
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
      "2\r\n{}\r\n0\r\n\r\n");
  EXPECT_EQ(c.read_until("\r\n").rfind("HTTP/1.1 400", 0), 0u);
  // A body with no length at all is refused at once.
  RawConn n(port());
  n.send("POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n{}");
  EXPECT_EQ(n.read_until("\r\n").rfind("HTTP/1.1 411", 0), 0u);
  // A body just under the limit is read and judged on its content.
  const std::string big =
      "{\"prompt\":\"" + std::string(3u << 20, 'a') + "\",\"max_tokens\":\"x\"}";
  expect_error(post(port(), "/v1/completions", big), 400, "max_tokens");
}

// Streams `body`, reads a few events, then drops the connection.
void drop_mid_stream(int port, const std::string& path, json body) {
  body["stream"] = true;
  RawConn c(port);
  ASSERT_TRUE(c.send(http_post(path, body.dump())));
  const std::string got = c.read_until("data: {\"id\"", std::chrono::seconds(20), 3);
  ASSERT_NE(got.find("200 OK"), std::string::npos) << got;
  EXPECT_EQ(metric(port, "moeserve_num_requests_running"), 1);
}

TEST_F(Errors, ClientDisconnectCancelsStream) {
  const std::string cancelled =
      "moeserve_requests_total{endpoint=\"completions\",outcome=\"cancelled\"}";
  const double before = metric(port(), cancelled);
  json body = completion_body("Tell me everything you know", 200);
  body["ignore_eos"] = true;
  drop_mid_stream(port(), "/v1/completions", body);
  EXPECT_TRUE(wait_metric(port(), cancelled, before + 1, std::chrono::seconds(5)));
  EXPECT_TRUE(wait_idle(port(), std::chrono::seconds(5)));
  EXPECT_LT(metric(port(), "moeserve_kv_blocks_used"), 1);
}

TEST_F(Errors, ClientDisconnectCancelsNonStreamed) {
  const std::string cancelled = "moeserve_requests_total{endpoint=\"chat\",outcome=\"cancelled\"}";
  const double before = metric(port(), cancelled);
  json body = chat_body("Tell me everything you know", 200);
  body["ignore_eos"] = true;
  {
    RawConn c(port());
    ASSERT_TRUE(c.send(http_post("/v1/chat/completions", body.dump())));
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (metric(port(), "moeserve_kv_blocks_used") == 0 &&
           std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    ASSERT_GT(metric(port(), "moeserve_kv_blocks_used"), 0);
  }  // closed here (a FIN), long before 200 tokens
  EXPECT_TRUE(wait_metric(port(), cancelled, before + 1, std::chrono::seconds(5)));
  EXPECT_TRUE(wait_idle(port(), std::chrono::seconds(5)));
}

TEST(Auth, ApiKeyRequiredExceptForHealth) {
  server::ServerOptions so;
  so.api_key = "sekret";
  TestServer s(test_engine_config(), so);
  EXPECT_EQ(get(s.port(), "/health").status, 200);
  expect_error(get(s.port(), "/v1/models"), 401, "", "invalid_api_key");
  expect_error(get(s.port(), "/v1/models", {{"Authorization", "Bearer wrong"}}), 401);
  expect_error(get(s.port(), "/v1/models", {{"Authorization", "sekret"}}), 401);
  expect_error(post(s.port(), "/v1/chat/completions", chat_body("x", 1)), 401);
  EXPECT_EQ(get(s.port(), "/metrics").status, 401);
  const httplib::Headers ok = {{"Authorization", "Bearer sekret"}};
  EXPECT_EQ(get(s.port(), "/v1/models", ok).status, 200);
  EXPECT_EQ(post(s.port(), "/v1/chat/completions", chat_body("x", 1), ok).status, 200);
  EXPECT_EQ(get(s.port(), "/metrics", ok).status, 200);
  for (int i = 0; i < 500 && s.engine().stats().kv_blocks_used > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(s.engine().stats().kv_blocks_used, 0);
}

TEST(QueueFull, Answers429WhenTheEngineQueueIsFull) {
  engine::EngineConfig ec = test_engine_config();
  ec.max_num_seqs = 1;
  ec.max_waiting = 1;
  TestServer s(ec);
  const int port = s.port();
  json body = completion_body("Keep going", 200);
  body["ignore_eos"] = true;
  body["stream"] = true;
  RawConn running(port), waiting(port);
  ASSERT_TRUE(running.send(http_post("/v1/completions", body.dump())));
  ASSERT_NE(running.read_until("data: {").find("200 OK"), std::string::npos);
  ASSERT_TRUE(waiting.send(http_post("/v1/completions", body.dump())));
  ASSERT_NE(waiting.read_until("\r\n\r\n").find("200 OK"), std::string::npos);  // queued
  const Reply r = post(port, "/v1/completions", completion_body("one more", 2));
  expect_error(r, 429, "", "queue_full");
  EXPECT_TRUE(wait_metric(
      port, "moeserve_requests_total{endpoint=\"completions\",outcome=\"rejected\"}", 1));
  running.close();
  waiting.close();
  EXPECT_TRUE(wait_idle(port, std::chrono::seconds(5)));
  EXPECT_EQ(post(port, "/v1/completions", completion_body("one more", 2)).status, 200);
}

}  // namespace
