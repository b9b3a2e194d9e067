// HTTP fuzzing: many generated malformed requests (seeded, bounded in count and time) on raw
// connections, with the cases hardening was made for among them (compressed bodies, chunked in
// any case, no length, header floods, long lines, Range, smuggling pairs, control characters).
// Every answer is a well-formed HTTP response (or a close), never a 500; /health keeps answering;
// afterwards no connection, descriptor or KV block is left behind.
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <random>

#include "server_test_util.h"

using namespace moeserve;
using namespace moeserve::testing;
using namespace std::chrono_literals;

namespace {

using Clock = std::chrono::steady_clock;

int open_fds() {
  int n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

// The status code of a raw response after any "100 Continue": 0 for no response at all, -1 for
// one that is not a well-formed status line.
int parsed_status(std::string_view r) {
  while (r.rfind("HTTP/1.1 100 ", 0) == 0) {
    const size_t end = r.find("\r\n\r\n");
    if (end == std::string_view::npos) return -1;
    r.remove_prefix(end + 4);
  }
  if (r.empty()) return 0;
  if (r.size() < 12 || r.rfind("HTTP/1.1 ", 0) != 0) return -1;
  for (int i = 9; i < 12; ++i)
    if (r[i] < '0' || r[i] > '9') return -1;
  return std::atoi(std::string(r.substr(9, 3)).c_str());
}

class Gen {
 public:
  explicit Gen(uint32_t seed) : rng_(seed) {}

  std::string request() {
    const bool lf = pick(10) == 0;  // bare LF line ends now and then
    const std::string eol = lf ? "\n" : "\r\n";
    std::string body = this->body();
    const bool chunk = pick(4) == 0;
    std::string r = method() + " " + target() + " " + version() + eol;
    std::vector<std::string> hs;
    if (pick(3) != 0) hs.push_back("Host: x");
    if (chunk) {
      static const char* te[] = {"chunked",       "Chunked",          "CHUNKED",  " chunked ",
                                 "gzip, chunked", "chunked, chunked", "identity", "xchunked"};
      hs.push_back("Transfer-Encoding: " + std::string(te[pick(std::size(te))]));
      if (pick(8) == 0) hs.push_back("Content-Length: " + std::to_string(body.size()));
      body = chunked(body);
    } else {
      switch (pick(8)) {
        case 0:
          break;  // no length
        case 1:
          hs.push_back("Content-Length: " + std::to_string(pick(1 << 24)));
          break;
        case 2:
          hs.push_back("Content-Length: " + std::to_string(body.size()));
          hs.push_back("Content-Length: " + std::to_string(body.size() + 1));
          break;
        case 3:
          hs.push_back(std::string("Content-Length: ") + (pick(2)   ? "-1"
                                                          : pick(2) ? "0x10"
                                                                    : "99999999999999999999999"));
          break;
        default:
          hs.push_back("Content-Length: " + std::to_string(body.size()));
      }
    }
    const int extras = static_cast<int>(pick(6));
    for (int i = 0; i < extras; ++i) hs.push_back(header());
    if (pick(40) == 0)  // a flood
      for (int i = 0; i < 150 + static_cast<int>(pick(3000)); ++i)
        hs.push_back("X-F" + std::to_string(i) + ": v");
    std::shuffle(hs.begin(), hs.end(), rng_);
    for (const auto& h : hs) r += h + eol;
    r += eol + body;
    switch (pick(10)) {  // damage
      case 0:
        r = r.substr(0, pick(r.size() + 1));
        break;
      case 1:
        if (!r.empty()) r[pick(r.size())] = static_cast<char>(rng_());
        break;
      case 2:
        r.insert(pick(r.size() + 1), bytes(1 + pick(8)));
        break;
      default:
        break;
    }
    return r;
  }

  size_t pick(size_t n) { return n == 0 ? 0 : rng_() % n; }

 private:
  std::string bytes(size_t n) {
    std::string s(n, '\0');
    for (auto& c : s) c = static_cast<char>(rng_());
    return s;
  }
  std::string method() {
    static const char* m[] = {"GET",    "POST",    "POST", "POST", "HEAD", "PUT",
                              "DELETE", "OPTIONS", "get",  "G ET", "",     "PATCH"};
    return pick(30) == 0 ? bytes(1 + pick(6)) : m[pick(std::size(m))];
  }
  std::string target() {
    static const char* t[] = {"/health",
                              "/metrics",
                              "/v1/models",
                              "/v1/models/demo",
                              "/v1/models/%64emo",
                              "/v1/models/%ff%00%",
                              "/v1/models/",
                              "/v1/completions",
                              "/v1/completions",
                              "/v1/chat/completions",
                              "/v1/chat/completions?x=1",
                              "/nothing",
                              "*",
                              "http://x/health",
                              "/%00%ff",
                              ""};
    if (pick(25) == 0) return "/" + std::string(1000 + pick(20000), 'a');
    return t[pick(std::size(t))];
  }
  std::string version() {
    static const char* v[] = {"HTTP/1.1",  "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0",
                              "HTTP/1.1x", "http/1.1", "HTTP/1.",  ""};
    return v[pick(std::size(v))];
  }
  std::string header() {
    const size_t kind = pick(14);
    if (kind >= 5 && kind <= 9 && pick(3) != 0) return "Accept: */*";  // fewer broken lines
    switch (kind) {
      case 0:
        return std::string("Content-Encoding: ") + (pick(2) ? "gzip" : pick(2) ? "br" : "identity");
      case 1: {
        std::string r = "Range: bytes=";
        for (int i = 0, n = 1 + static_cast<int>(pick(1000)); i < n; ++i) r += "0-,";
        return r + "0-";
      }
      case 2:
        return std::string("Expect: ") + (pick(2) ? "100-continue" : "202-accepted");
      case 3:
        return std::string("Connection: ") + (pick(2) ? "close" : pick(2) ? "keep-alive" : "x, y");
      case 4:
        return "X-Long: " + std::string(pick(20000), 'x');
      case 5:
        return "NoColonHere";
      case 6:
        return " folded: line";
      case 7:
        return "X-Ctl: a" + std::string(1, static_cast<char>(pick(32))) + "b";
      case 8:
        return "Bad Name: v";
      case 9:
        return ": empty name";
      case 10:
        return "Authorization: Bearer " + bytes(pick(10));
      case 11:
        return "X-Bytes: " + bytes(pick(40));
      default:
        return "Content-Type: application/json";
    }
  }
  std::string body() {
    switch (pick(6)) {
      case 0:
        return "";
      case 1:
        return bytes(pick(300));
      case 2:
        return "{\"prompt\":\"" + std::string(pick(3000), 'a') + "\",\"max_tokens\":\"x\"}";
      default: {
        const bool chat = pick(2) == 0;
        json b = chat ? chat_body("fuzz", 1) : completion_body("fuzz", 1);
        if (pick(4) == 0) b["stream"] = true;
        return b.dump();
      }
    }
  }
  std::string chunked(const std::string& body) {
    std::string out;
    size_t i = 0;
    while (i < body.size()) {
      const size_t n = std::min(body.size() - i, 1 + pick(64));
      char size[32];
      std::snprintf(size, sizeof(size), pick(2) ? "%zx" : "%zX", n);
      out += size;
      if (pick(6) == 0) out += ";ext=" + std::to_string(pick(100));
      if (pick(30) == 0) out += "zz";  // a bad size
      out += "\r\n" + body.substr(i, n) + (pick(30) == 0 ? "" : "\r\n");
      i += n;
    }
    out += "0\r\n";
    if (pick(5) == 0) out += "X-Trailer: t\r\n";
    if (pick(10) == 0) out += "7FFFFFFFFFFFFF\r\n";  // a size over every limit
    return out + "\r\n";
  }

  std::mt19937 rng_;
};

TEST(HttpFuzz, MalformedRequestsNeverBreakTheServer) {
  engine::EngineConfig ec = test_engine_config();
  ec.max_model_len = 48;
  server::ServerOptions so;
  so.http.header_timeout = 800ms;
  so.http.body_timeout = 800ms;
  so.http.idle_timeout = 300ms;
  so.http.linger_timeout = 300ms;
  TestServer s(ec, so);
  const int port = s.port();
  ASSERT_EQ(get(port, "/health").status, 200);
  auto settle = [&] {  // until every connection the server had is gone
    const auto until = Clock::now() + 5s;
    while (s.server().connections() != 0 && Clock::now() < until) std::this_thread::sleep_for(5ms);
    return s.server().connections() == 0;
  };
  ASSERT_TRUE(settle());
  const int fds_before = open_fds();

  constexpr int kThreads = 8, kPerThread = 150;
  const auto budget = Clock::now() + 60s;
  std::mutex mu;
  std::map<int, int> statuses;
  std::vector<std::string> bad;
  std::atomic<int> sent{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      Gen g(1600 + t);
      for (int i = 0; i < kPerThread && Clock::now() < budget; ++i) {
        const std::string req = g.request();
        RawConn c(port);
        if (!c.ok()) {
          std::lock_guard<std::mutex> lk(mu);
          bad.push_back("cannot connect");
          continue;
        }
        c.send(req);
        if (g.pick(8) != 0) c.shutdown_write();  // mostly: no more is coming
        c.closed_by_peer(5s);
        const int st = parsed_status(c.received());
        ++sent;
        std::lock_guard<std::mutex> lk(mu);
        ++statuses[st];
        if (st < 0 || (st >= 500 && st != 501 && st != 503 && st != 505))
          bad.push_back(std::to_string(st) + " for " + req.substr(0, 200) + " -> " +
                        c.received().substr(0, 200));
      }
    });
  // /health answers all along.
  while (sent < kThreads * kPerThread && Clock::now() < budget) {
    const auto h0 = Clock::now();
    EXPECT_EQ(get(port, "/health").status, 200);
    EXPECT_LT(Clock::now() - h0, 1s);
    std::this_thread::sleep_for(100ms);
  }
  for (auto& th : threads) th.join();

  std::string summary;
  for (const auto& [st, n] : statuses)
    summary += " " + std::to_string(st) + "x" + std::to_string(n);
  std::printf("http fuzz: %d requests:%s\n", sent.load(), summary.c_str());
  EXPECT_GE(sent.load(), kThreads * kPerThread / 2);
  for (const auto& b : bad) ADD_FAILURE() << b;
  for (int st : {200, 400, 404, 411, 415, 431})
    EXPECT_GT(statuses[st], 0) << "no request got " << st;

  // Nothing left behind.
  EXPECT_EQ(get(port, "/health").status, 200);
  EXPECT_TRUE(settle()) << s.server().connections() << " connections still open";
  const auto until = Clock::now() + 5s;
  while (open_fds() != fds_before && Clock::now() < until) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(open_fds(), fds_before);
  EXPECT_TRUE(wait_idle(port));
}

}  // namespace
