#include "cli/common.h"

#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moeserve::cli {

namespace fs = std::filesystem;

std::vector<int32_t> parse_ids(const std::string& s, const char* flag) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string item = s.substr(i, j - i);
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty() && j == s.size() && ids.empty() && i == 0) break;
    MS_CHECK(!item.empty(), flag, ": empty item in the id list \"", s, "\"");
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    MS_CHECK(end && *end == '\0' && errno == 0 && v >= 0 && v <= INT32_MAX, flag, ": \"", item,
             "\" is not a token id (a non-negative integer)");
    ids.push_back(static_cast<int32_t>(v));
    i = j + 1;
  }
  MS_CHECK(!ids.empty(), flag, ": no token ids given");
  return ids;
}

bool has_random_weights(const std::string& dir) {
  std::ifstream in(fs::path(dir) / "config.json");
  const auto j = nlohmann::json::parse(in, nullptr, false);
  return j.is_object() && j.contains("moeserve_random_weights") &&
         j["moeserve_random_weights"] == true;
}

std::string bundled_tokenizer_dir() {
  std::vector<fs::path> candidates;
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n > 0) {
    const fs::path exe = fs::path(std::string(buf, n)).parent_path();
    candidates.push_back(exe / "../assets/deepseek-v3");
    candidates.push_back(exe / "../share/moeserve/deepseek-v3");
  }
#ifdef MOESERVE_SOURCE_DIR
  candidates.push_back(fs::path(MOESERVE_SOURCE_DIR) / "assets/deepseek-v3");
#endif
  for (const auto& c : candidates)
    if (fs::exists(c / "tokenizer.json")) return fs::canonical(c).string();
  return "";
}

}  // namespace moeserve::cli
