// Reading files: a whole text file, or a JSON file named by a checkpoint or the user
// (config.json, an index), of which only a regular file of bounded size is read, a parse error
// naming the byte, never the file's contents.
#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>

namespace moeserve {

// The whole file at `path`; throws moeserve::Error when it cannot be read.
std::string read_text_file(const std::string& path);

// Parses the file at `path`; throws moeserve::Error when it is missing, not a regular file,
// larger than max_bytes, unreadable, or not valid JSON.
nlohmann::json read_json_file(const std::string& path, size_t max_bytes);

}  // namespace moeserve
