// The moeserve binary as a user runs it: output formats, help, and clear errors (one line,
// exit status 1, never a crash) for bad checkpoints and bad flags.
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "model/init_model.h"

using moeserve::testing::TempDir;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

struct CmdResult {
  int status = -1;  // exit status, or 128 + signal
  std::string out, err;
};

CmdResult run(const std::string& args) {
  TempDir d;
  const std::string cmd =
      std::string(MOESERVE_BINARY) + " " + args + " >" + (d / "out") + " 2>" + (d / "err");
  const int rc = std::system(cmd.c_str());
  CmdResult r;
  r.status = WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
  std::ifstream o(d / "out"), e(d / "err");
  r.out.assign(std::istreambuf_iterator<char>(o), {});
  r.err.assign(std::istreambuf_iterator<char>(e), {});
  return r;
}

std::string tiny_model(const TempDir& d, const std::string& name = "m") {
  const std::string dir = d / name;
  const CmdResult r = run("init-model --preset tiny --out " + dir + " --seed 3");
  EXPECT_EQ(r.status, 0) << r.err;
  return dir;
}

void edit_config(const std::string& dir, const std::function<void(json&)>& f) {
  json j;
  std::ifstream(dir + "/config.json") >> j;
  f(j);
  std::ofstream(dir + "/config.json") << j.dump();
}

void expect_clean_failure(const CmdResult& r, std::initializer_list<std::string> fragments) {
  EXPECT_EQ(r.status, 1) << "stderr: " << r.err;
  for (const auto& f : fragments)
    EXPECT_NE(r.err.find(f), std::string::npos) << "stderr lacks \"" << f << "\": " << r.err;
}

}  // namespace

TEST(Cli, HelpOnEverySubcommand) {
  for (const char* sub : {"", "generate", "score", "init-model", "bench"}) {
    const CmdResult r = run(std::string(sub) + " --help");
    EXPECT_EQ(r.status, 0) << sub;
    EXPECT_NE(r.out.find("Usage"), std::string::npos) << sub;
  }
}

TEST(Cli, GenerateJsonAndScoreFormats) {
  TempDir d;
  const std::string m = tiny_model(d);
  CmdResult r = run("generate --model " + m + " --prompt-ids 1,2,3 --max-tokens 5 --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const json g = json::parse(r.out);
  EXPECT_EQ(g["prompt_ids"], json({1, 2, 3}));
  EXPECT_EQ(g["output_ids"].size(), 5u);
  EXPECT_NE(r.err.find("RANDOM weights"), std::string::npos);
  r = run("score --model " + m + " --ids 5,6,7,8");
  ASSERT_EQ(r.status, 0) << r.err;
  const json s = json::parse(r.out);
  EXPECT_EQ(s["ids"], json({5, 6, 7, 8}));
  ASSERT_EQ(s["logprobs"].size(), 4u);
  EXPECT_TRUE(s["logprobs"][0].is_null());
  for (int i = 1; i < 4; ++i) EXPECT_LT(s["logprobs"][i].get<double>(), 0.0);
  // Sampling with a seed is reproducible.
  const std::string samp =
      "generate --model " + m +
      " --prompt-ids 4 --max-tokens 8 --temperature 1 --top-p 0.9 --top-k 50 --seed 9 --json";
  EXPECT_EQ(run(samp).out, run(samp).out);
}

TEST(Cli, MissingTensorIsNamed) {
  TempDir d;
  const std::string m = tiny_model(d);
  edit_config(m, [](json& j) { j["num_hidden_layers"] = 4; });
  expect_clean_failure(run("score --model " + m + " --ids 1,2"), {"model.layers.3.", "missing"});
}

TEST(Cli, WrongShapeShowsExpectedAndActual) {
  TempDir d;
  const std::string m = tiny_model(d);
  edit_config(m, [](json& j) { j["vocab_size"] = 600; });
  expect_clean_failure(run("score --model " + m + " --ids 1,2"),
                       {"model.embed_tokens.weight", "[512, 64]", "expected [600, 64]"});
}

TEST(Cli, UnsupportedConfigValue) {
  TempDir d;
  const std::string m = tiny_model(d);
  edit_config(m, [](json& j) { j["scoring_func"] = "sparsemax"; });
  expect_clean_failure(run("score --model " + m + " --ids 1,2"), {"scoring_func", "sparsemax"});
}

TEST(Cli, TruncatedAndCorruptFiles) {
  TempDir d;
  const std::string m = tiny_model(d);
  const std::string f = m + "/model.safetensors";
  fs::resize_file(f, fs::file_size(f) - 1000);
  expect_clean_failure(run("score --model " + m + " --ids 1,2"), {"truncated"});
  const std::string m2 = tiny_model(d, "m2");
  {
    std::fstream s(m2 + "/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    const uint64_t huge = 1ull << 40;
    s.write(reinterpret_cast<const char*>(&huge), 8);
  }
  expect_clean_failure(run("score --model " + m2 + " --ids 1,2"), {"header claims"});
  const std::string m3 = tiny_model(d, "m3");
  {
    std::fstream s(m3 + "/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    s.seekp(8);
    s.write("[[[[", 4);
  }
  expect_clean_failure(run("score --model " + m3 + " --ids 1,2"), {"not valid JSON"});
}

TEST(Cli, BadFlags) {
  TempDir d;
  const std::string m = tiny_model(d);
  expect_clean_failure(run("generate --model " + m + " --prompt-ids 1,x"),
                       {"\"x\" is not a token id"});
  expect_clean_failure(run("generate --model " + m + " --prompt-ids 1,99999"),
                       {"99999", "out of range"});
  expect_clean_failure(run("generate --model " + m + " --prompt-ids 1 --top-p 0"), {"--top-p"});
  expect_clean_failure(run("init-model --preset nope --out " + (d / "x")),
                       {"unknown preset", "nope"});
  expect_clean_failure(run("init-model --preset tiny --out " + m), {"already holds a model"});
  const CmdResult r = run("generate --model " + (d / "absent") + " --prompt-ids 1");
  EXPECT_NE(r.status, 0);
  EXPECT_LT(r.status, 128);  // an error exit, not a signal
  const CmdResult no_cfg = run("score --model " + d.path() + " --ids 1");
  expect_clean_failure(no_cfg, {"model folder", "has no"});
}

TEST(Cli, Fp8InitModelRuns) {
  TempDir d;
  const CmdResult init = run("init-model --preset tiny --dtype fp8 --out " + (d / "f8"));
  ASSERT_EQ(init.status, 0) << init.err;
  json cfg;
  std::ifstream(d / "f8/config.json") >> cfg;
  EXPECT_EQ(cfg["quantization_config"]["quant_method"], "fp8");
  const CmdResult r =
      run("generate --model " + (d / "f8") + " --prompt-ids 1,2 --max-tokens 3 --json");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["output_ids"].size(), 3u);
}
