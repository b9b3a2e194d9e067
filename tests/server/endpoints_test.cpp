// The endpoints over HTTP against a demo model: response shapes, streaming format, stop
// strings, usage, logprobs, metrics. After every test the engine holds no KV block.
#include <gtest/gtest.h>

#include "server/output.h"
#include "server_test_util.h"

using namespace moeserve;
using namespace moeserve::testing;

namespace {

class Endpoints : public SharedServerTest<Endpoints> {
 protected:
  static void SetUpTestSuite() { server_ = new TestServer(); }
};

// The chunks of a streamed response (without [DONE]), checking the SSE framing on the way.
std::vector<json> stream_chunks(const Reply& r) {
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_NE(r.content_type.find("text/event-stream"), std::string::npos);
  const auto payloads = sse_payloads(r.body);
  EXPECT_FALSE(payloads.empty());
  if (payloads.empty()) return {};
  EXPECT_EQ(payloads.back(), "[DONE]");
  std::vector<json> chunks;
  for (size_t i = 0; i + 1 < payloads.size(); ++i) {
    json j = json::parse(payloads[i], nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << payloads[i];
    chunks.push_back(j);
  }
  return chunks;
}

TEST_F(Endpoints, HealthAndModels) {
  Reply h = get(port(), "/health");
  EXPECT_EQ(h.status, 200);
  Reply m = get(port(), "/v1/models");
  ASSERT_EQ(m.status, 200);
  EXPECT_EQ(m.j["object"], "list");
  ASSERT_EQ(m.j["data"].size(), 1u);
  EXPECT_EQ(m.j["data"][0]["id"], "demo");
  EXPECT_EQ(m.j["data"][0]["object"], "model");
  EXPECT_EQ(get(port(), "/v1/models/demo").j["id"], "demo");
  EXPECT_EQ(get(port(), "/v1/models/other").status, 404);
}

TEST_F(Endpoints, ChatCompletion) {
  Reply r = post(port(), "/v1/chat/completions", chat_body("Hello there", 6));
  ASSERT_EQ(r.status, 200) << r.body;
  const json& j = r.j;
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["id"].get<std::string>().rfind("chatcmpl-", 0), 0u);
  EXPECT_EQ(j["model"], "demo");
  EXPECT_TRUE(j["created"].is_number_integer());
  ASSERT_EQ(j["choices"].size(), 1u);
  const json& c = j["choices"][0];
  EXPECT_EQ(c["index"], 0);
  EXPECT_EQ(c["message"]["role"], "assistant");
  EXPECT_TRUE(c["message"]["content"].is_string());
  EXPECT_FALSE(c["message"].contains("reasoning_content"));  // V3's template has no <think>
  EXPECT_TRUE(c["logprobs"].is_null());
  const std::string reason = c["finish_reason"];
  EXPECT_TRUE(reason == "length" || reason == "stop");
  // <bos><｜User｜>Hello there<｜Assistant｜>
  const auto& tok = demo_tokenizer();
  const int64_t prompt = 3 + static_cast<int64_t>(tok.encode("Hello there", false).size());
  EXPECT_EQ(j["usage"]["prompt_tokens"], prompt);
  const int64_t completion = j["usage"]["completion_tokens"];
  EXPECT_EQ(j["usage"]["total_tokens"], prompt + completion);
  if (reason == "length") {
    EXPECT_EQ(completion, 6);
  }
}

TEST_F(Endpoints, CompletionMatchesAcrossFormats) {
  // The same greedy completion, asked as text, as token ids, streamed and not.
  const auto& tok = demo_tokenizer();
  json body = completion_body("The capital of France is", 8);
  Reply a = post(port(), "/v1/completions", body);
  ASSERT_EQ(a.status, 200) << a.body;
  EXPECT_EQ(a.j["object"], "text_completion");
  EXPECT_EQ(a.j["id"].get<std::string>().rfind("cmpl-", 0), 0u);
  const std::string text = a.j["choices"][0]["text"];

  body["prompt"] = tok.encode("The capital of France is", true);
  Reply b = post(port(), "/v1/completions", body);
  EXPECT_EQ(b.j["choices"][0]["text"], text);
  EXPECT_EQ(b.j["usage"], a.j["usage"]);

  body["stream"] = true;
  const auto chunks = stream_chunks(post(port(), "/v1/completions", body));
  ASSERT_GE(chunks.size(), 2u);
  std::string streamed;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const json& ch = chunks[i];
    EXPECT_EQ(ch["object"], "text_completion");
    EXPECT_EQ(ch["id"], chunks[0]["id"]);
    EXPECT_FALSE(ch.contains("usage"));  // only with stream_options.include_usage
    streamed += ch["choices"][0]["text"].get<std::string>();
    if (i + 1 < chunks.size()) {
      EXPECT_TRUE(ch["choices"][0]["finish_reason"].is_null());
    }
  }
  EXPECT_EQ(chunks.back()["choices"][0]["finish_reason"], a.j["choices"][0]["finish_reason"]);
  EXPECT_EQ(streamed, text);
}

