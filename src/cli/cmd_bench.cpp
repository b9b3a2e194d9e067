// moeserve bench: prefill and decode speed of a model, each printed next to the bound it is
// measured against (the machine's memory read bandwidth for decode at batch 1, for prefill the
// peak rate of the unit the products run on: FMA, or vdpbf16ps under --precision bf16), both
// measured here in the same run.
#include <sched.h>
#include <sys/resource.h>
#include <sys/sysinfo.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "cli/commands.h"
#include "cli/common.h"
#include "cli/parallel.h"
#include "core/cpu_features.h"
#include "core/error.h"
#include "engine/generator.h"
#include "kernels/roofline.h"
#include "model/init_model.h"

namespace moeserve::cli {

namespace fs = std::filesystem;

namespace {

struct BenchArgs {
  std::string model, preset, dtype = "bf16", cache_dir = "models";
  std::string kv_cache_dtype;  // add_kv_cache_dtype_option
  int64_t prompt_len = 512, decode_tokens = 32;
  int64_t speculative_tokens = 0;
  ParallelArgs par;
  bool json = false;
};

// FLOPs of one forward over `n` new tokens after `past` cached ones: 2 per weight element
// each token uses, plus attention in the absorbed form (scores, latent sum, absorption).
double forward_flops(const model::ModelConfig& c, size_t active_matrix_elems, int64_t past,
                     int64_t n) {
  double f = 2.0 * static_cast<double>(active_matrix_elems) * n;
  const double nh = c.num_attention_heads, L = c.kv_lora_rank, rd = c.qk_rope_head_dim;
  double ctx = 0;  // sum over the new tokens of their context length
  for (int64_t i = 0; i < n; ++i) ctx += past + i + 1;
  f += c.num_hidden_layers * nh *
       (ctx * 2.0 * (2.0 * L + rd) + n * 2.0 * L * (c.qk_nope_head_dim + c.v_head_dim));
  return f;
}

double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Speculative decoding's costs at the end of a `past`-token context: the median seconds of a
// forward of one token (a plain decode step), of 1 + k tokens (verifying k drafts) and of one
// MTP module row (drafting a token).
struct SpecCosts {
  double step = 0, verify = 0, draft = 0;
};
SpecCosts measure_spec_costs(model::Model& m, const std::vector<int32_t>& prompt, int64_t k,
                             kv::KvDtype dtype) {
  const model::ModelConfig& c = m.config();
  const int64_t P = static_cast<int64_t>(prompt.size()), bs = 16;
  kv::KvPool kv((P + k + 1 + bs - 1) / bs, bs, c.num_hidden_layers + 1, c.kv_cache_dim(), dtype);
  std::vector<int32_t> blocks;
  MS_ASSERT(kv.allocate(kv.n_blocks(), &blocks));
  std::vector<float> logits((k + 1) * c.vocab_size), hidden((k + 1) * c.hidden_size);
  model::Batch b;
  b.tokens = prompt;
  b.seqs = {{0, P, 0, blocks.data()}};
  b.logit_rows = {P - 1};
  m.forward(b, kv, logits.data());
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  constexpr int kReps = 9;
  std::vector<double> one, ver, dr;
  for (int r = 0; r < kReps; ++r) {
    // (each writes the rows after the prompt again)
    b.tokens = {prompt[0]};
    b.seqs = {{0, 1, P, blocks.data()}};
    b.logit_rows = {0};
    double t = seconds_now();
    m.forward(b, kv, logits.data(), hidden.data());
    one.push_back(seconds_now() - t);
    b.tokens.assign(k + 1, prompt[0]);
    b.seqs = {{0, k + 1, P, blocks.data()}};
    b.logit_rows.clear();
    for (int64_t i = 0; i <= k; ++i) b.logit_rows.push_back(i);
    t = seconds_now();
    m.forward(b, kv, logits.data(), hidden.data());
    ver.push_back(seconds_now() - t);
    if (m.has_mtp()) {
      b.tokens = {prompt[1 % P]};
      b.seqs = {{0, 1, P, blocks.data()}};
      b.logit_rows = {0};
      t = seconds_now();
      m.forward_mtp(b, hidden.data(), kv, logits.data(), hidden.data());
      dr.push_back(seconds_now() - t);
    }
  }
  return {median(one), median(ver), dr.empty() ? 0.0 : median(dr)};
}

long peak_rss_kb() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6));
  return 0;
}

