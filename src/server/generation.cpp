#include "server/generation.h"

#include <algorithm>

#include "server/api_error.h"
#include "server/server.h"

namespace moeserve::server {

namespace {

double seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

}  // namespace

Generation::Generation(ServerContext& ctx, const GenRequest& req, Prepared p,
                       Clock::time_point arrival, std::shared_ptr<Wakeup> wake)
    : ctx_(ctx),
      session_(std::make_shared<Session>(ctx.engine, std::move(wake))),
      prep_(std::move(p)),
      prompt_size_(prep_.prompt.size()),
      pipeline_(ctx.tok, prep_.output),
      endpoint_(req.endpoint == Endpoint::Chat ? "chat" : "completions"),
      arrival_(arrival) {}

Generation::~Generation() {
  abort();
}

void Generation::submit() {
  engine::Request r;
  r.prompt = std::move(prep_.prompt);
  r.max_tokens = prep_.max_tokens;
  r.sampling = prep_.sampling;
  r.stop_ids = prep_.output.stop_ids;
  r.top_logprobs = prep_.top_logprobs;
  std::string err;
  switch (session_->submit(std::move(r), &err)) {
    case engine::SubmitResult::Accepted:
      return;
    case engine::SubmitResult::QueueFull:
      done_ = true;
      ctx_.metrics.record_request(endpoint_, Outcome::Rejected);
      throw ApiError(429, "The server is busy (" + err + "); retry later.", "", "queue_full");
    case engine::SubmitResult::Invalid:
      done_ = true;
      ctx_.metrics.record_request(endpoint_, Outcome::Invalid);
      throw ApiError(400, err);
  }
}

bool Generation::step(Delta& out, std::chrono::milliseconds timeout) {
  if (done_) return true;
  std::vector<EngineEvent> events;
  session_->wait(events, timeout);
  for (const EngineEvent& e : events) {
    if (e.finish) {
      cached_tokens_ = std::max(cached_tokens_, e.finish->cached_tokens);
      switch (e.finish->reason) {
        case engine::FinishReason::Stop:
        case engine::FinishReason::Length:
          pipeline_.finish(out);
          finish_reason_ = e.finish->reason == engine::FinishReason::Stop ? "stop" : "length";
          if (e.finish->reason == engine::FinishReason::Stop && !pipeline_.tool_calls().empty())
            finish_reason_ = "tool_calls";
          complete(e.finish->reason == engine::FinishReason::Stop ? Outcome::Stop
                                                                  : Outcome::Length);
          break;
        case engine::FinishReason::Cancelled:  // not by us: the engine is shutting down
          failed_ = true;
          error_ = "The request was cancelled because the server is shutting down.";
          complete(Outcome::Cancelled);
          break;
        case engine::FinishReason::Error:
          failed_ = true;
          error_ = "Generation failed: " + e.finish->error;
          complete(Outcome::Error);
          break;
      }
      return true;
    }
    cached_tokens_ = std::max(cached_tokens_, e.token.cached_tokens);
    if (!first_token_seen_) {
      ctx_.metrics.record_ttft(seconds(e.time - arrival_));
      first_token_seen_ = true;
    } else {
      ctx_.metrics.record_itl(seconds(e.time - last_token_));
    }
    last_token_ = e.time;
    if (pipeline_.put(e.token, out)) {
      // A stop string: the output ends here; the engine stops at its next step.
      session_->cancel();
      pipeline_.finish(out);
      finish_reason_ = "stop";
      complete(Outcome::Stop);
      return true;
    }
  }
  return false;
}

void Generation::abort() {
  if (done_) return;
  // Counted before the engine frees the blocks: whoever sees them free sees the count too.
  complete(Outcome::Cancelled);
  session_->cancel();
}

void Generation::fail(std::string error) {
  if (done_) return;
  failed_ = true;
  error_ = std::move(error);
  complete(Outcome::Error);
}

void Generation::complete(Outcome outcome) {
  if (done_) return;
  done_ = true;
  ctx_.metrics.record_request(endpoint_, outcome);
  ctx_.metrics.record_tokens(static_cast<int64_t>(prompt_size_), pipeline_.tokens());
  ctx_.metrics.record_e2e(seconds(Clock::now() - arrival_));
}

}  // namespace moeserve::server
