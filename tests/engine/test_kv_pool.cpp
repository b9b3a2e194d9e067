#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <set>
#include <vector>

#include "core/error.h"
#include "kv/kv_pool.h"

namespace moeserve {
namespace {

// The pool starts zeroed, on 2 MB alignment (huge pages), with every (block, layer, slot) row
// its own memory; blocks come back in full.
TEST(KvPool, ZeroedAlignedDisjointAndAccounted) {
  kv::KvPool pool(5, 4, 3, 10);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(pool.block_data(0)) % (uintptr_t{2} << 20), 0u);
  EXPECT_EQ(pool.block_bytes(), 3u * 4 * 10 * 4);
  for (int32_t b = 0; b < 5; ++b)
    for (int64_t l = 0; l < 3; ++l)
      for (int64_t s = 0; s < 4; ++s)
        for (int64_t i = 0; i < 10; ++i) {
          ASSERT_EQ(pool.at(b, l, s)[i], 0.0f);
          pool.at(b, l, s)[i] = static_cast<float>(((b * 3 + l) * 4 + s) * 10 + i);
        }
  for (int32_t b = 0; b < 5; ++b)
    for (int64_t l = 0; l < 3; ++l)
      for (int64_t s = 0; s < 4; ++s)
        for (int64_t i = 0; i < 10; ++i)
          ASSERT_EQ(pool.at(b, l, s)[i], static_cast<float>(((b * 3 + l) * 4 + s) * 10 + i));

  std::vector<int32_t> a, c;
  EXPECT_TRUE(pool.allocate(3, &a));
  EXPECT_FALSE(pool.allocate(3, &c));  // all or nothing
  EXPECT_TRUE(c.empty());
  EXPECT_EQ(pool.n_used(), 3);
  pool.release(a);
  EXPECT_EQ(pool.n_free(), 5);
}

// Random allocations and releases against a model of which blocks are taken: a block is never
// handed out twice, ids stay in range, `out` is appended to, and counts add up.
TEST(KvPool, NeverHandsOutABlockInUse) {
  kv::KvPool pool(37, 2, 1, 4);
  std::mt19937 rng(11);
  std::vector<std::vector<int32_t>> held;
  std::set<int32_t> taken;
  for (int step = 0; step < 3000; ++step) {
    if (held.empty() || rng() % 3 != 0) {
      const int64_t n = rng() % 6;
      std::vector<int32_t> got = {-7};  // allocate appends after what is there
      const bool ok = pool.allocate(n, &got);
      ASSERT_EQ(ok, n <= 37 - static_cast<int64_t>(taken.size())) << "step " << step;
      ASSERT_EQ(got[0], -7);
      ASSERT_EQ(static_cast<int64_t>(got.size()), ok ? n + 1 : 1);
      got.erase(got.begin());
      for (int32_t b : got) {
        ASSERT_GE(b, 0);
        ASSERT_LT(b, 37);
        ASSERT_TRUE(taken.insert(b).second) << "block " << b << " handed out twice";
      }
      if (!got.empty()) held.push_back(got);
    } else {
      const size_t i = rng() % held.size();
      pool.release(held[i]);
      for (int32_t b : held[i]) taken.erase(b);
      held.erase(held.begin() + static_cast<int64_t>(i));
    }
    ASSERT_EQ(pool.n_used(), static_cast<int64_t>(taken.size()));
    ASSERT_EQ(pool.n_free() + pool.n_used(), 37);
  }
  EXPECT_EQ(pool.blocks_for(0), 0);
  EXPECT_EQ(pool.blocks_for(1), 1);
  EXPECT_EQ(pool.blocks_for(2), 1);
  EXPECT_EQ(pool.blocks_for(3), 2);
}

TEST(KvPool, DoubleReleaseIsCaught) {
  kv::KvPool pool(4, 1, 1, 1);
  std::vector<int32_t> a;
  ASSERT_TRUE(pool.allocate(2, &a));
  pool.release(a);
  EXPECT_THROW(pool.release(a), moeserve::Error);
  EXPECT_THROW(pool.release({9}), moeserve::Error);
  EXPECT_EQ(pool.n_free(), 4);
}

}  // namespace
}  // namespace moeserve
