#include "tokenizer/tokenizer.h"

#include <fstream>
#include <functional>
#include <sstream>
#include <unordered_map>

#include "core/error.h"
#include "core/json_file.h"
#include "tokenizer/tokenizer_impl.h"
#include "tokenizer/unicode.h"
#include "tokenizer/word_cache.h"

namespace moeserve::tokenizer {
Tokenizer Tokenizer::load(const std::filesystem::path& dir) {
  const auto tok = dir / "tokenizer.json";
  MS_CHECK(std::filesystem::is_regular_file(tok), "no tokenizer found: ", tok.string(),
           " does not exist (expected a Hugging Face model folder)");
  const auto cfg = dir / "tokenizer_config.json";
  const std::string cfg_text = std::filesystem::is_regular_file(cfg) ? read_text_file(cfg) : "";
  return from_json(read_text_file(tok), cfg_text);
}

Tokenizer Tokenizer::from_json(const std::string& tokenizer_json, const std::string& config_json) {
  Tokenizer t;
  t.impl_ = build_tokenizer(tokenizer_json, config_json);
  return t;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special,
                                       bool parse_special) const {
  const TokenizerImpl& t = *impl_;
  check_utf8(text, "input text");
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (add_special) ids.insert(ids.end(), t.prefix_ids.begin(), t.prefix_ids.end());

  std::vector<Piece> raw, pieces;
  t.raw_matcher->split(text, 0, text.size(), !parse_special, raw);
  for (const Piece& p : raw) {
    if (p.id >= 0) {
      pieces.push_back(p);
    } else {
      t.norm_matcher->split(text, p.begin, p.end, !parse_special, pieces);
    }
  }

  WordCache& cache = WordCache::for_thread(t.uid);
  const BpeModel& bpe = *t.bpe;
  const std::function<void(std::string_view)> on_word = [&](std::string_view word) {
    if (word.size() > WordCache::kMaxWord || word.size() == 1) {
      bpe.encode_word(word, ids);
      return;
    }
    const uint64_t h = WordCache::hash(word);
    if (cache.lookup(word, h, ids)) return;
    const size_t before = ids.size();
    bpe.encode_word(word, ids);
    cache.insert(word, h, ids.data() + before, ids.size() - before);
  };
  for (const Piece& p : pieces) {
    if (p.id >= 0) {
      ids.push_back(p.id);
    } else {
      t.pre->run(text.substr(p.begin, p.end - p.begin), on_word);
    }
  }
  if (add_special) ids.insert(ids.end(), t.suffix_ids.begin(), t.suffix_ids.end());
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  const TokenizerImpl& t = *impl_;
  std::string bytes;
  for (const int32_t id : ids) {
    if (id < 0 || size_t(id) >= t.present.size() || !t.present[id]) continue;
    if (skip_special && t.special[id]) continue;
    bytes += t.bytes[id];
  }
  std::string out;
  out.reserve(bytes.size());
  utf8_lossy_append(out, bytes);
  return out;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  const std::string key(token);
  if (auto it = impl_->added.find(key); it != impl_->added.end()) return it->second;
  if (auto it = impl_->bpe->vocab().find(key); it != impl_->bpe->vocab().end()) return it->second;
  return std::nullopt;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || size_t(id) >= impl_->tokens.size()) return "";
  return impl_->tokens[id];
}

std::string_view Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || size_t(id) >= impl_->bytes.size()) return {};
  return impl_->bytes[id];
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->special.size() && impl_->special[id];
}

int32_t Tokenizer::bos_id() const {
  return impl_->bos_id;
}
int32_t Tokenizer::eos_id() const {
  return impl_->eos_id;
}
const std::string& Tokenizer::bos_token() const {
  return impl_->bos_token;
}
const std::string& Tokenizer::eos_token() const {
  return impl_->eos_token;
}
bool Tokenizer::add_bos() const {
  return impl_->add_bos;
}
int32_t Tokenizer::vocab_size() const {
  return static_cast<int32_t>(impl_->tokens.size());
}

}  // namespace moeserve::tokenizer
