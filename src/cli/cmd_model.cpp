// generate, score and init-model: the commands that run a model on token ids.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "cli/commands.h"
#include "cli/common.h"
#include "cli/parallel.h"
#include "core/error.h"
#include "engine/generator.h"
#include "model/init_model.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/stream_decoder.h"
#include "tokenizer/tokenizer.h"

namespace moeserve::cli {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct GenerateArgs {
  std::string model, prompt_ids, prompt, chat_template;
  bool chat = false;
  int64_t max_tokens = 16;
  float temperature = 0.0f, top_p = 1.0f;
  int64_t top_k = 0;
  uint64_t seed = 0;
  bool json = false, ignore_eos = false;
  std::string kv_cache_dtype;  // add_kv_cache_dtype_option
  int64_t speculative_tokens = 0;
  ParallelArgs par;
  const CLI::Option* seed_opt = nullptr;  // given on the command line, or a random seed is used
};

void warn_if_random(const std::string& dir) {
  if (has_random_weights(dir))
    std::fprintf(stderr,
                 "note: %s holds RANDOM weights (made by `moeserve init-model`); its output is "
                 "meaningless text, for demos and tests only.\n",
                 dir.c_str());
}

void run_generate(const GenerateArgs& a) {
  MS_CHECK(a.temperature >= 0.0f, "--temperature must be >= 0");
  MS_CHECK(a.top_p > 0.0f && a.top_p <= 1.0f, "--top-p must be in (0, 1]");
  MS_CHECK(a.top_k >= 0, "--top-k must be >= 0");
  MS_CHECK(a.max_tokens >= 1, "--max-tokens must be >= 1");
  MS_CHECK(a.prompt_ids.empty() != a.prompt.empty(),
           "give exactly one of --prompt-ids and --prompt");
  MS_CHECK(!a.chat || !a.prompt.empty(), "--chat needs --prompt (the user message)");
  const bool text = !a.prompt.empty();
  std::optional<tokenizer::Tokenizer> tok;
  std::vector<int32_t> prompt;
  if (text) {
    tok = tokenizer::Tokenizer::load(a.model);
    if (a.chat) {
      const auto tmpl = tokenizer::ChatTemplate::from_model_dir(a.model, a.chat_template);
      nlohmann::ordered_json messages = nlohmann::ordered_json::array();
      messages.push_back({{"role", "user"}, {"content", a.prompt}});
      prompt = tok->encode(tmpl.render(messages, true), /*add_special=*/false);
    } else {
      prompt = tok->encode(a.prompt, /*add_special=*/true);
    }
  } else {
    prompt = parse_ids(a.prompt_ids, "--prompt-ids");
  }
  ParallelModel pm(a.model, a.par);
  model::Model& m = pm.model();
  const kv::KvDtype kv_dtype = parse_kv_cache_dtype(a.kv_cache_dtype);
  if (a.speculative_tokens > 0) m.load_mtp();
  engine::Generator gen(m, 16, kv_dtype);
  if (!pm.is_root()) {  // the other ranks hold experts and follow rank 0's steps
    gen.drain();
    pm.write_expert_load();
    return;
  }
  warn_if_random(a.model);
  // Without --seed every run samples differently; the seed is printed so a run can be repeated.
  const uint64_t seed = a.seed_opt->count() > 0 ? a.seed : random_seed();
  const bool sampled = a.temperature > 0.0f;
  engine::GenerateOptions opt;
  opt.max_tokens = a.max_tokens;
  opt.sampling.temperature = a.temperature;
  opt.sampling.top_p = a.top_p;
  opt.sampling.top_k = a.top_k;
  opt.sampling.seed = seed;
  opt.speculative_tokens = a.speculative_tokens;
  if (!a.ignore_eos) {
    // The end of sequence of config.json, the tokenizer and generation_config.json.
    if (m.config().eos_token_id >= 0)
      opt.stop_ids.push_back(static_cast<int32_t>(m.config().eos_token_id));
    if (text && tok->eos_id() >= 0) opt.stop_ids.push_back(tok->eos_id());
    for (const int32_t id : generation_config_eos_ids(a.model, m.config().vocab_size))
      opt.stop_ids.push_back(id);
  }
  engine::GenerateStats st;
  std::optional<tokenizer::StreamDecoder> dec;
  if (text) dec.emplace(*tok, /*skip_special=*/true);
  std::vector<int32_t> out = gen.generate(
      prompt, opt,
      [&](int32_t id) {
        if (a.json) return;
        if (dec)
          std::fputs(dec->put(id).c_str(), stdout);
        else
          std::printf("%d ", id);
        std::fflush(stdout);
      },
      &st);
  gen.drain();
  pm.write_expert_load();
  if (dec && !a.json) std::fputs(dec->finish().c_str(), stdout);
  if (a.json) {
    json j{{"prompt_ids", prompt}, {"output_ids", out}};
    if (sampled) j["seed"] = seed;  // greedy output does not depend on it
    if (a.speculative_tokens > 0) {
      j["draft_tokens"] = st.draft_tokens;
      j["accepted_tokens"] = st.accepted_tokens;
    }
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("\n");
    std::fprintf(stderr,
                 "prompt %lld tokens in %.3f s, %lld tokens generated in %.3f s (%.2f tokens/s)",
                 static_cast<long long>(st.prompt_tokens), st.prefill_seconds,
                 static_cast<long long>(st.output_tokens), st.decode_seconds,
                 st.output_tokens > 1 ? (st.output_tokens - 1) / st.decode_seconds : 0.0);
    if (st.draft_tokens > 0)
      std::fprintf(stderr, "; %lld of %lld draft tokens accepted (%.1f%%)",
                   static_cast<long long>(st.accepted_tokens),
                   static_cast<long long>(st.draft_tokens),
                   100.0 * st.accepted_tokens / st.draft_tokens);
    if (sampled)
      std::fprintf(stderr, "; sampled with --seed %llu", static_cast<unsigned long long>(seed));
    std::fprintf(stderr, "\n");
  }
}

void run_score(const std::string& dir, const std::string& ids_s, const std::string& kv_cache_dtype,
               const ParallelArgs& par) {
  const std::vector<int32_t> ids = parse_ids(ids_s, "--ids");
  const kv::KvDtype kv_dtype = parse_kv_cache_dtype(kv_cache_dtype);
  ParallelModel pm(dir, par);
  engine::Generator gen(pm.model(), 16, kv_dtype);
  if (!pm.is_root()) {
    gen.drain();
    pm.write_expert_load();
    return;
  }
  const std::vector<double> lp = gen.score(ids);
  gen.drain();
  pm.write_expert_load();
  json j = {{"ids", ids}, {"logprobs", json::array()}};
  for (size_t i = 0; i < lp.size(); ++i)
    j["logprobs"].push_back(i == 0 ? json(nullptr) : json(lp[i]));
  std::printf("%s\n", j.dump().c_str());
}

struct InitArgs {
  std::string config, preset, out, dtype = "bf16", tokenizer;
  uint64_t seed = 0;
  bool force = false;
};

void run_init(const InitArgs& a) {
  MS_CHECK(a.config.empty() != a.preset.empty(), "give exactly one of --config and --preset");
  MS_CHECK(a.dtype == "bf16" || a.dtype == "fp8", "--dtype must be bf16 or fp8, got ", a.dtype);
  model::ModelConfig cfg;
  if (!a.preset.empty()) {
    cfg = model::preset_config(a.preset);
  } else {
    std::ifstream in(a.config);
    MS_CHECK(in.good(), "cannot open --config ", a.config);
    json j = json::parse(in, nullptr, false);
    MS_CHECK(!j.is_discarded(), a.config, " is not valid JSON");
    cfg = model::ModelConfig::from_json(j);
  }
  if (fs::exists(fs::path(a.out) / "model.safetensors") && !a.force)
    fail(a.out, " already holds a model (use --force to overwrite)");
  model::InitOptions opt;
  opt.seed = a.seed;
  opt.fp8 = a.dtype == "fp8";
  opt.progress = true;
  model::write_random_model(cfg, a.out, opt);
  // Mark the folder so every command can say plainly that the weights are random.
  {
    const fs::path p = fs::path(a.out) / "config.json";
    std::ifstream in(p);
    json j = json::parse(in);
    j["moeserve_random_weights"] = true;
    j["moeserve_seed"] = a.seed;
    std::ofstream(p) << j.dump(2) << "\n";
  }
  std::string tok = a.tokenizer;
  if (tok.empty() && cfg.vocab_size == 129280) tok = bundled_tokenizer_dir();
  if (!tok.empty()) {
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
      const fs::path src = fs::path(tok) / f;
      MS_CHECK(fs::exists(src), "--tokenizer ", tok, " has no ", f);
      fs::copy_file(src, fs::path(a.out) / f, fs::copy_options::overwrite_existing);
    }
  }
  std::fprintf(stderr, "wrote a random-weight %s checkpoint (%s) to %s%s\n",
               a.preset.empty() ? a.config.c_str() : a.preset.c_str(), a.dtype.c_str(),
               a.out.c_str(), tok.empty() ? "" : " with the DeepSeek-V3 tokenizer");
}

}  // namespace

