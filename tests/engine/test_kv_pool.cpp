#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "core/dtype.h"
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
  EXPECT_EQ(pool.dtype(), kv::KvDtype::F32);
  EXPECT_EQ(pool.capacity_tokens(), 20);
  auto f = [&](int32_t b, int64_t l, int64_t s) {
    return reinterpret_cast<float*>(pool.at(b, l, s));
  };
  for (int32_t b = 0; b < 5; ++b)
    for (int64_t l = 0; l < 3; ++l)
      for (int64_t s = 0; s < 4; ++s)
        for (int64_t i = 0; i < 10; ++i) {
          ASSERT_EQ(f(b, l, s)[i], 0.0f);
          f(b, l, s)[i] = static_cast<float>(((b * 3 + l) * 4 + s) * 10 + i);
        }
  for (int32_t b = 0; b < 5; ++b)
    for (int64_t l = 0; l < 3; ++l)
      for (int64_t s = 0; s < 4; ++s)
        for (int64_t i = 0; i < 10; ++i)
          ASSERT_EQ(f(b, l, s)[i], static_cast<float>(((b * 3 + l) * 4 + s) * 10 + i));

  std::vector<int32_t> a, c;
  EXPECT_TRUE(pool.allocate(3, &a));
  EXPECT_FALSE(pool.allocate(3, &c));  // all or nothing
  EXPECT_TRUE(c.empty());
  EXPECT_EQ(pool.n_used(), 3);
  pool.release(a);
  EXPECT_EQ(pool.n_free(), 5);
}

// Each dtype's rows: their size (bf16 half of f32, fp8 a byte a value plus an f32 scale per 128
// values), contiguous within a block, and a block is layers x slots x rows.
TEST(KvPool, RowsTakeTheirDtypesBytes) {
  EXPECT_EQ(kv::kv_row_bytes(kv::KvDtype::F32, 576), 2304);
  EXPECT_EQ(kv::kv_row_bytes(kv::KvDtype::BF16, 576), 1152);
  EXPECT_EQ(kv::kv_row_bytes(kv::KvDtype::FP8, 576), 576 + 5 * 4);
  EXPECT_EQ(kv::kv_row_bytes(kv::KvDtype::FP8, 128), 132);
  EXPECT_EQ(kv::kv_row_bytes(kv::KvDtype::FP8, 48), 52);
  for (kv::KvDtype d : kv::kKvDtypes) {
    kv::KvPool pool(3, 4, 2, 176, d);
    EXPECT_EQ(pool.row_bytes(), kv::kv_row_bytes(d, 176));
    EXPECT_EQ(pool.block_bytes(), static_cast<size_t>(2 * 4 * pool.row_bytes()));
    EXPECT_EQ(pool.at(1, 1, 3) + pool.row_bytes(), pool.block_data(2));
    kv::KvDtype back;
    ASSERT_TRUE(kv::parse_kv_dtype(kv::kv_dtype_name(d), &back));
    EXPECT_EQ(back, d);
  }
  kv::KvDtype x;
  EXPECT_FALSE(kv::parse_kv_dtype("fp16", &x));
}

