// Errors that reach the user: one exception type with a clear message, thrown at the boundary
// (files, flags, requests) and caught by the command line, which prints it and exits non-zero.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moeserve {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

// Throws moeserve::Error with the arguments streamed together.
template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(detail::concat(std::forward<Args>(args)...));
}

}  // namespace moeserve

// Boundary check: throws moeserve::Error(message) when cond is false.
#define MS_CHECK(cond, ...)                     \
  do {                                          \
    if (!(cond)) ::moeserve::fail(__VA_ARGS__); \
  } while (0)

// Internal invariant: a failure is a bug in moeserve, not bad input.
#define MS_ASSERT(cond)                                                                    \
  do {                                                                                     \
    if (!(cond))                                                                           \
      ::moeserve::fail("internal error: ", #cond, " failed at ", __FILE__, ":", __LINE__); \
  } while (0)
