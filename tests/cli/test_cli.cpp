// The moeserve binary as a user runs it: output formats, help, and clear errors (one line,
// exit status 1, never a crash) for bad checkpoints and bad flags; the model folder as the first
// argument; sampling seeds; the text commands against the Hugging Face tokenizer and jinja2
// fixtures; the end-of-sequence ids of generation_config.json.
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../test_util.h"
#include "model/init_model.h"

using moeserve::testing::read_file;
using moeserve::testing::TempDir;
using moeserve::testing::write_file;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

struct CmdResult {
  int status = -1;  // exit status, or 128 + signal
  std::string out, err;
};

// `env` (VAR=value ...) is put before the binary; `args` may end with a redirection of stdin.
CmdResult run_with(const std::string& env, const std::string& args) {
  TempDir d;
  const std::string cmd = env + " " + std::string(MOESERVE_BINARY) + " " + args + " >" +
                          (d / "out") + " 2>" + (d / "err");
  const int rc = std::system(cmd.c_str());
  CmdResult r;
  r.status = WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
  std::ifstream o(d / "out"), e(d / "err");
  r.out.assign(std::istreambuf_iterator<char>(o), {});
  r.err.assign(std::istreambuf_iterator<char>(e), {});
  return r;
}

CmdResult run(const std::string& args) {
  return run_with("", args);
}

json read_fixture(const std::string& name) {
  return json::parse(read_file(std::string(MOESERVE_SOURCE_DIR) + "/tests/fixtures/" + name));
}

const std::string kV3Tokenizer = std::string(MOESERVE_SOURCE_DIR) + "/assets/deepseek-v3";
const std::string kR1Template =
    std::string(MOESERVE_SOURCE_DIR) + "/assets/deepseek-r1/chat_template.jinja";

// About `n` items of `all`, evenly spread, the first and the last included.
std::vector<json> spread(const json& all, size_t n) {
  std::vector<json> out;
  const size_t step = std::max<size_t>(1, all.size() / n);
  for (size_t i = 0; i < all.size(); i += step) out.push_back(all[i]);
  if (!all.empty() && out.back() != all.back()) out.push_back(all.back());
  return out;
}

size_t lines(const std::string& s) {
  return std::count(s.begin(), s.end(), '\n');
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
  for (const char* sub : {"", "generate", "score", "init-model", "bench", "tokenize", "detokenize",
                          "chat-template", "serve", "plan-placement", "perplexity"}) {
    const CmdResult r = run(std::string(sub) + " --help");
    EXPECT_EQ(r.status, 0) << sub;
    EXPECT_NE(r.out.find("Usage"), std::string::npos) << sub;
    EXPECT_EQ(r.err, "") << sub;
    // Every subcommand with --model takes the folder as its first argument too, and says so.
    if (r.out.find("--model") != std::string::npos) {
      EXPECT_NE(r.out.find("[MODEL]"), std::string::npos) << sub << r.out;
      EXPECT_NE(r.out.find("--model DIR "), std::string::npos) << sub << r.out;
      EXPECT_NE(r.out.find("first argument"), std::string::npos) << sub << r.out;
    }
    // The same option reads the same in every subcommand.
    if (r.out.find("--chat-template") != std::string::npos) {
      EXPECT_NE(r.out.find("--chat-template FILE        Jinja chat template file (default: the "
                           "model's, from tokenizer_config.json)"),
                std::string::npos)
          << sub << r.out;
    }
    if (r.out.find("--threads") != std::string::npos) {
      EXPECT_NE(r.out.find("--threads INT=0 "), std::string::npos) << sub << r.out;
    }
  }
  const CmdResult v = run("--version");
  EXPECT_EQ(v.status, 0);
  EXPECT_NE(v.out.find("moeserve"), std::string::npos);
  // MOESERVE_ISA caps the kernels' instruction set (scripts/test-isas.sh relies on it).
  EXPECT_NE(run_with("MOESERVE_ISA=scalar", "--version").out.find("(kernels: scalar)"),
            std::string::npos);
}