// bf16 rows round to nearest even; fp8 rows hold e4m3 of x / scale with scale = amax / 448 per
// 128 values, so the block's largest value comes back exactly and the others within e4m3's
// half-ulp (2^-4 relative), small ones within half the smallest step.
TEST(KvPool, RowsEncodeAsDocumented) {
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const int64_t dim = 200;
  std::vector<float> x(dim), y(dim);
  for (float& v : x) v = n(rng);
  x[150] = 0;
  for (int64_t k = 128; k < dim; ++k) x[k] *= 1e-3f;  // the second block far smaller
  std::vector<uint8_t> row(kv::kv_row_bytes(kv::KvDtype::BF16, dim));
  kv::encode_row(kv::KvDtype::BF16, x.data(), dim, row.data());
  kv::decode_row(kv::KvDtype::BF16, row.data(), dim, y.data());
  for (int64_t k = 0; k < dim; ++k) EXPECT_EQ(y[k], bf16_to_f32(f32_to_bf16(x[k])));
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1p-8f), f32_to_bf16(1.0f));  // a tie goes to even
  kv::encode_row(kv::KvDtype::FP8, x.data(), dim, row.data());
  kv::decode_row(kv::KvDtype::FP8, row.data(), dim, y.data());
  for (int64_t b = 0; b < 2; ++b) {
    const int64_t k0 = b * 128, k1 = std::min<int64_t>(dim, k0 + 128);
    float amax = 0;
    int64_t at = k0;
    for (int64_t k = k0; k < k1; ++k)
      if (std::fabs(x[k]) > amax) amax = std::fabs(x[k]), at = k;
    float scale;
    std::memcpy(&scale, row.data() + dim + 4 * b, 4);
    EXPECT_EQ(scale, amax / 448.0f);
    EXPECT_NEAR(y[at], x[at], 1e-6f * amax);
    for (int64_t k = k0; k < k1; ++k) {
      EXPECT_NE(row[k] & 0x7f, 0x7f) << "a NaN byte";
      EXPECT_EQ(y[k], fp8e4m3_to_f32(row[k]) * scale);
      EXPECT_LE(std::fabs(y[k] - x[k]), std::max(std::fabs(x[k]) / 16, scale * 0x1p-10f)) << k;
    }
  }
  EXPECT_EQ(y[150], 0.0f);
  // All zeros: scale 1, zeros back; a NaN or infinity: the block decodes to NaN.
  std::fill(x.begin(), x.end(), 0.0f);
  x[5] = NAN;
  x[140] = INFINITY;
  kv::encode_row(kv::KvDtype::FP8, x.data(), dim, row.data());
  kv::decode_row(kv::KvDtype::FP8, row.data(), dim, y.data());
  EXPECT_TRUE(std::isnan(y[0]) && std::isnan(y[5]) && std::isnan(y[199]));
  x[5] = x[140] = 0;
  kv::encode_row(kv::KvDtype::FP8, x.data(), dim, row.data());
  kv::decode_row(kv::KvDtype::FP8, row.data(), dim, y.data());
  for (float v : y) EXPECT_EQ(v, 0.0f);
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

// Prefix cache: published blocks are found by their tokens and their parent, shared with a
// reference each, kept when released, and reused only for exactly the same prefix.
TEST(KvPool, PrefixMatchSharesPublishedBlocks) {
  kv::KvPool pool(8, 2, 1, 4);
  const std::vector<int32_t> a = {1, 2, 3, 4, 5, 6};
  std::vector<int32_t> seq;
  ASSERT_TRUE(pool.allocate(3, &seq));
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(pool.publish(seq[i], i ? seq[i - 1] : -1, a.data() + 2 * i), seq[i]);
    EXPECT_TRUE(pool.is_published(seq[i]));
  }
  EXPECT_EQ(pool.n_cached(), 3);
  // Same first two blocks, then a different one.
  const std::vector<int32_t> b = {1, 2, 3, 4, 5, 7};
  std::vector<int32_t> got;
  EXPECT_EQ(pool.match(b.data(), 3, &got), 2);
  EXPECT_EQ(got, std::vector<int32_t>(seq.begin(), seq.begin() + 2));
  EXPECT_EQ(pool.refs(seq[0]), 2);
  EXPECT_EQ(pool.refs(seq[2]), 1);
  // max_blocks bounds the match; a different first block matches nothing.
  std::vector<int32_t> one;
  EXPECT_EQ(pool.match(a.data(), 1, &one), 1);
  const std::vector<int32_t> c = {1, 9, 3, 4};
  std::vector<int32_t> none;
  EXPECT_EQ(pool.match(c.data(), 2, &none), 0);
  EXPECT_TRUE(none.empty());
  // The same tokens one block later are another prefix.
  const std::vector<int32_t> shifted = {3, 4, 5, 6};
  EXPECT_EQ(pool.match(shifted.data(), 2, &none), 0);
  pool.release(one);
  pool.release(got);
  pool.release(seq);
  // Nobody holds them: all free for allocate(), still cached and found again.
  EXPECT_EQ(pool.n_used(), 0);
  EXPECT_EQ(pool.n_free(), 8);
  EXPECT_EQ(pool.n_evictable(), 3);
  std::vector<int32_t> again;
  EXPECT_EQ(pool.match(a.data(), 3, &again), 3);
  EXPECT_EQ(again, seq);
  EXPECT_EQ(pool.n_used(), 3);
  EXPECT_EQ(pool.n_evictable(), 0);
  pool.release(again);
  EXPECT_THROW(pool.release({seq[0]}), moeserve::Error);  // no reference left to drop
}

