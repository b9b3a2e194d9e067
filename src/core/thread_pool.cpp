#include "core/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>

namespace moeserve {

namespace {
// How long a worker spins for the next job, and the caller for the workers to finish, before
// sleeping on the condition variable: a time, not a count of pause instructions, whose cost
// differs tenfold between CPUs (and more under a hypervisor). Decode issues a job every few to
// ~100 microseconds and the gaps between them are mostly short, so a short spin saves most
// futex wake-ups; a long one (formerly 4000 pauses, ~100 us here) costs a machine whose cores
// are shared: the spinning threads use up their share of the CPU, and a caller waiting on a
// worker that was preempted spins while that worker waits for a core. Measured on a 2-vCPU VM
// under load (docs/benchmarks.md): 1.4x the decode speed of the 100 us spin. MOESERVE_SPIN_US
// sets it (a machine whose cores are the engine's alone may gain from a longer spin).
int64_t spin_ns() {
  static const int64_t ns = [] {
    const char* v = std::getenv("MOESERVE_SPIN_US");
    if (!v || !*v) return int64_t{10000};
    char* end = nullptr;
    const long long us = std::strtoll(v, &end, 10);
    return (*end == 0 && us >= 0 && us <= 1000000) ? static_cast<int64_t>(us) * 1000
                                                   : int64_t{10000};
  }();
  return ns;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until done() or spin_ns() have passed; whether done() became true.
template <class F>
bool spin_until(F&& done) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto limit = std::chrono::nanoseconds(spin_ns());
  for (;;) {
    for (int j = 0; j < 16; ++j) {
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() - t0 >= limit) return done();
  }
}

// Range of chunk `i` of `parts` over n elements in units of grain.
void chunk(int64_t n, int64_t grain, int parts, int i, int64_t* b, int64_t* e) {
  const int64_t units = (n + grain - 1) / grain;
  const int64_t per = units / parts, extra = units % parts;
  const int64_t ub = i * per + std::min<int64_t>(i, extra);
  const int64_t ue = ub + per + (i < extra ? 1 : 0);
  *b = std::min(n, ub * grain);
  *e = std::min(n, ue * grain);
}
}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) {
    if (const char* env = std::getenv("MOESERVE_THREADS")) n_threads = std::atoi(env);
  }
  if (n_threads <= 0)
    n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  n_threads_ = n_threads;
  for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::worker(int index) {
  uint64_t seen = 0;
  for (;;) {
    spin_until([&] {
      return generation_.load(std::memory_order_acquire) != seen ||
             stop_.load(std::memory_order_relaxed);
    });
    const std::function<void(int64_t, int64_t, int)>* job;
    int64_t n, grain;
    {
      std::unique_lock<std::mutex> lk(mu_);
      start_cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
      n = job_n_;
      grain = job_grain_;
    }
    int64_t b, e;
    chunk(n, grain, n_threads_, index, &b, &e);
    if (b < e) (*job)(b, e, index);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lk(mu_);
      done_cv_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn,
                              int64_t grain) const {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  bool serial = n_threads_ == 1 || n <= grain;
  if (!serial) {
    std::lock_guard<std::mutex> lk(mu_);
    if (busy_)
      serial = true;  // nested call
    else
      busy_ = true;
  }
  if (serial) {
    fn(0, n, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    job_ = &fn;
    job_n_ = n;
    job_grain_ = grain;
    pending_ = n_threads_ - 1;
    ++generation_;
  }
  start_cv_.notify_all();
  int64_t b, e;
  chunk(n, grain, n_threads_, 0, &b, &e);
  if (b < e) fn(b, e, 0);
  spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; });
  std::unique_lock<std::mutex> lk(mu_);
  done_cv_.wait(lk, [&] { return pending_ == 0; });
  busy_ = false;
}

}  // namespace moeserve
