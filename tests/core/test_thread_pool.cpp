// ThreadPool: every element exactly once, the same ranges every time, nested and concurrent
// callers, and no lost wake-up between spinning and sleeping.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "core/thread_pool.h"

namespace moeserve {
namespace {

// Runs one job over n elements and checks each was visited once, by ranges of whole grains.
void check_cover(const ThreadPool& pool, int64_t n, int64_t grain) {
  std::vector<std::atomic<int>> seen(n);
  pool.parallel_for(
      n,
      [&](int64_t b, int64_t e, int) {
        EXPECT_TRUE(b % grain == 0) << "range starts mid-grain: " << b;
        for (int64_t i = b; i < e; ++i) seen[i].fetch_add(1);
      },
      grain);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[i].load(), 1) << "n=" << n << " i=" << i;
}

TEST(ThreadPool, EveryElementOnce) {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.size(), threads);
    for (int64_t n : {1, 2, 7, 64, 1000})
      for (int64_t grain : {1, 3, 64}) check_cover(pool, n, grain);
  }
}

// The ranges run at the same time on distinct threads: each waits until every range has started
// (a pool that ran them one after another would never get there, and fails at the deadline).
TEST(ThreadPool, RangesRunAtOnceOnTheirOwnThreads) {
  for (int threads : {2, 3}) {
    ThreadPool pool(threads);
    std::atomic<int> started{0};
    std::atomic<bool> timed_out{false};
    std::mutex mu;
    std::set<std::thread::id> ids;
    std::set<int> indices;
    pool.parallel_for(300, [&](int64_t, int64_t, int t) {
      {
        std::lock_guard<std::mutex> lock(mu);
        ids.insert(std::this_thread::get_id());
        indices.insert(t);
      }
      started.fetch_add(1);
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (started.load() < threads) {
        if (std::chrono::steady_clock::now() > deadline) {
          timed_out = true;
          break;
        }
        std::this_thread::yield();
      }
    });
    EXPECT_FALSE(timed_out) << threads << " threads: the ranges did not run at the same time";
    EXPECT_EQ(started.load(), threads);
    EXPECT_EQ(static_cast<int>(ids.size()), threads);
    EXPECT_EQ(static_cast<int>(indices.size()), threads);
  }
}

TEST(ThreadPool, SameRangesEveryCall) {
  ThreadPool pool(3);
  std::vector<int64_t> first(1000), again(1000);
  pool.parallel_for(1000, [&](int64_t b, int64_t e, int t) {
    for (int64_t i = b; i < e; ++i) first[i] = t;
  });
  for (int rep = 0; rep < 50; ++rep) {
    pool.parallel_for(1000, [&](int64_t b, int64_t e, int t) {
      for (int64_t i = b; i < e; ++i) again[i] = t;
    });
    ASSERT_EQ(first, again) << "call " << rep;
  }
}

TEST(ThreadPool, ManyShortJobsInARow) {  // what decode does: a job every few microseconds
  ThreadPool pool(2);
  std::atomic<int64_t> sum{0};
  for (int rep = 0; rep < 20000; ++rep)
    pool.parallel_for(4, [&](int64_t b, int64_t e, int) { sum.fetch_add(e - b); });
  EXPECT_EQ(sum.load(), 4 * 20000);
}

TEST(ThreadPool, JobsAfterTheWorkersWentToSleep) {
  ThreadPool pool(3);
  for (int rep = 0; rep < 5; ++rep) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // past any spinning
    check_cover(pool, 100, 1);
  }
}

TEST(ThreadPool, NestedCallRunsSerially) {
  ThreadPool pool(2);
  std::atomic<int64_t> inner{0};
  pool.parallel_for(4, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i)
      pool.parallel_for(10, [&](int64_t ib, int64_t ie, int t) {
        EXPECT_EQ(ib, 0);
        EXPECT_EQ(ie, 10);
        (void)t;
        inner.fetch_add(ie - ib);
      });
  });
  EXPECT_EQ(inner.load(), 40);
}

TEST(ThreadPool, TwoCallersAtOnce) {  // the second runs its job itself, both complete
  ThreadPool pool(2);
  std::atomic<int64_t> total{0};
  auto caller = [&] {
    for (int rep = 0; rep < 2000; ++rep)
      pool.parallel_for(8, [&](int64_t b, int64_t e, int) { total.fetch_add(e - b); });
  };
  std::thread a(caller), b(caller);
  a.join();
  b.join();
  EXPECT_EQ(total.load(), 2 * 2000 * 8);
}

TEST(ThreadPool, DestroyedRightAfterAJobOrIdle) {
  for (int rep = 0; rep < 200; ++rep) {
    ThreadPool pool(3);
    if (rep % 2) check_cover(pool, 30, 1);
  }
}

}  // namespace
}  // namespace moeserve
