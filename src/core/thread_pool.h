// A fixed set of worker threads for fork-join loops. Work is split into contiguous, statically
// sized ranges, so which thread computes an element never changes a result.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moeserve {

class ThreadPool {
 public:
  // n_threads <= 0 means one per hardware thread (MOESERVE_THREADS overrides).
  explicit ThreadPool(int n_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls fn(begin, end, thread_index) on disjoint ranges covering [0, n), each range a multiple
  // of `grain` long (but the last), and returns when all are done. Not reentrant: a call from
  // inside fn runs serially on the calling thread.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn,
                    int64_t grain = 1) const;

 private:
  void worker(int index);

  int n_threads_;
  std::vector<std::thread> threads_;
  mutable std::mutex mu_;
  mutable std::condition_variable start_cv_, done_cv_;
  mutable const std::function<void(int64_t, int64_t, int)>* job_ = nullptr;
  mutable int64_t job_n_ = 0, job_grain_ = 1;
  // generation_ and pending_ change under mu_ but are also read without it: workers and the
  // caller spin on them briefly (thread_pool.cpp: spin_ns, 10 us unless MOESERVE_SPIN_US says)
  // before sleeping on the condition variables (decode issues a job every ~100 us, and a futex
  // wake-up costs a good part of that).
  mutable std::atomic<uint64_t> generation_{0};
  mutable std::atomic<int> pending_{0};
  mutable bool busy_ = false;
  std::atomic<bool> stop_{false};
};

}  // namespace moeserve