// The weights' format for the report: fp8, bf16, or int4/int8 experts with the rest as stored.
std::string weights_label(const model::ModelConfig& c) {
  using K = model::Quantization::Kind;
  if (c.quant.kind == K::PackQuantized)
    return "int" + std::to_string(c.quant.num_bits) + " group " +
           (c.quant.group_size > 0 ? std::to_string(c.quant.group_size) : std::string("row")) +
           " where quantized, the rest " + (c.fp8 ? "fp8" : "bf16");
  return c.fp8 ? "fp8" : "bf16";
}

void run_bench(const BenchArgs& a) {
  MS_CHECK(a.model.empty() != a.preset.empty(), "give exactly one of --model and --preset");
  MS_CHECK(a.prompt_len >= 1 && a.decode_tokens >= 2, "--prompt-len >= 1 and --decode-tokens >= 2");
  std::string dir = a.model;
  ParallelModel pm(a.par);
  comm::Communicator& comm = pm.comm();
  const int n_ranks = comm.size();
  pm.check_all([&] {
    if (a.preset.empty() || !pm.is_root()) return;
    dir = (fs::path(a.cache_dir) / (a.preset + "-" + a.dtype)).string();
    if (!fs::exists(fs::path(dir) / "model.safetensors")) {
      std::fprintf(stderr, "creating %s (random weights) ...\n", dir.c_str());
      model::InitOptions opt;
      opt.fp8 = a.dtype == "fp8";
      opt.progress = true;
      model::write_random_model(model::preset_config(a.preset), dir, opt);
    }
  });
  if (!a.preset.empty()) dir = (fs::path(a.cache_dir) / (a.preset + "-" + a.dtype)).string();

  pm.load(dir);
  model::Model& m = pm.model();
  if (a.speculative_tokens > 0) m.load_mtp();
  m.prefault(/*progress=*/pm.is_root(), /*copy=*/!a.par.mmap);
  const model::ModelConfig& c = m.config();
  const size_t weight_bytes = m.store().total_bytes();
  const size_t active_bytes = model::active_weight_bytes(m.weights(), c);
  const size_t active_elems = model::active_matrix_elems(m.weights(), c);

  std::mt19937 rng(1);
  std::vector<int32_t> prompt(a.prompt_len);
  for (auto& t : prompt) t = static_cast<int32_t>(rng() % c.vocab_size);
  const kv::KvDtype kv_dtype = parse_kv_cache_dtype(a.kv_cache_dtype);
  engine::Generator gen(m, 16, kv_dtype);
  engine::GenerateOptions opt;
  opt.max_tokens = a.decode_tokens;
  opt.prefill_chunk = a.prompt_len;
  // Warm-up (page cache, allocations), then the measured run.
  {
    engine::GenerateOptions w = opt;
    w.max_tokens = 2;
    gen.generate(
        std::vector<int32_t>(prompt.begin(), prompt.begin() + std::min<int64_t>(8, a.prompt_len)),
        w);
    gen.drain();
  }
  // Every rank runs its own sequence (attention is data-parallel); the slowest sets the pace.
  engine::GenerateStats st;
  gen.generate(prompt, opt, {}, &st);
  gen.drain();
  // The same decode after a short prompt (kShortPrompt tokens): what a token costs when
  // attention has few cached rows to read, next to the figure at --prompt-len.
  constexpr int64_t kShortPrompt = 8;
  const bool short_run = a.prompt_len > kShortPrompt;
  engine::GenerateStats short_st;
  if (short_run) {
    gen.generate(std::vector<int32_t>(prompt.begin(), prompt.begin() + kShortPrompt), opt, {},
                 &short_st);
    gen.drain();
  }
  // Speculative decoding: the same decode with the MTP module's drafts, and the steps' costs.
  engine::GenerateStats spec_st;
  SpecCosts costs;
  if (a.speculative_tokens > 0) {
    engine::GenerateOptions so = opt;
    so.speculative_tokens = a.speculative_tokens;
    gen.generate(prompt, so, {}, &spec_st);
    gen.drain();
    costs = measure_spec_costs(m, prompt, a.speculative_tokens, kv_dtype);
    // Under mpirun, the slowest rank's times, and the drafts of every rank's sequence.
    double t[4] = {spec_st.decode_seconds, costs.step, costs.verify, costs.draft};
    comm.all_reduce(t, 4, comm::ReduceOp::Max);
    spec_st.decode_seconds = t[0];
    costs = {t[1], t[2], t[3]};
    int64_t n[2] = {spec_st.draft_tokens, spec_st.accepted_tokens};
    comm.all_reduce(n, 2, comm::ReduceOp::Sum);
    spec_st.draft_tokens = n[0];
    spec_st.accepted_tokens = n[1];
  }
  double times[5] = {st.prefill_seconds, st.decode_seconds, st.prefill_exchange_seconds,
                     st.decode_exchange_seconds, short_st.decode_seconds};
  comm.all_reduce(times, 5, comm::ReduceOp::Max);
  st.prefill_seconds = times[0];
  st.decode_seconds = times[1];
  // Under mpirun, the largest rank's: the ranks map one checkpoint, whose pages they share
  // (a sum over ranks would count them once per rank).
  double rss_all = peak_rss_kb() * 1024.0, held = static_cast<double>(m.weight_bytes_held());
  comm.all_reduce(&rss_all, 1, comm::ReduceOp::Max);
  comm.all_reduce(&held, 1, comm::ReduceOp::Max);  // under EP a rank holds its experts only
  pm.write_expert_load();
  // The machine's bounds, measured after the run (so its buffers do not count in the peak
  // RSS) by rank 0 with every core while the others wait asleep: a rank waiting in an MPI
  // barrier spins, and took a core from the measurement.
  const kernels::Precision precision = m.precision();
  const char* unit = kernels::matmul_unit(precision);
  double bw = 0, peak = 0, fma_peak = 0;
  {
    std::unique_ptr<comm::Mailbox> mb = n_ranks > 1 ? comm.mailbox() : nullptr;
    constexpr int kMeasured = 1;
    if (pm.is_root()) {
      // mpirun binds each rank to its own core(s); the measurement's threads may use them all
      // (they inherit this thread's mask, restored after).
      cpu_set_t bound, every;
      const bool have_mask = sched_getaffinity(0, sizeof bound, &bound) == 0;
      CPU_ZERO(&every);
      for (int c = 0; c < std::min<int>(CPU_SETSIZE, get_nprocs_conf()); ++c) CPU_SET(c, &every);
      if (have_mask) sched_setaffinity(0, sizeof every, &every);
      ThreadPool all(0);
      std::fprintf(stderr, "measuring the machine (%d threads, %s) ...\n", all.size(), unit);
      bw = kernels::measure_read_bandwidth_gbs(all);
      fma_peak = kernels::measure_peak_gflops(all);
      peak = kernels::measure_peak_gflops(all, precision);
      if (have_mask) sched_setaffinity(0, sizeof bound, &bound);
      for (int r = 1; r < n_ranks; ++r) mb->post(r, kMeasured, {});
    } else {
      while (!mb->poll(kMeasured)) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    if (mb) mb->flush();
    comm.barrier();
  }
  if (!pm.is_root()) return;
  const double prefill_tps = n_ranks * a.prompt_len / st.prefill_seconds;
  const double prefill_gflops =
      n_ranks * forward_flops(c, active_elems, 0, a.prompt_len) / st.prefill_seconds / 1e9;
  const double decode_tps = n_ranks * (st.output_tokens - 1) / st.decode_seconds;
  // Bytes a decode step reads: the weights its token uses, and every cached latent row of its
  // sequence in every layer (the step that makes output token k, k >= 1, attends over
  // prompt + k rows; the timed steps average prompt + n/2). Counted once each.
  const double row_bytes =
      static_cast<double>(c.num_hidden_layers) * kv::kv_row_bytes(kv_dtype, c.kv_cache_dim());
  auto kv_read = [&](int64_t prompt_tokens, int64_t out) {
    return row_bytes * (prompt_tokens + out / 2.0);
  };
  const double kv_read_bytes = kv_read(a.prompt_len, st.output_tokens);
  const double decode_gbs = (active_bytes + kv_read_bytes) * decode_tps / 1e9;
  const double short_tps =
      short_run ? n_ranks * (short_st.output_tokens - 1) / times[4] : decode_tps;
  const double short_kv_read = short_run ? kv_read(kShortPrompt, short_st.output_tokens) : 0;
  const double short_gbs = (active_bytes + short_kv_read) * short_tps / 1e9;
  const int64_t kv_tokens = a.prompt_len + a.decode_tokens;
  const double kv_bytes = static_cast<double>(kv_tokens) * row_bytes;
  const double rss = rss_all;

  std::printf("model          %s (%s, %.2f GB of weights, %.1f MB read per decoded token)\n",
              dir.c_str(), weights_label(c).c_str(), weight_bytes / 1e9, active_bytes / 1e6);
  std::printf("machine        %s; read bandwidth %.1f GB/s; peak FMA %.1f GFLOP/s (all cores)\n",
              isa_name(kernels::active_isa()), bw, fma_peak);
  std::printf("products       --precision %s on %s; its peak %.1f GFLOP/s (all cores)\n",
              kernels::precision_name(precision), unit, peak);
  std::printf("parallel       %d rank(s) x %d thread(s); expert parallel %s\n", n_ranks,
              pm.pool().size(), n_ranks > 1 ? "on" : "off");
  std::printf("prefill        %lld tokens: %.1f tokens/s, %.1f GFLOP/s = %.1f%% of its peak\n",
              static_cast<long long>(a.prompt_len), prefill_tps, prefill_gflops,
              100.0 * prefill_gflops / peak);
  std::printf(
      "decode (bs=1)  %.2f tokens/s, %.2f GB/s of weights and cache (%.1f + %.1f MB a token) = "
      "%.1f%% of read bandwidth\n",
      decode_tps, decode_gbs, active_bytes / 1e6, kv_read_bytes / 1e6, 100.0 * decode_gbs / bw);
  if (short_run)
    std::printf(
        "               after %lld prompt tokens instead of %lld: %.2f tokens/s, %.1f%% of read "
        "bandwidth (attention over fewer cached rows)\n",
        static_cast<long long>(kShortPrompt), static_cast<long long>(a.prompt_len), short_tps,
        100.0 * short_gbs / bw);
  double spec_tps = 0, acceptance = 0;
  if (a.speculative_tokens > 0) {
    spec_tps = n_ranks * (spec_st.output_tokens - 1) / spec_st.decode_seconds;
    acceptance = spec_st.draft_tokens > 0
                     ? static_cast<double>(spec_st.accepted_tokens) / spec_st.draft_tokens
                     : 0.0;
    std::printf(
        "speculative    k=%lld: %.2f tokens/s = %.2fx plain decode; %lld of %lld drafts "
        "accepted (%.1f%%)%s\n",
        static_cast<long long>(a.speculative_tokens), spec_tps, spec_tps / decode_tps,
        static_cast<long long>(spec_st.accepted_tokens),
        static_cast<long long>(spec_st.draft_tokens), 100.0 * acceptance,
        has_random_weights(dir) ? " (random weights: acceptance means nothing)" : "");
    std::printf(
        "               at %lld tokens of context: a 1-token step %.2f ms, verifying %lld drafts "
        "(%lld tokens) %.2f ms = %.2fx, one MTP draft %.2f ms\n",
        static_cast<long long>(a.prompt_len), costs.step * 1e3,
        static_cast<long long>(a.speculative_tokens),
        static_cast<long long>(a.speculative_tokens + 1), costs.verify * 1e3,
        costs.verify / costs.step, costs.draft * 1e3);
  }
  std::printf(
      "KV cache       %s rows, %lld bytes per token, %lld tokens cached at the end\n",
      kv::kv_dtype_name(kv_dtype),
      static_cast<long long>(c.num_hidden_layers * kv::kv_row_bytes(kv_dtype, c.kv_cache_dim())),
      static_cast<long long>(kv_tokens));
  if (n_ranks > 1) {
    std::printf("communication  %.1f%% of prefill time, %.1f%% of decode time in MoE all-to-alls\n",
                100.0 * times[2] / st.prefill_seconds, 100.0 * times[3] / st.decode_seconds);
    std::printf(
        "               (bytes per token count each token's weights in full; ranks whose tokens "
        "route to the same experts read them once, so this can pass 100%%)\n");
  }
  std::printf(
      "memory         peak RSS %.2f GB%s; weights %.2f GB%s + KV cache %.3f GB -> %.1f%% over\n",
      rss / 1e9, n_ranks > 1 ? " (largest rank)" : "", held / 1e9, n_ranks > 1 ? " held by it" : "",
      kv_bytes / 1e9, 100.0 * (rss / (held + kv_bytes) - 1.0));
  if (a.json) {
    nlohmann::json j = {{"model", dir},
                        {"bandwidth_gbs", bw},
                        {"peak_gflops", peak},
                        {"fma_peak_gflops", fma_peak},
                        {"precision", kernels::precision_name(precision)},
                        {"unit", unit},
                        {"prefill_tokens_per_s", prefill_tps},
                        {"prefill_gflops", prefill_gflops},
                        {"prefill_peak_ratio", prefill_gflops / peak},
                        {"decode_tokens_per_s", decode_tps},
                        {"decode_bandwidth_ratio", decode_gbs / bw},
                        {"decode_kv_read_bytes", kv_read_bytes},
                        {"short_prompt_decode_tokens_per_s", short_tps},
                        {"short_prompt_decode_bandwidth_ratio", short_gbs / bw},
                        {"ranks", n_ranks},
                        {"prefill_comm_share", times[2] / st.prefill_seconds},
                        {"decode_comm_share", times[3] / st.decode_seconds},
                        {"peak_rss_bytes", rss},
                        {"weight_bytes", weight_bytes},
                        {"weight_bytes_held", held},
                        {"kv_bytes", kv_bytes},
                        {"kv_cache_dtype", kv::kv_dtype_name(kv_dtype)}};
    if (a.speculative_tokens > 0) {
      j["speculative_tokens"] = a.speculative_tokens;
      j["spec_decode_tokens_per_s"] = spec_tps;
      j["spec_draft_tokens"] = spec_st.draft_tokens;
      j["spec_accepted_tokens"] = spec_st.accepted_tokens;
      j["spec_acceptance_rate"] = acceptance;
      j["step_seconds"] = costs.step;
      j["verify_seconds"] = costs.verify;
      j["mtp_draft_seconds"] = costs.draft;
    }
    std::printf("%s\n", j.dump().c_str());
  }
}

}  // namespace

