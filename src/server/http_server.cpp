#include "server/http_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <malloc.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

#include "core/error.h"

namespace moeserve::server::http {

using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kReadChunk = 64 << 10;
constexpr size_t kReadPerEvent = 256 << 10;  // then other connections get their turn
constexpr size_t kMaxChunkLine = 1024;       // a chunk's size line with its extensions
constexpr size_t kTrimAfter = 1 << 20;       // a request this large hands its memory back

char lower_c(char c) {
  return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c;
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (lower_c(a[i]) != lower_c(b[i])) return false;
  return true;
}

bool is_tchar(char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  return std::strchr("!#$%&'*+-.^_`|~", c) != nullptr && c != '\0';
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Comma-separated list contains `token` (case-insensitive).
bool has_token(std::string_view list, std::string_view token) {
  while (!list.empty()) {
    const size_t c = list.find(',');
    if (iequals(trim(list.substr(0, c)), token)) return true;
    if (c == std::string_view::npos) break;
    list.remove_prefix(c + 1);
  }
  return false;
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::string seconds_text(std::chrono::milliseconds d) {
  const long long ms = d.count();
  return ms % 1000 == 0 ? std::to_string(ms / 1000) + " s" : std::to_string(ms) + " ms";
}

}  // namespace

const char* reason_phrase(int status) {
  switch (status) {
    case 100:
      return "Continue";
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 411:
      return "Length Required";
    case 413:
      return "Content Too Large";
    case 414:
      return "URI Too Long";
    case 415:
      return "Unsupported Media Type";
    case 417:
      return "Expectation Failed";
    case 429:
      return "Too Many Requests";
    case 431:
      return "Request Header Fields Too Large";
    case 500:
      return "Internal Server Error";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return status < 300 ? "OK" : status < 500 ? "Bad Request" : "Internal Server Error";
  }
}

const Header* Request::find(std::string_view name) const {
  for (const Header& h : headers)
    if (iequals(h.name, name)) return &h;
  return nullptr;
}

std::string Request::get(std::string_view name) const {
  const Header* h = find(name);
  return h ? h->value : std::string();
}

// ---------------------------------------------------------------------------------------------
// Connections

enum class Phase {
  Head,        // reading the request line and headers (idle: not one byte of it yet)
  Body,        // reading the body
  Dispatched,  // a worker owns it
  Writing,     // the event thread writes an error response, then closes
  Draining,    // write side shut; reading and dropping what the client still sends, then close
};

enum class ChunkState { Size, Data, DataEnd, Trailer };

struct Connection {
  const Options* opt = nullptr;
  const std::atomic<bool>* stopping = nullptr;
  int fd = -1;
  std::string addr;
  Phase phase = Phase::Head;
  Clock::time_point deadline, started;
  bool idle = true;

  // Reading (event thread).
  std::string in;
  size_t pos = 0;
  Request req;
  bool line_seen = false;
  size_t header_bytes = 0, header_count = 0;
  bool chunked = false;
  size_t body_left = 0;
  ChunkState chunk = ChunkState::Size;
  size_t chunk_left = 0;
  bool keep_alive = true;
  uint32_t events = 0;  // what epoll watches now

  // Writing an error (event thread).
  std::string out;
  size_t out_off = 0;

  // The exchange (worker).
  Lane lane = Lane::Work;
  bool responded = false, streaming = false, stream_ended = false, chunked_out = false;
  bool gone = false, peer_fin = false, probed = false, abandoned = false;
  int status = 0;
  std::string note, probe;
  std::atomic<bool> kill{false};  // stop(): the socket is being shut down under the worker

  void reset_request() {
    std::string remote = std::move(req.remote_addr);
    const int remote_port = req.remote_port;
    req = Request{};
    req.remote_addr = std::move(remote);
    req.remote_port = remote_port;
    line_seen = false;
    header_bytes = header_count = 0;
    chunked = false;
    body_left = 0;
    chunk = ChunkState::Size;
    chunk_left = 0;
    keep_alive = true;
    responded = streaming = stream_ended = chunked_out = false;
    gone = peer_fin = probed = abandoned = false;
    status = 0;
    note.clear();
    probe.clear();
  }
};

// ---------------------------------------------------------------------------------------------
// Exchange

const Request& Exchange::request() const {
  return c_.req;
}
bool Exchange::responded() const {
  return c_.responded;
}
int Exchange::status() const {
  return c_.status;
}
void Exchange::note(std::string text) {
  if (!c_.note.empty()) c_.note += ' ';
  c_.note += text;
}
void Exchange::abandon() {
  c_.abandoned = true;
  c_.keep_alive = false;
}

bool Exchange::send_all(std::string_view d) {
  if (c_.gone) return false;
  const auto deadline = Clock::now() + c_.opt->write_timeout;
  while (!d.empty()) {
    if (c_.kill) {
      c_.gone = true;
      return false;
    }
    const ssize_t n = ::send(c_.fd, d.data(), d.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      d.remove_prefix(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) break;  // the client does not read: give up on it
      pollfd p{c_.fd, POLLOUT, 0};
      ::poll(&p, 1, static_cast<int>(std::min<long long>(left, 200)));
      continue;
    }
    break;
  }
  if (d.empty()) return true;
  c_.gone = true;
  c_.keep_alive = false;
  return false;
}

std::string Exchange::head(int status, std::string_view content_type,
                           const std::vector<std::pair<std::string, std::string>>& headers) {
  if (c_.peer_fin || c_.stopping->load() || c_.req.minor_version == 0) c_.keep_alive = false;
  std::string h = "HTTP/1.1 " + std::to_string(status) + " " + reason_phrase(status) + "\r\n";
  if (!content_type.empty()) h.append("Content-Type: ").append(content_type).append("\r\n");
  for (const auto& [k, v] : headers) h.append(k).append(": ").append(v).append("\r\n");
  h += c_.keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n";
  return h;
}

bool Exchange::respond(int status, std::string_view content_type, std::string_view body,
                       const std::vector<std::pair<std::string, std::string>>& headers) {
  if (c_.responded) return false;
  c_.responded = true;
  c_.status = status;
  std::string r = head(status, content_type, headers);
  r += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n";
  if (c_.req.method != "HEAD") r.append(body);
  return send_all(r);
}

bool Exchange::begin_stream(int status, std::string_view content_type,
                            const std::vector<std::pair<std::string, std::string>>& headers,
                            std::string probe) {
  if (c_.responded) return false;
  c_.responded = c_.streaming = true;
  c_.status = status;
  c_.probe = std::move(probe);
  c_.chunked_out = c_.req.minor_version >= 1;
  if (!c_.chunked_out) c_.keep_alive = false;  // HTTP/1.0: the end of the stream is the close
  std::string r = head(status, content_type, headers);
  if (c_.chunked_out) r += "Transfer-Encoding: chunked\r\n";
  r += "\r\n";
  return send_all(r);
}

bool Exchange::write(std::string_view data) {
  if (!c_.streaming || c_.stream_ended) return false;
  if (data.empty()) return !c_.gone;
  if (!c_.chunked_out) return send_all(data);
  char size[24];
  const int n = std::snprintf(size, sizeof(size), "%zx\r\n", data.size());
  std::string piece(size, static_cast<size_t>(n));
  piece.append(data).append("\r\n");
  return send_all(piece);
}

bool Exchange::end_stream() {
  if (!c_.streaming || c_.stream_ended) return false;
  c_.stream_ended = true;
  return c_.chunked_out ? send_all("0\r\n\r\n") : !c_.gone;
}

bool Exchange::client_gone() {
  if (c_.gone || c_.kill) return true;
  pollfd p{c_.fd, POLLIN | POLLRDHUP, 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  if (p.revents & (POLLERR | POLLHUP | POLLNVAL)) {
    c_.gone = true;  // reset (or both directions shut)
    c_.keep_alive = false;
    return true;
  }
  char b;
  const ssize_t n = ::recv(c_.fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
    c_.gone = true;
    c_.keep_alive = false;
    return true;
  }
  if (n == 0) {  // FIN: closed, or only half-closed
    c_.peer_fin = true;
    c_.keep_alive = false;
    if (!c_.probed) {
      c_.probed = true;
      if (!c_.responded && c_.req.minor_version >= 1)
        send_all("HTTP/1.1 100 Continue\r\n\r\n");
      else if (c_.streaming && !c_.probe.empty())
        write(c_.probe);
    }
  }
  return c_.gone;
}

// ---------------------------------------------------------------------------------------------
// Listener

Listener& Listener::operator=(Listener&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    port_ = o.port_;
    o.fd_ = -1;
  }
  return *this;
}

Listener::~Listener() {
  if (fd_ >= 0) ::close(fd_);
}

Listener Listener::open(const std::string& host, int port) {
  MS_CHECK(port >= 0 && port < 65536, "--port must be in 0..65535, got ", port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  const int rc =
      ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &res);
  MS_CHECK(rc == 0, "cannot listen on ", host, ":", port, ": ", gai_strerror(rc));
  int err = 0;
  Listener l;
  for (addrinfo* ai = res; ai && l.fd_ < 0; ai = ai->ai_next) {
    const int fd =
        ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      err = errno;
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd, SOMAXCONN) != 0) {
      err = errno;
      ::close(fd);
      continue;
    }
    l.fd_ = fd;
  }
  ::freeaddrinfo(res);
  MS_CHECK(l.fd_ >= 0, "cannot listen on ", host, ":", port, ": ", std::strerror(err),
           err == EADDRINUSE ? " (another process uses the port; pick another with --port)" : "");
  sockaddr_storage a{};
  socklen_t len = sizeof(a);
  ::getsockname(l.fd_, reinterpret_cast<sockaddr*>(&a), &len);
  l.port_ = a.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port)
                                    : ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
  return l;
}

