// The server under hostile and heavy use: thousands of malformed requests (random bytes,
// truncated JSON, wrong types, huge numbers, malformed HTTP) never crash it or change its
// answers, and concurrent greedy requests get exactly the outputs they get one at a time.
#include <gtest/gtest.h>

#include <atomic>
#include <random>

#include "server_test_util.h"

using namespace moeserve;
using namespace moeserve::testing;

namespace {

class Robustness : public SharedServerTest<Robustness> {
 protected:
  // Short sequences: a fuzzed request that happens to be valid generates little.
  static void SetUpTestSuite() {
    engine::EngineConfig ec = test_engine_config();
    ec.max_model_len = 48;
    server_ = new TestServer(ec);
  }
};

// A JSON value of a random kind, some of them extreme.
json random_value(std::mt19937& rng, int depth = 0) {
  switch (rng() % 12) {
    case 0:
      return nullptr;
    case 1:
      return rng() % 2 == 0;
    case 2:
      return static_cast<int64_t>(rng()) - (1ll << 31);
    case 3:
      return std::numeric_limits<int64_t>::max();
    case 4:
      return std::numeric_limits<uint64_t>::max();
    case 5:
      return -1e308;
    case 6:
      return 0.5;
    case 7:
      return std::string(rng() % 8, "ab\n<>\"\\{"[rng() % 8]);
    case 8:
      return "\xf0\x9f\x98\x80 unicode \xe4\xbd\xa0";
    case 9: {
      if (depth > 2) return json::array();
      json a = json::array();
      for (int i = rng() % 3; i > 0; --i) a.push_back(random_value(rng, depth + 1));
      return a;
    }
    case 10: {
      if (depth > 2) return json::object();
      json o = json::object();
      for (int i = rng() % 3; i > 0; --i)
        o["k" + std::to_string(rng() % 4)] = random_value(rng, depth + 1);
      return o;
    }
    default:
      return json::array({{{"role", "user"}, {"content", "hi"}}});
  }
}

const char* kFields[] = {"model",
                         "messages",
                         "prompt",
                         "max_tokens",
                         "max_completion_tokens",
                         "temperature",
                         "top_p",
                         "top_k",
                         "seed",
                         "stop",
                         "stream",
                         "stream_options",
                         "logprobs",
                         "top_logprobs",
                         "n",
                         "stop_token_ids",
                         "ignore_eos",
                         "logit_bias",
                         "presence_penalty",
                         "tools",
                         "echo"};

// One malformed (or, rarely, valid but tiny) request body.
std::string fuzz_body(std::mt19937& rng, bool chat) {
  json valid = chat ? chat_body("fuzz", 1) : completion_body("fuzz", 1);
  valid["max_completion_tokens"] = 1;  // a fuzzed max_tokens falls back to it
  // Mostly kinds that are always invalid; bit flips and wrong types are often still valid.
  static const int kind_of[10] = {0, 0, 0, 1, 1, 1, 2, 2, 3, 4};
  switch (kind_of[rng() % 10]) {
    case 0: {  // random bytes
      std::string s(rng() % 200, '\0');
      for (auto& c : s) c = static_cast<char>(rng() & 0xff);
      return s;
    }
    case 1: {  // truncated JSON
      const std::string s = valid.dump();
      return s.substr(0, rng() % s.size());
    }
    case 2: {  // a field of the wrong type or out of range
      valid[kFields[rng() % std::size(kFields)]] = random_value(rng);
      valid["max_tokens"] = rng() % 4 == 0 ? random_value(rng) : json(1);
      return valid.dump();
    }
    case 3: {  // huge or odd numbers written as text
      static const char* nums[] = {"1e400",
                                   "-0",
                                   "99999999999999999999999999",
                                   "1.5",
                                   "-9223372036854775809",
                                   "NaN",
                                   "Infinity",
                                   "0x10",
                                   "1e-400"};
      const std::string key = kFields[rng() % std::size(kFields)];
      std::string s = valid.dump();
      s.insert(1, "\"" + key + "\":" + nums[rng() % std::size(nums)] + ",");
      return s;
    }
    default: {  // a bit flipped somewhere in a valid body
      std::string s = valid.dump();
      s[rng() % s.size()] ^= static_cast<char>(1 << (rng() % 8));
      return s;
    }
  }
}

TEST_F(Robustness, SurvivesThousandsOfMalformedRequests) {
  const json probe = completion_body("The quick brown fox", 6);
  const Reply before = post(port(), "/v1/completions", probe);
  ASSERT_EQ(before.status, 200);

  std::mt19937 rng(2024);
  httplib::Client c("127.0.0.1", port());
  c.set_keep_alive(true);  // thousands of requests on few connections
  c.set_read_timeout(60);
  c.set_tcp_nodelay(true);
  int counts[600] = {};
  for (int i = 0; i < 3000; ++i) {
    const bool chat = rng() % 2 == 0;
    const std::string body = fuzz_body(rng, chat);
    auto r = c.Post(chat ? "/v1/chat/completions" : "/v1/completions", body, "application/json");
    ASSERT_TRUE(r) << "no response to request " << i << ": " << body;
    ASSERT_TRUE(r->status == 200 || r->status == 400) << r->status << " for " << body;
    ++counts[r->status];
    if (r->status == 400) {
      const json e = json::parse(r->body, nullptr, false);
      ASSERT_TRUE(e.is_object() && e.contains("error")) << r->body;
    }
  }
  EXPECT_GT(counts[400], 2500);
  std::printf("fuzz: %d answered 400, %d answered 200\n", counts[400], counts[200]);

  // Malformed HTTP on raw connections.
  const std::vector<std::string> raw = {
      "GARBAGE\r\n\r\n",
      "POST /v1/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
      "POST /v1/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}",
      "POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
      "POST /v1/completions HTTP/1.1\r\nX-Long: " + std::string(100000, 'x') + "\r\n\r\n",
      "GET /" + std::string(20000, 'a') + " HTTP/1.1\r\n\r\n",
      "POST /v1/completions HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"pro",  // then hang up
      std::string("\0\xff\xfe", 3),
  };
  for (const auto& req : raw) {
    RawConn rc(port());
    rc.send(req);
    rc.read_until("\r\n\r\n", std::chrono::milliseconds(300));
  }

  // Still up, still right.
  EXPECT_EQ(get(port(), "/health").status, 200);
  const Reply after = post(port(), "/v1/completions", probe);
  ASSERT_EQ(after.status, 200);
  EXPECT_EQ(after.j["choices"], before.j["choices"]);
}

TEST_F(Robustness, ConcurrentGreedyRequestsMatchSequential) {
  constexpr int kN = 16;
  std::vector<json> bodies;
  for (int i = 0; i < kN; ++i) {
    json b = i % 2
                 ? chat_body("Question number " + std::to_string(i * 7) + "?", 10)
                 : completion_body(std::string(1 + i % 5, '#') + " item " + std::to_string(i), 10);
    b["ignore_eos"] = i % 3 == 0;
    if (i % 4 == 0) b["stream"] = true;
    if (i % 4 == 1) b["stop"] = "e";
    bodies.push_back(b);
  }
  auto path = [&](int i) {
    return bodies[i].contains("messages") ? "/v1/chat/completions" : "/v1/completions";
  };
  // Text and finish reason of a response, streamed or not.
  auto result = [&](int i, const Reply& r) {
    EXPECT_EQ(r.status, 200) << r.body;
    if (!bodies[i].value("stream", false)) return r.j["choices"][0].dump() + r.j["usage"].dump();
    std::string text, reason;
    for (const auto& p : sse_payloads(r.body)) {
      if (p == "[DONE]") continue;
      const json c = json::parse(p)["choices"][0];
      if (c.contains("text")) text += c["text"].get<std::string>();
      if (c.contains("delta") && c["delta"].contains("content"))
        text += c["delta"]["content"].get<std::string>();
      if (!c["finish_reason"].is_null()) reason = c["finish_reason"];
    }
    return text + "|" + reason;
  };
  std::vector<std::string> sequential(kN), concurrent(kN);
  for (int i = 0; i < kN; ++i) sequential[i] = result(i, post(port(), path(i), bodies[i]));

  const double steps_before = metric(port(), "moeserve_engine_steps_total");
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kN; ++i)
    threads.emplace_back([&, i] {
      ++ready;
      while (ready < kN) std::this_thread::yield();
      concurrent[i] = result(i, post(port(), path(i), bodies[i]));
    });
  for (auto& t : threads) t.join();
  for (int i = 0; i < kN; ++i) EXPECT_EQ(concurrent[i], sequential[i]) << "request " << i;
  // They really ran batched: far fewer steps than 16 requests x 10 tokens.
  EXPECT_LT(metric(port(), "moeserve_engine_steps_total") - steps_before, kN * 10 * 0.75);
}

}  // namespace
