#include "tokenizer/unicode.h"

#include "core/error.h"

namespace moeserve::tokenizer {
namespace {

struct Scan {
  size_t len;       // valid sequence length, or the maximal invalid subpart (>= 1)
  bool ok;          // a complete, well-formed sequence
  bool incomplete;  // input ended inside a sequence that was valid so far
};

// One step of UTF-8 decoding with the "maximal subpart" rule (Unicode 3.9, also Rust's).
Scan scan(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<uint8_t>(s[i + k]); };
  const uint8_t c = b(0);
  if (c < 0x80) return {1, true, false};
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    need = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return {1, false, false};
  }
  for (size_t k = 1; k < need; ++k) {
    if (i + k >= s.size()) return {k, false, true};
    const uint8_t x = b(k);
    const bool good = k == 1 ? (x >= lo && x <= hi) : (x >= 0x80 && x <= 0xBF);
    if (!good) return {k, false, false};
  }
  return {need, true, false};
}

}  // namespace

size_t find_invalid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    // Fast path over ASCII, eight bytes at a time.
    while (i + 8 <= s.size()) {
      uint64_t w;
      __builtin_memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= s.size()) break;
    const Scan r = scan(s, i);
    if (!r.ok) return i;
    i += r.len;
  }
  return std::string_view::npos;
}

void check_utf8(std::string_view s, const char* what) {
  const size_t bad = find_invalid_utf8(s);
  if (bad != std::string_view::npos)
    fail(what, " is not valid UTF-8 (bad byte 0x", std::hex, static_cast<int>(uint8_t(s[bad])),
         std::dec, " at offset ", bad, ")");
}

size_t utf8_seq_len(std::string_view s, size_t i, bool* incomplete) {
  const Scan r = scan(s, i);
  if (incomplete) *incomplete = r.incomplete;
  return r.ok ? r.len : 0;
}

uint32_t utf8_next(std::string_view s, size_t& i) {
  const auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<uint8_t>(s[i + k])); };
  const uint32_t c = b(0);
  uint32_t cp;
  if (c < 0x80) {
    cp = c;
    i += 1;
  } else if (c < 0xE0) {
    cp = ((c & 0x1F) << 6) | (b(1) & 0x3F);
    i += 2;
  } else if (c < 0xF0) {
    cp = ((c & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    i += 3;
  } else {
    cp = ((c & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
    i += 4;
  }
  return cp;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

size_t utf8_lossy_append(std::string& out, std::string_view bytes, bool final_chunk) {
  size_t i = 0, run = 0;  // [run, i) is valid text not yet copied
  while (i < bytes.size()) {
    const Scan r = scan(bytes, i);
    if (r.ok) {
      i += r.len;
      continue;
    }
    out.append(bytes.substr(run, i - run));
    if (r.incomplete && !final_chunk) return bytes.size() - i;
    out.append("\xEF\xBF\xBD");  // U+FFFD
    i += r.len;
    run = i;
  }
  out.append(bytes.substr(run, i - run));
  return 0;
}

ByteLevelAlphabet::ByteLevelAlphabet() {
  cp_to_byte.fill(-1);
  uint32_t extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const uint32_t cp = printable ? static_cast<uint32_t>(b) : 0x100 + extra++;
    std::string u;
    utf8_append(u, cp);
    byte_to_utf8[b] = u;
    cp_to_byte[cp] = static_cast<int16_t>(b);
  }
}

bool ByteLevelAlphabet::decode(std::string_view token, std::string& out) const {
  size_t i = 0;
  while (i < token.size()) {
    if (!utf8_seq_len(token, i)) return false;
    const uint32_t cp = utf8_next(token, i);
    if (cp >= cp_to_byte.size() || cp_to_byte[cp] < 0) return false;
    out.push_back(static_cast<char>(cp_to_byte[cp]));
  }
  return true;
}

const ByteLevelAlphabet& byte_level_alphabet() {
  static const ByteLevelAlphabet alphabet;
  return alphabet;
}

}  // namespace moeserve::tokenizer