void register_model_commands(CLI::App& app) {
  auto g = std::make_shared<GenerateArgs>();
  CLI::App* gen = app.add_subcommand("generate", "Generate tokens after a prompt");
  gen->add_option("--model", g->model)->required()->check(CLI::ExistingDirectory);
  gen->add_option("--prompt-ids", g->prompt_ids, "Prompt as token ids: 1,2,3");
  gen->add_option("--prompt", g->prompt, "Prompt as text (needs the model's tokenizer)");
  gen->add_flag("--chat", g->chat, "Send --prompt as a user message through the chat template");
  gen->add_option("--chat-template", g->chat_template,
                  "Jinja chat template file (default: the model's, from tokenizer_config.json)");
  gen->add_option("--max-tokens", g->max_tokens, "Tokens to generate")->capture_default_str();
  gen->add_option("--temperature", g->temperature, "Sampling temperature (0 = greedy)")
      ->capture_default_str();
  gen->add_option("--top-p", g->top_p,
                  "Nucleus sampling: the smallest set of tokens with this mass")
      ->capture_default_str();
  gen->add_option("--top-k", g->top_k, "Sample among the k most likely tokens (0 = all)")
      ->capture_default_str();
  g->seed_opt = gen->add_option("--seed", g->seed,
                                "Sampling seed (default: a random one, printed on stderr or in "
                                "--json so that the run can be repeated)");
  gen->add_flag("--json", g->json,
                "Print {\"prompt_ids\": [...], \"output_ids\": [...]} (and \"seed\" when "
                "sampling, \"draft_tokens\" and \"accepted_tokens\" with --speculative-tokens) "
                "instead of the text");
  gen->add_flag("--ignore-eos", g->ignore_eos,
                "Do not stop at the end-of-sequence tokens (config.json, tokenizer, "
                "generation_config.json)");
  add_kv_cache_dtype_option(gen, &g->kv_cache_dtype);
  add_speculative_tokens_option(gen, &g->speculative_tokens);
  add_parallel_flags(gen, g->par);
  gen->callback([g] { run_generate(*g); });

  auto s = std::make_shared<std::pair<std::string, std::string>>();
  auto par = std::make_shared<ParallelArgs>();
  auto score_kv = std::make_shared<std::string>(kv::kv_dtype_name(kv::kDefaultKvDtype));
  CLI::App* sc =
      app.add_subcommand("score", "Print log P(ids[i] | ids[<i]) for every token as JSON");
  sc->add_option("--model", s->first)->required()->check(CLI::ExistingDirectory);
  sc->add_option("--ids", s->second, "Token ids: 1,2,3")->required();
  add_kv_cache_dtype_option(sc, score_kv.get());
  add_parallel_flags(sc, *par);
  sc->callback([s, par, score_kv] { run_score(s->first, s->second, *score_kv, *par); });

  auto i = std::make_shared<InitArgs>();
  std::string presets;
  for (const auto& n : model::preset_names()) presets += (presets.empty() ? "" : ", ") + n;
  CLI::App* init =
      app.add_subcommand("init-model", "Write a deterministic random-weight checkpoint");
  init->add_option("--config", i->config, "config.json to build the model from");
  init->add_option("--preset", i->preset, "Built-in configuration: " + presets);
  init->add_option("--out", i->out, "Model folder to write")->required()->type_name("DIR");
  init->add_option("--seed", i->seed, "Seed of the random weights")->capture_default_str();
  init->add_option("--dtype", i->dtype, "Weight dtype: bf16, or fp8 (e4m3, 128x128 block scales)")
      ->capture_default_str()
      ->check(CLI::IsMember({"bf16", "fp8"}));
  init->add_option("--tokenizer", i->tokenizer,
                   "Copy tokenizer files from this folder (default: the bundled DeepSeek-V3 "
                   "tokenizer when the vocabulary is its size)");
  init->add_flag("--force", i->force, "Overwrite an existing model");
  init->callback([i] { run_init(*i); });
}

}  // namespace moeserve::cli
