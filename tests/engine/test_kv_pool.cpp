#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

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

}  // namespace
}  // namespace moeserve
