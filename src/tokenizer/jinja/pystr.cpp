#include "tokenizer/jinja/pystr.h"

#include "core/error.h"
#include "tokenizer/jinja/lexer.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer::jinja::pystr {
namespace {

std::vector<uint32_t> cps(const std::string& s) {
  std::vector<uint32_t> out;
  size_t i = 0;
  while (i < s.size()) {
    if (!utf8_seq_len(s, i)) {  // not reachable for checked input; keep the byte
      out.push_back(uint8_t(s[i++]));
      continue;
    }
    out.push_back(utf8_next(s, i));
  }
  return out;
}

std::string join(const std::vector<uint32_t>& v, size_t b, size_t e) {
  std::string out;
  for (size_t i = b; i < e; ++i) utf8_append(out, v[i]);
  return out;
}

uint32_t to_upper(uint32_t c) {
  if (c >= 'a' && c <= 'z') return c - 32;
  if (c < 0x80) return c;
  if ((c >= 0xE0 && c <= 0xFE && c != 0xF7)) return c - 32;
  if (c == 0xFF) return 0x178;
  if (c == 0xB5) return 0x39C;
  if ((c >= 0x100 && c <= 0x137) || (c >= 0x14A && c <= 0x177)) return c & ~1u;
  if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return (c & 1) ? c : c - 1;
  if (c >= 0x3B1 && c <= 0x3C9) return c == 0x3C2 ? 0x3A3 : c - 32;
  if (c >= 0x430 && c <= 0x44F) return c - 32;
  if (c >= 0x450 && c <= 0x45F) return c - 80;
  return c;
}

uint32_t to_lower(uint32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if (c < 0x80) return c;
  if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 32;
  if (c == 0x178) return 0xFF;
  if ((c >= 0x100 && c <= 0x137) || (c >= 0x14A && c <= 0x177)) return c | 1u;
  if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return (c & 1) ? c + 1 : c;
  if (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) return c + 32;
  if (c >= 0x410 && c <= 0x42F) return c + 32;
  if (c >= 0x400 && c <= 0x40F) return c + 80;
  return c;
}

bool is_cased(uint32_t c) {
  return to_upper(c) != c || to_lower(c) != c;
}
bool is_upper(uint32_t c) {
  return to_lower(c) != c;
}
bool is_lower(uint32_t c) {
  return to_upper(c) != c;
}

bool is_linebreak(uint32_t c) {
  return c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || (c >= 0x1C && c <= 0x1E) ||
         c == 0x85 || c == 0x2028 || c == 0x2029;
}

}  // namespace

bool is_alpha_cp(uint32_t c) {
  if (c < 0x80) return (c | 32) >= 'a' && (c | 32) <= 'z';
  if (c < 0x100)
    return c >= 0xC0 && c != 0xD7 && c != 0xF7 ? true : c == 0xAA || c == 0xB5 || c == 0xBA;
  return !py_isspace(c) && !(c >= 0x2000 && c <= 0x206F) && !(c >= 0x3000 && c <= 0x303F) &&
         !(c >= 0xFF00 && c <= 0xFF20) && !(c >= 0x1F000 && c <= 0x1FFFF);
}

size_t length(const std::string& s) {
  size_t n = 0;
  for (const char c : s) n += (uint8_t(c) & 0xC0) != 0x80;
  return n;
}

std::string strip(const std::string& s, const std::optional<std::string>& chars, bool left,
                  bool right) {
  const auto v = cps(s);
  const auto set = chars ? cps(*chars) : std::vector<uint32_t>{};
  auto strip_it = [&](uint32_t c) {
    if (!chars) return py_isspace(c);
    for (uint32_t x : set)
      if (x == c) return true;
    return false;
  };
  size_t b = 0, e = v.size();
  if (left)
    while (b < e && strip_it(v[b])) ++b;
  if (right)
    while (e > b && strip_it(v[e - 1])) --e;
  return join(v, b, e);
}

std::vector<std::string> split(const std::string& s, const std::optional<std::string>& sep,
                               int64_t maxsplit, bool from_right) {
  std::vector<std::string> out;
  if (maxsplit < 0) maxsplit = INT64_MAX;
  if (sep) {
    MS_CHECK(!sep->empty(), "empty separator");
    if (!from_right) {
      size_t start = 0;
      for (size_t at;
           int64_t(out.size()) < maxsplit && (at = s.find(*sep, start)) != std::string::npos;) {
        out.push_back(s.substr(start, at - start));
        start = at + sep->size();
      }
      out.push_back(s.substr(start));
    } else {
      size_t end = s.size();
      while (int64_t(out.size()) < maxsplit && end >= sep->size()) {
        const size_t at = s.rfind(*sep, end - sep->size());
        if (at == std::string::npos) break;
        out.insert(out.begin(), s.substr(at + sep->size(), end - at - sep->size()));
        end = at;
      }
      out.insert(out.begin(), s.substr(0, end));
    }
    return out;
  }
  const auto v = cps(s);
  if (!from_right) {
    size_t i = 0;
    while (true) {
      while (i < v.size() && py_isspace(v[i])) ++i;
      if (i == v.size()) break;
      if (int64_t(out.size()) == maxsplit) {
        size_t e = v.size();
        out.push_back(join(v, i, e));
        break;
      }
      size_t j = i;
      while (j < v.size() && !py_isspace(v[j])) ++j;
      out.push_back(join(v, i, j));
      i = j;
    }
  } else {
    size_t i = v.size();
    while (true) {
      while (i > 0 && py_isspace(v[i - 1])) --i;
      if (i == 0) break;
      if (int64_t(out.size()) == maxsplit) {
        out.insert(out.begin(), join(v, 0, i));
        break;
      }
      size_t j = i;
      while (j > 0 && !py_isspace(v[j - 1])) --j;
      out.insert(out.begin(), join(v, j, i));
      i = j;
    }
  }
  return out;
}

