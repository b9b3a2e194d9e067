// Server-sent events for stream: true. Each chunk is one event, "data: {json}\n\n"; the stream
// ends with "data: [DONE]\n\n". An error after the stream has started (the status line is
// already sent) is an event carrying OpenAI's error object, then [DONE].
#include "server/http.h"

#include "server/api_error.h"
#include "server/generate.h"
#include "server/server.h"

namespace moeserve::server {

namespace {

constexpr std::chrono::milliseconds kPoll{50};

std::string event(const nlohmann::ordered_json& j) {
  return "data: " + to_wire(j) + "\n\n";
}

// Runs the whole stream inside one call of httplib's content provider. Returns false when the
// client went away (httplib then drops the connection; the releaser cancels the generation).
bool run_stream(ServerContext& ctx, Generation& gen, httplib::DataSink& sink) {
  auto send = [&](const std::string& s) { return sink.write(s.data(), s.size()); };
  const ResponseBuilder& b = gen.builder();
  if (b.endpoint() == Endpoint::Chat && !send(event(b.role_chunk()))) return false;
  bool shutting_down = false;
  while (!gen.done()) {
    if (ctx.stopping) {
      gen.abort();
      shutting_down = true;
      break;
    }
    Delta d;
    gen.step(d, kPoll);
    if (!d.empty() && !send(event(b.chunk(d, nullptr)))) return false;
    // A closed connection shows as readable-at-EOF long before a write to it fails.
    if (!gen.done() && !sink.is_writable()) return false;
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
  sink.done();
  return true;
}

}  // namespace

void stream_response(ServerContext& ctx, std::shared_ptr<Generation> gen, httplib::Response& res) {
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  res.set_chunked_content_provider(
      "text/event-stream",
      [&ctx, gen](size_t, httplib::DataSink& sink) { return run_stream(ctx, *gen, sink); },
      // Called when the response is destroyed, however it ended: cancels an unfinished
      // generation (client gone, write failure) so its KV blocks are freed.
      [gen](bool) { gen->abort(); });
}

}  // namespace moeserve::server
