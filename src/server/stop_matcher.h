// Text-level stop strings over streamed output. Text arrives in pieces that split anywhere (a
// stop string may span several tokens); the matcher releases only text that can no longer be the
// beginning of a stop string, and holds back the rest. So a stop string is never sent to a
// client, and the output ends right before the first one.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace moeserve::server {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);

  // Adds `piece` and appends to `out` the text that is now safe to send. Returns true when a
  // stop string was completed: `out` then ends just before it and later calls add nothing.
  bool put(std::string_view piece, std::string& out);

  // At the end of generation (no stop string found): releases the held-back text.
  void flush(std::string& out);

  bool stopped() const { return stopped_; }
  const std::string& held() const { return held_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;  // a suffix of the output that is a proper prefix of some stop string
  bool stopped_ = false;
};

// Holds back a suffix of `text` that could be the start of `marker`: returns the length of the
// longest proper suffix of text that is a prefix of marker (0 when none).
size_t partial_suffix(std::string_view text, std::string_view marker);

}  // namespace moeserve::server
