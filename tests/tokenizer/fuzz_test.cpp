// Fuzzing of the tokenizer and the template interpreter: random and mutated inputs must either
// work or fail with moeserve::Error, never crash, hang or blow up. Runs a short deterministic
// round in the test suite (MOESERVE_FUZZ_ITERS=N for a longer one), replays every saved input
// under tests/fixtures/tokenizer/fuzz/, and builds as a libFuzzer target too:
//   clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -DMOESERVE_LIBFUZZER
//     -DMOESERVE_SOURCE_DIR=\"$PWD\" -Isrc tests/tokenizer/fuzz_test.cpp
//     $(find src/tokenizer -name '*.cpp') -lpcre2-8 -o fuzz_tokenizer      (one line)
//   ./fuzz_tokenizer -max_len=4096 corpus/
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/stream_decoder.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer::fuzz {

inline std::filesystem::path source_dir() {
  return MOESERVE_SOURCE_DIR;
}

inline const Tokenizer& tokenizer() {
  static const Tokenizer tok = Tokenizer::load(source_dir() / "assets/deepseek-v3");
  return tok;
}

inline const nlohmann::ordered_json& sample_messages() {
  static const auto m = nlohmann::ordered_json::parse(R"([
    {"role": "system", "content": "sys"}, {"role": "user", "content": "hi <think>"},
    {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
      "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
    {"role": "tool", "content": "42"}, {"role": "assistant", "content": "x</think>y"}])");
  return m;
}

// One tokenizer input: must round-trip when valid UTF-8, be refused otherwise.
inline void tokenizer_one(const std::string& text) {
  const Tokenizer& tok = tokenizer();
  const bool valid = find_invalid_utf8(text) == std::string::npos;
  try {
    const auto ids = tok.encode(text, false);
    if (!valid) std::abort();                   // invalid input must be refused
    if (tok.decode(ids) != text) std::abort();  // byte-level BPE is lossless
    StreamDecoder dec(tok);
    std::string streamed;
    for (const int32_t id : ids) streamed += dec.put(id);
    streamed += dec.finish();
    if (streamed != text) std::abort();
    if (tok.encode(text, false, false).empty() != text.empty()) std::abort();
  } catch (const Error&) {
    if (valid) std::abort();
  }
  // Arbitrary bytes read as ids: decode and stream-decode must agree.
  std::vector<int32_t> ids;
  for (size_t i = 0; i + 3 < text.size() && ids.size() < 64; i += 3)
    ids.push_back(
        int32_t((uint8_t(text[i]) << 16 | uint8_t(text[i + 1]) << 8 | uint8_t(text[i + 2])) %
                130000) -
        100);
  StreamDecoder dec(tok);
  std::string streamed;
  for (const int32_t id : ids) streamed += dec.put(id);
  streamed += dec.finish();
  if (streamed != tok.decode(ids)) std::abort();
}

// One template input: parse and render with tight limits; only moeserve::Error may come out.
inline void template_one(const std::string& source) {
  try {
    ChatTemplate t = ChatTemplate::from_string(source, {{"bos_token", "<s>"}});
    t.set_limits({1 << 20, 200000});
    t.render(sample_messages(), true, nlohmann::ordered_json::array({{{"name", "t"}}}));
  } catch (const Error&) {
  }
}

}  // namespace moeserve::tokenizer::fuzz

#ifdef MOESERVE_LIBFUZZER

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string input(reinterpret_cast<const char*>(data + 1), size - 1);
  if (data[0] & 1) {
    moeserve::tokenizer::fuzz::template_one(input);
  } else {
    moeserve::tokenizer::fuzz::tokenizer_one(input);
  }
  return 0;
}

#else

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