// Flag errors (unknown, malformed, missing, out of a set) exit 1 with one line naming the
// problem, not with the parser's own status codes.
TEST(Cli, FlagErrorsExitOneWithOneLine) {
  TempDir d;
  const std::string m = tiny_model(d);
  const std::pair<std::string, std::string> cases[] = {
      {"", "subcommand is required"},
      {"no-such-command", "subcommand"},
      {"generate " + m + " --prompt-ids 1 --bogus", "--bogus"},
      {"generate " + m + " --prompt-ids 1 --max-tokens many", "--max-tokens"},
      {"generate " + m + " --prompt-ids 1 --seed abc", "--seed"},
      {"score " + m, "--ids is required"},
      {"score " + m + " --ids 1 second-positional", "second-positional"},
      {"score --ids 1", "model folder is missing"},
      {"serve --port 1", "model folder is missing"},
      {"generate " + (d / "absent") + " --prompt-ids 1", "absent"},
      {"init-model --preset tiny --dtype f16 --out " + (d / "x"), "--dtype"},
      {"bench --preset tiny --ep-transport pigeon", "--ep-transport"},
      {"bench --preset tiny --ep-overlap maybe", "--ep-overlap"},
      {"bench --preset tiny --ep-dispatch-dtype int4", "--ep-dispatch-dtype"},
      {"plan-placement --load x.json --ranks 2", "--out is required"},
  };
  for (const auto& [args, fragment] : cases) {
    const CmdResult r = run(args);
    EXPECT_EQ(r.status, 1) << args << ": " << r.err;
    EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << args << ": " << r.err;
    EXPECT_EQ(lines(r.err), 1u) << args << ": " << r.err;
    EXPECT_NE(r.err.find(fragment), std::string::npos) << args << ": " << r.err;
    EXPECT_EQ(r.out, "") << args;
  }
}

// Under mpirun every rank parses the same flags; only rank 0 prints the error and the help.
TEST(Cli, FlagErrorPrintedByRankZeroOnly) {
  CmdResult r = run_with("OMPI_COMM_WORLD_RANK=1", "generate --bogus");
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(r.err, "");
  r = run_with("OMPI_COMM_WORLD_RANK=1", "generate --help");
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(r.out, "");
  r = run_with("OMPI_COMM_WORLD_RANK=0", "generate --bogus");
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(lines(r.err), 1u) << r.err;
  // The real launcher: one "error:" line in all, whatever Open MPI adds around it.
  TempDir d;
  const std::string m = tiny_model(d);
  const std::string cmd =
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
      "mpirun --oversubscribe -np 2 " +
      std::string(MOESERVE_BINARY) + " generate " + m + " --prompt-ids 1 --bogus >" + (d / "out") +
      " 2>&1";
  const int rc = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(rc));
  EXPECT_EQ(WEXITSTATUS(rc), 1);
  const std::string out = read_file(d / "out");
  size_t errors = 0;
  for (size_t at = out.find("error: "); at != std::string::npos; at = out.find("error: ", at + 1))
    ++errors;
  EXPECT_EQ(errors, 1u) << out;
  EXPECT_NE(out.find("error: The following argument was not expected: --bogus"), std::string::npos)
      << out;
}

// `moeserve CMD DIR` is `moeserve CMD --model DIR`, for every subcommand that takes a model.
TEST(Cli, ModelFolderAsFirstArgument) {
  TempDir d;
  const std::string m = tiny_model(d);
  const CmdResult by_flag =
      run("generate --model " + m + " --prompt-ids 1,2 --max-tokens 4 --json");
  const CmdResult by_pos = run("generate " + m + " --prompt-ids 1,2 --max-tokens 4 --json");
  ASSERT_EQ(by_flag.status, 0) << by_flag.err;
  ASSERT_EQ(by_pos.status, 0) << by_pos.err;
  EXPECT_EQ(by_pos.out, by_flag.out);
  EXPECT_EQ(json::parse(by_pos.out)["output_ids"].size(), 4u);
  // After the flags as well as before them.
  const CmdResult s1 = run("score " + m + " --ids 1,2,3");
  const CmdResult s2 = run("score --ids 1,2,3 " + m);
  ASSERT_EQ(s1.status, 0) << s1.err;
  EXPECT_EQ(s1.out, s2.out);
  EXPECT_EQ(json::parse(s1.out)["ids"], json({1, 2, 3}));
  // serve reaches its own checks with the folder (this one has no tokenizer files).
  expect_clean_failure(run("serve " + m + " --port 0"), {m, "has no tokenizer.json"});
  const CmdResult tk = run("tokenize " + kV3Tokenizer + " --text Hello --no-special");
  ASSERT_EQ(tk.status, 0) << tk.err;
  EXPECT_EQ(tk.out, run("tokenize --model " + kV3Tokenizer + " --text Hello --no-special").out);
  // Given twice, or a folder that does not exist: one line, status 1.
  expect_clean_failure(run("score " + m + " --model " + m + " --ids 1"), {"given twice"});
  expect_clean_failure(run("score " + (d / "nowhere") + " --ids 1"), {"nowhere"});
}

