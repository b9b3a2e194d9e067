// Helpers of the server tests: a random-weight demo model (DeepSeek-V3 architecture and
// tokenizer) written once per process, in-process servers on free loopback ports, HTTP and SSE
// helpers, and /metrics readers.
#pragma once

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#include "httplib_client.h"

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "../test_util.h"
#include "core/thread_pool.h"
#include "engine/engine.h"
#include "model/init_model.h"
#include "model/model.h"
#include "server/server.h"

namespace moeserve::testing {

using json = nlohmann::json;

// The demo model, created on first use and removed when the process ends.
inline const std::string& demo_model_dir() {
  static TempDir dir;
  static std::once_flag once;
  std::call_once(once, [] {
    model::InitOptions o;
    o.seed = 11;
    model::write_random_model(model::preset_config("demo"), dir.path(), o);
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
      std::filesystem::copy_file(source_dir() + "/assets/deepseek-v3/" + f, dir / f);
  });
  return dir.path();
}

inline const tokenizer::Tokenizer& demo_tokenizer() {
  // The same files the demo model gets, without writing the model.
  static tokenizer::Tokenizer tok =
      tokenizer::Tokenizer::load(source_dir() + "/assets/deepseek-v3");
  return tok;
}

inline engine::EngineConfig test_engine_config() {
  engine::EngineConfig ec;
  ec.max_num_seqs = 16;
  ec.max_model_len = 256;
  ec.kv_cache_mb = 32;
  ec.max_batch_tokens = 256;
  ec.max_waiting = 64;
  return ec;
}

// A model, an engine and a server on 127.0.0.1:<free port>, torn down in order.
class TestServer {
 public:
  // chat_template: the source of a template to use instead of the model's.
  // wrap: a Service around the engine to serve instead of the engine itself.
  explicit TestServer(
      engine::EngineConfig ec = test_engine_config(), server::ServerOptions so = {},
      const std::string& chat_template = "",
      std::function<std::unique_ptr<engine::Service>(engine::Engine&)> wrap = nullptr) {
    pool_ = std::make_unique<ThreadPool>(2);
    model_ = std::make_unique<model::Model>(demo_model_dir(), *pool_);
    engine_ = std::make_unique<engine::Engine>(*model_, ec);
    if (wrap) wrapper_ = wrap(*engine_);
    const auto& tok = demo_tokenizer();
    auto chat = chat_template.empty() ? server::ChatFormat::load(demo_model_dir(), "", tok)
                                      : server::ChatFormat::from_source(chat_template, tok);
    so.host = "127.0.0.1";
    so.port = 0;
    if (so.served_model_name.empty()) so.served_model_name = "demo";
    server_ = std::make_unique<server::Server>(
        wrapper_ ? *wrapper_ : static_cast<engine::Service&>(*engine_), tok, std::move(chat),
        server::default_eos_ids(tok, model_->config().eos_token_id), so);
    server_->start();
  }
  ~TestServer() {
    server_.reset();  // stops
    wrapper_.reset();
    engine_.reset();
  }
  int port() const { return server_->port(); }
  server::Server& server() { return *server_; }
  engine::Engine& engine() { return *engine_; }

 private:
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<model::Model> model_;
  std::unique_ptr<engine::Engine> engine_;
  std::unique_ptr<engine::Service> wrapper_;
  std::unique_ptr<server::Server> server_;
};

struct Reply {
  int status = 0;  // 0: no response
  std::string body;
  std::string content_type;
  json j;  // body parsed as JSON (discarded when it is not)
};

inline Reply to_reply(const httplib::Result& r) {
  Reply out;
  if (!r) return out;
  out.status = r->status;
  out.body = r->body;
  out.content_type = r->get_header_value("Content-Type");
  out.j = json::parse(out.body, nullptr, false);
  return out;
}

inline httplib::Client client(int port) {
  httplib::Client c("127.0.0.1", port);
  c.set_read_timeout(60);
  c.set_write_timeout(60);
  c.set_tcp_nodelay(true);  // else headers and body wait for a delayed ACK
  return c;
}

inline Reply post(int port, const std::string& path, const std::string& body,
                  const httplib::Headers& headers = {}) {
  auto c = client(port);
  return to_reply(c.Post(path.c_str(), headers, body, "application/json"));
}
inline Reply post(int port, const std::string& path, const json& body,
                  const httplib::Headers& headers = {}) {
  return post(port, path, body.dump(), headers);
}
inline Reply get(int port, const std::string& path, const httplib::Headers& headers = {}) {
  auto c = client(port);
  return to_reply(c.Get(path.c_str(), headers));
}

// The events of an SSE body: each "data: X" payload, in order ("[DONE]" included).
inline std::vector<std::string> sse_payloads(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) end = body.size();
    std::string ev = body.substr(pos, end - pos);
    if (ev.rfind("data: ", 0) == 0)
      out.push_back(ev.substr(6));
    else if (!ev.empty())
      out.push_back("<malformed: " + ev + ">");
    pos = end + 2;
  }
  return out;
}