TEST_F(Endpoints, ChatStreamWithUsage) {
  json body = chat_body("Tell me a story", 7);
  body["stream"] = true;
  body["stream_options"] = {{"include_usage", true}};
  const auto chunks = stream_chunks(post(port(), "/v1/chat/completions", body));
  ASSERT_GE(chunks.size(), 3u);
  EXPECT_EQ(chunks[0]["choices"][0]["delta"]["role"], "assistant");
  std::string text;
  for (size_t i = 0; i + 1 < chunks.size(); ++i) {
    EXPECT_EQ(chunks[i]["object"], "chat.completion.chunk");
    EXPECT_TRUE(chunks[i].contains("usage") && chunks[i]["usage"].is_null());
    const json& d = chunks[i]["choices"][0]["delta"];
    if (d.contains("content")) text += d["content"].get<std::string>();
  }
  const json& last_choice = chunks[chunks.size() - 2]["choices"][0];
  EXPECT_FALSE(last_choice["finish_reason"].is_null());
  const json& usage_chunk = chunks.back();
  EXPECT_TRUE(usage_chunk["choices"].empty());
  EXPECT_EQ(usage_chunk["usage"]["completion_tokens"].get<int>() +
                usage_chunk["usage"]["prompt_tokens"].get<int>(),
            usage_chunk["usage"]["total_tokens"].get<int>());

  body.erase("stream");
  body.erase("stream_options");
  Reply full = post(port(), "/v1/chat/completions", body);
  EXPECT_EQ(full.j["choices"][0]["message"]["content"], text);
  EXPECT_EQ(full.j["usage"], usage_chunk["usage"]);
}

TEST_F(Endpoints, StopStringsTruncateAndAreNeverStreamed) {
  // Find a piece of the greedy output that spans a token boundary, then ask for it as stop.
  const auto& tok = demo_tokenizer();
  json body = completion_body("Once upon a time", 24);
  body["ignore_eos"] = true;
  body["logprobs"] = 0;
  Reply r = post(port(), "/v1/completions", body);
  ASSERT_EQ(r.status, 200);
  const std::string text = r.j["choices"][0]["text"];
  const json& offsets = r.j["choices"][0]["logprobs"]["text_offset"];
  ASSERT_GE(offsets.size(), 8u);
  // Tokens 4 and 5 (counted in characters; the demo output may be any script).
  std::vector<size_t> starts;
  for (size_t i = 0; i < text.size(); ++i)
    if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) starts.push_back(i);
  starts.push_back(text.size());
  const size_t c4 = offsets[4], c6 = offsets[6];
  ASSERT_LT(c4, c6);
  ASSERT_LE(c6, starts.size() - 1);
  const std::string stop = text.substr(starts[c4], starts[c6] - starts[c4]);
  const std::string expected = text.substr(0, text.find(stop));

  body.erase("logprobs");
  body["stop"] = json::array({stop, "never-appears-xyz"});
  Reply s = post(port(), "/v1/completions", body);
  EXPECT_EQ(s.j["choices"][0]["text"], expected);
  EXPECT_EQ(s.j["choices"][0]["finish_reason"], "stop");
  EXPECT_LT(s.j["usage"]["completion_tokens"].get<int>(), 24);

  body["stream"] = true;
  const auto chunks = stream_chunks(post(port(), "/v1/completions", body));
  std::string streamed;
  for (const auto& c : chunks) streamed += c["choices"][0]["text"].get<std::string>();
  EXPECT_EQ(streamed, expected);
  EXPECT_EQ(streamed.find(stop), std::string::npos);
  EXPECT_EQ(chunks.back()["choices"][0]["finish_reason"], "stop");
  (void)tok;
}

