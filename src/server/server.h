// moeserve's OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models,
// /health and /metrics in front of one engine::Service (one process, or a cluster of ranks under
// mpirun), on the HTTP/1.1 server of http_server.h.
//
// Threads: the HTTP event thread reads requests; a generation request holds a worker while it
// waits for tokens (see session.h), so the pool is sized for every request the engine can hold
// (running + waiting) plus spare ones. /health and /metrics run on workers of their own.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "engine/json_grammar.h"
#include "server/chat_format.h"
#include "server/metrics.h"
#include "server/protocol.h"
#include "tokenizer/tokenizer.h"

#include "server/http_server.h"

namespace moeserve::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                   // 0: any free port (see Server::port())
  std::string api_key;               // "": no authentication
  std::string served_model_name;     // the name clients put in "model"
  size_t max_body_bytes = 4u << 20;  // larger bodies get 413
  int http_threads = 0;              // 0: engine's max_num_seqs + max_waiting + 8
  ProtocolLimits limits;
  // The HTTP side's limits and deadlines (max_body_bytes and http_threads above override its
  // max_body_bytes and workers). max_connections 0: 1024 or twice the workers, whichever is
  // more, and less when the process may open fewer files; max_connections_per_client 0: a
  // quarter of max_connections.
  http::Options http;
  std::string precision = "exact";  // the products' precision (--precision), for /metrics
  bool log_requests = false;        // one line per request on stderr
  double stats_interval_s = 0;      // > 0: a throughput line on stderr this often, while busy
};

// What request handlers share. Immutable after construction except the metrics and `stopping`.
struct ServerContext {
  ServerContext(engine::Service& e, tokenizer::Tokenizer t, std::optional<ChatFormat> c,
                ServerOptions o, std::vector<int32_t> eos)
      : engine(e),
        tok(std::move(t)),
        chat(std::move(c)),
        opt(std::move(o)),
        eos_ids(std::move(eos)),
        started(std::chrono::duration_cast<std::chrono::seconds>(
                    std::chrono::system_clock::now().time_since_epoch())
                    .count()) {}

  engine::Service& engine;
  tokenizer::Tokenizer tok;
  std::optional<ChatFormat> chat;  // none: /v1/chat/completions answers 400
  ServerOptions opt;
  std::vector<int32_t> eos_ids;  // end generation unless the request says ignore_eos
  int64_t started = 0;           // unix seconds, for /v1/models
  Metrics metrics;
  std::atomic<bool> stopping{false};

  // The vocabulary of structured output, built on first use.
  std::shared_ptr<const engine::TokenTrie> token_trie();

 private:
  std::once_flag trie_once_;
  std::shared_ptr<const engine::TokenTrie> trie_;
};

class Server {
 public:
  // eos_ids: the tokens that end a turn (eos, chat end-of-turn tokens).
  Server(engine::Service& engine, tokenizer::Tokenizer tok, std::optional<ChatFormat> chat,
         std::vector<int32_t> eos_ids, ServerOptions opt);
  ~Server();  // stops

  // Binds the listening socket; throws moeserve::Error when it cannot. Returns the port.
  int bind();
  // Uses a socket opened before (http::Listener::open, e.g. before loading the model).
  int bind(http::Listener l);
  // Serves until stop() (blocking). bind() first.
  void run();
  // bind() and run() on a background thread; returns once it accepts connections.
  void start();
  // Stops accepting, ends in-flight requests (cancelling their generation; waiting non-streamed
  // ones get 503, streams an error event), answers 503 to requests still being read, and waits
  // for the workers: a few seconds at most (ServerOptions::http.stop_timeout, then sockets are
  // shut). Safe from any thread (not from a signal handler), idempotent.
  void stop();

  int connections() const { return http_->connections(); }  // open HTTP connections

  int port() const { return port_; }
  std::string url() const;
  ServerContext& context() { return *ctx_; }

 private:
  void handle(http::Exchange& ex);
  void request_done(const http::Request& req, int status, double seconds, const std::string& note);
  void stats_loop();

  std::unique_ptr<ServerContext> ctx_;
  std::unique_ptr<http::Server> http_;
  std::thread thread_, stats_thread_;
  int port_ = -1;
  std::atomic<bool> stopped_{false};
  std::mutex stats_mu_, join_mu_;
  std::condition_variable stats_cv_;
  std::atomic<int64_t> finished_requests_{0};
};

// The eos token of the tokenizer and of the model, and the end-of-turn tokens of well-known
// chat formats that the vocabulary has as special tokens.
std::vector<int32_t> default_eos_ids(const tokenizer::Tokenizer& tok, int64_t model_eos);

}  // namespace moeserve::server