void register_bench_command(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  std::string presets;
  for (const auto& n : model::preset_names()) presets += (presets.empty() ? "" : ", ") + n;
  CLI::App* b =
      app.add_subcommand("bench", "Prefill and decode speed against the machine's bounds");
  b->add_option("--model", a->model)->check(CLI::ExistingDirectory);
  b->add_option(
      "--preset", a->preset,
      "Built-in random-weight configuration to create (once, in --cache-dir) and run: " + presets);
  b->add_option("--dtype", a->dtype,
                "Weight dtype of the --preset model: bf16, or fp8 (e4m3, "
                "128x128 block scales)")
      ->capture_default_str()
      ->check(CLI::IsMember({"bf16", "fp8"}));
  b->add_option("--cache-dir", a->cache_dir, "Where preset models are written")
      ->capture_default_str();
  b->add_option("--prompt-len", a->prompt_len, "Prompt tokens to prefill")->capture_default_str();
  b->add_option("--decode-tokens", a->decode_tokens, "Tokens to decode")->capture_default_str();
  add_kv_cache_dtype_option(b, &a->kv_cache_dtype);
  add_speculative_tokens_option(b, &a->speculative_tokens);
  add_parallel_flags(b, a->par);
  b->add_flag("--json", a->json, "Also print the figures as one JSON line");
  b->callback([a] { run_bench(*a); });
}

}  // namespace moeserve::cli
