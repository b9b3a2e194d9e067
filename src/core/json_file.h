// Reading a JSON file named by a checkpoint or the user (config.json, an index): only a regular
// file of bounded size is read, and a parse error names the byte, never the file's contents.
#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>

namespace moeserve {

// Parses the file at `path`; throws moeserve::Error when it is missing, not a regular file,
// larger than max_bytes, unreadable, or not valid JSON.
nlohmann::json read_json_file(const std::string& path, size_t max_bytes);

}  // namespace moeserve
