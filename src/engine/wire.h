// Typed messages as bytes: a writer that appends trivially copyable values, vectors and
// strings, and a reader that takes them back in the same order and rejects truncated input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "core/error.h"

namespace moeserve::engine::wire {

class Writer {
 public:
  template <class T>
  Writer& put(const T& v) {
    static_assert(std::is_trivially_copyable_v<T>);
    raw(&v, sizeof(T));
    return *this;
  }
  template <class T>
  Writer& put_vec(const std::vector<T>& v) {
    static_assert(std::is_trivially_copyable_v<T>);
    put<uint64_t>(v.size());
    raw(v.data(), v.size() * sizeof(T));
    return *this;
  }
  Writer& put_str(const std::string& s) {
    put<uint64_t>(s.size());
    raw(s.data(), s.size());
    return *this;
  }
  void raw(const void* p, size_t n) {
    const size_t at = buf_.size();
    buf_.resize(at + n);
    if (n) std::memcpy(buf_.data() + at, p, n);
  }
  std::vector<std::byte> take() { return std::move(buf_); }
  size_t size() const { return buf_.size(); }

 private:
  std::vector<std::byte> buf_;
};

class Reader {
 public:
  Reader(const std::byte* p, size_t n) : p_(p), n_(n) {}
  explicit Reader(const std::vector<std::byte>& v) : Reader(v.data(), v.size()) {}
  template <class T>
  T get() {
    static_assert(std::is_trivially_copyable_v<T>);
    T v;
    std::memcpy(&v, take(sizeof(T)), sizeof(T));
    return v;
  }
  template <class T>
  std::vector<T> get_vec() {
    const uint64_t n = get<uint64_t>();
    MS_CHECK(n <= (n_ - at_) / sizeof(T), "message: a list of ", n, " entries overruns the ",
             n_ - at_, " bytes left");
    std::vector<T> v(n);
    if (n) std::memcpy(v.data(), take(n * sizeof(T)), n * sizeof(T));
    return v;
  }
  std::string get_str() {
    const uint64_t n = get<uint64_t>();
    MS_CHECK(n <= n_ - at_, "message: a string of ", n, " bytes overruns the ", n_ - at_,
             " bytes left");
    return std::string(reinterpret_cast<const char*>(take(n)), n);
  }
  // The next n bytes, in place.
  const std::byte* take(size_t n) {
    MS_CHECK(n <= n_ - at_, "message: truncated (", n, " bytes wanted, ", n_ - at_, " left)");
    const std::byte* p = p_ + at_;
    at_ += n;
    return p;
  }
  size_t left() const { return n_ - at_; }

 private:
  const std::byte* p_;
  size_t n_, at_ = 0;
};

}  // namespace moeserve::engine::wire