// Without --seed, sampling differs from run to run; the seed used is reported, and --seed with
// it repeats the run exactly. Greedy output does not depend on a seed and reports none.
TEST(Cli, RandomSeedUnlessGiven) {
  TempDir d;
  const std::string m = tiny_model(d);
  const std::string args =
      "generate " + m + " --prompt-ids 4,5 --max-tokens 12 --temperature 0.8 --ignore-eos";
  std::vector<json> runs;
  for (int i = 0; i < 3; ++i) {
    const CmdResult r = run(args + " --json");
    ASSERT_EQ(r.status, 0) << r.err;
    runs.push_back(json::parse(r.out));
    ASSERT_TRUE(runs.back().contains("seed")) << r.out;
  }
  EXPECT_NE(runs[0]["seed"], runs[1]["seed"]);
  EXPECT_NE(runs[1]["seed"], runs[2]["seed"]);
  // Three runs of 12 tokens sampled at 0.8 from a random model are not all the same.
  EXPECT_FALSE(runs[0]["output_ids"] == runs[1]["output_ids"] &&
               runs[1]["output_ids"] == runs[2]["output_ids"])
      << runs[0].dump();
  for (const json& r : runs) {
    const std::string seed = std::to_string(r["seed"].get<uint64_t>());
    const CmdResult again = run(args + " --json --seed " + seed);
    ASSERT_EQ(again.status, 0) << again.err;
    EXPECT_EQ(json::parse(again.out), r);
  }
  // The text form prints the seed on stderr.
  const CmdResult text = run(args);
  ASSERT_EQ(text.status, 0) << text.err;
  const size_t at = text.err.find("sampled with --seed ");
  ASSERT_NE(at, std::string::npos) << text.err;
  const std::string seed =
      text.err.substr(at + 20, text.err.find_first_not_of("0123456789", at + 20) - at - 20);
  EXPECT_EQ(run(args + " --seed " + seed).out, text.out);
  // Greedy: no seed reported, the same output every run.
  const CmdResult g1 = run("generate " + m + " --prompt-ids 4,5 --max-tokens 6 --json");
  const CmdResult g2 = run("generate " + m + " --prompt-ids 4,5 --max-tokens 6 --json");
  ASSERT_EQ(g1.status, 0) << g1.err;
  EXPECT_FALSE(json::parse(g1.out).contains("seed"));
  EXPECT_EQ(g1.out, g2.out);
}

// generate stops at the end-of-sequence ids of generation_config.json (a number or a list),
// emitting that token; --ignore-eos runs on to --max-tokens.
TEST(Cli, GenerationConfigEosStopsGenerate) {
  TempDir d;
  const std::string m = tiny_model(d);
  const std::string args = "generate " + m + " --prompt-ids 7,8,9 --max-tokens 12 --json";
  const CmdResult free_run = run(args + " --ignore-eos");
  ASSERT_EQ(free_run.status, 0) << free_run.err;
  const std::vector<int> all = json::parse(free_run.out)["output_ids"];
  ASSERT_EQ(all.size(), 12u);
  // The first output token not seen before it becomes the end of sequence.
  size_t stop = 1;
  while (stop < all.size() &&
         std::find(all.begin(), all.begin() + stop, all[stop]) != all.begin() + stop)
    ++stop;
  ASSERT_LT(stop, all.size()) << free_run.out;
  const std::vector<int> want(all.begin(), all.begin() + stop + 1);
  for (const json& eos : {json(all[stop]), json({100000, all[stop]})}) {
    write_file(m + "/generation_config.json", json{{"eos_token_id", eos}}.dump());
    const CmdResult r = run(args);
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(json::parse(r.out)["output_ids"].get<std::vector<int>>(), want) << eos.dump();
    EXPECT_EQ(run(args + " --ignore-eos").out, free_run.out);
  }
}

