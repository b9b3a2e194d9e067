// The per-token cost of structured output: the JSON constraint's mask over the DeepSeek-V3
// vocabulary (129,280 tokens) at each step of a sampled walk, against sampling the same logits
// unconstrained, greedy (where sampling itself costs an argmax, so the difference is the mask)
// and at temperature 1 (where the sampler's sort of the vocabulary dominates). Random logits
// stand in for a model's (a random-weight model's are as flat).
//   bench_json_constraint [--model DIR] [--steps N]
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "engine/json_grammar.h"
#include "engine/sampler.h"
#include "server/structured.h"
#include "tokenizer/tokenizer.h"

using namespace moeserve;
using Clock = std::chrono::steady_clock;

namespace {

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

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::string model = repo_root() + "/assets/deepseek-v3";
  int steps = 200;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--model")) model = argv[i + 1];
    if (!std::strcmp(argv[i], "--steps")) steps = std::atoi(argv[i + 1]);
  }
  const auto tok = tokenizer::Tokenizer::load(model);
  auto t0 = Clock::now();
  const auto trie = server::make_token_trie(tok);
  std::printf("vocabulary %d tokens, trie of %zu nodes built in %.0f ms\n", tok.vocab_size(),
              trie->nodes().size(), ms_since(t0));
  const int32_t eos = tok.eos_id();
  struct Case {
    const char* name;
    const char* schema;  // "" for json_object
  };
  const Case cases[] = {
      {"json_object", ""},
      {"object of short strings, integer, boolean",
       R"({"type":"object","properties":{"name":{"type":"string","maxLength":12},"age":{"type":"integer"},"ok":{"type":"boolean"}},"required":["name","age","ok"]})"},
      {"array of free strings", R"({"type":"array","items":{"type":"string"}})"},
      {"enum and numbers",
       R"({"type":"array","items":{"anyOf":[{"enum":["red","green","blue"]},{"type":"number"}]},"maxItems":50})"},
  };
  const int64_t V = tok.vocab_size();
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> logits(V);
  std::printf("%-44s %5s %13s %13s %7s\n", "schema", "T", "plain ms/tok", "masked ms/tok",
              "tokens");
  for (const float temperature : {0.0f, 1.0f})
    for (const Case& c : cases) {
      nlohmann::ordered_json schema;
      if (*c.schema) schema = nlohmann::ordered_json::parse(c.schema);
      const auto constraint = engine::compile_json_constraint(
          engine::json_constraint_spec(*c.schema ? &schema : nullptr, {eos}), trie);
      double plain_ms = 0, masked_ms = 0;
      int64_t tokens = 0;
      for (uint64_t seed = 0; tokens < steps; ++seed) {
        engine::SamplingParams p, q;
        p.temperature = q.temperature = temperature;
        p.seed = q.seed = seed;
        p.constraint = constraint;
        engine::Sampler masked(p), plain(q);
        std::vector<int32_t> seq = {0};
        for (int i = 0; i < 400 && tokens < steps; ++i) {
          for (float& x : logits) x = nd(rng);
          auto t = Clock::now();
          plain.sample(logits.data(), V, seq, 1);
          plain_ms += ms_since(t);
          t = Clock::now();
          const int32_t id = masked.sample(logits.data(), V, seq, 1);
          masked_ms += ms_since(t);
          ++tokens;
          seq.push_back(id);
          if (id == eos) break;
        }
      }
      std::printf("%-44s %5.1f %13.2f %13.2f %7lld\n", c.name, temperature, plain_ms / tokens,
                  masked_ms / tokens, static_cast<long long>(tokens));
    }
  return 0;
}
