// bench_batching: what continuous batching buys in decode. Runs the serving engine
// (engine::Engine, as `moeserve serve` does, without HTTP) with N requests at once for N in
// --batches, each with a --prompt-len random prompt and --output-len tokens out, and reports the
// aggregate decode rate: tokens generated after every request's first token, over the time from
// the last first token to the last token. Ratios are to N = 1 in the same run.
//
// Each row also prices its decode steps, from the experts the steps actually read (the model's
// counters): bytes per step (every matrix all tokens use, once; each routed expert that at
// least one token went to, once; each sequence's cached latent rows, at the cache's dtype) and
// matrix FLOPs per step (2 per weight element per token that uses it). Against this machine's
// measured read bandwidth and peak FMA rate, max(bytes / bandwidth, FLOPs / peak) bounds the step's
// time from below; "bound tok/s" is the rate at that bound ("%bound": the measured rate's share of
// it), and its ratio to batch 1's shows what batching can buy on this model at best, on any machine
// whose bandwidth and FMA rate stand in these ratios.
// --precision bf16 runs the weight products under the bf16 contract (kernels.h), and prices the
// FLOPs against the peak of the unit those run on (vdpbf16ps where the CPU has it).
//   bench_batching --model DIR [--batches 1,2,4,8,16] [--prompt-len 32] [--output-len 64]
//                  [--threads N] [--precision exact|bf16]
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "engine/engine.h"
#include "kernels/roofline.h"
#include "kv/kv_pool.h"
#include "model/model.h"
#include "model/weights.h"

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

int64_t sum(const std::vector<int64_t>& v) {
  return std::accumulate(v.begin(), v.end(), int64_t{0});
}

// The model's counters at one moment.
struct Counters {
  int64_t forwards = 0, expert_passes = 0, expert_tokens = 0;
  static Counters of(const model::Model& m) {
    return {m.forward_count(), sum(m.expert_pass_counts()), sum(m.expert_token_counts())};
  }
};

// The decode phase of n concurrent requests.
struct Phase {
  double seconds = 0;
  int64_t tokens = 0;
  Counters begin, end;  // at the last first token, at the last token
};