// A sample of a /metrics page: `name` or `name{labels}` exactly as written; NaN when absent.
inline double metric_in(const std::string& page, const std::string& series) {
  size_t pos = 0;
  while (pos < page.size()) {
    size_t end = page.find('\n', pos);
    if (end == std::string::npos) end = page.size();
    const std::string line = page.substr(pos, end - pos);
    if (line.size() > series.size() && line.compare(0, series.size(), series) == 0 &&
        line[series.size()] == ' ')
      return std::stod(line.substr(series.size() + 1));
    pos = end + 1;
  }
  return std::nan("");
}
inline double metric(int port, const std::string& series) {
  return metric_in(get(port, "/metrics").body, series);
}

// Waits until the engine holds no request and no KV block; false after `timeout`.
inline bool wait_idle(int port, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (metric(port, "moeserve_kv_blocks_used") == 0 &&
        metric(port, "moeserve_num_requests_running") == 0 &&
        metric(port, "moeserve_num_requests_waiting") == 0)
      return true;
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// One server shared by the tests of a suite. The suite's SetUpTestSuite starts it (sets
// server_); every test must leave no request and no KV block behind.
template <class Suite>
class SharedServerTest : public ::testing::Test {
 protected:
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void TearDown() override { EXPECT_TRUE(wait_idle(port())) << "KV blocks were not all freed"; }
  static int port() { return server_->port(); }
  static inline TestServer* server_ = nullptr;
};

// Waits until `series` reads `value` on /metrics; false after `timeout`.
inline bool wait_metric(int port, const std::string& series, double value,
                        std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (metric(port, series) != value) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

// A plain TCP connection, for what an HTTP client library will not do: malformed requests,
// and clients that vanish in the middle of a response. `from`: the local address to connect
// from (any of 127.0.0.0/8), so that tests can play several clients.
class RawConn {
 public:
  explicit RawConn(int port, const char* from = nullptr) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (from) {
      sockaddr_in l{};
      l.sin_family = AF_INET;
      ::inet_pton(AF_INET, from, &l.sin_addr);
      if (::bind(fd_, reinterpret_cast<sockaddr*>(&l), sizeof(l)) != 0) close();
    }
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd_ >= 0 && ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) close();
  }
  // Sends FIN: no more requests, the responses are still read.
  void shutdown_write() {
    if (fd_ >= 0) ::shutdown(fd_, SHUT_WR);
  }
  // Closes with a reset (RST) instead of a FIN.
  void reset() {
    if (fd_ < 0) return;
    linger l{1, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    close();
  }
  // True when the server has closed the connection (EOF or reset) within `timeout`; what
  // arrived before is kept for read_until / received.
  bool closed_by_peer(std::chrono::milliseconds timeout) {
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (fd_ >= 0) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          until - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
      char tmp[4096];
      const ssize_t n = ::recv(fd_, tmp, sizeof(tmp), 0);
      if (n <= 0) return true;
      buf_.append(tmp, static_cast<size_t>(n));
    }
    return true;
  }
  const std::string& received() const { return buf_; }
  int fd() const { return fd_; }
  ~RawConn() { close(); }
  bool ok() const { return fd_ >= 0; }
  bool send(const std::string& data) {
    size_t off = 0;
    while (fd_ >= 0 && off < data.size()) {
      const ssize_t n = ::send(fd_, data.data() + off, data.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += static_cast<size_t>(n);
    }
    return fd_ >= 0;
  }
  // Reads until `marker` has arrived `times` times (returns everything read so far), the peer
  // closes, or timeout.
  std::string read_until(const std::string& marker,
                         std::chrono::milliseconds timeout = std::chrono::seconds(20),
                         int times = 1) {
    const auto until = std::chrono::steady_clock::now() + timeout;
    auto count = [&] {
      int n = 0;
      for (size_t p = buf_.find(marker); p != std::string::npos; p = buf_.find(marker, p + 1)) ++n;
      return n;
    };
    while (fd_ >= 0 && count() < times) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          until - std::chrono::steady_clock::now());
      if (left.count() <= 0) break;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
      char tmp[4096];
      const ssize_t n = ::recv(fd_, tmp, sizeof(tmp), 0);
      if (n <= 0) break;
      buf_.append(tmp, static_cast<size_t>(n));
    }
    return buf_;
  }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
  std::string buf_;
};

inline std::string http_post(const std::string& path, const std::string& body,
                             const std::string& extra_headers = "") {
  return "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" +
         extra_headers + "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}

inline json chat_body(const std::string& text, int max_tokens = 8) {
  return {{"model", "demo"},
          {"messages", json::array({{{"role", "user"}, {"content", text}}})},
          {"max_tokens", max_tokens},
          {"temperature", 0}};
}

inline json completion_body(const std::string& prompt, int max_tokens = 8) {
  return {{"model", "demo"}, {"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0}};
}

}  // namespace moeserve::testing
