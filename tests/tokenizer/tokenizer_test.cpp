// Encoding and decoding against fixtures written by tools/make_tokenizer_fixtures.py from the
// Hugging Face `tokenizers` package.
#include <gtest/gtest.h>

#include "core/error.h"
#include "test_util.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer {
namespace {

using testing::read_fixture;
using testing::v3_tokenizer;
using Ids = std::vector<int32_t>;

std::string show(const std::string& s) {
  return nlohmann::json(s).dump().substr(0, 120);
}

TEST(Tokenizer, LoadsDeepSeekV3) {
  const Tokenizer& tok = v3_tokenizer();
  EXPECT_EQ(tok.vocab_size(), 128815);
  EXPECT_EQ(tok.bos_id(), 0);
  EXPECT_EQ(tok.eos_id(), 1);
  EXPECT_EQ(tok.bos_token(), "<｜begin▁of▁sentence｜>");
  EXPECT_TRUE(tok.add_bos());
  EXPECT_EQ(tok.token_to_id("<｜User｜>"), 128803);
  EXPECT_EQ(tok.token_to_id("Ġworld"), 2058);
  EXPECT_FALSE(tok.token_to_id("no such token").has_value());
  EXPECT_EQ(tok.id_to_token(2058), "Ġworld");
  EXPECT_EQ(tok.token_bytes(2058), " world");
  EXPECT_TRUE(tok.is_special(0));
  EXPECT_FALSE(tok.is_special(128803));  // <｜User｜> is an added, non-special token
  EXPECT_EQ(tok.id_to_token(-1), "");
  EXPECT_EQ(tok.id_to_token(1 << 30), "");
}

void check_encode_fixture(const Tokenizer& tok, const std::string& name, bool full) {
  const auto cases = read_fixture(name);
  ASSERT_GT(cases.size(), 50u);
  int failures = 0;
  for (const auto& c : cases) {
    const std::string text = c["text"];
    const Ids ids = tok.encode(text, false);
    EXPECT_EQ(ids, c["ids"].get<Ids>()) << "text " << show(text);
    if (full) {
      EXPECT_EQ(tok.encode(text, true), c["ids_bos"].get<Ids>()) << "bos, text " << show(text);
      EXPECT_EQ(tok.encode(text, false, false), c["ids_no_special"].get<Ids>())
          << "no special, text " << show(text);
    }
    const Ids want = c["ids"].get<Ids>();
    EXPECT_EQ(tok.decode(want, false), c["decode"].get<std::string>()) << show(text);
    EXPECT_EQ(tok.decode(want, true), c["decode_skip"].get<std::string>()) << show(text);
    if (::testing::Test::HasFailure() && ++failures > 5) break;
  }
}

TEST(Tokenizer, EncodeMatchesHuggingFace) {
  check_encode_fixture(v3_tokenizer(), "encode_deepseek_v3.json", true);
}

TEST(Tokenizer, SyntheticTokenizerMatchesHuggingFace) {
  // GPT-2 regex ByteLevel with add_prefix_space, [a, b] merges, lstrip/rstrip/single_word.
  const Tokenizer tok = Tokenizer::load(testing::fixture_dir() / "synthetic");
  check_encode_fixture(tok, "encode_synthetic.json", false);
}

// Same text as sweep_text() in tools/make_tokenizer_fixtures.py.
std::string sweep_text(uint32_t start, uint32_t stop, uint32_t step) {
  std::string out;
  for (uint32_t cp = start; cp < stop; cp += step) {
    if (cp >= 0xD800 && cp <= 0xDFFF) continue;
    std::string c;
    utf8_append(c, cp);
    out += c + "a " + c + c + "1'" + c + "\t" + c + " \n";
  }
  return out;
}

std::string fnv1a(const Ids& ids) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (const int32_t id : ids)
    for (int k = 0; k < 4; ++k) {
      h ^= (uint32_t(id) >> (8 * k)) & 0xFF;
      h *= 0x100000001B3ull;
    }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

TEST(Tokenizer, EveryCodePointMatchesHuggingFace) {
  const auto sweep = read_fixture("sweep_deepseek_v3.json");
  int bad = 0;
  for (const auto& c : sweep["chunks"]) {
    const uint32_t start = c["start"], stop = c["stop"], step = c["step"];
    const Ids ids = v3_tokenizer().encode(sweep_text(start, stop, step), false);
    if (fnv1a(ids) != c["hash"].get<std::string>() && ++bad <= 100)
      ADD_FAILURE() << "code points " << std::hex << start << ".." << stop << " step " << step;
  }
  EXPECT_EQ(bad, 0);
}

TEST(Tokenizer, DecodeMatchesHuggingFace) {
  for (const auto& c : read_fixture("decode_deepseek_v3.json")) {
    const Ids ids = c["ids"].get<Ids>();
    EXPECT_EQ(v3_tokenizer().decode(ids, false), c["text"].get<std::string>());
    EXPECT_EQ(v3_tokenizer().decode(ids, true), c["text_skip"].get<std::string>());
  }
}

TEST(Tokenizer, EmptyInput) {
  EXPECT_TRUE(v3_tokenizer().encode("", false).empty());
  EXPECT_EQ(v3_tokenizer().encode("", true), Ids{0});
  EXPECT_EQ(v3_tokenizer().decode(Ids{}, false), "");
}

TEST(Tokenizer, InvalidUtf8IsAnError) {
  for (const std::string bad : {"abc\xff", "\xc3", "\xed\xa0\x80" /* surrogate */,
                                "\xc0\xaf" /* overlong */, "ok\xf4\x90\x80\x80"}) {
    try {
      v3_tokenizer().encode(bad);
      ADD_FAILURE() << "no error for " << show(bad);
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("not valid UTF-8"), std::string::npos) << e.what();
    }
  }
}

