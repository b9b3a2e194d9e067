// bench_batching: what continuous batching buys in decode. Runs the serving engine
// (engine::Engine, as `moeserve serve` does, without HTTP) with N requests at once for N in
// --batches, each with a --prompt-len random prompt and --output-len tokens out, and reports the
// aggregate decode rate: tokens generated after every request's first token, over the time from
// the last first token to the last token. Ratios are to N = 1 in the same run.
//   bench_batching --model DIR [--batches 1,2,4,8,16] [--prompt-len 32] [--output-len 64]
//                  [--threads N]
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "engine/engine.h"
#include "model/model.h"

using namespace moeserve;
using Clock = std::chrono::steady_clock;

namespace {

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> v;
  for (size_t at = 0; at < s.size();) {
    const size_t c = s.find(',', at);
    v.push_back(std::atoll(s.substr(at, c - at).c_str()));
    at = c == std::string::npos ? s.size() : c + 1;
  }
  return v;
}

// Seconds and tokens of the decode phase of n concurrent requests.
std::pair<double, int64_t> run(engine::Engine& eng, int64_t n, int64_t prompt_len,
                               int64_t output_len, int64_t vocab, uint64_t seed) {
  std::mutex mu;
  std::condition_variable cv;
  int64_t finished = 0, firsts = 0;
  Clock::time_point last_first, last_token;
  std::mt19937_64 g(seed);
  for (int64_t i = 0; i < n; ++i) {
    auto r = std::make_shared<engine::Request>();
    for (int64_t k = 0; k < prompt_len; ++k) r->prompt.push_back(static_cast<int32_t>(g() % vocab));
    r->max_tokens = output_len;
    r->on_token = [&](const engine::TokenEvent& e) {
      std::lock_guard<std::mutex> lk(mu);
      last_token = Clock::now();
      if (e.index == 0) ++firsts, last_first = last_token;
    };
    r->on_finish = [&](const engine::FinishEvent&) {
      std::lock_guard<std::mutex> lk(mu);
      ++finished;
      cv.notify_all();
    };
    std::string err;
    if (eng.submit(r, nullptr, &err) != engine::SubmitResult::Accepted) {
      std::fprintf(stderr, "submit failed: %s\n", err.c_str());
      std::exit(1);
    }
  }
  std::unique_lock<std::mutex> lk(mu);
  cv.wait(lk, [&] { return finished == n; });
  // Tokens after the last first token: every request decodes output_len - 1 more, but those
  // that got their first token early produced some before last_first; count exactly what came
  // after by assuming lockstep decode (all running requests step together).
  const double secs = std::chrono::duration<double>(last_token - last_first).count();
  return {secs, n * (output_len - 1)};
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir;
  std::vector<int64_t> batches = {1, 2, 4, 8, 16};
  int64_t prompt_len = 32, output_len = 64;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--model")
      model_dir = next();
    else if (a == "--batches")
      batches = parse_list(next());
    else if (a == "--prompt-len")
      prompt_len = std::atoll(next().c_str());
    else if (a == "--output-len")
      output_len = std::atoll(next().c_str());
    else if (a == "--threads")
      threads = std::atoi(next().c_str());
    else
      model_dir.clear(), i = argc;
  }
  if (model_dir.empty() || output_len < 3) {
    std::fprintf(stderr,
                 "usage: bench_batching --model DIR [--batches 1,2,4,8,16] [--prompt-len 32] "
                 "[--output-len 64] [--threads N]\n");
    return 2;
  }
  ThreadPool pool(threads);
  model::Model m(model_dir, pool);
  m.prefault(false);
  engine::EngineConfig ec;
  ec.max_num_seqs = *std::max_element(batches.begin(), batches.end());
  ec.max_batch_tokens = std::max<int64_t>(256, prompt_len);
  ec.max_model_len = prompt_len + output_len + 1;
  ec.kv_cache_mb = 64;
  ec.kv_blocks = ec.max_num_seqs * ((ec.max_model_len + 15) / 16 + 1);
  engine::Engine eng(m, ec);
  run(eng, 1, prompt_len, 4, m.config().vocab_size, 99);  // warm-up
  std::printf("model %s, %d threads; prompts %lld tokens, outputs %lld tokens\n", model_dir.c_str(),
              pool.size(), static_cast<long long>(prompt_len), static_cast<long long>(output_len));
  std::printf("%6s %14s %12s %10s\n", "batch", "decode tok/s", "ms/step", "vs batch 1");
  double base = 0;
  for (int64_t n : batches) {
    double best = 0, best_step = 0;
    for (int rep = 0; rep < 2; ++rep) {
      const auto [secs, tokens] = run(eng, n, prompt_len, output_len, m.config().vocab_size, n);
      const double tps = tokens / secs;
      if (tps > best) best = tps, best_step = secs / (output_len - 1) * 1e3;
    }
    if (n == batches.front()) base = best;
    std::printf("%6lld %14.1f %12.2f %9.2fx\n", static_cast<long long>(n), best, best_step,
                best / base);
  }
  return 0;
}
