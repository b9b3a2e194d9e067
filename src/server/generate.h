// POST /v1/chat/completions and /v1/completions: validate, render and tokenize the prompt,
// submit to the engine (n sequences for n choices), then answer with one JSON object or a
// stream of server-sent events.
#pragma once

#include <chrono>
#include <memory>
#include <vector>

#include "server/generation.h"
#include "server/protocol.h"

namespace moeserve::server::http {
class Exchange;
}

namespace moeserve::server {

// How often a handler waiting on the engine looks around (client gone, deadline).
inline constexpr std::chrono::milliseconds kPoll{50};

struct ServerContext;

// Handles one generation request. Throws ApiError for everything the client gets wrong.
void handle_generate(ServerContext& ctx, Endpoint endpoint, http::Exchange& ex);

// The request in engine terms: prompt ids, token budget, sampling, stop conditions. Throws
// ApiError(400) (unknown model, no chat template, prompt too long, token ids out of range).
Prepared prepare(ServerContext& ctx, const GenRequest& g);

// The n choices of one request, each its own engine sequence, all waking one Wakeup.
class Choices {
 public:
  Choices() : wake_(std::make_shared<Wakeup>()) {}
  // Choice i of `g` (seeded with g.seed + i when the request has a seed).
  void add(ServerContext& ctx, const GenRequest& g, const Prepared& p, Clock::time_point arrival);
  // Submits the choices; throws ApiError as Generation::submit (the others are then aborted).
  // With prefix caching on, choices 1..n-1 wait for choice 0's first token: the prompt's
  // blocks are cached by then, and they start from them instead of computing it again.
  void submit(bool share_prompt);
  // Consumes what every unfinished choice produced, without waiting; out[i] gets choice i's.
  void step(std::vector<Delta>& out);
  // Waits (up to `timeout`) for an event from the engine since count() was `seen`.
  uint64_t count() const { return wake_->count(); }
  void wait(uint64_t seen, std::chrono::milliseconds timeout) { wake_->wait(seen, timeout); }
  void abort();
  bool done() const;
  size_t size() const { return gens_.size(); }
  const Generation& operator[](size_t i) const { return *gens_[i]; }
  const Generation* failed() const;  // the first that failed, or nullptr
  // The prompt counted once, the completion tokens of every choice.
  Usage usage() const;

 private:
  void submit_rest();

  std::shared_ptr<Wakeup> wake_;
  std::vector<std::unique_ptr<Generation>> gens_;
  bool rest_pending_ = false;  // choices 1..n-1 not submitted yet
};

// Streams the choices as server-sent events: "data: {chunk}\n\n" ... "data: [DONE]\n\n".
void stream_response(ServerContext& ctx, Choices& choices, const ResponseBuilder& b,
                     bool include_usage, http::Exchange& ex);

// The request log's note on a generation: "prompt N + completion M tokens".
std::string usage_note(const Usage& u);

}  // namespace moeserve::server