Phase run(engine::Engine& eng, const model::Model& m, int64_t n, int64_t prompt_len,
          int64_t output_len, int64_t vocab, uint64_t seed) {
  std::mutex mu;
  std::condition_variable cv;
  int64_t finished = 0, firsts = 0;
  Clock::time_point last_first, last_token;
  Phase ph;
  std::mt19937_64 g(seed);
  for (int64_t i = 0; i < n; ++i) {
    auto r = std::make_shared<engine::Request>();
    for (int64_t k = 0; k < prompt_len; ++k) r->prompt.push_back(static_cast<int32_t>(g() % vocab));
    r->max_tokens = output_len;
    r->on_token = [&](const engine::TokenEvent& e) {
      std::lock_guard<std::mutex> lk(mu);
      last_token = Clock::now();
      if (e.index == 0 && ++firsts == n) last_first = last_token, ph.begin = Counters::of(m);
    };
    r->on_finish = [&](const engine::FinishEvent&) {
      std::lock_guard<std::mutex> lk(mu);
      if (++finished == n) ph.end = Counters::of(m);
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
  ph.seconds = std::chrono::duration<double>(last_token - last_first).count();
  ph.tokens = n * (output_len - 1);
  return ph;
}

// What a decode step of the model costs at least: bytes and matrix FLOPs (see the top).
struct StepCost {
  double tokens = 0, bytes = 0, flops = 0;
};

StepCost step_cost(const model::Model& m, const Phase& ph, int64_t prompt_len, int64_t output_len,
                   kv::KvDtype kv_dtype) {
  const model::ModelConfig& c = m.config();
  const model::ModelWeights& w = m.weights();
  int64_t moe_layers = 0;
  for (const auto& L : w.layers) moe_layers += L.is_moe ? 1 : 0;
  const double k_all = static_cast<double>(moe_layers * c.num_experts_per_tok);
  const double ex_bytes = static_cast<double>(model::routed_expert_bytes(w));
  const double ex_elems = static_cast<double>(model::routed_expert_elems(c));
  const double fixed_bytes = model::active_weight_bytes(w, c) - k_all * ex_bytes;
  const double fixed_elems = model::active_matrix_elems(w, c) - k_all * ex_elems;
  const double steps = std::max<int64_t>(1, ph.end.forwards - ph.begin.forwards);
  StepCost s;
  s.tokens = ph.tokens / steps;
  const double passes = (ph.end.expert_passes - ph.begin.expert_passes) / steps;
  const double routed = (ph.end.expert_tokens - ph.begin.expert_tokens) / steps;
  // Cached rows each sequence reads per layer: its context, on average half-way through.
  const double ctx = prompt_len + output_len / 2.0;
  s.bytes = fixed_bytes + passes * ex_bytes +
            s.tokens * ctx * c.num_hidden_layers * kv::kv_row_bytes(kv_dtype, c.kv_cache_dim());
  s.flops = 2.0 * (fixed_elems * s.tokens + routed * ex_elems);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir;
  std::vector<int64_t> batches = {1, 2, 4, 8, 16};
  int64_t prompt_len = 32, output_len = 64;
  int threads = 0;
  kernels::Precision precision = kernels::Precision::Exact;
  bool usage = false;
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
    else if (a == "--precision") {
      const std::string v = next();
      if (v == "bf16")
        precision = kernels::Precision::Bf16;
      else if (v != "exact")
        usage = true;
    } else
      model_dir.clear(), i = argc;
  }
  if (usage || model_dir.empty() || output_len < 3) {
    std::fprintf(stderr,
                 "usage: bench_batching --model DIR [--batches 1,2,4,8,16] [--prompt-len 32] "
                 "[--output-len 64] [--threads N] [--precision exact|bf16]\n");
    return 2;
  }
  ThreadPool pool(threads);
  model::Model m(model_dir, pool);
  m.prefault(false);
  m.set_precision(precision);
  engine::EngineConfig ec;
  ec.max_num_seqs = *std::max_element(batches.begin(), batches.end());
  ec.max_batch_tokens = std::max<int64_t>(256, prompt_len);
  ec.max_model_len = prompt_len + output_len + 1;
  ec.kv_cache_mb = 64;
  ec.kv_blocks = ec.max_num_seqs * ((ec.max_model_len + 15) / 16 + 1);
  engine::Engine eng(m, ec);
  const double bw = kernels::measure_read_bandwidth_gbs(pool) * 1e9;
  const double peak = kernels::measure_peak_gflops(pool, precision) * 1e9;
  run(eng, m, 1, prompt_len, 4, m.config().vocab_size, 99);  // warm-up
  std::printf("model %s, %d threads; prompts %lld tokens, outputs %lld tokens; precision %s\n",
              model_dir.c_str(), pool.size(), static_cast<long long>(prompt_len),
              static_cast<long long>(output_len), kernels::precision_name(precision));
  std::printf("read bandwidth %.1f GB/s, peak %s %.1f GFLOP/s (measured)\n", bw / 1e9,
              kernels::matmul_unit(precision), peak / 1e9);
  std::printf("%6s %13s %9s %8s | %8s %6s %8s %6s | %12s %8s %9s\n", "batch", "decode tok/s",
              "ms/step", "vs b1", "MB/step", "%bw", "GF/step", "%peak", "bound tok/s", "vs b1",
              "%bound");
  double base = 0, bound_base = 0;
  for (int64_t n : batches) {
    double best = 0, best_step = 0;
    StepCost cost;
    for (int rep = 0; rep < 2; ++rep) {
      const Phase ph = run(eng, m, n, prompt_len, output_len, m.config().vocab_size, n);
      const double tps = ph.tokens / ph.seconds;
      if (tps > best) {
        best = tps;
        cost = step_cost(m, ph, prompt_len, output_len, ec.kv_dtype);
        best_step = cost.tokens / tps;
      }
    }
    const double bound = cost.tokens / std::max(cost.bytes / bw, cost.flops / peak);
    if (n == batches.front()) base = best, bound_base = bound;
    std::printf("%6lld %13.1f %9.2f %7.2fx | %8.0f %5.0f%% %8.2f %5.0f%% | %12.1f %7.2fx %8.0f%%\n",
                static_cast<long long>(n), best, best_step * 1e3, best / base, cost.bytes / 1e6,
                100 * cost.bytes / best_step / bw, cost.flops / 1e9,
                100 * cost.flops / best_step / peak, bound, bound / bound_base, 100 * best / bound);
  }
  return 0;
}
