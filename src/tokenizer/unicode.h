// UTF-8 helpers shared by the tokenizer, the streaming detokenizer and the chat-template
// interpreter, and the byte-level alphabet of GPT-2-style BPE (every byte is one printable char).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace moeserve::tokenizer {

// Offset of the first byte that is not part of a well-formed UTF-8 sequence, or npos when `s`
// is valid UTF-8 (no surrogates, no overlongs, nothing above U+10FFFF).
size_t find_invalid_utf8(std::string_view s);

// Throws moeserve::Error naming `what` and the byte offset when `s` is not valid UTF-8.
void check_utf8(std::string_view s, const char* what);

// Length of the well-formed sequence starting at s[i] (1..4), or 0 when s[i..] does not start
// with one. When the bytes present are a valid but unfinished prefix, *incomplete is set.
size_t utf8_seq_len(std::string_view s, size_t i, bool* incomplete = nullptr);

// Decodes the sequence at s[i] (which must be well-formed) and advances i past it.
uint32_t utf8_next(std::string_view s, size_t& i);

// Appends the UTF-8 encoding of code point `cp` (assumed valid).
void utf8_append(std::string& out, uint32_t cp);

// Decodes `bytes` the way Rust's String::from_utf8_lossy does (what Hugging Face decoders use):
// each maximal invalid subpart becomes one U+FFFD. With `final_chunk` false, a trailing valid but
// unfinished sequence is left undecoded and its length returned (0 otherwise), so a stream can be
// decoded piecewise with the same result as decoding it whole.
size_t utf8_lossy_append(std::string& out, std::string_view bytes, bool final_chunk = true);

// GPT-2 byte-level alphabet: byte b <-> one code point (printable bytes map to themselves, the
// others to U+0100 + k).
struct ByteLevelAlphabet {
  ByteLevelAlphabet();
  std::array<std::string, 256> byte_to_utf8;  // UTF-8 of the char that stands for each byte
  // Code point -> byte, or -1 when the code point is not in the alphabet (covers U+0000..U+0143).
  std::array<int16_t, 0x144> cp_to_byte;

  // Maps a token string of alphabet chars back to raw bytes; false if some char is not in the
  // alphabet (out is then unspecified).
  bool decode(std::string_view token, std::string& out) const;
};

const ByteLevelAlphabet& byte_level_alphabet();

}  // namespace moeserve::tokenizer
