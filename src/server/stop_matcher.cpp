#include "server/stop_matcher.h"

#include <algorithm>

namespace moeserve::server {

size_t partial_suffix(std::string_view text, std::string_view marker) {
  const size_t max = std::min(text.size(), marker.size() - (marker.empty() ? 0 : 1));
  for (size_t len = max; len > 0; --len)
    if (text.substr(text.size() - len) == marker.substr(0, len)) return len;
  return 0;
}

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  std::erase_if(stops_, [](const std::string& s) { return s.empty(); });
}

bool StopMatcher::put(std::string_view piece, std::string& out) {
  if (stopped_) return true;
  if (stops_.empty()) {
    out.append(piece);
    return false;
  }
  held_.append(piece);
  // Held text never contains a whole stop string (it would have matched), so the earliest match
  // lies in held_ and, by the hold-back rule, can start anywhere in it.
  size_t first = std::string::npos;
  for (const auto& s : stops_) first = std::min(first, held_.find(s));
  if (first != std::string::npos) {
    out.append(held_, 0, first);
    held_.clear();
    stopped_ = true;
    return true;
  }
  size_t hold = 0;
  for (const auto& s : stops_) hold = std::max(hold, partial_suffix(held_, s));
  out.append(held_, 0, held_.size() - hold);
  held_.erase(0, held_.size() - hold);
  return false;
}

void StopMatcher::flush(std::string& out) {
  if (!stopped_) out += held_;
  held_.clear();
}

}  // namespace moeserve::server
