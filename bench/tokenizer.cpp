// Encode throughput of the tokenizer, one thread, on a mixed text (English, CJK, code, numbers,
// emoji). Compare with tools/bench_tokenizer_hf.py, which runs HF `tokenizers` on the same text.
//   bench_tokenizer [--model DIR] [--text FILE] [--repeat N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace {

// The repository root: the current directory, or the parent of the folder holding this binary
// (build-*/bench_tokenizer), whichever has the tokenizer assets.
std::string repo_root() {
  namespace fs = std::filesystem;
  std::vector<fs::path> candidates = {fs::current_path()};
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) candidates.push_back(exe.parent_path().parent_path());
  for (const auto& c : candidates)
    if (fs::exists(c / "assets/deepseek-v3/tokenizer.json")) return c.string();
  return ".";
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw moeserve::Error("cannot read " + path);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

// Splits at line ends into chunks of about `size` bytes (a request-sized unit of text).
std::vector<std::string> chunks(const std::string& text, size_t size) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = std::min(text.size(), start + size);
    const size_t nl = text.find('\n', end);
    end = nl == std::string::npos ? text.size() : nl + 1;
    out.push_back(text.substr(start, end - start));
    start = end;
  }
  return out;
}

template <typename Fn>
double best_seconds(int repeat, Fn&& fn) {
  double best = 1e30;
  for (int r = 0; r < repeat; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string root = repo_root();
  std::string model = root + "/assets/deepseek-v3";
  std::string text_path = root + "/tests/fixtures/tokenizer/bench_mixed.txt";
  int repeat = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--model")) model = argv[i + 1];
    if (!std::strcmp(argv[i], "--text")) text_path = argv[i + 1];
    if (!std::strcmp(argv[i], "--repeat")) repeat = std::max(1, std::atoi(argv[i + 1]));
  }
  try {
    const auto t0 = std::chrono::steady_clock::now();
    const auto tok = moeserve::tokenizer::Tokenizer::load(model);
    const double load_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const std::string text = read_file(text_path);
    const double mb = text.size() / 1e6;
    size_t n_tokens = 0;
    const double whole = best_seconds(repeat, [&] { n_tokens = tok.encode(text, false).size(); });
    const auto parts = chunks(text, 4096);
    const double chunked = best_seconds(repeat, [&] {
      for (const auto& p : parts) n_tokens += tok.encode(p, false).size() * 0;
    });
    // Cold: a second tokenizer instance starts with an empty word cache.
    const auto fresh = moeserve::tokenizer::Tokenizer::load(model);
    const double cold = best_seconds(1, [&] { fresh.encode(text, false); });
    std::printf("moeserve tokenizer: load %.2f s, text %.2f MB, %zu tokens\n", load_s, mb,
                n_tokens);
    std::printf("  encode whole text:     %7.2f MB/s\n", mb / whole);
    std::printf("  encode 4 KB chunks:    %7.2f MB/s\n", mb / chunked);
    std::printf("  encode cold (1st run): %7.2f MB/s\n", mb / cold);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