TEST_F(Endpoints, StopTokenIdsAndLength) {
  json body = completion_body("Numbers: 1, 2, 3,", 5);
  body["ignore_eos"] = true;
  Reply a = post(port(), "/v1/completions", body);
  EXPECT_EQ(a.j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(a.j["usage"]["completion_tokens"], 5);
  body["logprobs"] = 0;
  Reply ids = post(port(), "/v1/completions", body);
  // Stop at the second generated token: it counts, but its text is not returned. Its id is the
  // one whose bytes are the token's text (tokens shown as "bytes:..." are partial characters).
  const auto& tok = demo_tokenizer();
  const std::string first = ids.j["choices"][0]["logprobs"]["tokens"][0];
  const std::string second = ids.j["choices"][0]["logprobs"]["tokens"][1];
  int32_t second_id = -1;
  for (int32_t id = 0; id < tok.vocab_size() && second_id < 0; ++id)
    if (moeserve::server::token_display(tok, id) == second) second_id = id;
  ASSERT_GE(second_id, 0) << second;
  body.erase("logprobs");
  body["stop_token_ids"] = {second_id};
  Reply s = post(port(), "/v1/completions", body);
  EXPECT_EQ(s.j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(s.j["usage"]["completion_tokens"], 2);
  if (first.rfind("bytes:", 0) != 0) {
    EXPECT_EQ(s.j["choices"][0]["text"], first);
  }
}

TEST_F(Endpoints, LogprobsInBothFormats) {
  json body = chat_body("Hi", 4);
  body["logprobs"] = true;
  body["top_logprobs"] = 3;
  Reply r = post(port(), "/v1/chat/completions", body);
  ASSERT_EQ(r.status, 200) << r.body;
  const json& content = r.j["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), r.j["usage"]["completion_tokens"].get<size_t>());
  for (const json& t : content) {
    EXPECT_TRUE(t["token"].is_string());
    EXPECT_LE(t["logprob"].get<double>(), 0.0);
    EXPECT_TRUE(t["bytes"].is_array());
    ASSERT_EQ(t["top_logprobs"].size(), 3u);
    // Greedy: the chosen token is the most likely one.
    EXPECT_EQ(t["top_logprobs"][0]["token"], t["token"]);
    EXPECT_DOUBLE_EQ(t["top_logprobs"][0]["logprob"].get<double>(), t["logprob"].get<double>());
    EXPECT_GE(t["top_logprobs"][0]["logprob"].get<double>(),
              t["top_logprobs"][1]["logprob"].get<double>());
  }

  json cb = completion_body("Hi", 4);
  cb["logprobs"] = 2;
  Reply c = post(port(), "/v1/completions", cb);
  const json& lp = c.j["choices"][0]["logprobs"];
  ASSERT_EQ(lp["tokens"].size(), 4u);
  ASSERT_EQ(lp["token_logprobs"].size(), 4u);
  ASSERT_EQ(lp["text_offset"].size(), 4u);
  ASSERT_EQ(lp["top_logprobs"].size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_GE(lp["top_logprobs"][i].size(), 2u);
    EXPECT_TRUE(lp["top_logprobs"][i].contains(lp["tokens"][i].get<std::string>()));
    if (i) {
      EXPECT_GE(lp["text_offset"][i].get<int>(), lp["text_offset"][i - 1].get<int>());
    }
  }

  // Streamed chat logprobs: one entry per generated token over all chunks.
  body["stream"] = true;
  const auto chunks = stream_chunks(post(port(), "/v1/chat/completions", body));
  size_t n = 0;
  for (const auto& ch : chunks)
    if (!ch["choices"][0]["logprobs"].is_null())
      n += ch["choices"][0]["logprobs"]["content"].size();
  EXPECT_EQ(n, content.size());
}

TEST_F(Endpoints, SeededSamplingIsReproducible) {
  json body = completion_body("Random words:", 8);
  body["temperature"] = 1.0;
  body["top_p"] = 0.9;
  body["top_k"] = 50;
  body["seed"] = 1234;
  body["ignore_eos"] = true;
  Reply a = post(port(), "/v1/completions", body);
  Reply b = post(port(), "/v1/completions", body);
  ASSERT_EQ(a.status, 200);
  EXPECT_EQ(a.j["choices"][0]["text"], b.j["choices"][0]["text"]);
}

TEST_F(Endpoints, MetricsCountRequestsTokensAndExperts) {
  const double before_req =
      metric(port(), "moeserve_requests_total{endpoint=\"chat\",outcome=\"length\"}");
  const double before_gen = metric(port(), "moeserve_generation_tokens_total");
  const double before_ttft = metric(port(), "moeserve_time_to_first_token_seconds_count");
  json body = chat_body("Count me", 3);
  body["ignore_eos"] = true;
  ASSERT_EQ(post(port(), "/v1/chat/completions", body).status, 200);
  EXPECT_EQ(metric(port(), "moeserve_requests_total{endpoint=\"chat\",outcome=\"length\"}"),
            before_req + 1);
  EXPECT_EQ(metric(port(), "moeserve_generation_tokens_total"), before_gen + 3);
  EXPECT_EQ(metric(port(), "moeserve_time_to_first_token_seconds_count"), before_ttft + 1);
  EXPECT_GE(metric(port(), "moeserve_inter_token_latency_seconds_count"), 2);

  const Reply m = get(port(), "/metrics");
  EXPECT_NE(m.content_type.find("text/plain"), std::string::npos);
  for (const char* name :
       {"# TYPE moeserve_requests_total counter",
        "# TYPE moeserve_time_to_first_token_seconds histogram",
        "# TYPE moeserve_inter_token_latency_seconds histogram", "moeserve_num_requests_running ",
        "moeserve_num_requests_waiting ", "moeserve_kv_blocks_used ", "moeserve_kv_blocks_free ",
        "moeserve_prompt_tokens_total ",
        "moeserve_time_to_first_token_seconds_bucket{le=\"+Inf\"}"})
    EXPECT_NE(m.body.find(name), std::string::npos) << name;
  // Demo: 4 layers, the first dense; 32 routed experts, 4 per token.
  double routed = 0;
  for (int l = 1; l < 4; ++l)
    for (int e = 0; e < 32; ++e)
      routed +=
          metric_in(m.body, "moeserve_expert_routed_tokens_total{layer=\"" + std::to_string(l) +
                                "\",expert=\"" + std::to_string(e) + "\"}");
  EXPECT_GT(routed, 0);
  // From one page: the gauges of separate reads may come from different moments.
  EXPECT_EQ(
      metric_in(m.body, "moeserve_kv_blocks_used") + metric_in(m.body, "moeserve_kv_blocks_free"),
      metric_in(m.body, "moeserve_kv_blocks_total"));
  // The capacity in tokens and the cache dtype (the default, bf16: the demo model's 4 layers
  // of 128 + 32 values, 2 bytes each).
  EXPECT_EQ(metric_in(m.body, "moeserve_kv_capacity_tokens"),
            metric_in(m.body, "moeserve_kv_blocks_total") * 16);
  EXPECT_EQ(metric_in(m.body, "moeserve_kv_bytes_per_token"), 4 * 160 * 2);
  EXPECT_EQ(metric_in(m.body, "moeserve_kv_cache_dtype{dtype=\"bf16\"}"), 1);
  EXPECT_EQ(metric_in(m.body, "moeserve_precision{precision=\"exact\"}"), 1);
}

// A DeepSeek-R1-style template: the generation prompt opens <think>, so the output starts as
// reasoning and goes to reasoning_content until </think>.
TEST(Reasoning, ThinkBlockGoesToReasoningContent) {
  const std::string r1 =
      "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] "
      "}}{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'].split('</think>')[-1] "
      "}}<｜end▁of▁sentence｜>{% endif %}{% endfor %}{% if add_generation_prompt "
      "%}<｜Assistant｜><think>\n{% endif %}";
  TestServer s(test_engine_config(), {}, r1);
  json body = chat_body("Why is the sky blue?", 12);
  body["ignore_eos"] = true;
  Reply r = post(s.port(), "/v1/chat/completions", body);
  ASSERT_EQ(r.status, 200) << r.body;
  const json& msg = r.j["choices"][0]["message"];
  ASSERT_TRUE(msg["reasoning_content"].is_string()) << r.body;
  const std::string reasoning = msg["reasoning_content"], content = msg["content"];

  // The same tokens as a plain completion of the rendered prompt: all reasoning up to </think>.
  const auto& tok = demo_tokenizer();
  json cb = completion_body("", 12);
  cb["prompt"] = tok.encode(
      "<｜begin▁of▁sentence｜><｜User｜>Why is the sky blue?<｜Assistant｜><think>\n", false);
  cb["ignore_eos"] = true;
  const std::string raw = post(s.port(), "/v1/completions", cb).j["choices"][0]["text"];
  const size_t end = raw.find("</think>");
  EXPECT_EQ(reasoning, raw.substr(0, end));
  EXPECT_EQ(content, end == std::string::npos ? "" : raw.substr(end + 8));

  body["stream"] = true;
  std::string streamed_reasoning, streamed_content;
  for (const auto& p : sse_payloads(post(s.port(), "/v1/chat/completions", body).body)) {
    if (p == "[DONE]") continue;
    const json d = json::parse(p)["choices"][0]["delta"];
    streamed_reasoning += d.value("reasoning_content", "");
    streamed_content += d.value("content", "");
  }
  EXPECT_EQ(streamed_reasoning, reasoning);
  EXPECT_EQ(streamed_content, content);
  EXPECT_TRUE(wait_idle(s.port()));
}

}  // namespace

// Prefix caching: a prompt sent again takes its full blocks from the cache (16 tokens a block,
// all but the block of its last token), reports them as usage.prompt_tokens_details.
// cached_tokens (in the response and in a stream's usage chunk) and in /metrics, and gives the
// same output.
TEST_F(Endpoints, CachedPromptTokensInUsageAndMetrics) {
  const auto& tok = demo_tokenizer();
  std::string text;
  for (int i = 0; i < 12; ++i) text += "Sentence number " + std::to_string(i) + " of a prompt. ";
  const int64_t n = static_cast<int64_t>(tok.encode(text, true).size());
  ASSERT_GE(n, 40);
  const double hits0 = metric(port(), "moeserve_prefix_cache_hits_total");
  const double queries0 = metric(port(), "moeserve_prefix_cache_queries_total");
  json body = completion_body(text, 5);
  Reply a = post(port(), "/v1/completions", body);
  ASSERT_EQ(a.status, 200) << a.body;
  EXPECT_EQ(a.j["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
  Reply b = post(port(), "/v1/completions", body);
  ASSERT_EQ(b.status, 200) << b.body;
  const int64_t cached = (n - 1) / 16 * 16;
  EXPECT_EQ(b.j["usage"]["prompt_tokens_details"]["cached_tokens"], cached);
  EXPECT_EQ(b.j["choices"][0]["text"], a.j["choices"][0]["text"]);
  EXPECT_EQ(b.j["usage"]["prompt_tokens"], n);
  body["stream"] = true;
  body["stream_options"] = {{"include_usage", true}};
  const auto chunks = stream_chunks(post(port(), "/v1/completions", body));
  ASSERT_FALSE(chunks.empty());
  EXPECT_EQ(chunks.back()["usage"]["prompt_tokens_details"]["cached_tokens"], cached);
  const Reply m = get(port(), "/metrics");
  EXPECT_EQ(metric_in(m.body, "moeserve_prefix_cache_queries_total"), queries0 + 3 * n);
  EXPECT_EQ(metric_in(m.body, "moeserve_prefix_cache_hits_total"), hits0 + 2 * cached);
  EXPECT_GT(metric_in(m.body, "moeserve_prefix_cache_hit_rate"), 0);
  EXPECT_GE(metric_in(m.body, "moeserve_kv_blocks_cached"), n / 16);
}
