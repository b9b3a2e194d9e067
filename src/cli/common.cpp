#include "cli/common.h"

#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"

namespace moeserve::cli {

void add_kv_cache_dtype_option(CLI::App* c, std::string* v) {
  *v = kv::kv_dtype_name(kv::kDefaultKvDtype);
  c->add_option("--kv-cache-dtype", *v,
                "How the latent KV cache stores its rows: bf16, fp8 (e4m3, one scale per 128 "
                "values) or f32")
      ->capture_default_str()
      ->check(CLI::IsMember({"bf16", "fp8", "f32"}));
}

void add_speculative_tokens_option(CLI::App* c, int64_t* v) {
  c->add_option("--speculative-tokens", *v,
                "Speculative decoding: tokens the model's multi-token-prediction (MTP) module "
                "drafts per step, verified in one forward of the main model (0: off; the "
                "output is the same either way)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{16}));
}

kv::KvDtype parse_kv_cache_dtype(const std::string& v) {
  kv::KvDtype d = kv::kDefaultKvDtype;
  MS_CHECK(kv::parse_kv_dtype(v, &d), "--kv-cache-dtype must be bf16, fp8 or f32, not '", v, "'");
  return d;
}

void add_precision_option(CLI::App* c, std::string* v) {
  *v = kernels::precision_name(kDefaultPrecision);
  c->add_option("--precision", *v,
                "How the weight products compute: exact (f32 activations, the f32 contract) or "
                "bf16 (activations rounded to bf16 entering them; runs on AVX512-BF16 where the "
                "CPU has it)")
      ->capture_default_str()
      ->check(CLI::IsMember({"exact", "bf16"}));
}

kernels::Precision parse_precision(const std::string& v) {
  if (v.empty() || v == "exact") return v.empty() ? kDefaultPrecision : kernels::Precision::Exact;
  MS_CHECK(v == "bf16", "--precision must be exact or bf16, not '", v, "'");
  return kernels::Precision::Bf16;
}

namespace fs = std::filesystem;

std::vector<int32_t> parse_ids(const std::string& s, const char* flag) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string item = s.substr(i, j - i);
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty() && j == s.size() && ids.empty() && i == 0) break;
    MS_CHECK(!item.empty(), flag, ": empty item in the id list \"", s, "\"");
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    MS_CHECK(end && *end == '\0' && errno == 0 && v >= 0 && v <= INT32_MAX, flag, ": \"", item,
             "\" is not a token id (a non-negative integer)");
    ids.push_back(static_cast<int32_t>(v));
    i = j + 1;
  }
  MS_CHECK(!ids.empty(), flag, ": no token ids given");
  return ids;
}

bool has_random_weights(const std::string& dir) {
  std::ifstream in(fs::path(dir) / "config.json");
  const auto j = nlohmann::json::parse(in, nullptr, false);
  return j.is_object() && j.contains("moeserve_random_weights") &&
         j["moeserve_random_weights"] == true;
}

std::string bundled_tokenizer_dir() {
  std::vector<fs::path> candidates;
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n > 0) {
    const fs::path exe = fs::path(std::string(buf, n)).parent_path();
    candidates.push_back(exe / "../assets/deepseek-v3");
    candidates.push_back(exe / "../share/moeserve/deepseek-v3");
  }
#ifdef MOESERVE_SOURCE_DIR
  candidates.push_back(fs::path(MOESERVE_SOURCE_DIR) / "assets/deepseek-v3");
#endif
  for (const auto& c : candidates)
    if (fs::exists(c / "tokenizer.json")) return fs::canonical(c).string();
  return "";
}

std::vector<int32_t> generation_config_eos_ids(const std::string& dir, int64_t vocab_size) {
  std::vector<int32_t> ids;
  std::ifstream in(fs::path(dir) / "generation_config.json");
  if (!in) return ids;
  const auto j = nlohmann::json::parse(in, nullptr, false);
  if (!j.is_object() || !j.contains("eos_token_id")) return ids;
  const auto& e = j["eos_token_id"];
  const auto add = [&](const nlohmann::json& v) {
    if (!v.is_number_integer()) return;
    const int64_t id = v.get<int64_t>();
    if (id >= 0 && id < vocab_size && std::find(ids.begin(), ids.end(), id) == ids.end())
      ids.push_back(static_cast<int32_t>(id));
  };
  if (e.is_array()) {
    for (const auto& v : e) add(v);
  } else {
    add(e);
  }
  return ids;
}

uint64_t random_seed() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

int launch_rank() {
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"})
    if (const char* v = std::getenv(var)) return std::atoi(v);
  return 0;
}

namespace {

constexpr const char* kModelHelp =
    "Model folder as Hugging Face publishes it (config.json, *.safetensors, tokenizer files)";

// Labels of options that name a file or a folder, the same in every subcommand.
const std::pair<const char*, const char*> kPathLabels[] = {
    {"--chat-template", "FILE"}, {"--placement", "FILE"}, {"--expert-load-out", "FILE"},
    {"--messages", "FILE"},      {"--tools", "FILE"},     {"--file", "FILE"},
    {"--config", "FILE"},        {"--load", "FILE"},      {"--cache-dir", "DIR"},
    {"--tokenizer", "DIR"}};

// Options that mean the same in every subcommand that has them, described the same way.
const std::pair<const char*, const char*> kSharedHelp[] = {
    {"--chat-template",
     "Jinja chat template file (default: the model's, from tokenizer_config.json)"}};

// The model folder as the first positional argument: its value goes to --model, as if given
// there (validators included), so the subcommand reads one variable either way.
void add_model_positional(CLI::App* sub, CLI::Option* model) {
  const bool required = model->get_required();
  model->description(std::string(kModelHelp) + (required
                                                    ? "; required, here or as the first argument"
                                                    : "; may also be given as the first argument"));
  model->option_text("DIR");
  sub->add_option_function<std::string>(
         "MODEL",
         [model](const std::string& dir) {
           if (model->count() > 0)
             throw CLI::ValidationError("MODEL",
                                        "the model folder is given twice (as MODEL and --model)");
           model->add_result(dir);
           model->run_callback();
         },
         "The model folder (the same as --model DIR)")
      ->option_text("DIR");
}

}  // namespace

void finish_subcommands(CLI::App& app) {
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
    if (CLI::Option* model = sub->get_option_no_throw("--model")) add_model_positional(sub, model);
    for (CLI::Option* opt : sub->get_options()) {
      if (opt->get_type_size() == 0 || opt->get_positional()) continue;  // flags, MODEL
      for (const auto& [name, label] : kPathLabels)
        if (opt->check_name(name)) opt->type_name(label);
      for (const auto& [name, help] : kSharedHelp)
        if (opt->check_name(name)) opt->description(help);
      if (opt->get_default_str().empty() &&
          opt->get_description().find("default") == std::string::npos)
        opt->capture_default_str();
    }
  }
}

std::string describe_parse_error(const CLI::ParseError& e, const CLI::App& app) {
  std::string sub;
  for (const CLI::App* s : app.get_subcommands()) sub = s->get_name();
  std::string msg = e.what();
  if (dynamic_cast<const CLI::RequiredError*>(&e) && msg.find("--model") != std::string::npos)
    msg = "the model folder is missing: give it first (moeserve " + sub +
          " DIR ...) or as --model DIR";
  return msg + " (see `moeserve " + (sub.empty() ? "" : sub + " ") + "--help`)";
}

}  // namespace moeserve::cli
