// http::Server alone, with handlers of the test's own: a write to a client that does not read
// gives up at the write deadline, and stop() ends a handler stuck writing to such a client
// within its stop timeout.
#include <gtest/gtest.h>

#include <atomic>

#include "server/http_server.h"
#include "server_test_util.h"

using namespace moeserve;
using namespace moeserve::testing;
using namespace std::chrono_literals;

namespace {

using Clock = std::chrono::steady_clock;

// A server whose handler streams 64 KiB pieces until a write fails, whatever else happens.
struct FloodServer {
  explicit FloodServer(server::http::Options o) {
    server::http::Callbacks cb;
    cb.handle = [this](server::http::Exchange& ex) {
      ++started;
      const std::string piece(64 << 10, 'x');
      if (ex.begin_stream(200, "text/plain"))
        while (ex.write(piece)) ++pieces;
      write_failed_at = Clock::now();
      ++ended;
    };
    http = std::make_unique<server::http::Server>(o, std::move(cb));
    http->listen(server::http::Listener::open("127.0.0.1", 0));
    thread = std::thread([this] { http->run(); });
  }
  ~FloodServer() {
    http->stop();
    thread.join();
  }
  // Waits until the handler has stopped making progress (the client's window is full).
  bool wait_blocked(std::chrono::milliseconds timeout) {
    const auto until = Clock::now() + timeout;
    while (started == 0 && Clock::now() < until) std::this_thread::sleep_for(5ms);
    int last = -1;
    while (Clock::now() < until) {
      const int now = pieces;
      if (now == last && now > 0) return true;
      last = now;
      std::this_thread::sleep_for(100ms);
    }
    return false;
  }

  std::unique_ptr<server::http::Server> http;
  std::thread thread;
  std::atomic<int> started{0}, ended{0}, pieces{0};
  Clock::time_point write_failed_at;
};

TEST(HttpServer, AWriteToAClientThatDoesNotReadGivesUpAtTheDeadline) {
  server::http::Options o;
  o.write_timeout = 300ms;
  FloodServer s(o);
  RawConn c(s.http->port());
  ASSERT_TRUE(c.send("GET /flood HTTP/1.1\r\n\r\n"));  // and never read
  ASSERT_TRUE(s.wait_blocked(10s));
  const auto blocked = Clock::now();
  const auto until = blocked + 5s;
  while (s.ended == 0 && Clock::now() < until) std::this_thread::sleep_for(5ms);
  ASSERT_EQ(s.ended, 1);
  EXPECT_LT(Clock::now() - blocked, 2s);
  // The connection is gone from the server.
  const auto until2 = Clock::now() + 5s;
  while (s.http->connections() != 0 && Clock::now() < until2) std::this_thread::sleep_for(5ms);
  EXPECT_EQ(s.http->connections(), 0);
}

TEST(HttpServer, StopEndsAHandlerBlockedOnAClientThatDoesNotRead) {
  server::http::Options o;
  o.write_timeout = 60s;  // the deadline would come far too late
  o.stop_timeout = 500ms;
  FloodServer s(o);
  RawConn c(s.http->port());
  ASSERT_TRUE(c.send("GET /flood HTTP/1.1\r\n\r\n"));
  ASSERT_TRUE(s.wait_blocked(10s));
  const auto t0 = Clock::now();
  s.http->stop();
  const auto took = Clock::now() - t0;
  EXPECT_LT(took, 2s);
  EXPECT_EQ(s.ended, 1);
  std::printf("stop with a blocked writer took %.2f s\n",
              std::chrono::duration<double>(took).count());
}

}  // namespace
