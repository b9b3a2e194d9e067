// Streaming detokenizer and reasoning parser.
#include <gtest/gtest.h>

#include "test_util.h"
#include "tokenizer/reasoning_parser.h"
#include "tokenizer/stream_decoder.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer {
namespace {

using Ids = std::vector<int32_t>;

// Feeds ids one at a time; every piece must be complete UTF-8, and all pieces together must be
// what decode() gives for the whole sequence.
void check_stream(const Ids& ids, bool skip_special) {
  const Tokenizer& tok = testing::v3_tokenizer();
  StreamDecoder dec(tok, skip_special);
  std::string all;
  for (const int32_t id : ids) {
    const std::string piece = dec.put(id);
    EXPECT_EQ(find_invalid_utf8(piece), std::string::npos);
    all += piece;
  }
  all += dec.finish();
  EXPECT_EQ(all, tok.decode(ids, skip_special));
  EXPECT_EQ(dec.pending(), 0u);
}

TEST(StreamDecoder, CorpusPiecesConcatenateToDecode) {
  for (const auto& c : testing::read_fixture("encode_deepseek_v3.json")) {
    const Ids ids = c["ids"].get<Ids>();
    check_stream(ids, false);
    check_stream(ids, true);
  }
}

TEST(StreamDecoder, ArbitraryIdsIncludingBrokenUtf8) {
  for (const auto& c : testing::read_fixture("decode_deepseek_v3.json")) {
    check_stream(c["ids"].get<Ids>(), false);
    check_stream(c["ids"].get<Ids>(), true);
  }
}

TEST(StreamDecoder, HoldsSplitCharacters) {
  const Tokenizer& tok = testing::v3_tokenizer();
  const Ids ids = tok.encode("😀", false);
  ASSERT_GT(ids.size(), 1u);  // a 4-byte emoji spans several byte-level tokens
  StreamDecoder dec(tok);
  for (size_t i = 0; i + 1 < ids.size(); ++i) EXPECT_EQ(dec.put(ids[i]), "");
  EXPECT_GT(dec.pending(), 0u);
  EXPECT_EQ(dec.put(ids.back()), "😀");
  EXPECT_EQ(dec.finish(), "");
}

TEST(StreamDecoder, UnfinishedCharacterBecomesReplacementAtFinish) {
  const Tokenizer& tok = testing::v3_tokenizer();
  const Ids ids = tok.encode("😀", false);
  StreamDecoder dec(tok);
  dec.put(ids[0]);
  EXPECT_EQ(dec.finish(), tok.decode(Ids{ids[0]}));
}

ReasoningDelta feed_all(ReasoningParser& p, const std::vector<std::string>& pieces) {
  ReasoningDelta all;
  for (const auto& piece : pieces) {
    const ReasoningDelta d = p.feed(piece);
    all.reasoning += d.reasoning;
    all.content += d.content;
  }
  const ReasoningDelta d = p.finish();
  all.reasoning += d.reasoning;
  all.content += d.content;
  return all;
}

// Every way of cutting `text` into two or three pieces gives the same split as the whole text.
void check_all_cuts(const std::string& text, ReasoningParser::Options opt,
                    const std::string& want_r, const std::string& want_c) {
  const ReasoningDelta whole = ReasoningParser::parse(text, opt);
  EXPECT_EQ(whole.reasoning, want_r) << text;
  EXPECT_EQ(whole.content, want_c) << text;
  for (size_t i = 0; i <= text.size(); ++i) {
    for (size_t j = i; j <= text.size(); j += 3) {
      ReasoningParser p(opt);
      const ReasoningDelta d =
          feed_all(p, {text.substr(0, i), text.substr(i, j - i), text.substr(j)});
      EXPECT_EQ(d.reasoning, want_r) << "cut at " << i << "," << j << " of " << text;
      EXPECT_EQ(d.content, want_c) << "cut at " << i << "," << j << " of " << text;
    }
  }
}

TEST(ReasoningParser, PromptOpenedThink) {
  ReasoningParser::Options r1;  // starts_in_reasoning = true
  check_all_cuts("Let me think.\n</think>\n\nThe answer is 4.", r1, "Let me think.\n",
                 "\n\nThe answer is 4.");
  check_all_cuts("<think>\nhmm</think>ok", r1, "\nhmm", "ok");
  check_all_cuts("no end tag at all", r1, "no end tag at all", "");
  check_all_cuts("a</think>b</think><think>c", r1, "a", "b</think><think>c");
  check_all_cuts("x </thin y</think>z", r1, "x </thin y", "z");
  check_all_cuts("思考😀</think>答案", r1, "思考😀", "答案");
  check_all_cuts("</think>", r1, "", "");
}

TEST(ReasoningParser, ModelOpensThink) {
  ReasoningParser::Options opt;
  opt.starts_in_reasoning = false;
  check_all_cuts("<think>plan</think>answer", opt, "plan", "answer");
  check_all_cuts("\n<think>plan</think>answer", opt, "plan", "answer");
  check_all_cuts("plain answer <think> not reasoning", opt, "",
                 "plain answer <think> not reasoning");
  check_all_cuts("<thin", opt, "", "<thin");
  check_all_cuts("", opt, "", "");
}

TEST(ReasoningParser, StreamsWithoutWaitingForTheEnd) {
  ReasoningParser p;
  EXPECT_EQ(p.feed("step one, ").reasoning, "step one, ");
  EXPECT_TRUE(p.in_reasoning());
  const ReasoningDelta d = p.feed("done</th");
  EXPECT_EQ(d.reasoning, "done");  // "</th" is held: it may be the end tag
  const ReasoningDelta e = p.feed("ink>Answer");
  EXPECT_EQ(e.reasoning, "");
  EXPECT_EQ(e.content, "Answer");
  EXPECT_TRUE(p.reasoning_ended());
}

TEST(ReasoningParser, FedByTheStreamDecoder) {
  const Tokenizer& tok = testing::v3_tokenizer();
  const Ids ids = tok.encode("推理过程😀 step</think>\n\n最终答案", false);
  StreamDecoder dec(tok);
  ReasoningParser parser;
  ReasoningDelta all;
  for (const int32_t id : ids) {
    const ReasoningDelta d = parser.feed(dec.put(id));
    all.reasoning += d.reasoning;
    all.content += d.content;
  }
  const ReasoningDelta d = parser.feed(dec.finish());
  const ReasoningDelta e = parser.finish();
  EXPECT_EQ(all.reasoning + d.reasoning + e.reasoning, "推理过程😀 step");
  EXPECT_EQ(all.content + d.content + e.content, "\n\n最终答案");
}

}  // namespace
}  // namespace moeserve::tokenizer
