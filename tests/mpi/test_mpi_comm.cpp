// The communicator on N processes (mpirun -np N): collectives, all-to-all with scatter/gather
// lists, messages, split, one-sided windows, check_all, mailboxes. `--large` adds messages above
// INT_MAX bytes (about 5 GB of memory at -np 2).
#include <chrono>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "harness.h"

using moeserve::comm::Communicator;
using moeserve::comm::ReduceOp;
using moeserve::comm::Segments;
using moeserve::mpitest::Checker;

namespace {

// The byte at position i of the message from rank `from` to rank `to`.
uint8_t pattern(int from, int to, size_t i) {
  return static_cast<uint8_t>((i * 131 + from * 17 + to * 29 + 7) & 0xff);
}

void test_basics(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  std::vector<int32_t> ranks(n, -1);
  const int32_t mine = me;
  c.all_gather(&mine, sizeof mine, ranks.data());
  for (int r = 0; r < n; ++r) CHECK(ck, ranks[r] == r);
  c.barrier();
  for (int root = 0; root < n; ++root)
    for (size_t bytes : {size_t{0}, size_t{1}, size_t{1000}}) {
      std::vector<uint8_t> b(bytes, 0);
      if (me == root)
        for (size_t i = 0; i < bytes; ++i) b[i] = pattern(root, 0, i);
      c.broadcast(b.data(), bytes, root);
      bool ok = true;
      for (size_t i = 0; i < bytes; ++i) ok &= b[i] == pattern(root, 0, i);
      CHECK(ck, ok);
    }
}

void test_all_reduce(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  std::vector<float> f(5);
  std::vector<double> d(5);
  std::vector<int64_t> l(5);
  for (int op = 0; op < 2; ++op) {
    for (int i = 0; i < 5; ++i) f[i] = d[i] = static_cast<float>(me + i), l[i] = me + i;
    const ReduceOp o = op ? ReduceOp::Max : ReduceOp::Sum;
    c.all_reduce(f.data(), f.size(), o);
    c.all_reduce(d.data(), d.size(), o);
    c.all_reduce(l.data(), l.size(), o);
    for (int i = 0; i < 5; ++i) {
      const int64_t want = op ? n - 1 + i : int64_t{n} * (n - 1) / 2 + int64_t{n} * i;
      CHECK(ck, f[i] == static_cast<float>(want) && d[i] == want && l[i] == want);
    }
  }
}

void test_gather_v(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  std::vector<size_t> counts(n), displs(n);
  size_t total = 0;
  for (int r = n - 1; r >= 0; --r) {  // blocks in reverse rank order, with gaps
    counts[r] = 3 * r;
    displs[r] = total + 2;
    total += counts[r] + 2;
  }
  std::vector<uint8_t> send(counts[me]), recv(total, 0xee);
  for (size_t i = 0; i < send.size(); ++i) send[i] = pattern(me, 0, i);
  c.all_gather_v(send.data(), send.size(), recv.data(), counts, displs);
  bool ok = true;
  for (int r = 0; r < n; ++r)
    for (size_t i = 0; i < counts[r]; ++i) ok &= recv[displs[r] + i] == pattern(r, 0, i);
  CHECK(ck, ok);
}

void test_all_to_all(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  std::vector<int64_t> s(n * 3), r(n * 3, -1);
  for (int p = 0; p < n; ++p)
    for (int i = 0; i < 3; ++i) s[p * 3 + i] = me * 1000 + p * 10 + i;
  c.all_to_all(s.data(), 3 * sizeof(int64_t), r.data());
  for (int p = 0; p < n; ++p)
    for (int i = 0; i < 3; ++i) CHECK(ck, r[p * 3 + i] == p * 1000 + me * 10 + i);

  // all_to_all_v: (from + to) % 3 * 5 bytes per pair (some empty), blocks in reverse order.
  auto bytes = [](int from, int to) { return static_cast<size_t>((from + to) % 3 * 5); };
  std::vector<size_t> sc(n), sd(n), rc(n), rd(n);
  size_t st = 0, rt = 0;
  for (int p = n - 1; p >= 0; --p) {
    sc[p] = bytes(me, p), sd[p] = st, st += sc[p];
    rc[p] = bytes(p, me), rd[p] = rt, rt += rc[p];
  }
  std::vector<uint8_t> sb(st), rb(rt, 0xee);
  for (int p = 0; p < n; ++p)
    for (size_t i = 0; i < sc[p]; ++i) sb[sd[p] + i] = pattern(me, p, i);
  c.all_to_all_v(sb.data(), sc, sd, rb.data(), rc, rd);
  bool ok = true;
  for (int p = 0; p < n; ++p)
    for (size_t i = 0; i < rc[p]; ++i) ok &= rb[rd[p] + i] == pattern(p, me, i);
  CHECK(ck, ok);
}

// Pieces cut differently on the two sides: the sender reads every other 5-byte run of a strided
// source, the receiver writes 3-byte runs with 1-byte gaps. Both ways of moving pieces.
void test_segments_on(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  auto bytes = [](int from, int to) { return static_cast<size_t>(11 * (from + 1) + to); };
  std::vector<std::vector<uint8_t>> src(n), dst(n);
  Segments s, r;
  s.reset();
  r.reset();
  for (int p = 0; p < n; ++p) {
    const size_t b = bytes(me, p);
    src[p].assign(2 * b + 10, 0xaa);
    for (size_t i = 0, o = 0; i < b; i += 5, o += 10) {
      const size_t len = std::min<size_t>(5, b - i);
      for (size_t k = 0; k < len; ++k) src[p][o + k] = pattern(me, p, i + k);
      s.add(&src[p][o], len);
    }
    s.next_peer();
    const size_t rb = bytes(p, me);
    dst[p].assign(2 * rb + 10, 0xee);
    for (size_t i = 0, o = 0; i < rb; i += 3, o += 4)
      r.add(&dst[p][o], std::min<size_t>(3, rb - i));
    r.next_peer();
  }
  c.all_to_all_segments(s, r);
  bool ok = true;
  for (int p = 0; p < n; ++p)
    for (size_t i = 0; i < bytes(p, me); ++i) ok &= dst[p][i / 3 * 4 + i % 3] == pattern(p, me, i);
  CHECK(ck, ok);
}

void test_segments(Communicator& c, Checker& ck) {
  test_segments_on(c, ck);
  auto dt = moeserve::comm::mpi_world({moeserve::comm::PiecesVia::Staging});
  test_segments_on(*dt, ck);
  auto half = dt->split(c.rank() % 2, 0);  // the option survives a split
  test_segments_on(*half, ck);
}

// Matched cuts: for each pair (from, to) the same piece sizes on both sides, some at or above
// the direct threshold (their own messages), some below (packed), a peer with a single small
// piece, and empty pieces (left out on both sides). The sender's pieces are every other run of
// a strided source, the receiver's land in reverse order of address with gaps, so a piece put
// in the wrong place shows.
// The lists of one exchange and the memory they name; `salt` makes each exchange's bytes its
// own.
struct MatchedCase {
  int n, me;
  size_t direct, salt;
  std::vector<std::vector<uint8_t>> src, dst;
  Segments s, r;
  std::vector<size_t> sizes(int from, int to) const {
    std::vector<size_t> v;
    if ((from + to) % 3 == 2) return std::vector<size_t>{7 + size_t(from)};  // one small piece
    for (int k = 0; k < 6; ++k)
      v.push_back((k + from + 2 * to) % 3 == 0 ? direct + 13 * k + to : 5 * k + from);
    v.push_back(0);
    return v;
  }
  MatchedCase(Communicator& c, size_t direct_, size_t salt_ = 0)
      : n(c.size()), me(c.rank()), direct(direct_), salt(salt_), src(n), dst(n) {
    s.reset();
    r.reset();
    for (int p = 0; p < n; ++p) {
      const auto out = sizes(me, p);
      size_t total = 0;
      for (size_t b : out) total += b;
      src[p].assign(2 * total + 16, 0xaa);
      size_t i = 0, o = 0;
      for (size_t b : out) {
        for (size_t k = 0; k < b; ++k) src[p][o + k] = pattern(me, p, i + k + salt * 7919);
        s.add_piece(&src[p][o], b);
        i += b, o += 2 * b + 1;
      }
      s.next_peer();
      const auto in = sizes(p, me);
      total = 0;
      for (size_t b : in) total += b;
      dst[p].assign(total + in.size(), 0xee);
      // Piece k lands after pieces k+1.. (reverse address order), one byte apart.
      size_t end = dst[p].size();
      std::vector<size_t> at(in.size());
      for (size_t k = 0; k < in.size(); ++k) at[k] = end -= in[k] + 1;
      for (size_t k = 0; k < in.size(); ++k) r.add_piece(&dst[p][at[k]], in[k]);
      r.next_peer();
    }
  }
  bool arrived() const {
    bool ok = true;
    for (int p = 0; p < n; ++p) {
      const auto in = sizes(p, me);
      size_t end = dst[p].size(), i = 0;
      for (size_t b : in) {
        end -= b + 1;
        for (size_t k = 0; k < b; ++k) ok &= dst[p][end + k] == pattern(p, me, i + k + salt * 7919);
        ok &= dst[p][end + b] == 0xee;
        i += b;
      }
    }
    return ok;
  }
};

void test_matched_on(Communicator& c, Checker& ck, size_t direct) {
  MatchedCase x(c, direct);
  c.all_to_all_matched(x.s, x.r);
  CHECK(ck, x.arrived());
}

// Several non-blocking exchanges in flight at once, completed in another order than started
// (each keeps to its own messages), one of them ended by its destructor (which waits).
void test_matched_in_flight(Communicator& c, Checker& ck) {
  for (size_t direct : {size_t(1), size_t(64), size_t(1) << 20}) {
    moeserve::comm::MpiOptions opt;
    opt.direct_bytes = direct;
    auto m = moeserve::comm::mpi_world(opt);
    MatchedCase a(*m, direct, 1), b(*m, direct, 2), d(*m, direct, 3);
    auto pa = m->start_all_to_all_matched(a.s, a.r);
    auto pb = m->start_all_to_all_matched(b.s, b.r);
    { auto pd = m->start_all_to_all_matched(d.s, d.r); }  // waited for here
    CHECK(ck, d.arrived());
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    bool done = false;
    while (!done && std::chrono::steady_clock::now() < until) done = pb->test();
    CHECK(ck, done);
    if (!done) pb->wait();
    CHECK(ck, b.arrived());
    CHECK(ck, pb->test());  // stays complete
    pa->wait();
    CHECK(ck, a.arrived());
    // Blocking exchanges between non-blocking ones number their messages alike.
    MatchedCase e(*m, direct, 4);
    auto pe = m->start_all_to_all_matched(e.s, e.r);
    test_matched_on(*m, ck, direct);
    pe->wait();
    CHECK(ck, e.arrived());
  }
}

void test_matched(Communicator& c, Checker& ck) {
  moeserve::comm::MpiOptions opt;
  for (size_t direct : {size_t(1), size_t(64), size_t(1) << 20}) {
    opt.direct_bytes = direct;
    auto m = moeserve::comm::mpi_world(opt);
    test_matched_on(*m, ck, direct);
    auto half = m->split(c.rank() % 2, 0);
    test_matched_on(*half, ck, direct);
  }
  test_matched_on(c, ck, 100);
}

void test_send_recv(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  if (n < 2) return;
  const int peer = me % 2 ? me - 1 : me + 1;
  if (peer >= n) return;  // odd size: the last rank sits out
  auto msg = [](int from, int tag) {
    std::vector<uint8_t> m(static_cast<size_t>(100 * from + tag));
    for (size_t i = 0; i < m.size(); ++i) m[i] = pattern(from, tag, i);
    return m;
  };
  auto send_both = [&] {
    for (int tag : {5, 6}) c.send(msg(me, tag).data(), msg(me, tag).size(), peer, tag);
    c.send(nullptr, 0, peer, 7);
  };
  auto recv_both = [&] {
    for (int tag : {5, 6}) {
      std::vector<uint8_t> got(msg(peer, tag).size());
      c.recv(got.data(), got.size(), peer, tag);
      CHECK(ck, got == msg(peer, tag));
    }
    c.recv(nullptr, 0, peer, 7);
  };
  if (me % 2 == 0)
    send_both(), recv_both();
  else
    recv_both(), send_both();
  CHECK_THROWS(ck, [&] { c.send(nullptr, 0, peer, 40000); }, {"tag 40000"});
}

void test_split(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  auto sub = c.split(me % 2, -me);  // reverse order inside each half
  const int half = (n - me % 2 + 1) / 2;
  CHECK(ck, sub && sub->size() == half);
  if (sub) {
    CHECK(ck, sub->rank() == half - 1 - me / 2);
    int64_t sum = me;
    sub->all_reduce(&sum, 1, ReduceOp::Sum);
    int64_t want = 0;
    for (int r = me % 2; r < n; r += 2) want += r;
    CHECK(ck, sum == want);
  }
  auto none = c.split(me == 0 ? -1 : 0, 0);
  CHECK(ck, (me == 0) == (none == nullptr));
}

void test_window(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  auto size_of = [](int r) { return r == 0 ? size_t{0} : size_t(4096) * r + 3; };
  std::vector<uint8_t> mem(size_of(me));
  for (size_t i = 0; i < mem.size(); ++i) mem[i] = pattern(me, 0, i);
  auto win = c.expose(mem.empty() ? nullptr : mem.data(), mem.size());
  bool ok = true;
  for (int t = 0; t < n; ++t) {
    CHECK(ck, win->size(t) == size_of(t));
    if (!size_of(t)) continue;
    std::vector<uint8_t> a(100), b(size_of(t) - 50);
    win->get(t, size_of(t) - 100, a.data(), a.size());
    win->get(t, 50, b.data(), b.size());
    win->flush(t);
    for (size_t i = 0; i < a.size(); ++i) ok &= a[i] == pattern(t, 0, size_of(t) - 100 + i);
    for (size_t i = 0; i < b.size(); ++i) ok &= b[i] == pattern(t, 0, 50 + i);
  }
  CHECK(ck, ok);
  uint8_t x[8];
  CHECK_THROWS(ck, [&] { win->get(n - 1, size_of(n - 1), x, 1); }, {"past the"});
  c.barrier();  // nobody frees its memory while others may still read it
}

void test_check_all(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  int ran = 0;
  moeserve::comm::check_all(c, [&] { ++ran; });
  CHECK(ck, ran == 1);
  const std::string last = std::to_string(n - 1);
  CHECK_THROWS(
      ck,
      [&] {
        moeserve::comm::check_all(c, [&] {
          if (me == n - 1) moeserve::fail("shard model-0000", me, ".safetensors is missing");
        });
      },
      {(n > 1 ? "rank " + last + " of " + std::to_string(n) + " failed: " : std::string()) +
       "shard model-0000" + last + ".safetensors is missing"});
  if (n >= 2) {
    CHECK_THROWS(ck,
                 [&] {
                   moeserve::comm::check_all(c, [&] {
                     if (me == 0) throw std::runtime_error("first");
                     if (me == n - 1) moeserve::fail("second");
                   });
                 },
                 {"rank 0 of", "failed: first (also failed: " + last + ")"});
  }
  c.barrier();  // and the communicator still works
}

// Messages above INT_MAX bytes through every path that chunks or uses derived types.
void test_large(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  if (n != 2) return;
  const size_t big = (size_t(1) << 31) + 5;
  auto fill = [](std::vector<uint8_t>& v, int from) {
    for (size_t i = 0; i < v.size(); ++i) v[i] = pattern(from, 1, i);
  };
  auto same = [](const std::vector<uint8_t>& v, int from, size_t off) {
    for (size_t i = 0; i < v.size(); i += 4093)
      if (v[i] != pattern(from, 1, off + i)) return false;
    return v.empty() || v.back() == pattern(from, 1, off + v.size() - 1);
  };
  {  // broadcast
    std::vector<uint8_t> b(big);
    if (me == 0) fill(b, 0);
    c.broadcast(b.data(), b.size(), 0);
    CHECK(ck, same(b, 0, 0));
  }
  {  // all_to_all_v: rank 0 sends big to rank 1, rank 1 sends 3 bytes to rank 0
    std::vector<uint8_t> s(me == 0 ? big : 3), r(me == 0 ? 3 : big);
    fill(s, me);
    const std::vector<size_t> zero = {0, 0};
    std::vector<size_t> sc = {0, 0}, rc = {0, 0};
    sc[1 - me] = s.size(), rc[1 - me] = r.size();
    c.all_to_all_v(s.data(), sc, zero, r.data(), rc, zero);
    CHECK(ck, same(r, 1 - me, 0));
  }
  {  // send / recv, then a one-sided read of the same bytes
    std::vector<uint8_t> b(big);
    if (me == 0)
      fill(b, 0), c.send(b.data(), b.size(), 1, 3);
    else
      c.recv(b.data(), b.size(), 0, 3), CHECK(ck, same(b, 0, 0));
    std::vector<uint8_t> got(me == 1 ? big - 1 : 0);
    auto win = c.expose(me == 0 ? b.data() : nullptr, me == 0 ? b.size() : 0);
    if (me == 1) win->get(0, 1, got.data(), got.size()), win->flush(0), CHECK(ck, same(got, 0, 1));
    c.barrier();
  }
}

// Mailboxes: messages of every size reach every rank (itself included) in the order posted, a
// poller of one tag never sees another's, and flush() on one thread waits for a large message to
// this very rank while another thread takes it (the flush must not block that poll).
void test_mailbox(Communicator& c, Checker& ck) {
  const int n = c.size(), me = c.rank();
  auto mb = c.mailbox();
  CHECK(ck, mb->rank() == me && mb->size() == n);
  const std::vector<size_t> sizes = {0, 5, 70000, size_t(1) << 21};
  auto body = [](int from, int to, size_t bytes) {
    std::vector<std::byte> m(bytes);
    for (size_t i = 0; i < bytes; ++i) m[i] = std::byte{pattern(from, to, i)};
    return m;
  };
  for (int to = 0; to < n; ++to)
    for (size_t b : sizes) mb->post(to, 3, body(me, to, b));
  mb->post(me, 4, body(me, me, 9));  // another tag
  std::vector<size_t> next(n, 0);    // per source: the index of the size expected next
  size_t got = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (got < sizes.size() * n && std::chrono::steady_clock::now() < deadline) {
    auto m = mb->poll(3);
    if (!m) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      continue;
    }
    ++got;
    CHECK(ck, m->tag == 3 && m->source >= 0 && m->source < n);
    if (m->source < 0 || m->source >= n || next[m->source] >= sizes.size()) continue;
    CHECK_MSG(
        ck, m->data == body(m->source, me, sizes[next[m->source]]),
        "message " + std::to_string(next[m->source]) + " from rank " + std::to_string(m->source));
    ++next[m->source];
  }
  CHECK(ck, got == sizes.size() * n);
  auto other = mb->poll(4);
  CHECK(ck, other && other->data == body(me, me, 9));
  CHECK(ck, !mb->poll(3) && !mb->poll(4));

  // flush() on one thread, the large message to ourselves taken on another.
  mb->post(me, 5, body(me, me, size_t(4) << 20));
  std::thread flusher([&] { mb->flush(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::optional<moeserve::comm::Mailbox::Message> big;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!big && std::chrono::steady_clock::now() < until) big = mb->poll(5);
  CHECK(ck, big && big->data == body(me, me, size_t(4) << 20));
  flusher.join();
  CHECK(ck, mb->pending() == 0);
  c.barrier();
}

}  // namespace

int main(int argc, char** argv) {
  const bool large = argc > 1 && std::string(argv[1]) == "--large";
  std::vector<moeserve::mpitest::Test> tests = {
      {"basics", test_basics},
      {"all_reduce", test_all_reduce},
      {"all_gather_v", test_gather_v},
      {"all_to_all", test_all_to_all},
      {"segments", test_segments},
      {"matched", test_matched},
      {"matched, several in flight", test_matched_in_flight},
      {"send_recv", test_send_recv},
      {"split", test_split},
      {"window", test_window},
      {"check_all", test_check_all},
      {"mailbox", test_mailbox},
  };
  if (large) tests = {{"large", test_large}};
  return moeserve::mpitest::run_all(tests);
}
