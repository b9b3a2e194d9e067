// The HTTP/1.1 server under the API: one event thread reads requests, a bounded pool of worker
// threads answers them.
//
// The event thread (epoll, non-blocking sockets) accepts connections and reads each request's
// line, headers and body under hard limits: a size cap on the request line, on each header line,
// on the number of headers and on their total size (431); an overall deadline for the headers
// and another for the body (408), whatever pace the bytes arrive at; a cap on connections in
// total and per client address. A body needs a Content-Length or a chunked Transfer-Encoding
// (411 otherwise); its decoded size is checked against the limit as it arrives (413, without
// buffering past it); a Content-Encoding other than identity is refused (415). Only complete
// requests reach a worker, so slow clients hold no worker. Control requests (a `Lane` the owner
// chooses: /health, /metrics) run on workers of their own, so they answer while every ordinary
// worker is busy.
//
// A worker answers through an Exchange: a whole response, or a chunked stream, each write under a
// deadline. Exchange::client_gone() looks at the connection's own socket: an error or reset
// means the client has gone; a clean half-close (FIN) after a complete request does not, and the
// response still goes out.
//
// stop() closes the listener, answers 503 to requests still being read, closes idle and slow
// connections, lets in-flight requests end (their owner sees its own stop flag), and after
// Options::stop_timeout shuts the remaining sockets down so that no write can block.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moeserve::server::http {

struct Header {
  std::string name;
  std::string value;  // without leading and trailing whitespace
  std::string raw;    // as sent after the colon, less leading whitespace (trailing kept)
};

struct Request {
  std::string method;  // as sent (methods are case-sensitive)
  std::string target;  // as sent: path and query
  std::string path;    // target before '?', not percent-decoded
  int minor_version = 1;
  std::vector<Header> headers;
  std::string body;  // decoded (chunked bodies are joined)
  std::string remote_addr;
  int remote_port = 0;

  // The first header named `name` (case-insensitive), nullptr when absent.
  const Header* find(std::string_view name) const;
  std::string get(std::string_view name) const;  // its value, "" when absent
};

// Which workers answer a request.
enum class Lane { Work, Control };

struct Options {
  size_t max_request_line = 8192;                   // longer: 414
  size_t max_header_line = 8192;                    // longer: 431
  size_t max_header_count = 100;                    // more: 431
  size_t max_header_bytes = 65536;                  // all header lines together; more: 431
  size_t max_body_bytes = 4u << 20;                 // decoded; larger: 413
  std::chrono::milliseconds header_timeout{10000};  // request line + headers, from the first byte
  std::chrono::milliseconds body_timeout{30000};    // the whole body, from the end of the headers
  std::chrono::milliseconds idle_timeout{5000};     // a kept-alive connection with no request
  std::chrono::milliseconds write_timeout{30000};   // each write of a response or stream
  std::chrono::milliseconds linger_timeout{2000};   // reading what a closed request left unread
  std::chrono::milliseconds stop_timeout{3000};     // stop(): in-flight requests' time to end
  int max_connections = 1024;
  int max_connections_per_client = 256;  // per remote address
  int workers = 64;
  int control_workers = 2;
};

class Server;
struct Connection;

// One request as its worker sees it.
class Exchange {
 public:
  const Request& request() const;

  // Sends a whole response (Content-Length). Returns false when it could not be written. The
  // headers Content-Type, Content-Length, Connection and Date are added.
  bool respond(int status, std::string_view content_type, std::string_view body,
               const std::vector<std::pair<std::string, std::string>>& headers = {});

  // A chunked response: the status line and headers, then pieces, then the end.
  // `probe`: bytes the stream may carry at any time without meaning anything to the client (an
  // event-stream comment); client_gone() writes them to test a connection the client closed.
  bool begin_stream(int status, std::string_view content_type,
                    const std::vector<std::pair<std::string, std::string>>& headers = {},
                    std::string probe = "");
  bool write(std::string_view data);
  bool end_stream();

  // True once the client has reset the connection or a write failed. A FIN is answered once
  // with bytes a closed socket answers with a reset: before the response an interim
  // "100 Continue" (HTTP/1.1), in a stream its probe; a client that only half-closed ignores them
  // and gets its response.
  bool client_gone();

  // Ends the exchange without a response (the client has gone); the connection is closed.
  void abandon();

  // Text added to the request's log line (token counts, ...).
  void note(std::string text);

  bool responded() const;
  int status() const;

  explicit Exchange(Connection& c) : c_(c) {}

 private:
  bool send_all(std::string_view data);
  std::string head(int status, std::string_view content_type,
                   const std::vector<std::pair<std::string, std::string>>& headers);
  Connection& c_;
};

// What the owner supplies.
struct Callbacks {
  std::function<Lane(const Request&)> lane;  // default: Work
  std::function<void(Exchange&)> handle;     // must not throw; must respond, stream or abandon
  // The body of an error the server answers itself (400, 408, 411, 413, 415, 431, 503, ...).
  std::function<std::string(int status, const std::string& message)> error_body;
  // Called once per request that got a status (or was abandoned: 499), after its response;
  // `req` may be partial (method and target empty when the request line was never read).
  std::function<void(const Request& req, int status, double seconds, const std::string& note)> done;
};

// A listening socket, opened before the server exists (to report a busy port early).
class Listener {
 public:
  // Throws moeserve::Error naming the address when it cannot listen. port 0: any free port.
  static Listener open(const std::string& host, int port);
  Listener() = default;
  Listener(Listener&& o) noexcept : fd_(o.fd_), port_(o.port_) { o.fd_ = -1; }
  Listener& operator=(Listener&& o) noexcept;
  ~Listener();
  int port() const { return port_; }
  int fd() const { return fd_; }
  int release() {
    const int f = fd_;
    fd_ = -1;
    return f;
  }

 private:
  int fd_ = -1, port_ = -1;
};

class Server {
 public:
  Server(Options opt, Callbacks cb);
  ~Server();  // stop()

  // Takes the listening socket. run() needs one.
  void listen(Listener l);
  int port() const { return port_; }
  // Serves until stop() (blocking): the event thread is the caller's.
  void run();
  // Stops as described above; returns when run() has returned (or at once when it never ran).
  // Safe from any thread but a worker's, idempotent.
  void stop();
  bool stopping() const;

  int connections() const;  // open connections, for tests

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int port_ = -1;
};

// The reason phrase of a status code.
const char* reason_phrase(int status);

}  // namespace moeserve::server::http
