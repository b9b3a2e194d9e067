// tokenizer.json / tokenizer_config.json -> TokenizerImpl, rejecting what is not supported.
#include <atomic>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/tokenizer_impl.h"
#include "tokenizer/unicode.h"

namespace moeserve::tokenizer {
namespace {

using json = nlohmann::json;

std::string type_of(const json& j) {
  return j.is_object() && j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>()
                                                                      : "?";
}

// Only normalizers that leave the text unchanged are supported.
void check_normalizer(const json& n) {
  if (n.is_null()) return;
  const std::string type = type_of(n);
  if (type == "Sequence") {
    for (const auto& sub : n.value("normalizers", json::array())) check_normalizer(sub);
    return;
  }
  fail("tokenizer.json: unsupported normalizer \"", type,
       "\" (only an empty or null normalizer is supported)");
}

void check_decoder(const json& d) {
  const std::string type = type_of(d);
  if (type == "ByteLevel") return;
  if (type == "Sequence") {
    const auto& list = d.value("decoders", json::array());
    MS_CHECK(list.size() == 1, "tokenizer.json: unsupported decoder Sequence (only [ByteLevel])");
    return check_decoder(list[0]);
  }
  fail("tokenizer.json: unsupported decoder \"", d.is_null() ? "null" : type,
       "\" (supported: ByteLevel)");
}

// TemplateProcessing's "single" template -> ids before and after the text.
void parse_post_processor(const json& p, TokenizerImpl& t) {
  if (p.is_null()) return;
  const std::string type = type_of(p);
  if (type == "ByteLevel") return;
  if (type == "Sequence") {
    for (const auto& sub : p.value("processors", json::array())) parse_post_processor(sub, t);
    return;
  }
  MS_CHECK(type == "TemplateProcessing", "tokenizer.json: unsupported post_processor \"", type,
           "\" (supported: ByteLevel, TemplateProcessing, Sequence)");
  bool after = false;
  for (const auto& item : p.at("single")) {
    if (item.contains("Sequence")) {
      after = true;
      continue;
    }
    const std::string name = item.at("SpecialToken").at("id").get<std::string>();
    const auto& ids = p.at("special_tokens").at(name).at("ids");
    for (const auto& id : ids) (after ? t.suffix_ids : t.prefix_ids).push_back(id.get<int32_t>());
  }
}

std::string token_content(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content")) return v["content"].get<std::string>();
  return "";
}

void parse_model(const json& m, TokenizerImpl& t) {
  const std::string type = m.value("type", "BPE");
  MS_CHECK(type == "BPE", "tokenizer.json: unsupported model type \"", type,
           "\" (only byte-level BPE is supported)");
  MS_CHECK(m.value("dropout", json()).is_null() || m["dropout"].get<double>() == 0.0,
           "tokenizer.json: BPE dropout is not supported");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json v = m.value(key, json());
    MS_CHECK(v.is_null() || v == "", "tokenizer.json: BPE ", key, " is not supported");
  }
  MS_CHECK(!m.value("byte_fallback", false), "tokenizer.json: BPE byte_fallback is not supported");
  std::unordered_map<std::string, int32_t> vocab;
  const json& jv = m.at("vocab");
  MS_CHECK(jv.is_object(), "tokenizer.json: model.vocab must be an object");
  vocab.reserve(jv.size());
  for (auto it = jv.begin(); it != jv.end(); ++it) {
    const int64_t id = it.value().get<int64_t>();
    MS_CHECK(id >= 0 && id < (1 << 24), "tokenizer.json: token id ", id, " out of range");
    vocab.emplace(it.key(), static_cast<int32_t>(id));
  }
  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(m.at("merges").size());
  for (const auto& mg : m.at("merges")) {
    if (mg.is_string()) {
      const std::string s = mg.get<std::string>();
      const size_t sp = s.find(' ');
      MS_CHECK(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos,
               "tokenizer.json: merge \"", s, "\" is not two tokens separated by a space");
      merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else {
      MS_CHECK(mg.is_array() && mg.size() == 2,
               "tokenizer.json: a merge must be \"a b\" or [a, b]");
      merges.emplace_back(mg[0].get<std::string>(), mg[1].get<std::string>());
    }
  }
  int32_t unk = -1;
  if (const std::string u = token_content(m.value("unk_token", json())); !u.empty()) {
    auto it = vocab.find(u);
    if (it != vocab.end()) unk = it->second;
  }
  for (const auto& [tok, id] : vocab) {
    if (size_t(id) >= t.tokens.size()) t.tokens.resize(id + 1);
    t.tokens[id] = tok;
  }
  t.present.assign(t.tokens.size(), 0);
  for (const auto& [tok, id] : vocab) t.present[id] = 1;
  t.bpe =
      std::make_unique<BpeModel>(std::move(vocab), merges, m.value("ignore_merges", false), unk);
}

}  // namespace

std::shared_ptr<TokenizerImpl> build_tokenizer(const std::string& tokenizer_json,
                                               const std::string& config_json) {
  static std::atomic<uint64_t> next_uid{1};
  auto t = std::make_shared<TokenizerImpl>();
  t->uid = next_uid++;
  json j, cfg;
  try {
    j = json::parse(tokenizer_json);
    cfg = config_json.empty() ? json::object() : json::parse(config_json);
  } catch (const json::exception& e) {
    fail("cannot parse tokenizer JSON: ", e.what());
  }
  try {
    MS_CHECK(j.is_object() && j.contains("model"), "tokenizer.json: no \"model\"");
    check_normalizer(j.value("normalizer", json()));
    parse_model(j.at("model"), *t);
    t->pre = std::make_unique<PreTokenizer>(j.value("pre_tokenizer", json()));
    check_decoder(j.value("decoder", json()));

    std::vector<AddedToken> added;
    for (const auto& a : j.value("added_tokens", json::array())) {
      AddedToken tok;
      tok.id = a.at("id").get<int32_t>();
      MS_CHECK(tok.id >= 0 && tok.id < (1 << 24), "tokenizer.json: added token id out of range");
      tok.content = a.at("content").get<std::string>();
      check_utf8(tok.content, "an added token");
      tok.single_word = a.value("single_word", false);
      tok.lstrip = a.value("lstrip", false);
      tok.rstrip = a.value("rstrip", false);
      tok.normalized = a.value("normalized", !a.value("special", false));
      tok.special = a.value("special", false);
      if (size_t(tok.id) >= t->tokens.size()) {
        t->tokens.resize(tok.id + 1);
        t->present.resize(tok.id + 1, 0);
      }
      t->tokens[tok.id] = tok.content;
      t->present[tok.id] = 1;
      t->added[tok.content] = tok.id;
      added.push_back(tok);
    }
    t->special.assign(t->tokens.size(), 0);
    for (const AddedToken& a : added)
      if (a.special) t->special[a.id] = 1;
    t->raw_matcher = std::make_unique<AddedTokenMatcher>(added, false);
    t->norm_matcher = std::make_unique<AddedTokenMatcher>(added, true);

    // ByteLevel decoding of every token: alphabet chars -> bytes, anything else verbatim.
    const ByteLevelAlphabet& alphabet = byte_level_alphabet();
    t->bytes.resize(t->tokens.size());
    for (size_t id = 0; id < t->tokens.size(); ++id) {
      if (!t->present[id]) continue;
      if (!alphabet.decode(t->tokens[id], t->bytes[id])) t->bytes[id] = t->tokens[id];
    }

    parse_post_processor(j.value("post_processor", json()), *t);
    auto lookup = [&](const std::string& s) -> int32_t {
      if (s.empty()) return -1;
      if (auto it = t->added.find(s); it != t->added.end()) return it->second;
      if (auto it = t->bpe->vocab().find(s); it != t->bpe->vocab().end()) return it->second;
      return -1;
    };
    t->bos_token = token_content(cfg.value("bos_token", json()));
    t->eos_token = token_content(cfg.value("eos_token", json()));
    t->bos_id = lookup(t->bos_token);
    t->eos_id = lookup(t->eos_token);
    // As transformers' Llama-style fast tokenizers do, the config's flags replace the template.
    if (cfg.contains("add_bos_token") || cfg.contains("add_eos_token")) {
      t->prefix_ids.clear();
      t->suffix_ids.clear();
      if (cfg.value("add_bos_token", false) && t->bos_id >= 0) t->prefix_ids.push_back(t->bos_id);
      if (cfg.value("add_eos_token", false) && t->eos_id >= 0) t->suffix_ids.push_back(t->eos_id);
    }
    t->add_bos = !t->prefix_ids.empty() && t->prefix_ids[0] == t->bos_id;
  } catch (const json::exception& e) {
    fail("tokenizer.json has an unexpected layout: ", e.what());
  }
  return t;
}

}  // namespace moeserve::tokenizer
