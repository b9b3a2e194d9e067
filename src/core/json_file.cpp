#include "core/json_file.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moeserve {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MS_CHECK(in, "cannot read ", path);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

nlohmann::json read_json_file(const std::string& path, size_t max_bytes) {
  struct stat st {};
  MS_CHECK(::stat(path.c_str(), &st) == 0, "cannot open ", path, ": ", std::strerror(errno));
  MS_CHECK(S_ISREG(st.st_mode), path, " is not a regular file");
  MS_CHECK(static_cast<size_t>(st.st_size) <= max_bytes, path, " is ", st.st_size,
           " bytes, more than the ", max_bytes, " accepted for it");
  std::ifstream in(path, std::ios::binary);
  MS_CHECK(in, "cannot open ", path, ": ", std::strerror(errno));
  std::string text;
  text.resize(static_cast<size_t>(st.st_size));
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  MS_CHECK(in.gcount() == static_cast<std::streamsize>(text.size()), "cannot read ", path);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    fail(path, " is not valid JSON (syntax error at byte ", e.byte, ")");
  } catch (const nlohmann::json::exception&) {
    // (e.g. a number beyond a double's range; its message would quote the file.)
    fail(path, " is not valid JSON (a value out of range)");
  }
}

}  // namespace moeserve