// ---------------------------------------------------------------------------------------------
// Server

using ConnPtr = std::shared_ptr<Connection>;

struct Server::Impl {
  Options opt;
  Callbacks cb;
  Listener listener;
  int ep = -1, wake = -1;
  std::atomic<bool> stopping{false};

  // run() / stop() handshake.
  std::mutex run_mu;
  std::condition_variable run_cv;
  bool running = false, run_done = false;

  // Event thread only.
  std::unordered_map<int, ConnPtr> conns;
  std::map<std::string, int> per_client;
  std::atomic<int> nconns{0};
  bool stop_begun = false, forced = false;
  Clock::time_point stop_deadline;
  std::optional<Clock::time_point> accept_paused_until;

  // Workers.
  std::mutex qmu;
  std::condition_variable qcv;
  std::deque<ConnPtr> queue[2];  // by Lane
  bool quit = false;
  std::vector<std::thread> threads;
  std::mutex rmu;
  std::vector<ConnPtr> returned;

  void wake_up() {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake, &one, sizeof(one));
  }

  void watch(Connection& c, uint32_t ev) {
    if (c.events == ev) return;
    epoll_event e{};
    e.events = ev;
    e.data.fd = c.fd;
    ::epoll_ctl(ep, c.events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c.fd, &e);
    c.events = ev;
  }
  void unwatch(Connection& c) {
    if (c.events) ::epoll_ctl(ep, EPOLL_CTL_DEL, c.fd, nullptr);
    c.events = 0;
  }

  void close_conn(const ConnPtr& c) {
    unwatch(*c);
    ::close(c->fd);
    conns.erase(c->fd);
    if (--per_client[c->addr] <= 0) per_client.erase(c->addr);
    nconns = static_cast<int>(conns.size());
  }

  // Write side shut: the client reads the response to its end; what it still sends is dropped.
  void graceful_close(const ConnPtr& c) {
    ::shutdown(c->fd, SHUT_WR);
    c->phase = Phase::Draining;
    c->in.clear();
    c->in.shrink_to_fit();
    c->pos = 0;
    const auto linger = stopping ? std::min(opt.linger_timeout, std::chrono::milliseconds(500))
                                 : opt.linger_timeout;
    c->deadline = Clock::now() + linger;
    watch(*c, EPOLLIN | EPOLLRDHUP);
  }

  void flush_out(const ConnPtr& c) {
    while (c->out_off < c->out.size()) {
      const ssize_t n = ::send(c->fd, c->out.data() + c->out_off, c->out.size() - c->out_off,
                               MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        c->out_off += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        watch(*c, EPOLLOUT);
        return;
      }
      close_conn(c);
      return;
    }
    c->out.clear();
    c->out_off = 0;
    graceful_close(c);
  }

  // Answers a request the event thread refuses, then closes the connection.
  void fail(const ConnPtr& c, int status, const std::string& message) {
    const std::string body = cb.error_body ? cb.error_body(status, message) : message;
    std::string r = "HTTP/1.1 " + std::to_string(status) + " " + reason_phrase(status) + "\r\n";
    r += "Content-Type: application/json\r\nConnection: close\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + body;
    if (cb.done) cb.done(c->req, status, seconds_since(c->started), "");
    c->req.body.clear();
    c->req.body.shrink_to_fit();
    c->in.clear();
    c->in.shrink_to_fit();
    c->pos = 0;
    c->phase = Phase::Writing;
    c->out = std::move(r);
    c->out_off = 0;
    c->deadline = Clock::now() + std::min(opt.write_timeout, std::chrono::milliseconds(5000));
    flush_out(c);
  }

  void dispatch(const ConnPtr& c) {
    unwatch(*c);
    c->phase = Phase::Dispatched;
    c->in.erase(0, c->pos);  // what is left is the next request (pipelined)
    c->pos = 0;
    if (c->in.capacity() > kReadChunk * 2) c->in.shrink_to_fit();
    c->lane = cb.lane ? cb.lane(c->req) : Lane::Work;
    {
      std::lock_guard<std::mutex> lk(qmu);
      queue[c->lane == Lane::Control ? 1 : 0].push_back(c);
    }
    qcv.notify_all();
  }

  // Request line and headers read: decide how the body comes.
  void on_headers(const ConnPtr& c) {
    Request& r = c->req;
    const std::string conn = r.get("Connection");
    c->keep_alive =
        r.minor_version >= 1 ? !has_token(conn, "close") : has_token(conn, "keep-alive");
    if (stopping) return fail(c, 503, "The server is shutting down.");
    const Header* te = nullptr;
    std::vector<const Header*> cl;
    for (const Header& h : r.headers) {
      if (iequals(h.name, "Transfer-Encoding")) {
        if (te) return fail(c, 400, "More than one Transfer-Encoding header.");
        te = &h;
      } else if (iequals(h.name, "Content-Length")) {
        cl.push_back(&h);
      }
    }
    if (te) {
      if (!cl.empty()) return fail(c, 400, "Both Transfer-Encoding and Content-Length were sent.");
      if (r.minor_version == 0) return fail(c, 400, "Transfer-Encoding needs HTTP/1.1.");
      if (!iequals(te->value, "chunked"))
        return fail(c, 501,
                    "Transfer-Encoding '" + te->value +
                        "' is not supported; send the body with Content-Length or chunked.");
      c->chunked = true;
    } else if (!cl.empty()) {
      for (const Header* h : cl) {
        const std::string& v = h->value;
        if (v.empty() || v.size() > 18 || v != cl[0]->value ||
            !std::all_of(v.begin(), v.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
          return fail(c, 400, "The Content-Length header is not a valid length.");
      }
      c->body_left = std::stoull(cl[0]->value);
      if (c->body_left > opt.max_body_bytes)
        return fail(c, 413,
                    "The request body is larger than the limit of " +
                        std::to_string(opt.max_body_bytes) + " bytes.");
    } else if (r.method == "POST" || r.method == "PUT" || r.method == "PATCH") {
      return fail(c, 411,
                  "A request body needs a Content-Length header (or chunked "
                  "Transfer-Encoding).");
    }
    if (const Header* ce = r.find("Content-Encoding"); ce && !iequals(ce->value, "identity"))
      return fail(c, 415,
                  "Content-Encoding '" + ce->value +
                      "' is not accepted; send the request body uncompressed.");
    const bool has_body = c->chunked || c->body_left > 0;
    if (const Header* ex = r.find("Expect")) {
      if (!iequals(ex->value, "100-continue"))
        return fail(c, 417, "Only 'Expect: 100-continue' is supported.");
      if (has_body && r.minor_version >= 1) {
        static const char kContinue[] = "HTTP/1.1 100 Continue\r\n\r\n";
        [[maybe_unused]] ssize_t n =
            ::send(c->fd, kContinue, sizeof(kContinue) - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
      }
    }
    c->phase = Phase::Body;
    c->deadline = Clock::now() + opt.body_timeout;
    if (!has_body) dispatch(c);
  }

  // Parses what has arrived; moves the connection on (dispatch, fail) when it can.
  void process(const ConnPtr& c) {
    Connection& k = *c;
    while (k.phase == Phase::Head || k.phase == Phase::Body) {
      if (k.phase == Phase::Head || (k.chunked && k.chunk == ChunkState::Trailer) ||
          (k.chunked && k.chunk == ChunkState::Size)) {
        const size_t nl = k.in.find('\n', k.pos);
        if (nl == std::string::npos) {
          const size_t pending = k.in.size() - k.pos;
          if (k.phase == Phase::Head && !k.line_seen && pending > opt.max_request_line)
            return fail(c, 414, "The request line is longer than the limit.");
          if (k.phase == Phase::Head && k.line_seen && pending > opt.max_header_line)
            return fail(c, 431,
                        "A header line is longer than the limit of " +
                            std::to_string(opt.max_header_line) + " bytes.");
          if (k.phase == Phase::Body && pending > kMaxChunkLine)
            return fail(c, 400, "A chunk size line is too long.");
          break;
        }
        std::string_view line(k.in.data() + k.pos, nl - k.pos);
        k.pos = nl + 1;
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        if (k.phase == Phase::Body && k.chunk == ChunkState::Size) {
          std::string_view sz = trim(line.substr(0, line.find(';')));
          if (sz.empty() || sz.size() > 15 || !std::all_of(sz.begin(), sz.end(), [](char ch) {
                return std::isxdigit(static_cast<unsigned char>(ch)) != 0;
              }))
            return fail(c, 400, "A chunk size is not a hexadecimal number.");
          const size_t n = std::stoull(std::string(sz), nullptr, 16);
          if (n > opt.max_body_bytes - k.req.body.size())
            return fail(c, 413,
                        "The request body is larger than the limit of " +
                            std::to_string(opt.max_body_bytes) + " bytes.");
          k.chunk = n == 0 ? ChunkState::Trailer : ChunkState::Data;
          k.chunk_left = n;
          continue;
        }
        if (k.phase == Phase::Body) {  // trailer lines: counted, not kept
          if (line.empty()) {
            dispatch(c);
            break;
          }
          if (line.size() > opt.max_header_line ||
              (k.header_bytes += line.size() + 2) > opt.max_header_bytes ||
              ++k.header_count > opt.max_header_count)
            return fail(c, 431, "The request's trailer fields are too large.");
          continue;
        }
        if (!k.line_seen) {
          if (line.empty()) continue;  // empty lines before a request are allowed
          if (line.size() > opt.max_request_line)
            return fail(c, 414, "The request line is longer than the limit.");
          const size_t s1 = line.find(' ');
          const size_t s2 = s1 == std::string_view::npos ? s1 : line.find(' ', s1 + 1);
          if (s2 == std::string_view::npos || line.find(' ', s2 + 1) != std::string_view::npos)
            return fail(c, 400, "The request line is malformed.");
          const std::string_view method = line.substr(0, s1),
                                 target = line.substr(s1 + 1, s2 - s1 - 1),
                                 version = line.substr(s2 + 1);
          if (method.empty() || !std::all_of(method.begin(), method.end(), is_tchar) ||
              target.empty() || std::any_of(target.begin(), target.end(), [](char ch) {
                return static_cast<unsigned char>(ch) <= 0x20 || ch == 0x7f;
              }))
            return fail(c, 400, "The request line is malformed.");
          if (version.size() != 8 || version.substr(0, 5) != "HTTP/" || version[6] != '.')
            return fail(c, 400, "The request line is malformed.");
          if (version[5] != '1' || (version[7] != '0' && version[7] != '1'))
            return fail(c, 505, "Only HTTP/1.0 and HTTP/1.1 are supported.");
          k.req.method = method;
          k.req.target = target;
          k.req.path = std::string(target.substr(0, target.find('?')));
          k.req.minor_version = version[7] - '0';
          k.line_seen = true;
          continue;
        }
        if (line.size() > opt.max_header_line)
          return fail(c, 431,
                      "A header line is longer than the limit of " +
                          std::to_string(opt.max_header_line) + " bytes.");
        if (line.empty()) {
          on_headers(c);
          continue;
        }
        if ((k.header_bytes += line.size() + 2) > opt.max_header_bytes)
          return fail(c, 431,
                      "The request headers are larger than the limit of " +
                          std::to_string(opt.max_header_bytes) + " bytes.");
        if (++k.header_count > opt.max_header_count)
          return fail(
              c, 431,
              "The request has more than " + std::to_string(opt.max_header_count) + " headers.");
        const size_t colon = line.find(':');
        if (colon == std::string_view::npos || colon == 0 ||
            !std::all_of(line.begin(), line.begin() + colon, is_tchar))
          return fail(c, 400, "A header line is malformed.");
        std::string_view raw = line.substr(colon + 1);
        while (!raw.empty() && (raw.front() == ' ' || raw.front() == '\t')) raw.remove_prefix(1);
        if (std::any_of(raw.begin(), raw.end(), [](char ch) {
              return (static_cast<unsigned char>(ch) < 0x20 && ch != '\t') || ch == 0x7f;
            }))
          return fail(c, 400, "A header value holds a control character.");
        k.req.headers.push_back(
            {std::string(line.substr(0, colon)), std::string(trim(raw)), std::string(raw)});
        continue;
      }
      // Body bytes.
      const size_t avail = k.in.size() - k.pos;
      if (!k.chunked) {
        const size_t take = std::min(avail, k.body_left);
        k.req.body.append(k.in, k.pos, take);
        k.pos += take;
        k.body_left -= take;
        if (k.body_left == 0) {
          dispatch(c);
          break;
        }
        break;  // needs more
      }
      if (k.chunk == ChunkState::Data) {
        const size_t take = std::min(avail, k.chunk_left);
        k.req.body.append(k.in, k.pos, take);
        k.pos += take;
        k.chunk_left -= take;
        if (k.chunk_left > 0) break;
        k.chunk = ChunkState::DataEnd;
        continue;
      }
      // DataEnd: the CRLF after a chunk's data.
      if (avail == 0) break;
      if (k.in[k.pos] == '\n') {
        ++k.pos;
      } else if (k.in[k.pos] == '\r') {
        if (avail < 2) break;
        if (k.in[k.pos + 1] != '\n') return fail(c, 400, "A chunk does not end with CRLF.");
        k.pos += 2;
      } else {
        return fail(c, 400, "A chunk does not end with CRLF.");
      }
      k.chunk = ChunkState::Size;
    }
    if (k.phase == Phase::Head || k.phase == Phase::Body) {
      k.in.erase(0, k.pos);
      k.pos = 0;
    }
  }

  void on_readable(const ConnPtr& c) {
    char buf[kReadChunk];
    size_t total = 0;
    while (total < kReadPerEvent) {
      const ssize_t n = ::recv(c->fd, buf, sizeof(buf), 0);
      if (n > 0) {
        total += static_cast<size_t>(n);
        if (c->phase == Phase::Draining) continue;
        if (c->idle) {
          c->idle = false;
          c->started = Clock::now();
          c->deadline = c->started + opt.header_timeout;
        }
        c->in.append(buf, static_cast<size_t>(n));
        process(c);
        if (c->phase != Phase::Head && c->phase != Phase::Body) return;
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      // The client closed (or reset) before a complete request: nobody to answer.
      close_conn(c);
      return;
    }
  }

  void accept_all() {
    for (;;) {
      sockaddr_storage a{};
      socklen_t len = sizeof(a);
      const int fd = ::accept4(listener.fd(), reinterpret_cast<sockaddr*>(&a), &len,
                               SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          // Out of descriptors: the rest wait in the backlog. The listener stays readable, so
          // it is left out of the loop for a moment instead of spinning on it.
          ::epoll_ctl(ep, EPOLL_CTL_DEL, listener.fd(), nullptr);
          accept_paused_until = Clock::now() + std::chrono::milliseconds(100);
        }
        return;
      }
      char host[INET6_ADDRSTRLEN] = "?";
      int port = 0;
      if (a.ss_family == AF_INET) {
        const auto* s4 = reinterpret_cast<sockaddr_in*>(&a);
        ::inet_ntop(AF_INET, &s4->sin_addr, host, sizeof(host));
        port = ntohs(s4->sin_port);
      } else if (a.ss_family == AF_INET6) {
        const auto* s6 = reinterpret_cast<sockaddr_in6*>(&a);
        ::inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof(host));
        port = ntohs(s6->sin6_port);
      }
      auto c = std::make_shared<Connection>();
      c->opt = &opt;
      c->stopping = &stopping;
      c->fd = fd;
      c->addr = host;
      c->req.remote_addr = host;
      c->req.remote_port = port;
      c->started = Clock::now();
      const auto it = per_client.find(c->addr);
      if (static_cast<int>(conns.size()) >= opt.max_connections ||
          (it != per_client.end() && it->second >= opt.max_connections_per_client)) {
        const std::string body = cb.error_body
                                     ? cb.error_body(503, "Too many connections; retry later.")
                                     : "Too many connections";
        const std::string r =
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            "Connection: close\r\nContent-Length: " +
            std::to_string(body.size()) + "\r\n\r\n" + body;
        [[maybe_unused]] ssize_t n = ::send(fd, r.data(), r.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        ::shutdown(fd, SHUT_WR);
        ::close(fd);
        if (cb.done) cb.done(c->req, 503, 0.0, "too many connections");
        continue;
      }
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      c->deadline = c->started + opt.header_timeout;
      conns[fd] = c;
      ++per_client[c->addr];
      nconns = static_cast<int>(conns.size());
      watch(*c, EPOLLIN | EPOLLRDHUP);
    }
  }

  // Connections workers have finished with: kept alive for the next request, or closed.
  void take_returned() {
    std::vector<ConnPtr> back;
    {
      std::lock_guard<std::mutex> lk(rmu);
      back.swap(returned);
    }
    for (const ConnPtr& c : back) {
      if (c->gone || c->kill) {
        close_conn(c);
        continue;
      }
      if (!c->keep_alive || stopping || c->abandoned) {
        graceful_close(c);
        continue;
      }
      c->reset_request();
      c->phase = Phase::Head;
      c->started = Clock::now();
      c->idle = c->in.empty();
      c->deadline = c->started + (c->idle ? opt.idle_timeout : opt.header_timeout);
      watch(*c, EPOLLIN | EPOLLRDHUP);
      if (!c->idle) process(c);  // a pipelined request
    }
  }

  void check_deadlines() {
    const auto now = Clock::now();
    std::vector<ConnPtr> due;
    for (auto& [fd, c] : conns)
      if (c->phase != Phase::Dispatched && now >= c->deadline) due.push_back(c);
    for (const ConnPtr& c : due) {
      if (c->phase == Phase::Head && !c->idle)
        fail(c, 408,
             "The request headers did not arrive within " + seconds_text(opt.header_timeout) + ".");
      else if (c->phase == Phase::Body)
        fail(c, 408,
             "The request body did not arrive within " + seconds_text(opt.body_timeout) + ".");
      else
        close_conn(c);  // idle, or a close that lingered long enough
    }
  }

  void begin_stop() {
    stop_begun = true;
    stop_deadline = Clock::now() + opt.stop_timeout;
    if (listener.fd() >= 0) {
      ::epoll_ctl(ep, EPOLL_CTL_DEL, listener.fd(), nullptr);
      listener = Listener();
    }
    std::vector<ConnPtr> all;
    for (auto& [fd, c] : conns) all.push_back(c);
    for (const ConnPtr& c : all) {
      switch (c->phase) {
        case Phase::Head:
          if (c->idle)
            close_conn(c);
          else
            fail(c, 503, "The server is shutting down.");
          break;
        case Phase::Body:
          fail(c, 503, "The server is shutting down.");
          break;
        case Phase::Draining:
          c->deadline = std::min(c->deadline, Clock::now() + std::chrono::milliseconds(500));
          break;
        default:
          break;
      }
    }
  }

  // stop()'s time is up: no write may block any more, nothing is read any more.
  void force() {
    forced = true;
    std::vector<ConnPtr> all;
    for (auto& [fd, c] : conns) all.push_back(c);
    for (const ConnPtr& c : all) {
      if (c->phase == Phase::Dispatched) {
        c->kill = true;
        ::shutdown(c->fd, SHUT_RDWR);
      } else {
        close_conn(c);
      }
    }
  }

  void worker(int lane) {
    for (;;) {
      ConnPtr c;
      {
        std::unique_lock<std::mutex> lk(qmu);
        qcv.wait(lk, [&] { return quit || !queue[lane].empty(); });
        if (queue[lane].empty()) return;
        c = std::move(queue[lane].front());
        queue[lane].pop_front();
      }
      Exchange ex(*c);
      try {
        cb.handle(ex);
      } catch (...) {
      }
      if (!c->responded && !c->abandoned && !c->gone) {
        const std::string body =
            cb.error_body ? cb.error_body(500, "Internal server error.") : "Internal error";
        ex.respond(500, "application/json", body);
      }
      if (c->streaming && !c->stream_ended) c->keep_alive = false;
      if (cb.done) {
        const int status = c->abandoned || (c->gone && !c->streaming) ? 499 : c->status;
        cb.done(c->req, status, seconds_since(c->started), c->note);
      }
      const bool big = c->req.body.capacity() >= kTrimAfter || c->in.capacity() >= kTrimAfter;
      c->req.body.clear();
      c->req.body.shrink_to_fit();
      if (big) {
        c->in.shrink_to_fit();
        ::malloc_trim(0);  // hand the request's pages back to the system
      }
      {
        std::lock_guard<std::mutex> lk(rmu);
        returned.push_back(std::move(c));
      }
      wake_up();
    }
  }
};

Server::Server(Options opt, Callbacks cb) : impl_(std::make_unique<Impl>()) {
  // Request bodies and what is parsed from them are megabytes, freed on worker threads. glibc
  // keeps the top of a thread's arena when it is freed (up to twice its mmap threshold, which
  // grows to the largest block freed), and malloc_trim does not reach it; blocks of 1 MiB and
  // more mapped on their own go back to the system when freed, in any thread.
  static const bool once = [] { return mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1; }();
  (void)once;
  impl_->opt = std::move(opt);
  impl_->cb = std::move(cb);
  MS_CHECK(impl_->cb.handle, "http::Server needs a handler");
  impl_->opt.workers = std::max(1, impl_->opt.workers);
  impl_->opt.control_workers = std::max(1, impl_->opt.control_workers);
  impl_->opt.max_connections = std::max(1, impl_->opt.max_connections);
  impl_->opt.max_connections_per_client = std::max(1, impl_->opt.max_connections_per_client);
}

Server::~Server() {
  stop();
}

void Server::listen(Listener l) {
  port_ = l.port();
  impl_->listener = std::move(l);
}

bool Server::stopping() const {
  return impl_->stopping;
}

int Server::connections() const {
  return impl_->nconns;
}

void Server::run() {
  Impl& s = *impl_;
  MS_CHECK(s.listener.fd() >= 0, "http::Server::run without a listening socket");
  {
    std::lock_guard<std::mutex> lk(s.run_mu);
    if (s.stopping || s.running || s.run_done) return;
    s.ep = ::epoll_create1(EPOLL_CLOEXEC);
    s.wake = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s.ep < 0 || s.wake < 0) {
      const int err = errno;
      if (s.ep >= 0) ::close(s.ep);
      if (s.wake >= 0) ::close(s.wake);
      s.ep = s.wake = -1;
      ::moeserve::fail("cannot create the HTTP server's event loop: ", std::strerror(err));
    }
    s.running = true;
  }
  for (int fd : {s.listener.fd(), s.wake}) {
    epoll_event e{};
    e.events = EPOLLIN;
    e.data.fd = fd;
    ::epoll_ctl(s.ep, EPOLL_CTL_ADD, fd, &e);
  }
  for (int i = 0; i < s.opt.workers; ++i) s.threads.emplace_back([&s] { s.worker(0); });
  for (int i = 0; i < s.opt.control_workers; ++i) s.threads.emplace_back([&s] { s.worker(1); });

  epoll_event evs[256];
  for (;;) {
    const int n = ::epoll_wait(s.ep, evs, 256, 100);
    for (int i = 0; i < n; ++i) {
      const int fd = evs[i].data.fd;
      if (fd == s.wake) {
        uint64_t v;
        [[maybe_unused]] ssize_t r = ::read(s.wake, &v, sizeof(v));
        continue;
      }
      if (s.listener.fd() >= 0 && fd == s.listener.fd()) {
        s.accept_all();
        continue;
      }
      auto it = s.conns.find(fd);
      if (it == s.conns.end()) continue;
      ConnPtr c = it->second;
      if (c->phase == Phase::Writing) {
        if (evs[i].events & (EPOLLERR | EPOLLHUP))
          s.close_conn(c);
        else
          s.flush_out(c);
      } else if (c->phase != Phase::Dispatched) {
        s.on_readable(c);
      }
    }
    s.take_returned();
    if (s.accept_paused_until && Clock::now() >= *s.accept_paused_until) {
      s.accept_paused_until.reset();
      if (s.listener.fd() >= 0) {
        epoll_event e{};
        e.events = EPOLLIN;
        e.data.fd = s.listener.fd();
        ::epoll_ctl(s.ep, EPOLL_CTL_ADD, s.listener.fd(), &e);
      }
    }
    if (s.stopping && !s.stop_begun) s.begin_stop();
    s.check_deadlines();
    if (s.stop_begun) {
      if (s.conns.empty()) break;
      if (!s.forced && Clock::now() >= s.stop_deadline) s.force();
    }
  }

  {
    std::lock_guard<std::mutex> lk(s.qmu);
    s.quit = true;
  }
  s.qcv.notify_all();
  for (auto& t : s.threads) t.join();
  s.threads.clear();
  {
    std::lock_guard<std::mutex> lk(s.run_mu);  // stop() writes to `wake` under it
    ::close(s.ep);
    ::close(s.wake);
    s.ep = s.wake = -1;
    s.running = false;
    s.run_done = true;
  }
  s.run_cv.notify_all();
}

void Server::stop() {
  Impl& s = *impl_;
  std::unique_lock<std::mutex> lk(s.run_mu);
  s.stopping = true;
  if (!s.running) return;
  s.wake_up();
  s.run_cv.wait(lk, [&] { return s.run_done; });
}

}  // namespace moeserve::server::http
