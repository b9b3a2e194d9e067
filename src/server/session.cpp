#include "server/session.h"

namespace moeserve::server {

uint64_t Wakeup::count() const {
  std::lock_guard<std::mutex> lk(mu_);
  return count_;
}

void Wakeup::notify() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    ++count_;
  }
  cv_.notify_all();
}

void Wakeup::wait(uint64_t seen, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait_for(lk, timeout, [&] { return count_ != seen; });
}

Session::~Session() {
  cancel();
}

engine::SubmitResult Session::submit(engine::Request req, std::string* error) {
  // The callbacks hold the queue alive (weakly: a Session abandoned by its HTTP thread cancels
  // itself on destruction, and events arriving after that are dropped).
  std::weak_ptr<Session> self = weak_from_this();
  req.on_token = [self](const engine::TokenEvent& t) {
    if (auto s = self.lock()) {
      {
        std::lock_guard<std::mutex> lk(s->mu_);
        s->events_.push_back({t, std::nullopt, Clock::now()});
      }
      s->cv_.notify_one();
      if (s->wake_) s->wake_->notify();
    }
  };
  req.on_finish = [self](const engine::FinishEvent& f) {
    if (auto s = self.lock()) {
      {
        std::lock_guard<std::mutex> lk(s->mu_);
        s->events_.push_back({{}, f, Clock::now()});
        s->finished_ = true;
      }
      s->cv_.notify_one();
      if (s->wake_) s->wake_->notify();
    }
  };
  auto r = engine_.submit(std::make_shared<engine::Request>(std::move(req)), &id_, error);
  std::lock_guard<std::mutex> lk(mu_);
  submitted_ = r == engine::SubmitResult::Accepted;
  return r;
}

bool Session::wait(std::vector<EngineEvent>& out, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait_for(lk, timeout, [&] { return !events_.empty(); });
  if (events_.empty()) return false;
  while (!events_.empty()) {
    out.push_back(std::move(events_.front()));
    events_.pop_front();
  }
  return true;
}

void Session::cancel() {
  uint64_t id = 0;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!submitted_ || finished_ || cancelled_) return;
    cancelled_ = true;
    id = id_;
  }
  engine_.cancel(id);
}

bool Session::finished() const {
  std::lock_guard<std::mutex> lk(mu_);
  return finished_;
}

}  // namespace moeserve::server