std::vector<std::string> splitlines(const std::string& s, bool keepends) {
  const auto v = cps(s);
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    if (!is_linebreak(v[i])) continue;
    size_t end = i + 1;
    if (v[i] == '\r' && i + 1 < v.size() && v[i + 1] == '\n') end = i + 2;
    out.push_back(join(v, start, keepends ? end : i));
    start = end;
    i = end - 1;
  }
  if (start < v.size()) out.push_back(join(v, start, v.size()));
  return out;
}

std::string replace(const std::string& s, const std::string& old, const std::string& repl,
                    int64_t count) {
  if (count < 0) count = INT64_MAX;
  std::string out;
  if (old.empty()) {
    const auto v = cps(s);
    int64_t n = 0;
    for (size_t i = 0; i <= v.size(); ++i) {
      if (n++ < count) out += repl;
      if (i < v.size()) utf8_append(out, v[i]);
    }
    return out;
  }
  size_t start = 0;
  int64_t n = 0;
  for (size_t at; n < count && (at = s.find(old, start)) != std::string::npos; ++n) {
    out.append(s, start, at - start);
    out += repl;
    start = at + old.size();
  }
  out.append(s, start, std::string::npos);
  return out;
}

int64_t find(const std::string& s, const std::string& sub, bool from_right) {
  const size_t at = from_right ? s.rfind(sub) : s.find(sub);
  if (at == std::string::npos) return -1;
  return static_cast<int64_t>(length(s.substr(0, at)));
}

int64_t count(const std::string& s, const std::string& sub) {
  if (sub.empty()) return static_cast<int64_t>(length(s)) + 1;
  int64_t n = 0;
  for (size_t at = s.find(sub); at != std::string::npos; at = s.find(sub, at + sub.size())) ++n;
  return n;
}

std::string lower(const std::string& s) {
  std::string out;
  for (uint32_t c : cps(s)) utf8_append(out, to_lower(c));
  return out;
}

std::string upper(const std::string& s) {
  std::string out;
  for (uint32_t c : cps(s)) utf8_append(out, to_upper(c));
  return out;
}

std::string swapcase(const std::string& s) {
  std::string out;
  for (uint32_t c : cps(s)) utf8_append(out, is_upper(c) ? to_lower(c) : to_upper(c));
  return out;
}

std::string title(const std::string& s) {
  std::string out;
  bool prev_cased = false;
  for (uint32_t c : cps(s)) {
    if (is_cased(c)) {
      utf8_append(out, prev_cased ? to_lower(c) : to_upper(c));
      prev_cased = true;
    } else {
      utf8_append(out, c);
      prev_cased = false;
    }
  }
  return out;
}

std::string capitalize(const std::string& s) {
  const auto v = cps(s);
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) utf8_append(out, i == 0 ? to_upper(v[i]) : to_lower(v[i]));
  return out;
}

bool is(const std::string& s, const std::string& what) {
  const auto v = cps(s);
  if (v.empty()) return false;
  if (what == "isupper" || what == "islower") {
    bool any = false;
    for (uint32_t c : v) {
      if (!is_cased(c)) continue;
      any = true;
      if (what == "isupper" ? is_lower(c) : is_upper(c)) return false;
    }
    return any;
  }
  if (what == "istitle") {
    bool any = false;
    for (uint32_t c : v) any = any || is_cased(c);
    return any && title(s) == s;
  }
  for (uint32_t c : v) {
    const bool digit = c >= '0' && c <= '9';
    bool ok = false;
    if (what == "isdigit" || what == "isnumeric" || what == "isdecimal") ok = digit;
    if (what == "isalpha") ok = is_alpha_cp(c);
    if (what == "isalnum") ok = digit || is_alpha_cp(c);
    if (what == "isspace") ok = py_isspace(c);
    if (!ok) return false;
  }
  return true;
}

std::string pad(const std::string& s, int64_t width, const std::string& fill, int where) {
  const int64_t len = static_cast<int64_t>(length(s));
  if (width <= len) return s;
  MS_CHECK(width < (int64_t(1) << 26), "padding width too large");
  const int64_t total = width - len;
  int64_t left = where < 0 ? 0 : where > 0 ? total : total / 2 + (total & width & 1);
  std::string out;
  for (int64_t i = 0; i < left; ++i) out += fill;
  out += s;
  for (int64_t i = 0; i < total - left; ++i) out += fill;
  return out;
}

}  // namespace moeserve::tokenizer::jinja::pystr