// tokenize against Hugging Face tokenizers (tests/fixtures/tokenizer, DeepSeek-V3's tokenizer):
// from --text, --file and standard input, with and without the special tokens.
TEST(Cli, TokenizeMatchesHuggingFace) {
  TempDir d;
  int n = 0;
  const json fixture = read_fixture("tokenizer/encode_deepseek_v3.json");
  for (const json& c : spread(fixture, 3)) {
    const std::string file = d / ("text" + std::to_string(n++));
    write_file(file, c["text"].get<std::string>());
    const std::string cmd = "tokenize " + kV3Tokenizer + " --file " + file;
    const CmdResult bos = run(cmd);
    ASSERT_EQ(bos.status, 0) << bos.err;
    EXPECT_EQ(json::parse(bos.out), c["ids_bos"]) << c.dump();
    EXPECT_EQ(json::parse(run(cmd + " --no-special").out), c["ids"]) << c.dump();
    EXPECT_EQ(json::parse(run(cmd + " --no-special --no-parse-special").out), c["ids_no_special"])
        << c.dump();
  }
  // Standard input, as `echo TEXT | moeserve tokenize DIR` gives it: the text, not an empty one.
  const json& last = fixture.back();
  write_file(d / "last", last["text"].get<std::string>());
  const CmdResult in = run("tokenize " + kV3Tokenizer + " < " + (d / "last"));
  ASSERT_EQ(in.status, 0) << in.err;
  EXPECT_EQ(json::parse(in.out), last["ids_bos"]);
  // `echo hi |`: BOS, "hi", "\n".
  write_file(d / "hi", "hi\n");
  const json hi = json::parse(run("tokenize " + kV3Tokenizer + " < " + (d / "hi")).out);
  ASSERT_EQ(hi.size(), 3u) << hi.dump();
  EXPECT_EQ(json({hi[0], hi[1]}), json::parse(run("tokenize " + kV3Tokenizer + " --text hi").out));
  // --text "" is the empty text (BOS only), not a read of standard input.
  EXPECT_EQ(json::parse(run("tokenize " + kV3Tokenizer + " --text '' < " + (d / "hi")).out),
            json({0}));
}

// detokenize against Hugging Face's decode, from --ids (both list forms) and standard input.
TEST(Cli, DetokenizeMatchesHuggingFace) {
  TempDir d;
  int n = 0;
  const json fixture = read_fixture("tokenizer/decode_deepseek_v3.json");
  for (const json& c : spread(fixture, 4)) {
    std::string ids;
    for (const auto& id : c["ids"]) ids += (ids.empty() ? "" : ",") + std::to_string(id.get<int>());
    const CmdResult r = run("detokenize " + kV3Tokenizer + " --ids " + ids);
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out, c["text"].get<std::string>()) << ids;
    const std::string file = d / ("ids" + std::to_string(n++));
    write_file(file, c["ids"].dump() + "\n");  // what tokenize prints
    const CmdResult s = run("detokenize " + kV3Tokenizer + " --skip-special < " + file);
    ASSERT_EQ(s.status, 0) << s.err;
    EXPECT_EQ(s.out, c["text_skip"].get<std::string>()) << ids;
  }
  expect_clean_failure(run("detokenize " + kV3Tokenizer + " --ids 1,2,999999"), {"999999"});
}