// A second block computed for a prefix already published is merged into the first: publish
// hands back the published one (with the caller's reference) and frees the duplicate.
TEST(KvPool, PublishingADuplicateReturnsThePublishedBlock) {
  kv::KvPool pool(4, 2, 1, 4);
  const std::vector<int32_t> t = {7, 8};
  std::vector<int32_t> x, y;
  ASSERT_TRUE(pool.allocate(1, &x));
  ASSERT_TRUE(pool.allocate(1, &y));
  EXPECT_EQ(pool.publish(x[0], -1, t.data()), x[0]);
  EXPECT_EQ(pool.publish(y[0], -1, t.data()), x[0]);
  EXPECT_FALSE(pool.is_published(y[0]));
  EXPECT_EQ(pool.refs(x[0]), 2);
  EXPECT_EQ(pool.refs(y[0]), 0);
  EXPECT_EQ(pool.n_used(), 1);
  EXPECT_EQ(pool.n_cached(), 1);
  pool.release({x[0]});
  pool.release({x[0]});
  EXPECT_EQ(pool.n_used(), 0);
}

// Eviction: only when no never-used (or unpublished) block is free, least recently released
// first, a sequence's last block before its first; an evicted block is published again under
// its new prefix.
// Keys with the token after each block (speculative decoding): a match needs that token too,
// and the same tokens going on differently are two blocks, each chained on.
TEST(KvPool, KeysWithTheNextTokenTellContinuationsApart) {
  kv::KvPool pool(8, 2, 1, 4);
  pool.set_key_next_token(true);
  EXPECT_TRUE(pool.key_next_token());
  const std::vector<int32_t> a = {1, 2, 3, 4, 5}, b = {1, 2, 9, 4, 5};
  std::vector<int32_t> x, y;
  ASSERT_TRUE(pool.allocate(2, &x));
  ASSERT_TRUE(pool.allocate(2, &y));
  EXPECT_EQ(pool.publish(x[0], -1, a.data()), x[0]);
  EXPECT_EQ(pool.publish(x[1], x[0], a.data() + 2), x[1]);
  // b's first block holds a's tokens but reads 9 after them: published too, and b's second
  // block chains on to it.
  EXPECT_EQ(pool.publish(y[0], -1, b.data()), y[0]);
  EXPECT_TRUE(pool.is_published(y[0]));
  EXPECT_EQ(pool.publish(y[1], y[0], b.data() + 2), y[1]);
  EXPECT_EQ(pool.n_cached(), 4);
  std::vector<int32_t> got;
  EXPECT_EQ(pool.match(b.data(), 2, &got), 2);
  EXPECT_EQ(got, y);
  pool.release(got);
  got.clear();
  EXPECT_EQ(pool.match(a.data(), 2, &got), 2);
  EXPECT_EQ(got, x);
  pool.release(got);
  got.clear();
  // {1, 2} then 7: neither block.
  const std::vector<int32_t> c = {1, 2, 7};
  EXPECT_EQ(pool.match(c.data(), 1, &got), 0);
  // The same block and next token: the published one is returned.
  std::vector<int32_t> z;
  ASSERT_TRUE(pool.allocate(1, &z));
  EXPECT_EQ(pool.publish(z[0], -1, a.data()), x[0]);
  pool.release({x[0]});
  pool.release(x);
  pool.release(y);
  EXPECT_EQ(pool.n_used(), 0);
  // The keys change only while nothing is published.
  EXPECT_THROW(pool.set_key_next_token(false), Error);
}

