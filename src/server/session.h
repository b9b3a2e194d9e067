// One request in the engine, seen from the HTTP thread that serves it. The engine thread pushes
// token and finish events into a queue (its callbacks only lock, append and notify); the HTTP
// thread waits on the queue, with a timeout so it can also watch its client and the server.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "engine/engine.h"

namespace moeserve::server {

using Clock = std::chrono::steady_clock;

struct EngineEvent {
  engine::TokenEvent token;
  std::optional<engine::FinishEvent> finish;  // set on the last event only
  Clock::time_point time;
};

// Wakes the thread that waits for any of several sessions (the choices of one request).
class Wakeup {
 public:
  uint64_t count() const;
  void notify();
  // Waits until count() differs from `seen`, at most `timeout`.
  void wait(uint64_t seen, std::chrono::milliseconds timeout);

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t count_ = 0;
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  // `wake`, when given, is notified on every event too.
  explicit Session(engine::Service& engine, std::shared_ptr<Wakeup> wake = nullptr)
      : engine_(engine), wake_(std::move(wake)) {}
  ~Session();  // cancels the request if the engine has not finished it

  // Submits `req` (its callbacks are set here). Returns the engine's answer; on anything but
  // Accepted, *error holds the engine's message.
  engine::SubmitResult submit(engine::Request req, std::string* error);

  // Waits up to `timeout` for events and moves them to `out` (in order). False when none came.
  bool wait(std::vector<EngineEvent>& out, std::chrono::milliseconds timeout);

  // Asks the engine to stop the request and free its KV blocks; idempotent, no-op once finished.
  void cancel();
  bool finished() const;

 private:
  engine::Service& engine_;
  std::shared_ptr<Wakeup> wake_;
  uint64_t id_ = 0;
  bool submitted_ = false;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<EngineEvent> events_;
  bool finished_ = false;
  bool cancelled_ = false;
};

}  // namespace moeserve::server