namespace moeserve::tokenizer::fuzz {
namespace {

int iterations(int fallback) {
  const char* env = std::getenv("MOESERVE_FUZZ_ITERS");
  return env ? std::max(1, std::atoi(env)) : fallback;
}

const std::vector<std::string> kTextPieces = {"a",          "Z",
                                              " ",          "  ",
                                              "\n",         "\r\n",
                                              "\t",         "1",
                                              "123456",     "'s",
                                              "!",          "?!",
                                              "...",        "你好",
                                              "中",         "カタ",
                                              "한",         "é",
                                              "e\xCC\x81",  "😀",
                                              "👍🏽",   "\xF0\x9F",
                                              "\x80",       "\xFF",
                                              "\xC3",       "\xED\xA0\x80",
                                              "<｜User｜>", "<｜end▁of▁sentence｜>",
                                              "<｜",        "｜>",
                                              "<|EOT|>",    "<think>",
                                              "\xC2\x85",   "\xE3\x80\x80",
                                              "\x00",       "\xF4\x8F\xBF\xBF",
                                              "<",          "▁"};

const std::vector<std::string> kTemplatePieces = {"{{",
                                                  "}}",
                                                  "{%",
                                                  "%}",
                                                  "{#",
                                                  "#}",
                                                  "{%-",
                                                  "-%}",
                                                  "{{-",
                                                  "-}}",
                                                  "(",
                                                  ")",
                                                  "[",
                                                  "]",
                                                  "{",
                                                  "}",
                                                  "|",
                                                  ".",
                                                  ",",
                                                  ":",
                                                  "'",
                                                  "\"",
                                                  "\\",
                                                  " ",
                                                  "\n",
                                                  "if ",
                                                  "else",
                                                  "endif",
                                                  "for ",
                                                  " in ",
                                                  "endfor",
                                                  "set ",
                                                  "=",
                                                  "+",
                                                  "~",
                                                  "*",
                                                  "**",
                                                  "//",
                                                  "not ",
                                                  " is ",
                                                  "none",
                                                  "defined",
                                                  "loop.",
                                                  "messages",
                                                  "ns",
                                                  "namespace(",
                                                  "tojson",
                                                  "length",
                                                  "trim",
                                                  "split(",
                                                  "[-1]",
                                                  "[::-1]",
                                                  "raise_exception(",
                                                  "range(",
                                                  "macro ",
                                                  "endmacro",
                                                  "raw",
                                                  "endraw",
                                                  "0",
                                                  "1e309",
                                                  "9"
                                                  "9999999999999999999",
                                                  "'\\u12'",
                                                  "'\\x'",
                                                  "😀",
                                                  "\xFF"};

std::string random_text(std::mt19937& rng) {
  std::string s;
  const int n = std::uniform_int_distribution<int>(0, 24)(rng);
  for (int i = 0; i < n; ++i) {
    if (rng() % 8 == 0) {
      s += static_cast<char>(rng() & 0xFF);
    } else {
      s += kTextPieces[rng() % kTextPieces.size()];
    }
  }
  return s;
}

std::vector<std::string> template_seeds() {
  std::vector<std::string> seeds;
  const auto fixture = nlohmann::ordered_json::parse(
      std::ifstream(source_dir() / "tests/fixtures/tokenizer/chat_templates.json"));
  for (const auto& c : fixture["cases"])
    if (c.contains("source")) seeds.push_back(c["source"]);
  std::ifstream r1(source_dir() / "assets/deepseek-r1/chat_template.jinja");
  std::ostringstream os;
  os << r1.rdbuf();
  seeds.push_back(os.str());
  return seeds;
}

std::string mutate(std::string s, std::mt19937& rng) {
  const int n = 1 + int(rng() % 4);
  for (int k = 0; k < n; ++k) {
    const size_t pos = s.empty() ? 0 : rng() % (s.size() + 1);
    switch (rng() % 5) {
      case 0:  // delete a span
        if (!s.empty()) s.erase(std::min(pos, s.size() - 1), 1 + rng() % 8);
        break;
      case 1:  // insert a piece of syntax
        s.insert(pos, kTemplatePieces[rng() % kTemplatePieces.size()]);
        break;
      case 2:  // duplicate a span
        if (!s.empty()) s.insert(pos, s.substr(rng() % s.size(), 1 + rng() % 16));
        break;
      case 3:  // flip a byte
        if (!s.empty()) s[std::min(pos, s.size() - 1)] ^= char(1 << (rng() % 8));
        break;
      default:  // truncate
        s.resize(pos);
    }
  }
  return s;
}

TEST(Fuzz, TokenizerRandomInputs) {
  std::mt19937 rng(12345);
  const int n = iterations(3000);
  for (int i = 0; i < n; ++i) tokenizer_one(random_text(rng));
}

TEST(Fuzz, TemplateMutations) {
  std::mt19937 rng(777);
  const auto seeds = template_seeds();
  ASSERT_FALSE(seeds.empty());
  const int n = iterations(3000);
  for (int i = 0; i < n; ++i) template_one(mutate(seeds[rng() % seeds.size()], rng));
}

// Inputs the fuzzers once found a problem with: <name>.txt for the tokenizer, <name>.jinja for
// the template interpreter.
TEST(Fuzz, SavedRegressions) {
  const auto dir = source_dir() / "tests/fixtures/tokenizer/fuzz";
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::ifstream in(e.path(), std::ios::binary);
    std::ostringstream os;
    os << in.rdbuf();
    if (e.path().extension() == ".txt") tokenizer_one(os.str());
    if (e.path().extension() == ".jinja") template_one(os.str());
    ++n;
  }
  EXPECT_GT(n, 0);
}

}  // namespace
}  // namespace moeserve::tokenizer::fuzz

#endif
