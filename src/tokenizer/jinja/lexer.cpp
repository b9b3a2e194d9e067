#include "tokenizer/jinja/lexer.h"

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer::jinja {

bool py_isspace(uint32_t c) {
  return (c >= 9 && c <= 13) || (c >= 28 && c <= 32) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

namespace {

[[noreturn]] void syntax_error(int line, const std::string& msg) {
  fail("chat template syntax error at line ", line, ": ", msg);
}

// Length of the whitespace code point at s[i], or 0.
size_t space_at(const std::string& s, size_t i) {
  if (i >= s.size()) return 0;
  const size_t n = utf8_seq_len(s, i);
  if (!n) return 0;
  size_t j = i;
  return py_isspace(utf8_next(s, j)) ? n : 0;
}

size_t skip_spaces(const std::string& s, size_t i) {
  while (size_t n = space_at(s, i)) i += n;
  return i;
}

// Python's str.rstrip() (Unicode whitespace).
std::string rstrip(const std::string& s) {
  size_t end = s.size();
  while (end > 0) {
    size_t i = end - 1;
    while (i > 0 && (uint8_t(s[i]) & 0xC0) == 0x80) --i;
    if (!space_at(s, i) || space_at(s, i) != end - i) break;
    end = i;
  }
  return s.substr(0, end);
}

bool all_space(const std::string& s, size_t from) {
  if (from >= s.size()) return false;  // \s+ needs at least one character
  return skip_spaces(s, from) == s.size();
}

// Names are ASCII identifiers (jinja2 allows Unicode ones; chat templates do not use them).
bool is_name_start(unsigned char c) {
  return std::isalpha(c) || c == '_';
}
bool is_name_char(unsigned char c) {
  return std::isalnum(c) || c == '_';
}

// Python's "unicode-escape" decoding of a string literal's body.
std::string unescape(const std::string& body, int line) {
  std::string out;
  for (size_t i = 0; i < body.size(); ++i) {
    if (body[i] != '\\' || i + 1 >= body.size()) {
      out += body[i];
      continue;
    }
    const char c = body[++i];
    auto hex = [&](int n) -> uint32_t {
      uint32_t v = 0;
      for (int k = 0; k < n; ++k) {
        const size_t at = i + 1 + k;
        if (at >= body.size() || !std::isxdigit(static_cast<unsigned char>(body[at])))
          syntax_error(line, "truncated \\x, \\u or \\U escape in a string literal");
        const char h = static_cast<char>(std::tolower(static_cast<unsigned char>(body[at])));
        v = v * 16 + static_cast<uint32_t>(h <= '9' ? h - '0' : h - 'a' + 10);
      }
      i += n;
      return v;
    };
    switch (c) {
      case 'n':
        out += '\n';
        break;
      case 't':
        out += '\t';
        break;
      case 'r':
        out += '\r';
        break;
      case '\\':
        out += '\\';
        break;
      case '\'':
        out += '\'';
        break;
      case '"':
        out += '"';
        break;
      case 'a':
        out += '\a';
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'v':
        out += '\v';
        break;
      case '\n':
        break;  // line continuation
      case 'x':
        utf8_append(out, hex(2));
        break;
      case 'u':
        utf8_append(out, hex(4));
        break;
      case 'U': {
        const uint32_t cp = hex(8);
        if (cp > 0x10FFFF) syntax_error(line, "escape out of range");
        utf8_append(out, cp);
        break;
      }
      default:
        if (c >= '0' && c <= '7') {
          uint32_t v = c - '0';
          for (int k = 0; k < 2 && i + 1 < body.size() && body[i + 1] >= '0' && body[i + 1] <= '7';
               ++k)
            v = v * 8 + (body[++i] - '0');
          utf8_append(out, v);
        } else {
          out += '\\';  // unknown escapes stay as written
          out += c;
        }
    }
  }
  // Surrogates from \u escapes cannot be encoded; treat them as an error like jinja2's output.
  check_utf8(out, "chat template string literal");
  return out;
}

struct Lexer {
  std::string src;
  size_t pos = 0;
  int line = 1;
  size_t line_pos = 0;  // src[0, line_pos) has been counted into `line`
  bool line_starting = true;
  std::vector<Token> out;

  int line_at(size_t p) {
    for (; line_pos < p && line_pos < src.size(); ++line_pos)
      if (src[line_pos] == '\n') ++line;
    return line;
  }
  void emit(Token::Type t, std::string text, size_t at) {
    out.push_back({t, std::move(text), line_at(at)});
  }
  bool at(size_t p, const char* s) const { return src.compare(p, std::strlen(s), s) == 0; }

  // Text before a tag at `p` with sign `sign`, after whitespace control.
  void emit_text(size_t from, size_t p, char sign, bool is_var) {
    std::string text = src.substr(from, p - from);
    if (sign == '-') {
      text = rstrip(text);
    } else if (sign != '+' && !is_var) {  // lstrip_blocks
      const size_t nl = text.rfind('\n');
      const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
      if ((l_pos > 0 || line_starting) && all_space(text, l_pos)) text.resize(l_pos);
    }
    if (!text.empty()) emit(Token::Type::kText, std::move(text), from);
  }

  // Block end at pos (when brackets are balanced): "+%}" | "-%}\s*" | "%}\n?".
  size_t block_end(size_t p) const {
    if (at(p, "+%}")) return p + 3;
    if (at(p, "-%}")) return skip_spaces(src, p + 3);
    if (at(p, "%}")) return p + 2 + (p + 2 < src.size() && src[p + 2] == '\n');
    return 0;
  }
  size_t var_end(size_t p) const {
    if (at(p, "-}}")) return skip_spaces(src, p + 3);
    if (at(p, "}}")) return p + 2;
    return 0;
  }

  void lex_tag(bool is_var);
  void lex_number();
  // End of `(\d+_)*\d+` at p (digit groups joined by single underscores), or 0 if none.
  size_t digits(size_t p) const {
    if (p >= src.size() || !std::isdigit((unsigned char)src[p])) return 0;
    size_t e = p;
    while (true) {
      while (e < src.size() && std::isdigit((unsigned char)src[e])) ++e;
      if (e + 1 < src.size() && src[e] == '_' && std::isdigit((unsigned char)src[e + 1])) {
        ++e;
        continue;
      }
      return e;
    }
  }
  bool try_raw(size_t p, size_t text_from);
  void run();
};

void Lexer::lex_tag(bool is_var) {
  std::vector<char> stack;  // open brackets
  static const char* kOps[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "/",
                               "*",  "%",  "~",  "[",  "]",  "(",  ")", "{", "}",
                               ">",  "<",  "=",  ".",  ":",  "|",  ",", ";"};
  while (true) {
    if (pos >= src.size())
      syntax_error(line_at(pos), is_var ? "unexpected end of template, expected '}}'"
                                        : "unexpected end of template, expected '%}'");
    if (stack.empty()) {
      if (const size_t e = is_var ? var_end(pos) : block_end(pos)) {
        emit(is_var ? Token::Type::kVarEnd : Token::Type::kBlockEnd, "", pos);
        line_starting = src[e - 1] == '\n';
        pos = e;
        return;
      }
    }
    if (const size_t e = skip_spaces(src, pos); e > pos) {
      pos = e;
      continue;
    }
    const unsigned char c = src[pos];
    if (std::isdigit(c)) {
      lex_number();
      continue;
    }
    if (is_name_start(c)) {
      size_t e = pos;
      while (e < src.size() && is_name_char((unsigned char)src[e])) ++e;
      emit(Token::Type::kName, src.substr(pos, e - pos), pos);
      pos = e;
      continue;
    }
    if (c == '\'' || c == '"') {
      size_t e = pos + 1;
      while (e < src.size() && src[e] != char(c)) e += src[e] == '\\' ? 2 : 1;
      if (e >= src.size()) syntax_error(line_at(pos), "unterminated string literal");
      emit(Token::Type::kString, unescape(src.substr(pos + 1, e - pos - 1), line_at(pos)), pos);
      pos = e + 1;
      continue;
    }
    const char* op = nullptr;
    for (const char* o : kOps)
      if (at(pos, o)) {
        op = o;
        break;
      }
    if (!op) syntax_error(line_at(pos), std::string("unexpected char '") + char(c) + "'");
    if (op[1] == 0 && std::strchr("([{", op[0]))
      stack.push_back(op[0] == '(' ? ')' : op[0] == '[' ? ']' : '}');
    if (op[1] == 0 && std::strchr(")]}", op[0])) {
      if (stack.empty() || stack.back() != op[0])
        syntax_error(line_at(pos), std::string("unexpected '") + op + "'");
      stack.pop_back();
    }
    emit(Token::Type::kOp, op, pos);
    pos += std::strlen(op);
  }
}

// Numbers as jinja2's float_re / integer_re read them ("05" is the integer 0, then 5).
void Lexer::lex_number() {
  auto clean = [&](size_t b, size_t e) {
    std::string out;
    for (size_t k = b; k < e; ++k)
      if (src[k] != '_') out += src[k];
    return out;
  };
  if (pos == 0 || src[pos - 1] != '.') {  // a float never starts right after a dot
    const size_t m = digits(pos);
    size_t e = m;
    bool is_float = false;
    if (m < src.size() && src[m] == '.' && digits(m + 1)) {
      e = digits(m + 1);
      is_float = true;
    }
    if (e < src.size() && (src[e] == 'e' || src[e] == 'E')) {
      size_t f = e + 1;
      if (f < src.size() && (src[f] == '+' || src[f] == '-')) ++f;
      if (digits(f)) {
        e = digits(f);
        is_float = true;
      }
    }
    if (is_float) {
      emit(Token::Type::kFloat, clean(pos, e), pos);
      pos = e;
      return;
    }
  }
  const char p1 = pos + 1 < src.size() ? char(std::tolower((unsigned char)src[pos + 1])) : 0;
  int base = 10;
  if (src[pos] == '0' && (p1 == 'b' || p1 == 'o' || p1 == 'x'))
    base = p1 == 'b' ? 2 : p1 == 'o' ? 8 : 16;
  auto is_digit = [&](char ch) {
    const int d = std::isdigit((unsigned char)ch)    ? ch - '0'
                  : std::isxdigit((unsigned char)ch) ? std::tolower((unsigned char)ch) - 'a' + 10
                                                     : 99;
    return d < base;
  };
  size_t e = pos + 1;
  if (base != 10) {  // 0x(_?[\da-f])+
    size_t f = pos + 2;
    while (true) {
      const size_t g = f < src.size() && src[f] == '_' ? f + 1 : f;
      if (g >= src.size() || !is_digit(src[g])) break;
      f = g + 1;
    }
    if (f == pos + 2) {
      base = 10;  // "0x" without digits: the integer 0, then a name
    } else {
      e = f;
    }
  }
  if (base == 10) {  // [1-9](_?\d)* or 0(_?0)*
    const char want = src[pos] == '0' ? '0' : 0;
    while (true) {
      const size_t g = e < src.size() && src[e] == '_' ? e + 1 : e;
      if (g >= src.size() || !std::isdigit((unsigned char)src[g]) || (want && src[g] != want))
        break;
      e = g + 1;
    }
  }
  std::string text = clean(base == 10 ? pos : pos + 2, e);
  errno = 0;
  const unsigned long long v = std::strtoull(text.c_str(), nullptr, base);
  if (errno == ERANGE || v > uint64_t(INT64_MAX))
    syntax_error(line_at(pos), "integer literal too large");
  emit(Token::Type::kInt, std::to_string(v), pos);
  pos = e;
}

// {% raw %}...{% endraw %} at p: the content becomes text verbatim.
bool Lexer::try_raw(size_t p, size_t text_from) {
  size_t q = p + 2;
  char sign = 0;
  if (q < src.size() && (src[q] == '-' || src[q] == '+')) sign = src[q++];
  q = skip_spaces(src, q);
  if (!at(q, "raw")) return false;
  q = skip_spaces(src, q + 3);
  size_t body;
  if (at(q, "-%}")) {
    body = skip_spaces(src, q + 3);
  } else if (at(q, "%}")) {
    body = q + 2;
  } else {
    return false;
  }
  emit_text(text_from, p, sign, false);
  for (size_t s = src.find("{%", body); s != std::string::npos; s = src.find("{%", s + 1)) {
    size_t r = s + 2;
    char esign = 0;
    if (r < src.size() && (src[r] == '-' || src[r] == '+')) esign = src[r++];
    r = skip_spaces(src, r);
    if (!at(r, "endraw")) continue;
    r = skip_spaces(src, r + 6);
    const size_t e = block_end(r);
    if (!e) continue;
    line_starting = false;
    emit_text(body, s, esign, false);
    line_starting = src[e - 1] == '\n';
    pos = e;
    return true;
  }
  syntax_error(line_at(p), "missing end of raw directive");
}

void Lexer::run() {
  while (pos < src.size()) {
    size_t p = pos;
    while ((p = src.find('{', p)) != std::string::npos) {
      if (p + 1 < src.size() && (src[p + 1] == '{' || src[p + 1] == '%' || src[p + 1] == '#'))
        break;
      ++p;
    }
    if (p == std::string::npos) {
      emit(Token::Type::kText, src.substr(pos), pos);
      break;
    }
    const char kind = src[p + 1];
    if (kind == '%' && try_raw(p, pos)) continue;
    char sign = 0;
    if (p + 2 < src.size() && (src[p + 2] == '-' || src[p + 2] == '+')) sign = src[p + 2];
    emit_text(pos, p, sign, kind == '{');
    line_starting = false;
    pos = p + 2 + (sign ? 1 : 0);
    if (kind == '#') {
      size_t q = pos;
      if (q >= src.size()) break;  // "{#" at the very end: jinja2 lets it go
      for (;; ++q) {
        if (q >= src.size()) syntax_error(line_at(p), "missing end of comment tag");
        if (at(q, "+#}")) {
          pos = q + 3;
          break;
        }
        if (at(q, "-#}")) {
          pos = skip_spaces(src, q + 3);
          break;
        }
        if (at(q, "#}")) {
          pos = q + 2 + (q + 2 < src.size() && src[q + 2] == '\n');
          break;
        }
      }
      line_starting = src[pos - 1] == '\n';
      continue;
    }
    const bool is_var = kind == '{';
    emit(is_var ? Token::Type::kVarBegin : Token::Type::kBlockBegin, "", p);
    lex_tag(is_var);
  }
  emit(Token::Type::kEof, "", src.size());
}

}  // namespace

std::vector<Token> tokenize(const std::string& source) {
  check_utf8(source, "chat template");
  Lexer lx;
  // Newlines normalised to \n, and one trailing newline dropped, as jinja2 does.
  lx.src.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      lx.src += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      lx.src += source[i];
    }
  }
  if (!lx.src.empty() && lx.src.back() == '\n') lx.src.pop_back();
  lx.run();
  return std::move(lx.out);
}

}  // namespace moeserve::tokenizer::jinja
