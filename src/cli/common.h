// Helpers shared by the subcommands.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moeserve::cli {

// "1,2,3" (spaces allowed) -> ids; a malformed list is an error naming the bad item.
std::vector<int32_t> parse_ids(const std::string& s, const char* flag);

// True when config.json of `dir` says init-model wrote it (random weights).
bool has_random_weights(const std::string& dir);

// The folder holding the DeepSeek-V3 tokenizer files shipped with moeserve, or "" if not found.
std::string bundled_tokenizer_dir();

}  // namespace moeserve::cli
