#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/regex.h"

#include <pcre2.h>

#include <cstdint>
#include <cstring>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer {
namespace {

struct OnigClass {
  const char* name;
  bool full;  // the ranges replace PCRE2's class; otherwise they are added to it
  const uint32_t* ranges;
  size_t n_ranges;
};
#include "tokenizer/onig_classes.inc"

const OnigClass* find_class(std::string_view name) {
  static const std::pair<const char*, const char*> kAliases[] = {
      {"Letter", "L"}, {"Mark", "M"},      {"Number", "N"}, {"Punctuation", "P"},
      {"Symbol", "S"}, {"Separator", "Z"}, {"Other", "C"},  {"Decimal_Number", "Nd"},
      {"Digit", "Nd"}, {"Space", "space"}, {"Word", "word"}};
  for (const auto& [alias, to] : kAliases)
    if (name == alias) name = to;
  for (const OnigClass& c : kOnigClasses)
    if (name == c.name) return &c;
  return nullptr;
}

// The class as the inside of a bracket expression (without the brackets).
std::string class_body(const OnigClass& c) {
  std::string out;
  if (!c.full) out = std::string("\\p{") + c.name + "}";
  char buf[40];
  for (size_t i = 0; i < c.n_ranges; ++i) {
    const uint32_t a = c.ranges[2 * i], b = c.ranges[2 * i + 1];
    if (a == b) {
      std::snprintf(buf, sizeof buf, "\\x{%X}", a);
    } else {
      std::snprintf(buf, sizeof buf, "\\x{%X}-\\x{%X}", a, b);
    }
    out += buf;
  }
  return out;
}

// Per-thread match state: PCRE2 match data and JIT stack cannot be shared between threads.
struct MatchState {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
  pcre2_match_context* ctx = pcre2_match_context_create(nullptr);
  MatchState() {
    if (stack && ctx) pcre2_jit_stack_assign(ctx, nullptr, stack);
  }
  ~MatchState() {
    pcre2_match_context_free(ctx);
    pcre2_jit_stack_free(stack);
    pcre2_match_data_free(data);
  }
};

MatchState& match_state() {
  static thread_local MatchState state;
  return state;
}

}  // namespace

Regex::Regex(const std::string& onig_pattern) {
  const std::string pattern = translate(onig_pattern);
  int err = 0;
  PCRE2_SIZE offset = 0;
  auto* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                             PCRE2_UTF | PCRE2_UCP, &err, &offset, nullptr);
  if (!code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    fail("cannot compile regex \"", onig_pattern, "\": ", reinterpret_cast<const char*>(msg));
  }
  code_ = code;
  jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() {
  pcre2_code_free(static_cast<pcre2_code*>(code_));
}

bool Regex::next_match(std::string_view s, size_t pos, size_t& begin, size_t& end) const {
  MatchState& st = match_state();
  MS_CHECK(st.data && st.ctx, "out of memory for regex match data");
  auto* code = static_cast<pcre2_code*>(code_);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  const int rc =
      jit_ ? pcre2_jit_match(code, subject, s.size(), pos, 0, st.data, st.ctx)
           : pcre2_match(code, subject, s.size(), pos, PCRE2_NO_UTF_CHECK, st.data, st.ctx);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    fail("regex failed on a text of ", s.size(), " bytes: ", reinterpret_cast<const char*>(msg));
  }
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.data);
  begin = ov[0];
  end = ov[1];
  return true;
}

size_t Regex::advance_one(std::string_view s, size_t i) {
  if (i >= s.size()) return s.size() + 1;
  const size_t n = utf8_seq_len(s, i);
  return i + (n ? n : 1);
}

std::string Regex::translate(const std::string& p) {
  std::string out;
  bool in_class = false;
  // Emits a class body: inline inside brackets, else wrapped (negated when asked).
  auto emit = [&](const std::string& body, bool negated) {
    if (in_class) {
      out += body;
    } else {
      out += negated ? "[^" : "[";
      out += body;
      out += ']';
    }
  };
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char n = p[++i];
      const bool negated = n == 'P' || n == 'S' || n == 'W' || n == 'D' || n == 'H';
      const OnigClass* cls = nullptr;
      std::string raw = std::string("\\") + n;
      if ((n == 'p' || n == 'P') && i + 1 < p.size() && p[i + 1] == '{') {
        const size_t close = p.find('}', i + 2);
        if (close != std::string::npos) {
          raw = p.substr(i - 1, close - i + 2);
          cls = find_class(std::string_view(p).substr(i + 2, close - i - 2));
          i = close;
        }
      } else if (n == 's' || n == 'S') {
        cls = find_class("space");
      } else if (n == 'w' || n == 'W') {
        cls = find_class("word");
      } else if (n == 'd' || n == 'D') {
        cls = find_class("Nd");
      } else if (n == 'h' || n == 'H') {  // Ruby syntax: a hexadecimal digit
        if (negated && in_class) {
          out += raw;
        } else {
          emit("0-9a-fA-F", negated);
        }
        continue;
      }
      // A negated class cannot be spliced into a bracket; PCRE2's meaning is close enough there.
      if (cls && !(negated && in_class)) {
        emit(class_body(*cls), negated);
      } else {
        out += raw;
      }
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out += c;
      // A ']' (or '^]') right after the opening bracket is a literal.
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];
      continue;
    }
    if (c == ']' && in_class) in_class = false;
    out += c;
  }
  return out;
}

}  // namespace moeserve::tokenizer
