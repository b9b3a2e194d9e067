// The single-process communicator and check_all (the MPI backend runs in tests/mpi).
#include <cstdlib>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "../test_util.h"
#include "comm/communicator.h"
#include "comm/local_comm.h"

using moeserve::comm::check_all;
using moeserve::comm::LocalCommunicator;
using moeserve::comm::ReduceOp;
using moeserve::comm::Segments;
using moeserve::testing::expect_error;

TEST(LocalComm, WorldWithoutMpirunIsLocal) {
  if (std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMIX_RANK")) GTEST_SKIP();
  auto w = moeserve::comm::world();
  EXPECT_EQ(w->rank(), 0);
  EXPECT_EQ(w->size(), 1);
  EXPECT_NE(dynamic_cast<LocalCommunicator*>(w.get()), nullptr);
}

TEST(LocalComm, CollectivesCopy) {
  LocalCommunicator c;
  c.barrier();
  double d[2] = {1.5, -2.0};
  c.all_reduce(d, 2, ReduceOp::Max);
  EXPECT_EQ(d[1], -2.0);
  int in[3] = {1, 2, 3}, out[3] = {};
  c.all_gather(in, sizeof in, out);
  EXPECT_EQ(out[2], 3);
  std::vector<char> buf(10, 0);
  const size_t cnt[1] = {3}, disp[1] = {5}, zero[1] = {0};
  c.all_gather_v("abc", 3, buf.data(), cnt, disp);
  EXPECT_EQ(std::string(buf.data() + 5, 3), "abc");
  c.all_to_all_v("xyz", cnt, zero, buf.data(), cnt, zero);
  EXPECT_EQ(std::string(buf.data(), 3), "xyz");
  EXPECT_EQ(c.split(3, 0)->size(), 1);
  EXPECT_EQ(c.split(-1, 0), nullptr);
}

TEST(LocalComm, SegmentsMergeAndCutDifferently) {
  std::vector<int> src(10);
  std::iota(src.begin(), src.end(), 0);
  std::vector<int> dst(10, -1);
  Segments s, r;
  s.reset();
  s.add(&src[0], 3 * sizeof(int));
  s.add(&src[3], 2 * sizeof(int));  // continues: merged
  s.add(&src[8], 2 * sizeof(int));
  s.next_peer();
  EXPECT_EQ(s.peer(0).size(), 2u);
  EXPECT_EQ(s.peer_bytes(0), 7 * sizeof(int));
  r.reset();
  r.add(&dst[0], 1 * sizeof(int));
  r.add(&dst[4], 6 * sizeof(int));
  r.next_peer();
  LocalCommunicator c;
  c.all_to_all_segments(s, r);
  EXPECT_EQ(dst, (std::vector<int>{0, -1, -1, -1, 1, 2, 3, 4, 8, 9}));
}

TEST(LocalComm, SendToSelfQueuesAndWindowReads) {
  LocalCommunicator c;
  c.send("hello", 5, 0, 7);
  c.send("", 0, 0, 7);
  char got[5];
  c.recv(got, 5, 0, 7);
  EXPECT_EQ(std::string(got, 5), "hello");
  c.recv(got, 0, 0, 7);
  expect_error([&] { c.recv(got, 5, 0, 7); }, {"no message with tag 7"});

  std::vector<char> mem = {'a', 'b', 'c', 'd'};
  auto w = c.expose(mem.data(), mem.size());
  EXPECT_EQ(w->size(0), 4u);
  char two[2];
  w->get(0, 2, two, 2);
  w->flush(0);
  EXPECT_EQ(std::string(two, 2), "cd");
  expect_error([&] { w->get(0, 3, two, 2); }, {"past the 4 bytes"});
}

TEST(CheckAll, PassesOrNamesTheFailedRank) {
  LocalCommunicator c;
  int ran = 0;
  check_all(c, [&] { ++ran; });
  EXPECT_EQ(ran, 1);
  // Alone, the message needs no rank: it comes back as it was.
  auto message = [&](const std::function<void()>& fn) {
    try {
      check_all(c, fn);
    } catch (const moeserve::Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_EQ(message([] { moeserve::fail("shard 3 is missing"); }), "shard 3 is missing");
  EXPECT_EQ(message([] { throw std::runtime_error("other"); }), "other");
}
