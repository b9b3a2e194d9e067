// The HTTP layer under hostile clients: every way around the body limit (compressed, chunked in
// any case, no length), header floods, Range, slow clients on headers and on the body while
// /health keeps answering, connection caps, half-closed and reset connections, the API key
// checked before routing and compared exactly, shutdown with slow clients connected, /health
// reporting the service's problem, and memory handed back after large requests.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <fstream>

#include "server_test_util.h"

using namespace moeserve;
using namespace moeserve::testing;
using namespace std::chrono_literals;

namespace {

using Clock = std::chrono::steady_clock;

// The status code of a raw response ("HTTP/1.1 200 OK..."), 0 when there is none. Interim
// "100 Continue" responses are skipped.
int status_of(std::string_view r) {
  while (r.rfind("HTTP/1.1 100", 0) == 0) {
    const size_t end = r.find("\r\n\r\n");
    if (end == std::string_view::npos) return 0;
    r.remove_prefix(end + 4);
  }
  if (r.size() < 12 || r.rfind("HTTP/1.1 ", 0) != 0) return 0;
  return std::atoi(std::string(r.substr(9, 3)).c_str());
}

// The body of a raw response with Content-Length, or the joined chunks of a chunked one.
// Interim "100 Continue" responses are skipped.
std::string body_of(std::string r) {
  while (r.rfind("HTTP/1.1 100", 0) == 0 && r.find("\r\n\r\n") != std::string::npos)
    r = r.substr(r.find("\r\n\r\n") + 4);
  const size_t head_end = r.find("\r\n\r\n");
  if (head_end == std::string::npos) return "";
  std::string body = r.substr(head_end + 4);
  if (r.substr(0, head_end).find("Transfer-Encoding: chunked") == std::string::npos) return body;
  std::string out;
  size_t pos = 0;
  while (pos < body.size()) {
    const size_t nl = body.find("\r\n", pos);
    if (nl == std::string::npos) break;
    const size_t n = std::stoul(body.substr(pos, nl - pos), nullptr, 16);
    if (n == 0) break;
    out += body.substr(nl + 2, n);
    pos = nl + 2 + n + 2;
  }
  return out;
}

// Sends `req` on a new connection and reads until the server closes it (or `timeout`).
std::string roundtrip(int port, const std::string& req, std::chrono::milliseconds timeout = 10s) {
  RawConn c(port);
  EXPECT_TRUE(c.ok());
  c.send(req);
  c.closed_by_peer(timeout);
  return c.received();
}

std::string chunked(const std::string& body, size_t piece) {
  std::string out;
  for (size_t i = 0; i < body.size(); i += piece) {
    const std::string part = body.substr(i, piece);
    char size[32];
    std::snprintf(size, sizeof(size), "%zx", part.size());
    out += std::string(size) + (i == 0 ? ";ext=1" : "") + "\r\n" + part + "\r\n";
  }
  return out + "0\r\n\r\n";
}

std::string post_head(const std::string& path, const std::string& extra) {
  return "POST " + path + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra +
         "\r\n";
}

server::ServerOptions quick_deadlines() {
  server::ServerOptions so;
  so.http.header_timeout = 1000ms;
  so.http.body_timeout = 1500ms;
  so.http.idle_timeout = 1000ms;
  so.http.linger_timeout = 500ms;
  return so;
}

class Http : public SharedServerTest<Http> {
 protected:
  static void SetUpTestSuite() {
    engine::EngineConfig ec = test_engine_config();
    server_ = new TestServer(ec, quick_deadlines());
  }
};

TEST_F(Http, CompressedBodiesAreRefused) {
  const std::string body = completion_body("Hello", 2).dump();
  for (const char* enc : {"gzip", "GZIP", "deflate", "br", "gzip, identity"}) {
    const std::string r = roundtrip(
        port(),
        http_post("/v1/completions", body, "Content-Encoding: " + std::string(enc) + "\r\n"));
    EXPECT_EQ(status_of(r), 415) << enc << ": " << r;
    EXPECT_NE(r.find("unsupported_media_type"), std::string::npos) << r;
  }
  const std::string ok = roundtrip(
      port(),
      http_post("/v1/completions", body, "Content-Encoding: identity\r\nConnection: close\r\n"));
  EXPECT_EQ(status_of(ok), 200) << ok;
}

TEST_F(Http, ChunkedBodiesInAnyCaseAreDecodedUnderTheLimit) {
  const std::string body = completion_body("Hello there", 3).dump();
  for (const char* te : {"chunked", "Chunked", "CHUNKED", "cHuNkEd"}) {
    const std::string r = roundtrip(
        port(), post_head("/v1/completions",
                          "Connection: close\r\nTransfer-Encoding: " + std::string(te) + "\r\n") +
                    chunked(body, 7));
    ASSERT_EQ(status_of(r), 200) << te << ": " << r;
    const json j = json::parse(body_of(r), nullptr, false);
    EXPECT_EQ(j["usage"]["completion_tokens"], 3) << r;
  }
  // Over the limit: refused at the chunk that crosses it, whatever follows.
  RawConn c(port());
  ASSERT_TRUE(c.send(post_head("/v1/completions", "Transfer-Encoding: Chunked\r\n")));
  const std::string mib(1 << 20, 'a');
  int sent = 0;
  for (; sent < 8; ++sent) {
    if (!c.send("100000\r\n" + mib + "\r\n")) break;
    if (status_of(c.read_until("\r\n\r\n", 50ms)) != 0) break;
  }
  c.closed_by_peer(5s);
  EXPECT_EQ(status_of(c.received()), 413) << c.received().substr(0, 300);
  EXPECT_LE(sent, 5);  // 4 MiB fit; the fifth chunk's size line is refused
  // A declared size over the limit is refused before its data comes.
  const std::string r = roundtrip(
      port(), post_head("/v1/completions", "Transfer-Encoding: chunked\r\n") + "7FFFFFFFFFFF\r\n");
  EXPECT_EQ(status_of(r), 413) << r;
  // Other transfer codings are not supported.
  EXPECT_EQ(status_of(roundtrip(
                port(), post_head("/v1/completions", "Transfer-Encoding: gzip, chunked\r\n"))),
            501);
  // A length and a coding together is how requests get smuggled: refused.
  EXPECT_EQ(
      status_of(roundtrip(port(), post_head("/v1/completions",
                                            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n") +
                                      "0\r\n\r\n")),
      400);
  // A malformed chunk.
  EXPECT_EQ(
      status_of(roundtrip(port(), post_head("/v1/completions", "Transfer-Encoding: chunked\r\n") +
                                      "zz\r\nhello\r\n0\r\n\r\n")),
      400);
}

TEST_F(Http, PostWithoutLengthIs411AtOnce) {
  const auto t0 = Clock::now();
  RawConn c(port());
  ASSERT_TRUE(c.send(post_head("/v1/completions", "") + completion_body("x", 1).dump()));
  // The client keeps its side open: the answer must not wait for a close.
  const std::string r = c.read_until("\r\n\r\n", 5s);
  EXPECT_EQ(status_of(r), 411) << r;
  EXPECT_LT(Clock::now() - t0, 900ms);  // before any deadline
  EXPECT_TRUE(c.closed_by_peer(3s));
  // Conflicting or malformed lengths.
  for (const char* cl : {"Content-Length: 5\r\nContent-Length: 6\r\n", "Content-Length: -5\r\n",
                         "Content-Length: abc\r\n", "Content-Length: 1e3\r\n",
                         "Content-Length: 99999999999999999999999\r\n"})
    EXPECT_EQ(status_of(roundtrip(port(), post_head("/v1/completions", cl) + "{}")), 400) << cl;
  // A length over the limit is refused before the body is read.
  EXPECT_EQ(
      status_of(roundtrip(port(), post_head("/v1/completions", "Content-Length: 4194305\r\n"))),
      413);
}

TEST_F(Http, HeaderFloodsAre431) {
  std::string many;
  for (int i = 0; i < 101; ++i) many += "X-H" + std::to_string(i) + ": v\r\n";
  EXPECT_EQ(status_of(roundtrip(port(), "GET /health HTTP/1.1\r\n" + many + "\r\n")), 431);
  std::string hundred;
  for (int i = 0; i < 90; ++i) hundred += "X-H" + std::to_string(i) + ": v\r\n";
  EXPECT_EQ(status_of(roundtrip(port(), "GET /health HTTP/1.1\r\n" + hundred + "\r\n")), 200);
  // One long line, many long lines, a long request line.
  EXPECT_EQ(status_of(roundtrip(port(), "GET /health HTTP/1.1\r\nX-Long: " +
                                            std::string(100000, 'x') + "\r\n\r\n")),
            431);
  std::string big;
  for (int i = 0; i < 20; ++i)
    big += "X-B" + std::to_string(i) + ": " + std::string(4000, 'b') + "\r\n";
  EXPECT_EQ(status_of(roundtrip(port(), "GET /health HTTP/1.1\r\n" + big + "\r\n")), 431);
  EXPECT_EQ(status_of(roundtrip(port(), "GET /" + std::string(20000, 'a') + " HTTP/1.1\r\n\r\n")),
            414);
  // Millions of headers: cut off at the limit, the rest is read and dropped.
  RawConn c(port());
  std::string block;
  while (block.size() < (64 << 10)) block += "X-a: b\r\n";
  ASSERT_TRUE(c.send("POST /v1/completions HTTP/1.1\r\n"));
  for (int i = 0; i < 500 && c.send(block); ++i) {
  }
  c.closed_by_peer(5s);
  EXPECT_EQ(status_of(c.received()), 431) << c.received().substr(0, 200);
  EXPECT_EQ(get(port(), "/health").status, 200);
}

TEST_F(Http, RangeIsIgnored) {
  std::string range = "bytes=";
  for (int i = 0; i < 1000; ++i) range += "0-,";
  range += "0-";
  const std::string plain = roundtrip(port(), "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n");
  const std::string r = roundtrip(
      port(), "GET /metrics HTTP/1.1\r\nConnection: close\r\nRange: " + range + "\r\n\r\n");
  EXPECT_EQ(status_of(r), 200);
  EXPECT_EQ(r.find("Content-Range"), std::string::npos);
  EXPECT_EQ(r.find("multipart/byteranges"), std::string::npos);
  EXPECT_LT(r.size(), plain.size() + 4096);  // one page, not a thousand
}

// Clients that send their request a line at a time, each line well within any per-read
// timeout, are cut off by the overall deadline; meanwhile /health answers at once.
TEST_F(Http, SlowClientsHitOverallDeadlinesWhileHealthAnswers) {
  constexpr int kSlow = 24;
  std::vector<std::unique_ptr<RawConn>> heads, bodies;
  for (int i = 0; i < kSlow; ++i) {
    heads.push_back(std::make_unique<RawConn>(port(), "127.0.0.2"));
    ASSERT_TRUE(heads.back()->ok());
    heads.back()->send("POST /v1/completions HTTP/1.1\r\n");
    bodies.push_back(std::make_unique<RawConn>(port(), "127.0.0.3"));
    ASSERT_TRUE(bodies.back()->ok());
    bodies.back()->send(post_head("/v1/completions", "Content-Length: 1000\r\n"));
  }
  const auto t0 = Clock::now();
  double worst_health = 0;
  while (Clock::now() - t0 < 2500ms) {
    for (auto& c : heads) c->send("X-Slow: 1\r\n");
    for (auto& c : bodies) c->send("aaaaaaaaaa");
    const auto h0 = Clock::now();
    EXPECT_EQ(get(port(), "/health").status, 200);
    worst_health = std::max(worst_health, std::chrono::duration<double>(Clock::now() - h0).count());
    std::this_thread::sleep_for(200ms);
  }
  EXPECT_LT(worst_health, 0.5);
  for (auto& c : heads) {
    EXPECT_TRUE(c->closed_by_peer(1s));
    EXPECT_EQ(status_of(c->received()), 408) << c->received();
    EXPECT_NE(c->received().find("headers did not arrive"), std::string::npos);
  }
  for (auto& c : bodies) {
    EXPECT_TRUE(c->closed_by_peer(1s));
    EXPECT_EQ(status_of(c->received()), 408) << c->received();
    EXPECT_NE(c->received().find("body did not arrive"), std::string::npos);
  }
}

TEST_F(Http, HalfClosedClientGetsItsResponse) {
  {
    RawConn c(port());
    ASSERT_TRUE(
        c.send(http_post("/v1/completions", completion_body("Once upon a time", 6).dump())));
    c.shutdown_write();
    EXPECT_TRUE(c.closed_by_peer(20s));
    ASSERT_EQ(status_of(c.received()), 200) << c.received();
    const json j = json::parse(body_of(c.received()), nullptr, false);
    EXPECT_EQ(j["usage"]["completion_tokens"], 6) << c.received();
  }
  {
    json b = completion_body("Once upon a time", 6);
    b["stream"] = true;
    RawConn c(port());
    ASSERT_TRUE(c.send(http_post("/v1/completions", b.dump())));
    c.shutdown_write();
    EXPECT_TRUE(c.closed_by_peer(20s));
    EXPECT_EQ(status_of(c.received()), 200) << c.received();
    EXPECT_NE(c.received().find("data: [DONE]"), std::string::npos) << c.received();
  }
  {
    RawConn c(port());
    ASSERT_TRUE(c.send("GET /health HTTP/1.1\r\n\r\n"));
    c.shutdown_write();
    EXPECT_TRUE(c.closed_by_peer(5s));
    EXPECT_EQ(status_of(c.received()), 200);
  }
}

TEST_F(Http, ResetCancelsTheGeneration) {
  const std::string cancelled =
      "moeserve_requests_total{endpoint=\"completions\",outcome=\"cancelled\"}";
  const double before = metric(port(), cancelled);
  const double tokens_before = metric(port(), "moeserve_generation_tokens_total");
  json body = completion_body("Tell me everything you know", 200);
  body["ignore_eos"] = true;
  {
    RawConn c(port());
    ASSERT_TRUE(c.send(http_post("/v1/completions", body.dump())));
    const auto until = Clock::now() + 10s;
    while (metric(port(), "moeserve_kv_blocks_used") == 0 && Clock::now() < until)
      std::this_thread::sleep_for(5ms);
    ASSERT_GT(metric(port(), "moeserve_kv_blocks_used"), 0);
    c.reset();
  }
  EXPECT_TRUE(wait_metric(port(), cancelled, before + 1, 5s));
  EXPECT_TRUE(wait_idle(port(), 5s));
  EXPECT_LT(metric(port(), "moeserve_generation_tokens_total") - tokens_before, 200);
}

TEST_F(Http, KeepAliveAndPipelining) {
  RawConn c(port());
  ASSERT_TRUE(c.send("GET /health HTTP/1.1\r\n\r\nGET /v1/models HTTP/1.1\r\n\r\n"));
  const std::string r = c.read_until("\r\n\r\n{", 5s, 2);
  EXPECT_NE(r.find("\"status\":\"ok\""), std::string::npos) << r;
  EXPECT_TRUE(c.read_until("\"object\":\"list\"", 5s).find("\"object\":\"list\"") !=
              std::string::npos);
  // An idle kept-alive connection is closed after the idle timeout.
  EXPECT_TRUE(c.closed_by_peer(3s));
  // Expect: 100-continue is answered before the body is sent.
  RawConn e(port());
  const std::string b = completion_body("Hi", 1).dump();
  ASSERT_TRUE(e.send(post_head("/v1/completions", "Expect: 100-continue\r\nContent-Length: " +
                                                      std::to_string(b.size()) + "\r\n")));
  EXPECT_EQ(e.read_until("\r\n\r\n", 2s).rfind("HTTP/1.1 100 Continue", 0), 0u);
  ASSERT_TRUE(e.send(b));
  EXPECT_NE(e.read_until("\"usage\"", 10s).find("HTTP/1.1 200"), std::string::npos);
}

TEST(HttpCaps, ConnectionsPerClientAndInTotal) {
  server::ServerOptions so;
  so.http.max_connections = 12;
  so.http.max_connections_per_client = 6;
  TestServer s(test_engine_config(), so);
  auto wait_conns = [&](int n) {
    const auto until = Clock::now() + 5s;
    while (s.server().connections() != n && Clock::now() < until) std::this_thread::sleep_for(2ms);
    return s.server().connections() == n;
  };
  std::vector<std::unique_ptr<RawConn>> a, b;
  for (int i = 0; i < 6; ++i) a.push_back(std::make_unique<RawConn>(s.port(), "127.0.0.2"));
  ASSERT_TRUE(wait_conns(6));
  RawConn extra(s.port(), "127.0.0.2");
  EXPECT_TRUE(extra.closed_by_peer(5s));
  EXPECT_EQ(status_of(extra.received()), 503) << extra.received();
  EXPECT_EQ(get(s.port(), "/health").status, 200);         // another client is served
  ASSERT_TRUE(wait_conns(6)) << s.server().connections();  // that client has gone
  for (int i = 0; i < 6; ++i) b.push_back(std::make_unique<RawConn>(s.port(), "127.0.0.3"));
  ASSERT_TRUE(wait_conns(12)) << s.server().connections();
  RawConn over(s.port(), "127.0.0.4");
  EXPECT_TRUE(over.closed_by_peer(5s));
  EXPECT_EQ(status_of(over.received()), 503) << over.received();
  for (auto& c : a) EXPECT_FALSE(c->closed_by_peer(1ms));  // the first ones are untouched
  a.clear();
  ASSERT_TRUE(wait_conns(6));
  EXPECT_EQ(get(s.port(), "/health").status, 200);
}

class FaultyService : public engine::Service {
 public:
  explicit FaultyService(engine::Engine& e) : e_(e) {}
  engine::SubmitResult submit(std::shared_ptr<engine::Request> r, uint64_t* id,
                              std::string* error) override {
    return e_.submit(std::move(r), id, error);
  }
  void cancel(uint64_t id) override { e_.cancel(id); }
  engine::EngineStats stats() const override { return e_.stats(); }
  const engine::EngineConfig& config() const override { return e_.config(); }
  const model::ModelConfig& model_config() const override { return e_.model_config(); }
  std::string health_problem() const override {
    std::lock_guard<std::mutex> lk(mu_);
    return problem_;
  }
  void set_problem(std::string p) {
    std::lock_guard<std::mutex> lk(mu_);
    problem_ = std::move(p);
  }

 private:
  engine::Engine& e_;
  mutable std::mutex mu_;
  std::string problem_;
};

TEST(HttpHealth, ReportsTheServiceProblem) {
  FaultyService* svc = nullptr;
  TestServer s(test_engine_config(), {}, "", [&](engine::Engine& e) {
    auto f = std::make_unique<FaultyService>(e);
    svc = f.get();
    return f;
  });
  EXPECT_EQ(get(s.port(), "/health").status, 200);
  svc->set_problem("rank 1 has not answered for 5.0 s");
  const Reply r = get(s.port(), "/health");
  EXPECT_EQ(r.status, 503);
  ASSERT_TRUE(r.j.is_object()) << r.body;
  EXPECT_EQ(r.j["error"]["message"], "rank 1 has not answered for 5.0 s");
  EXPECT_EQ(r.j["error"]["type"], "server_error");
  svc->set_problem("");
  EXPECT_EQ(get(s.port(), "/health").status, 200);
}

TEST(HttpAuth, KeyIsCheckedBeforeRoutingAndExactly) {
  server::ServerOptions so;
  so.api_key = "sekret";
  TestServer s(test_engine_config(), so);
  const int p = s.port();
  // Without the key, nothing about the routes shows.
  EXPECT_EQ(get(p, "/nothing").status, 401);
  EXPECT_EQ(get(p, "/v1/chat/completions").status, 401);
  EXPECT_EQ(post(p, "/v1/models", std::string("{}")).status, 401);
  EXPECT_EQ(post(p, "/v2/anything", std::string("{}")).status, 401);
  EXPECT_EQ(get(p, "/health").status, 200);
  // With it, they do.
  const httplib::Headers ok = {{"Authorization", "Bearer sekret"}};
  EXPECT_EQ(get(p, "/nothing", ok).status, 404);
  EXPECT_EQ(get(p, "/v1/chat/completions", ok).status, 405);
  EXPECT_EQ(post(p, "/v1/models", std::string("{}"), ok).status, 405);
  EXPECT_EQ(get(p, "/v1/models", ok).status, 200);
  // Near misses.
  auto with = [&](const std::string& auth) {
    return status_of(roundtrip(
        p, "GET /v1/models HTTP/1.1\r\nConnection: close\r\nAuthorization: " + auth + "\r\n\r\n"));
  };
  EXPECT_EQ(with("Bearer sekret"), 200);
  EXPECT_EQ(with("Bearer sekret "), 401);
  EXPECT_EQ(with("Bearer sekret\t"), 401);
  EXPECT_EQ(with("Bearer  sekret"), 401);
  EXPECT_EQ(with("Bearer sekre"), 401);
  EXPECT_EQ(with("Bearer sekrett"), 401);
  EXPECT_EQ(with("bearer sekret"), 401);
  EXPECT_EQ(with(std::string("Bearer sekret\0", 14)), 400);  // a NUL is malformed HTTP
  EXPECT_EQ(with(std::string("Bearer sek\0ret", 14)), 400);
}

// stop() with every kind of connection open: a client stuck in its headers, an idle one, a
// stream and a waiting non-streamed request. It returns within a few seconds and every client
// is told.
TEST(HttpStop, EndsEveryConnectionWithinSeconds) {
  auto s = std::make_unique<TestServer>();
  const int p = s->port();
  RawConn slow(p), idle(p), stream(p), waiting(p);
  ASSERT_TRUE(slow.send("POST /v1/completions HTTP/1.1\r\nHost: x\r\n"));
  json b = completion_body("Keep going", 200);
  b["ignore_eos"] = true;
  json sb = b;
  sb["stream"] = true;
  ASSERT_TRUE(stream.send(http_post("/v1/completions", sb.dump())));
  ASSERT_NE(stream.read_until("data: {").find("200 OK"), std::string::npos);
  ASSERT_TRUE(waiting.send(http_post("/v1/completions", b.dump())));
  const auto until = Clock::now() + 10s;
  while (metric(p, "moeserve_num_requests_running") + metric(p, "moeserve_num_requests_waiting") <
             2 &&
         Clock::now() < until)
    std::this_thread::sleep_for(5ms);
  ASSERT_TRUE(s->server().connections() >= 4);

  const auto t0 = Clock::now();
  s->server().stop();
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_LT(took, 5.0);
  std::printf("stop took %.2f s\n", took);

  EXPECT_TRUE(slow.closed_by_peer(2s));
  EXPECT_EQ(status_of(slow.received()), 503) << slow.received();
  EXPECT_TRUE(idle.closed_by_peer(2s));
  EXPECT_EQ(idle.received(), "");
  EXPECT_TRUE(stream.closed_by_peer(2s));
  EXPECT_NE(stream.received().find("shutting_down"), std::string::npos) << stream.received();
  EXPECT_NE(stream.received().find("data: [DONE]"), std::string::npos);
  EXPECT_TRUE(waiting.closed_by_peer(2s));
  EXPECT_EQ(status_of(waiting.received()), 503) << waiting.received();
  EXPECT_NE(waiting.received().find("shutting_down"), std::string::npos);
  RawConn after(p);
  EXPECT_FALSE(after.ok());  // no longer listening
  for (int i = 0; i < 500 && s->engine().stats().kv_blocks_used > 0; ++i)
    std::this_thread::sleep_for(10ms);
  EXPECT_EQ(s->engine().stats().kv_blocks_used, 0);
  s.reset();
}

// After large requests the process's memory goes back to about where it was.
TEST(HttpMemory, LargeRequestsHandTheirMemoryBack) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "ASan's allocator keeps freed memory in quarantine";
#else
  auto rss_mb = [] {  // anonymous memory: the heap (file pages, the model's, do not count)
    std::ifstream in("/proc/self/status");
    std::string line;
    while (std::getline(in, line))
      if (line.rfind("RssAnon:", 0) == 0) return std::atof(line.c_str() + 8) / 1024.0;
    return 0.0;
  };
  TestServer s;
  // Raw connections on one prepared request, so that the client side of this process allocates
  // next to nothing: what the RSS shows is the server's.
  const std::string req =
      http_post("/v1/completions",
                "{\"prompt\":\"" + std::string((4u << 20) - 64, 'a') + "\",\"max_tokens\":\"x\"}",
                "Connection: close\r\n");
  auto burst = [&] {
    std::vector<std::thread> t;
    for (int i = 0; i < 12; ++i)
      t.emplace_back([&] {
        RawConn c(s.port());
        c.send(req);
        c.closed_by_peer(30s);
        EXPECT_EQ(c.received().rfind("HTTP/1.1 400", 0), 0u) << c.received().substr(0, 100);
      });
    for (auto& th : t) th.join();
  };
  burst();  // the first burst creates the threads' arenas and what stays allocated
  const double base = rss_mb();
  double peak = 0;
  for (int i = 0; i < 3; ++i) {
    burst();
    peak = std::max(peak, rss_mb());
  }
  const double after = rss_mb();
  std::printf(
      "RSS: %.0f MB before, %.0f MB at the peak, %.0f MB after bursts of 12 x 4 MiB requests\n",
      base, peak, after);
  EXPECT_LT(after - base, 24.0);
#endif
}

// One log line per request (client address and port included on kept-alive connections too),
// and the periodic throughput line while requests ran.
TEST(HttpLog, RequestLinesAndStatsLine) {
  server::ServerOptions so;
  so.log_requests = true;
  so.stats_interval_s = 0.2;
  TestServer s(test_engine_config(), so);
  ::testing::internal::CaptureStderr();
  {
    auto c = client(s.port());
    c.set_keep_alive(true);
    for (int i = 0; i < 3; ++i)
      EXPECT_EQ(
          c.Post("/v1/completions", completion_body("Hello", 3).dump(), "application/json")->status,
          200);
  }
  EXPECT_EQ(get(s.port(), "/nothing").status, 404);
  std::this_thread::sleep_for(1s);  // five stats intervals
  const std::string err = ::testing::internal::GetCapturedStderr();
  int generation_lines = 0;
  for (size_t p = err.find("moeserve: 127.0.0.1:"); p != std::string::npos;
       p = err.find("moeserve: 127.0.0.1:", p + 1)) {
    const std::string line = err.substr(p, err.find('\n', p) - p);
    if (line.find("\"POST /v1/completions\" 200") != std::string::npos) {
      ++generation_lines;
      EXPECT_NE(line.find("prompt 2 + completion 3 tokens"), std::string::npos) << line;
    }
  }
  EXPECT_EQ(generation_lines, 3) << err;
  EXPECT_NE(err.find("\"GET /nothing\" 404"), std::string::npos) << err;
  // The stats lines account for every request, however the intervals fell.
  int finished = 0;
  for (size_t p = err.find(" requests finished, prompt "); p != std::string::npos;
       p = err.find(" requests finished, prompt ", p + 1)) {
    const size_t start = err.rfind("moeserve: ", p) + 10;
    finished += std::atoi(err.c_str() + start);
  }
  EXPECT_EQ(finished, 3) << err;
  EXPECT_NE(err.find("tokens/s"), std::string::npos) << err;
}

// `moeserve serve` as a process: a busy port fails before the model loads; a request is logged;
// SIGTERM with a slow client connected ends the process within seconds and the client gets 503.
TEST(HttpProcess, ServeLogsRequestsAndStopsOnSigterm) {
  ASSERT_TRUE(std::filesystem::exists(MOESERVE_BINARY)) << "build the moeserve target first";
  TempDir tmp;
  auto spawn = [&](const std::vector<std::string>& args, const std::string& tag) {
    std::fflush(stdout);  // else the child writes what is buffered a second time
    std::fflush(stderr);
    const pid_t pid = fork();
    if (pid == 0) {
      freopen((tmp / (tag + ".out")).c_str(), "w", stdout);
      freopen((tmp / (tag + ".err")).c_str(), "w", stderr);
      std::vector<char*> argv;
      argv.push_back(const_cast<char*>(MOESERVE_BINARY));
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      execv(MOESERVE_BINARY, argv.data());
      _exit(127);
    }
    return pid;
  };
  auto slurp = [&](const std::string& f) {
    std::ifstream in(tmp / f);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  auto wait_exit = [](pid_t pid, std::chrono::milliseconds timeout) {
    const auto until = Clock::now() + timeout;
    int st = 0;
    while (Clock::now() < until) {
      if (waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
      std::this_thread::sleep_for(10ms);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    return -1;
  };
  const std::vector<std::string> common = {"serve",
                                           "--model",
                                           demo_model_dir(),
                                           "--served-model-name",
                                           "demo",
                                           "--max-model-len",
                                           "64",
                                           "--kv-cache-mb",
                                           "8",
                                           "--threads",
                                           "1"};
  std::vector<std::string> a = common;
  {
    std::ofstream key(tmp / "key");
    key << "sekret\n";
  }
  a.insert(a.end(), {"--port", "0", "--api-key-file", tmp / "key"});
  const pid_t pid = spawn(a, "a");
  int port = 0;
  const auto until = Clock::now() + 60s;
  while (port == 0 && Clock::now() < until) {
    const std::string out = slurp("a.out");
    const size_t at = out.find("http://127.0.0.1:");
    if (at != std::string::npos) port = std::atoi(out.c_str() + at + 17);
    std::this_thread::sleep_for(20ms);
  }
  ASSERT_GT(port, 0) << slurp("a.err");

  // The same port again: refused at once, before loading anything.
  std::vector<std::string> b = common;
  b.insert(b.end(), {"--port", std::to_string(port)});
  const auto t_busy = Clock::now();
  EXPECT_EQ(wait_exit(spawn(b, "b"), 30s), 1);
  const std::string berr = slurp("b.err");
  EXPECT_NE(berr.find("cannot listen on 127.0.0.1:" + std::to_string(port)), std::string::npos)
      << berr;
  EXPECT_EQ(berr.find("loading weights"), std::string::npos) << berr;
  std::printf("busy port reported after %.2f s\n",
              std::chrono::duration<double>(Clock::now() - t_busy).count());

  EXPECT_EQ(post(port, "/v1/completions", completion_body("Hello", 2)).status, 401);
  EXPECT_EQ(post(port, "/v1/completions", completion_body("Hello", 2),
                 {{"Authorization", "Bearer sekret"}})
                .status,
            200);
  RawConn slow(port);
  ASSERT_TRUE(slow.send("POST /v1/completions HTTP/1.1\r\nHost: x\r\n"));
  // The request line is logged once the response is out.
  const auto log_until = Clock::now() + 5s;
  while (slurp("a.err").find("\"POST /v1/completions\" 200") == std::string::npos &&
         Clock::now() < log_until)
    std::this_thread::sleep_for(10ms);
  const std::string err = slurp("a.err");
  EXPECT_NE(err.find("\"POST /v1/completions\" 200"), std::string::npos) << err;
  EXPECT_NE(err.find("prompt "), std::string::npos) << err;
  EXPECT_NE(err.find("loading weights"), std::string::npos) << err;

  std::vector<std::string> c = common;
  c.insert(c.end(), {"--port", "0"});
  // A key file that cannot be read, or a key with a space: one line, at once.
  std::vector<std::string> d = common;
  d.insert(d.end(), {"--port", "0", "--api-key-file", tmp / "missing"});
  EXPECT_EQ(wait_exit(spawn(d, "d"), 30s), 1);
  EXPECT_NE(slurp("d.err").find("--api-key-file"), std::string::npos) << slurp("d.err");
  setenv("MOESERVE_API_KEY", "two words", 1);
  EXPECT_EQ(wait_exit(spawn(c, "e"), 30s), 1);
  unsetenv("MOESERVE_API_KEY");
  EXPECT_NE(slurp("e.err").find("MOESERVE_API_KEY holds a space"), std::string::npos)
      << slurp("e.err");

  // A signal while the model loads ends the process at once.
  const pid_t early = spawn(c, "c");
  std::this_thread::sleep_for(50ms);
  const auto t_early = Clock::now();
  kill(early, SIGTERM);
  const int early_status = wait_exit(early, 10s);
  EXPECT_TRUE(early_status == 128 + SIGTERM || early_status == 128) << early_status;
  EXPECT_LT(Clock::now() - t_early, 5s);

  const auto t0 = Clock::now();
  kill(pid, SIGTERM);
  EXPECT_EQ(wait_exit(pid, 10s), 0) << slurp("a.err");
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_LT(took, 5.0);
  EXPECT_TRUE(slow.closed_by_peer(1s));
  EXPECT_EQ(status_of(slow.received()), 503) << slow.received();
}

}  // namespace
