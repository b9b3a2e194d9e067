// Python str methods on UTF-8 strings, indexed by code point as Python does. Case mapping
// covers ASCII, Latin-1, Greek and Cyrillic (what chat templates meet), not all of Unicode.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moeserve::tokenizer::jinja::pystr {

size_t length(const std::string& s);  // in code points
// strip/lstrip/rstrip; chars == nullopt strips whitespace.
std::string strip(const std::string& s, const std::optional<std::string>& chars, bool left,
                  bool right);
// split(sep=None, maxsplit=-1) / rsplit.
std::vector<std::string> split(const std::string& s, const std::optional<std::string>& sep,
                               int64_t maxsplit, bool from_right = false);
std::vector<std::string> splitlines(const std::string& s, bool keepends);
std::string replace(const std::string& s, const std::string& old, const std::string& repl,
                    int64_t count);
// find/rfind: code point index or -1.
int64_t find(const std::string& s, const std::string& sub, bool from_right);
int64_t count(const std::string& s, const std::string& sub);
std::string lower(const std::string& s);
std::string upper(const std::string& s);
std::string title(const std::string& s);
std::string capitalize(const std::string& s);
std::string swapcase(const std::string& s);
bool is_alpha_cp(uint32_t c);
// isupper / islower / isdigit / isalpha / isalnum / isspace / istitle on the whole string.
bool is(const std::string& s, const std::string& what);
std::string pad(const std::string& s, int64_t width, const std::string& fill,
                int where);  // -1 ljust, 0 center, 1 rjust

}  // namespace moeserve::tokenizer::jinja::pystr
