// Server-sent events for stream: true. Each chunk is one event, "data: {json}\n\n"; the stream
// ends with "data: [DONE]\n\n". An error after the stream has started (the status line is
// already sent) is an event carrying OpenAI's error object, then [DONE].
#include "server/api_error.h"
#include "server/generate.h"
#include "server/http_server.h"
#include "server/server.h"

namespace moeserve::server {

namespace {

constexpr std::chrono::milliseconds kPoll{50};

std::string event(const nlohmann::ordered_json& j) {
  return "data: " + to_wire(j) + "\n\n";
}

}  // namespace

// The whole stream on the request's worker. A client that goes away (a write fails, or the
// connection was reset) cancels the generation.
void stream_response(ServerContext& ctx, Generation& gen, http::Exchange& ex) {
  auto send = [&](const std::string& s) { return ex.write(s); };
  auto client_gone = [&] {
    gen.abort();
    ex.abandon();
  };
  if (!ex.begin_stream(200, "text/event-stream",
                       {{"Cache-Control", "no-cache"}, {"X-Accel-Buffering", "no"}},
                       /*probe=*/": \n\n"))
    return client_gone();
  const ResponseBuilder& b = gen.builder();
  if (b.endpoint() == Endpoint::Chat && !send(event(b.role_chunk()))) return client_gone();
  bool shutting_down = false;
  while (!gen.done()) {
    if (ctx.stopping) {
      gen.abort();
      shutting_down = true;
      break;
    }
    Delta d;
    gen.step(d, kPoll);
    if (!d.empty() && !send(event(b.chunk(d, nullptr)))) return client_gone();
    if (!gen.done() && ex.client_gone()) return client_gone();
  }
  if (shutting_down || gen.failed()) {
    const bool server_side = shutting_down || ctx.stopping;
    send(event(nlohmann::ordered_json::parse(
        error_body(server_side ? "The server is shutting down." : gen.error(), "server_error", "",
                   server_side ? "shutting_down" : "generation_failed"))));
  } else {
    send(event(b.chunk(Delta{}, gen.finish_reason())));
    if (gen.include_usage()) send(event(b.usage_chunk(gen.usage())));
  }
  send("data: [DONE]\n\n");
  ex.end_stream();
}

}  // namespace moeserve::server
