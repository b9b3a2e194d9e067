// Shared helpers for the tokenizer tests: fixture paths and the DeepSeek-V3 tokenizer, loaded once.
#pragma once

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "tokenizer/tokenizer.h"

namespace moeserve::tokenizer::testing {

inline std::filesystem::path source_dir() {
  return MOESERVE_SOURCE_DIR;
}
inline std::filesystem::path fixture_dir() {
  return source_dir() / "tests/fixtures/tokenizer";
}
inline std::filesystem::path v3_dir() {
  return source_dir() / "assets/deepseek-v3";
}
inline std::filesystem::path r1_dir() {
  return source_dir() / "assets/deepseek-r1";
}

inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + p.string());
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

inline nlohmann::ordered_json read_fixture(const std::string& name) {
  return nlohmann::ordered_json::parse(read_text(fixture_dir() / name));
}

inline const Tokenizer& v3_tokenizer() {
  static const Tokenizer tok = Tokenizer::load(v3_dir());
  return tok;
}

}  // namespace moeserve::tokenizer::testing
