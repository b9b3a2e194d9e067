// Regexes of tokenizer.json, written for Oniguruma (the engine HF `tokenizers` uses), run with
// PCRE2 (UTF + UCP, JIT when available). Escapes whose meaning differs between the two engines
// (\s, \w, \h, and \p{..} classes, which follow a newer Unicode version in Oniguruma) are
// rewritten to Oniguruma's meaning before compiling.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace moeserve::tokenizer {

// A compiled PCRE2 pattern, safe to use from several threads at once.
class Regex {
 public:
  explicit Regex(const std::string& onig_pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Calls fn(begin, end) for every non-overlapping match in `s` from left to right (an empty
  // match advances one character, as Oniguruma's find_iter does). `s` must be valid UTF-8.
  template <typename Fn>
  void find_all(std::string_view s, Fn&& fn) const {
    size_t pos = 0, b, e;
    while (pos <= s.size() && next_match(s, pos, b, e)) {
      fn(b, e);
      pos = e > b ? e : advance_one(s, e);
    }
  }

  // First match at or after `pos`; false when there is none. Throws on engine errors.
  bool next_match(std::string_view s, size_t pos, size_t& begin, size_t& end) const;

  // Translates the escapes of an Oniguruma pattern whose PCRE2 meaning differs (\s, \S, \h, ...).
  static std::string translate(const std::string& onig_pattern);

 private:
  static size_t advance_one(std::string_view s, size_t i);
  void* code_ = nullptr;  // pcre2_code_8*
  bool jit_ = false;
};

}  // namespace moeserve::tokenizer
