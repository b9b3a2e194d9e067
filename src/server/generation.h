// One choice of a generation request after validation: the engine session, the output pipeline
// and its metrics, driven by the HTTP thread that serves the request (one thread only; nothing
// here is shared). A request with n choices runs n Generations, which wake one Wakeup.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "server/metrics.h"
#include "server/output.h"
#include "server/responses.h"
#include "server/session.h"

namespace moeserve::server {

struct ServerContext;

// The validated request in engine terms.
struct Prepared {
  std::vector<int32_t> prompt;
  int64_t max_tokens = 0;
  engine::SamplingParams sampling;
  OutputOptions output;
  int top_logprobs = -1;
};

class Generation {
 public:
  Generation(ServerContext& ctx, const GenRequest& req, Prepared p, Clock::time_point arrival,
             std::shared_ptr<Wakeup> wake = nullptr);
  ~Generation();  // an unfinished generation is aborted

  // Submits to the engine; throws ApiError 429 (queue full) or 400 (engine refused it).
  void submit();

  // Waits up to `timeout` and consumes what the engine produced, appending the text to send to
  // `out`. Returns true once the output is complete (or failed).
  bool step(Delta& out, std::chrono::milliseconds timeout);

  // The client is gone or the server is stopping: cancel the request in the engine.
  void abort();

  bool done() const { return done_; }
  bool failed() const { return failed_; }
  bool started() const { return first_token_seen_; }  // its first token came
  // Ends a generation that was never submitted, as failed with `error`.
  void fail(std::string error);
  const std::string& error() const { return error_; }
  const char* finish_reason() const { return finish_reason_; }  // "stop" / "length"
  Usage usage() const {
    return {static_cast<int64_t>(prompt_size_), pipeline_.tokens(), cached_tokens_};
  }

 private:
  void complete(Outcome outcome);  // records the request's metrics once

  ServerContext& ctx_;
  std::shared_ptr<Session> session_;
  Prepared prep_;
  size_t prompt_size_;
  OutputPipeline pipeline_;
  std::string endpoint_;
  Clock::time_point arrival_, last_token_;
  bool first_token_seen_ = false;
  int64_t cached_tokens_ = 0;  // from the engine's events
  bool done_ = false, failed_ = false;
  std::string error_;
  const char* finish_reason_ = nullptr;
};

}  // namespace moeserve::server
