// moeserve's OpenAI-compatible HTTP server (cpp-httplib): /v1/chat/completions,
// /v1/completions, /v1/models, /health and /metrics in front of one engine::Service (one process,
// or a cluster of ranks under mpirun).
//
// Threads: httplib runs each connection on a worker of its pool; a generation request holds its
// worker while it waits for tokens (see session.h), so the pool is sized for every request the
// engine can hold (running + waiting) plus spare ones for /health and /metrics.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "server/chat_format.h"
#include "server/metrics.h"
#include "server/protocol.h"
#include "tokenizer/tokenizer.h"

namespace httplib {
class Server;
}

namespace moeserve::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                   // 0: any free port (see Server::port())
  std::string api_key;               // "": no authentication
  std::string served_model_name;     // the name clients put in "model"
  size_t max_body_bytes = 4u << 20;  // larger bodies get 413
  int http_threads = 0;              // 0: engine's max_num_seqs + max_waiting + 8
  ProtocolLimits limits;
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
};

class Server {
 public:
  // eos_ids: the tokens that end a turn (eos, chat end-of-turn tokens).
  Server(engine::Service& engine, tokenizer::Tokenizer tok, std::optional<ChatFormat> chat,
         std::vector<int32_t> eos_ids, ServerOptions opt);
  ~Server();  // stops

  // Binds the listening socket; throws moeserve::Error when it cannot. Returns the port.
  int bind();
  // Serves until stop() (blocking). bind() first.
  void run();
  // bind() and run() on a background thread; returns once it accepts connections.
  void start();
  // Stops accepting, ends in-flight requests (cancelling their generation) and waits for the
  // workers. Safe from any thread (not from a signal handler), idempotent.
  void stop();

  int port() const { return port_; }
  std::string url() const;
  ServerContext& context() { return *ctx_; }

 private:
  void install_routes();

  std::unique_ptr<ServerContext> ctx_;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  int port_ = -1;
  std::atomic<bool> stopped_{false};
  std::atomic<bool> in_run_{false}, run_returned_{false};
};

// The eos token of the tokenizer and of the model, and the end-of-turn tokens of well-known
// chat formats that the vocabulary has as special tokens.
std::vector<int32_t> default_eos_ids(const tokenizer::Tokenizer& tok, int64_t model_eos);

}  // namespace moeserve::server
