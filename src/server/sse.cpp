// Server-sent events for stream: true. Each chunk is one event, "data: {json}\n\n"; the stream
// ends with "data: [DONE]\n\n". An error after the stream has started (the status line is
// already sent) is an event carrying OpenAI's error object, then [DONE].
#include "server/api_error.h"
#include "server/generate.h"
#include "server/http_server.h"
#include "server/server.h"

namespace moeserve::server {

namespace {

std::string event(const nlohmann::ordered_json& j) {
  return "data: " + to_wire(j) + "\n\n";
}

}  // namespace

// The whole stream on the request's worker, the choices' chunks as they come. A client that goes
// away (a write fails, or the connection was reset) cancels the generation.
void stream_response(ServerContext& ctx, Choices& choices, const ResponseBuilder& b,
                     bool include_usage, http::Exchange& ex) {
  auto send = [&](const std::string& s) { return ex.write(s); };
  auto client_gone = [&] {
    choices.abort();
    ex.abandon();
  };
  if (!ex.begin_stream(200, "text/event-stream",
                       {{"Cache-Control", "no-cache"}, {"X-Accel-Buffering", "no"}},
                       /*probe=*/": \n\n"))
    return client_gone();
  const int n = static_cast<int>(choices.size());
  if (b.endpoint() == Endpoint::Chat)
    for (int i = 0; i < n; ++i)
      if (!send(event(b.role_chunk(i)))) return client_gone();
  bool shutting_down = false;
  std::vector<bool> finished(n, false);
  while (true) {
    if (ctx.stopping) {
      choices.abort();
      shutting_down = true;
      break;
    }
    const uint64_t seen = choices.count();
    std::vector<Delta> d;
    choices.step(d);
    for (int i = 0; i < n; ++i) {
      if (!d[i].empty() && !send(event(b.chunk(d[i], nullptr, i)))) return client_gone();
      // A choice's finish chunk as soon as it ends (the others may go on).
      if (choices[i].done() && !choices[i].failed() && !finished[i]) {
        finished[i] = true;
        if (!send(event(b.chunk(Delta{}, choices[i].finish_reason(), i)))) return client_gone();
      }
    }
    if (choices.done()) break;
    if (ex.client_gone()) return client_gone();
    choices.wait(seen, kPoll);
  }
  const Generation* failed = choices.failed();
  if (shutting_down || failed) {
    const bool server_side = shutting_down || ctx.stopping;
    send(event(nlohmann::ordered_json::parse(
        error_body(server_side ? "The server is shutting down." : failed->error(), "server_error",
                   "", server_side ? "shutting_down" : "generation_failed"))));
  } else if (include_usage) {
    send(event(b.usage_chunk(choices.usage())));
  }
  send("data: [DONE]\n\n");
  ex.end_stream();
}

}  // namespace moeserve::server