// chat-template against jinja2 with transformers' settings: DeepSeek-V3's template, and R1's
// through --chat-template.
TEST(Cli, ChatTemplateMatchesJinja2) {
  TempDir d;
  std::vector<json> cases;
  const json fixture = read_fixture("tokenizer/chat_templates.json");
  for (const json& c : fixture["cases"])
    if (c.contains("template") && !c.contains("error")) cases.push_back(c);
  ASSERT_GE(cases.size(), 8u);
  int n = 0;
  for (const json& c : spread(json(cases), 7)) {
    const std::string file = d / ("messages" + std::to_string(n++) + ".json");
    write_file(file, json{{"messages", c["messages"]}}.dump());
    std::string args = "chat-template " + kV3Tokenizer + " --messages " + file;
    if (c["template"] == "r1") args += " --chat-template " + kR1Template;
    if (c["add_generation_prompt"].get<bool>()) args += " --add-generation-prompt";
    const CmdResult r = run(args);
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out, c["expected"].get<std::string>()) << c["name"];
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

TEST(Cli, PrecisionFlag) {
  // --precision bf16 computes (on every CPU: the unit or its emulation, the same bits), and an
  // unknown value is one clear line. `exact` is the default: the same output as no flag.
  TempDir d;
  const std::string m = tiny_model(d);
  const std::string gen = "generate --model " + m + " --prompt-ids 1,2,3 --max-tokens 4 --json";
  const CmdResult plain = run(gen);
  const CmdResult exact = run(gen + " --precision exact");
  const CmdResult bf16 = run(gen + " --precision bf16");
  ASSERT_EQ(plain.status, 0) << plain.err;
  ASSERT_EQ(exact.status, 0) << exact.err;
  ASSERT_EQ(bf16.status, 0) << bf16.err;
  EXPECT_EQ(json::parse(exact.out)["output_ids"], json::parse(plain.out)["output_ids"]);
  EXPECT_EQ(json::parse(bf16.out)["output_ids"].size(), 4u);
  const CmdResult score = run("score --model " + m + " --ids 1,2,3 --precision bf16");
  ASSERT_EQ(score.status, 0) << score.err;
  expect_clean_failure(run(gen + " --precision fp16"), {"--precision"});
}

TEST(Cli, BenchCountsTheCacheRowsADecodeStepReads) {
  // The decode figure's bytes: the weights a token uses plus every cached latent row of every
  // layer (prompt + k rows for output token k, averaged over the timed steps), at the cache's
  // dtype; and the same decode after a short prompt, reported next to it.
  const std::string shipped = std::string(MOESERVE_SOURCE_DIR) + "/data/models/shakespeare-v3-tiny";
  json cfg;
  std::ifstream(shipped + "/config.json") >> cfg;
  const int64_t layers = cfg["num_hidden_layers"].get<int64_t>();
  const int64_t dim = cfg["kv_lora_rank"].get<int64_t>() + cfg["qk_rope_head_dim"].get<int64_t>();
  for (const auto& [dtype, bytes] : {std::pair<std::string, int64_t>{"f32", 4}, {"bf16", 2}}) {
    const CmdResult r = run("bench --model " + shipped +
                            " --prompt-len 24 --decode-tokens 8 --json --kv-cache-dtype " + dtype);
    ASSERT_EQ(r.status, 0) << r.err;
    const json j = json::parse(r.out.substr(r.out.rfind('{')));
    EXPECT_DOUBLE_EQ(j["decode_kv_read_bytes"].get<double>(),
                     static_cast<double>(layers * dim * bytes) * (24 + 8 / 2.0))
        << dtype;
    EXPECT_GT(j["short_prompt_decode_tokens_per_s"].get<double>(), 0.0);
    EXPECT_GT(j["short_prompt_decode_bandwidth_ratio"].get<double>(), 0.0);
    EXPECT_NE(r.out.find("after 8 prompt tokens instead of 24"), std::string::npos) << r.out;
  }
}

TEST(Cli, SpeculativeTokensFlag) {
  // generate with the shipped model's MTP module: the same greedy output, and the acceptance on
  // stderr; bench reports it; a model without the module is one clear line.
  const std::string shipped = std::string(MOESERVE_SOURCE_DIR) + "/data/models/shakespeare-v3-tiny";
  const std::string gen =
      "generate " + shipped + " --prompt-ids 0,471,1141,286 --max-tokens 24 --ignore-eos";
  const CmdResult plain = run(gen + " --json");
  const CmdResult spec = run(gen + " --json --speculative-tokens 2");
  ASSERT_EQ(plain.status, 0) << plain.err;
  ASSERT_EQ(spec.status, 0) << spec.err;
  EXPECT_EQ(json::parse(spec.out)["output_ids"], json::parse(plain.out)["output_ids"]);
  const CmdResult text = run(gen + " --speculative-tokens 1");
  ASSERT_EQ(text.status, 0) << text.err;
  EXPECT_NE(text.err.find("draft tokens accepted"), std::string::npos) << text.err;
  const CmdResult bench = run("bench --model " + shipped +
                              " --prompt-len 16 --decode-tokens 8 --speculative-tokens 1 --json");
  ASSERT_EQ(bench.status, 0) << bench.err;
  const std::string last = bench.out.substr(bench.out.rfind('{'));
  const json j = json::parse(last);
  EXPECT_EQ(j["speculative_tokens"], 1);
  EXPECT_GT(j["spec_draft_tokens"].get<int64_t>(), 0);
  EXPECT_GT(j["verify_seconds"].get<double>(), 0.0);
  TempDir d;
  const std::string m = tiny_model(d);
  expect_clean_failure(
      run("generate --model " + m + " --prompt-ids 1,2,3 --max-tokens 4 --speculative-tokens 1"),
      {"num_nextn_predict_layers"});
  expect_clean_failure(run(gen + " --speculative-tokens -1"), {"--speculative-tokens"});
}
