// A minimal test runner for programs started by mpirun: every rank runs every test; a failed
// check prints its rank and line; rank 0 prints one line per test with the verdict of all ranks.
// No early return on a failed check: a rank that left a test early would leave the others
// waiting in its collectives (ctest's timeout is the last resort).
#pragma once

#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace moeserve::mpitest {

class Checker {
 public:
  explicit Checker(int rank) : rank_(rank) {}
  bool check(bool ok, const char* expr, const char* file, int line, const std::string& note) {
    if (!ok) {
      ++failures_;
      std::fprintf(stderr, "rank %d: %s:%d: CHECK(%s) failed%s%s\n", rank_, file, line, expr,
                   note.empty() ? "" : ": ", note.c_str());
    }
    return ok;
  }
  int failures() const { return failures_; }
  int rank() const { return rank_; }

 private:
  int rank_, failures_ = 0;
};

#define CHECK(ck, cond) (ck).check(static_cast<bool>(cond), #cond, __FILE__, __LINE__, {})
#define CHECK_MSG(ck, cond, note) \
  (ck).check(static_cast<bool>(cond), #cond, __FILE__, __LINE__, (note))

// Runs fn, checks that it throws an exception whose message contains every fragment.
template <class Fn>
void check_throws(Checker& ck, Fn&& fn, std::initializer_list<std::string> fragments,
                  const char* file, int line) {
  try {
    fn();
    ck.check(false, "an exception", file, line, "nothing was thrown");
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    for (const auto& f : fragments)
      ck.check(msg.find(f) != std::string::npos, "message contains fragment", file, line,
               "\"" + msg + "\" lacks \"" + f + "\"");
  }
}
// CHECK_THROWS(ck, fn, {fragments}): the arguments pass through whole, commas and all.
#define CHECK_THROWS(ck, ...) check_throws((ck), __VA_ARGS__, __FILE__, __LINE__)

struct Test {
  const char* name;
  std::function<void(comm::Communicator&, Checker&)> fn;
};

// The program's exit status: 0 when every check passed on every rank.
inline int run_all(const std::vector<Test>& tests, const std::string& filter = {}) {
  auto comm = comm::world();
  Checker ck(comm->rank());
  int64_t passed = 0, failed = 0;
  for (const Test& t : tests) {
    if (!filter.empty() && std::string(t.name).find(filter) == std::string::npos) continue;
    const int before = ck.failures();
    try {
      t.fn(*comm, ck);
    } catch (const std::exception& e) {
      ck.check(false, "no exception", t.name, 0, e.what());
    }
    int64_t f = ck.failures() - before;
    comm->all_reduce(&f, 1, comm::ReduceOp::Sum);
    (f ? failed : passed) += 1;
    if (comm->rank() == 0)
      std::printf("[%s] %s (np %d)\n", f ? "FAIL" : " OK ", t.name, comm->size());
  }
  if (comm->rank() == 0) {
    std::printf("%lld passed, %lld failed on %d ranks\n", static_cast<long long>(passed),
                static_cast<long long>(failed), comm->size());
    std::fflush(stdout);
  }
  return failed ? 1 : 0;
}

}  // namespace moeserve::mpitest