// Each unsupported piece of tokenizer.json is refused with an error that names it.
TEST(Tokenizer, UnsupportedConfigurationsAreNamed) {
  const auto base = nlohmann::json::parse(
      testing::read_text(testing::fixture_dir() / "synthetic/tokenizer.json"));
  const std::vector<std::pair<std::string, nlohmann::json>> cases = {
      {"NFC", {{"normalizer", {{"type", "NFC"}}}}},
      {"Lowercase",
       {{"normalizer", {{"type", "Sequence"}, {"normalizers", {{{"type", "Lowercase"}}}}}}}},
      {"WordPiece", {{"model", {{"type", "WordPiece"}, {"vocab", nlohmann::json::object()}}}}},
      {"Whitespace", {{"pre_tokenizer", {{"type", "Whitespace"}}}}},
      {"ByteLevel", {{"pre_tokenizer", {{"type", "Split"}, {"pattern", {{"Regex", "a"}}}}}}},
      {"Metaspace", {{"decoder", {{"type", "Metaspace"}}}}},
      {"BertProcessing", {{"post_processor", {{"type", "BertProcessing"}}}}},
      {"regex", {{"pre_tokenizer", {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}}}}},
  };
  for (const auto& [word, patch] : cases) {
    nlohmann::json j = base;
    j.merge_patch(patch);
    try {
      Tokenizer::from_json(j.dump(), "");
      ADD_FAILURE() << "accepted a tokenizer with " << patch.dump();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(Tokenizer::load("/nonexistent/model"), Error);
  EXPECT_THROW(Tokenizer::from_json("{not json", ""), Error);
}

TEST(Tokenizer, CopiesShareStateAndAgree) {
  const Tokenizer copy = v3_tokenizer();
  const std::string text = "The same text, twice. 同じ";
  EXPECT_EQ(copy.encode(text), v3_tokenizer().encode(text));
}

}  // namespace
}  // namespace moeserve::tokenizer
