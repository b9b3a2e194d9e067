// Noticing that the client of a non-streamed request has gone away, so its generation can be
// cancelled and its KV blocks freed. cpp-httplib 0.11 does not hand handlers their socket, so
// the watch finds it among the process's descriptors by its address pair (local and remote
// address and port identify a TCP connection uniquely), once, when the request starts. The
// descriptor stays owned by httplib's worker thread, which is inside our handler meanwhile.
// (Streamed requests need none of this: DataSink::is_writable says the same.)
#pragma once

#include <string>

namespace httplib {
struct Request;
}

namespace moeserve::server {

// Deepens the accept queue of this process's listening socket on `port` to the system's
// maximum: cpp-httplib as Debian builds it listens with a backlog of 5, which a burst of clients
// overflows. Returns false when no such socket was found.
bool deepen_listen_backlog(int port);

class ConnectionWatch {
 public:
  explicit ConnectionWatch(const httplib::Request& req);

  // True when the peer has closed (or reset) the connection. False when the socket could not
  // be found, so a failed lookup never cancels anything.
  bool peer_closed() const;
  bool found() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

}  // namespace moeserve::server