TEST(KvPool, EvictsLeastRecentlyReleasedOnlyWhenNothingElseIsFree) {
  kv::KvPool pool(4, 1, 1, 4);
  const std::vector<int32_t> a = {10, 11}, b = {20};
  std::vector<int32_t> sa, sb;
  ASSERT_TRUE(pool.allocate(2, &sa));
  pool.publish(sa[0], -1, &a[0]);
  pool.publish(sa[1], sa[0], &a[1]);
  ASSERT_TRUE(pool.allocate(1, &sb));
  pool.publish(sb[0], -1, &b[0]);
  pool.release(sa);  // LRU: sa[1], sa[0]
  pool.release(sb);  // then sb[0]
  EXPECT_EQ(pool.n_free(), 4);
  std::vector<int32_t> n1;
  ASSERT_TRUE(pool.allocate(1, &n1));  // the never-used block: nothing evicted
  EXPECT_EQ(pool.n_cached(), 3);
  std::vector<int32_t> n2;
  ASSERT_TRUE(pool.allocate(1, &n2));  // evicts a's second block
  EXPECT_EQ(n2[0], sa[1]);
  EXPECT_EQ(pool.n_cached(), 2);
  std::vector<int32_t> got;
  EXPECT_EQ(pool.match(a.data(), 2, &got), 1);  // a's first block is still there
  pool.release(got);
  std::vector<int32_t> n3;
  ASSERT_TRUE(pool.allocate(1, &n3));  // now the least recent is b (a's first was re-used)
  EXPECT_EQ(n3[0], sb[0]);
  std::vector<int32_t> n4;
  ASSERT_TRUE(pool.allocate(1, &n4));
  EXPECT_EQ(n4[0], sa[0]);
  EXPECT_EQ(pool.n_cached(), 0);
  EXPECT_FALSE(pool.allocate(1, &n4));
  // Blocks that left the cache hold a new prefix.
  const std::vector<int32_t> c = {30, 31};
  std::vector<int32_t> sc;
  pool.release(n1);
  ASSERT_TRUE(pool.allocate(1, &sc));
  EXPECT_EQ(pool.publish(sc[0], -1, &c[0]), sc[0]);
  const int32_t child = n2[0];
  EXPECT_EQ(pool.publish(child, sc[0], &c[1]), child);
  pool.release(sc);
  pool.release({child});
  std::vector<int32_t> m;
  EXPECT_EQ(pool.match(c.data(), 2, &m), 2);
  pool.release(m);
  pool.release(n3);
  pool.release(n4);
  EXPECT_EQ(pool.n_used(), 0);
  EXPECT_EQ(pool.n_free(), 4);
}

// Random sequences sharing prefixes against a model of the cache: every match returns blocks
// published for exactly those tokens (checked through the block's stored rows), a held block
// is never handed out again, and all references come back.
TEST(KvPool, RandomPrefixTrafficNeverSharesWrongOrHeldBlocks) {
  const int64_t bs = 2, n_blocks = 24;
  kv::KvPool pool(n_blocks, bs, 1, 1);
  std::mt19937 rng(5);
  // A block's row 0 holds a fingerprint of the whole prefix it ends, as a computed block would.
  auto fingerprint = [&](const std::vector<int32_t>& t, int64_t end) {
    float f = 0;
    for (int64_t i = 0; i < end; ++i) f = f * 3 + static_cast<float>(t[i]);
    return std::fmod(f, 1e6f);
  };
  struct Held {
    std::vector<int32_t> tokens, blocks;
  };
  std::vector<Held> held;
  std::vector<int32_t> refs(n_blocks, 0);
  for (int step = 0; step < 4000; ++step) {
    if (held.size() < 6 && rng() % 2) {
      Held h;
      const int64_t n = 1 + rng() % 5;
      for (int64_t i = 0; i < n * bs; ++i) h.tokens.push_back(static_cast<int32_t>(rng() % 3));
      const int64_t k = pool.match(h.tokens.data(), n, &h.blocks);
      for (int64_t i = 0; i < k; ++i) {
        float v;
        std::memcpy(&v, pool.at(h.blocks[i], 0, 0), sizeof v);
        ASSERT_EQ(v, fingerprint(h.tokens, (i + 1) * bs)) << "a wrong block shared";
      }
      if (!pool.allocate(n - k, &h.blocks)) {
        pool.release(h.blocks);
        continue;
      }
      for (int64_t i = k; i < n; ++i) {
        ASSERT_EQ(refs[h.blocks[i]], 0) << "a held block handed out";
        const float v = fingerprint(h.tokens, (i + 1) * bs);
        pool.store(&v, h.blocks[i], 0, 0);
        h.blocks[i] = pool.publish(h.blocks[i], i ? h.blocks[i - 1] : -1, &h.tokens[i * bs]);
      }
      for (int32_t b : h.blocks) ++refs[b];
      held.push_back(std::move(h));
    } else if (!held.empty()) {
      const size_t i = rng() % held.size();
      pool.release(held[i].blocks);
      for (int32_t b : held[i].blocks) --refs[b];
      held.erase(held.begin() + static_cast<int64_t>(i));
    }
    for (int32_t b = 0; b < n_blocks; ++b) ASSERT_EQ(pool.refs(b), refs[b]);
  }
  for (Held& h : held) pool.release(h.blocks);
  EXPECT_EQ(pool.n_used(), 0);
  EXPECT_EQ(pool.n_free(), n_blocks);
}

}  // namespace
}  // namespace moeserve
