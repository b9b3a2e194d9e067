// The trained model shipped in data/models/shakespeare-v3-tiny (tools/train_tiny.py) against
// transformers and PyTorch (tests/fixtures/shipped_model/reference.json, made by
// tools/make_shipped_model_reference.py): it loads without its multi-token-prediction layer
// (loaded only for speculative decoding), gives the reference's log-probs on held-out text and its
// greedy continuations, its tokenizer and chat template give what Hugging Face's give, and
// `moeserve perplexity` on the held-out text gives PyTorch's perplexity.
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../test_util.h"
#include "engine/generator.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

using moeserve::testing::read_file;
using moeserve::testing::TempDir;
using nlohmann::json;
namespace fs = std::filesystem;
using namespace moeserve;

namespace {

const fs::path kSrc = MOESERVE_SOURCE_DIR;
const fs::path kModel = kSrc / "data/models/shakespeare-v3-tiny";

json read_json(const fs::path& p) {
  std::ifstream in(p);
  EXPECT_TRUE(in.good()) << p;
  return json::parse(in);
}

const json& reference() {
  static const json ref = read_json(kSrc / "tests/fixtures/shipped_model/reference.json");
  return ref;
}

struct Result {
  int status = -1;
  std::string out, err;
};

Result run_moeserve(const std::string& args) {
  TempDir d;
  const std::string cmd =
      std::string(MOESERVE_BINARY) + " " + args + " >" + (d / "out") + " 2>" + (d / "err");
  const int rc = std::system(cmd.c_str());
  Result r;
  r.status = WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
  r.out = read_file(d / "out");
  r.err = read_file(d / "err");
  return r;
}

class ShippedModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { model_ = new model::Model(kModel.string(), *pool_); }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }
  static inline ThreadPool* pool_ = new ThreadPool(2);
  static inline model::Model* model_ = nullptr;
};

}  // namespace

// The folder is an ordinary Hugging Face folder of the DeepSeek-V3 architecture, and the
// safetensors hold the MTP module as model.layers.{num_hidden_layers}.*, which moeserve skips.
TEST_F(ShippedModel, IsDeepSeekV3WithAnMtpLayerThatIsSkipped) {
  const json cfg = read_json(kModel / "config.json");
  EXPECT_EQ(cfg["model_type"], "deepseek_v3");
  EXPECT_EQ(cfg["architectures"][0], "DeepseekV3ForCausalLM");
  EXPECT_EQ(cfg["num_nextn_predict_layers"], 1);
  EXPECT_EQ(cfg["first_k_dense_replace"], 1);
  EXPECT_EQ(cfg["n_shared_experts"], 1);
  EXPECT_EQ(cfg["scoring_func"], "sigmoid");
  EXPECT_EQ(cfg["topk_method"], "noaux_tc");
  EXPECT_GT(cfg["n_group"].get<int>(), 1);
  EXPECT_EQ(cfg["rope_scaling"]["type"], "yarn");
  EXPECT_TRUE(cfg["q_lora_rank"].is_number_integer());
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"})
    EXPECT_TRUE(fs::exists(kModel / f)) << f;
  EXPECT_LE(fs::file_size(kModel / "model.safetensors"), 25u * 1000 * 1000);

  const std::string mtp = "model.layers." + std::to_string(cfg["num_hidden_layers"].get<int>());
  // The safetensors header: 8 bytes of length, then JSON naming every tensor.
  const std::string file = read_file(kModel / "model.safetensors");
  ASSERT_GT(file.size(), 8u);
  uint64_t hlen = 0;
  std::memcpy(&hlen, file.data(), 8);
  const json header = json::parse(file.substr(8, hlen));
  int mtp_tensors = 0;
  for (const auto& [name, _] : header.items())
    if (name.rfind(mtp + ".", 0) == 0) ++mtp_tensors;
  for (const char* t :
       {".enorm.weight", ".hnorm.weight", ".eh_proj.weight", ".shared_head.head.weight",
        ".shared_head.norm.weight", ".embed_tokens.weight", ".mlp.gate.e_score_correction_bias"})
    EXPECT_TRUE(header.contains(mtp + t)) << mtp + t;
  EXPECT_GT(mtp_tensors, 20);
  // The model loaded (the fixture) computes with num_hidden_layers layers; `inspect` counts the
  // MTP layer apart (loaded only with --speculative-tokens).
  EXPECT_EQ(model_->config().num_hidden_layers, cfg["num_hidden_layers"].get<int64_t>());
  const Result r = run_moeserve("inspect " + kModel.string() + " --json");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["mtp_layers"], 1) << r.out;
}

// Per-token log-probs of held-out sequences (the longest past original_max_position_embeddings)
// within 1e-3 nats of transformers' with the f32 KV cache, as the fixtures of
// tests/engine/test_reference.cpp; with the default bf16 cache, the median and 90th percentile
// error within the bounds used there.
TEST_F(ShippedModel, LogProbsMatchTransformers) {
  struct Case {
    kv::KvDtype dtype;
    double max_err, median_err, p90_err;
  };
  for (const Case& cc :
       {Case{kv::KvDtype::F32, 1e-3, 1e-3, 1e-3}, Case{kv::KvDtype::BF16, INFINITY, 0.03, 0.4}}) {
    engine::Generator gen(*model_, 16, cc.dtype);
    std::vector<double> err;
    for (const json& c : reference()["cases"]) {
      const std::vector<int32_t> ids = c["ids"];
      const std::vector<double> lp = gen.score(ids);
      ASSERT_EQ(lp.size(), ids.size());
      for (size_t i = 1; i < ids.size(); ++i) {
        const double d = std::fabs(lp[i] - c["logprobs"][i].get<double>());
        err.push_back(std::isnan(d) ? INFINITY : d);
        EXPECT_LT(d, cc.max_err) << kv::kv_dtype_name(cc.dtype) << ": token " << i << " of "
                                 << ids.size();
      }
    }
    ASSERT_GT(err.size(), 1000u);
    std::sort(err.begin(), err.end());
    const double median = err[(err.size() - 1) / 2], p90 = err[(err.size() - 1) * 9 / 10];
    EXPECT_LE(median, cc.median_err) << kv::kv_dtype_name(cc.dtype);
    EXPECT_LE(p90, cc.p90_err) << kv::kv_dtype_name(cc.dtype);
    std::printf(
        "[ %s cache ] |logprob - transformers| over %zu tokens: median %.3g, p90 %.3g, "
        "max %.3g\n",
        kv::kv_dtype_name(cc.dtype), err.size(), median, p90, err.back());
  }
}

// Greedy continuations of a held-out prompt and of a chat prompt, up to the first step whose
// top-2 margin is within the log-prob tolerance.
TEST_F(ShippedModel, GreedyMatchesTransformers) {
  engine::Generator gen(*model_, 16, kv::KvDtype::F32);
  int compared = 0;
  for (const json& g : reference()["greedy"]) {
    const std::vector<int32_t> prompt = g["prompt"], want = g["output"];
    engine::GenerateOptions o;
    o.max_tokens = static_cast<int64_t>(want.size());
    const std::vector<int32_t> got = gen.generate(prompt, o);
    ASSERT_EQ(got.size(), want.size());
    for (size_t j = 0; j < want.size(); ++j) {
      if (g["margins"][j].get<double>() <= 1e-3) break;
      EXPECT_EQ(got[j], want[j]) << "greedy step " << j;
      ++compared;
    }
  }
  EXPECT_GT(compared, 10);
}

// moeserve's tokenizer and chat template on the shipped tokenizer give what transformers'
// AutoTokenizer gives: ids with BOS first, and the rendered chat prompt and its ids.
TEST_F(ShippedModel, TokenizerAndChatTemplateMatchHuggingFace) {
  const tokenizer::Tokenizer tok = tokenizer::Tokenizer::load(kModel);
  EXPECT_EQ(tok.bos_id(), 0);
  EXPECT_EQ(tok.eos_id(), 1);
  EXPECT_TRUE(tok.add_bos());
  for (const json& s : reference()["tokenizer"]) {
    const std::string text = s["text"];
    const std::vector<int32_t> want = s["ids"];
    EXPECT_EQ(tok.encode(text), want) << text;
    // Decoding the ids after BOS gives the text back (byte-level BPE loses nothing).
    ASSERT_FALSE(want.empty());
    EXPECT_EQ(tok.decode(std::vector<int32_t>(want.begin() + 1, want.end())), text);
  }
  const tokenizer::ChatTemplate tmpl = tokenizer::ChatTemplate::from_model_dir(kModel);
  for (const json& c : reference()["chat"]) {
    const std::string text = tmpl.render(nlohmann::ordered_json(c["messages"]), true);
    EXPECT_EQ(text, c["text"].get<std::string>());
    EXPECT_EQ(tok.encode(text, /*add_special=*/false), c["ids"].get<std::vector<int32_t>>());
  }
}

// `moeserve perplexity` on the held-out text agrees with PyTorch's perplexity computed the same
// way (tools/make_shipped_model_reference.py) within 1e-3 relative with the f32 KV cache (as
// PyTorch computes), within 1e-2 with the default bf16 cache. (That --batch changes nothing is
// tests/cli/test_perplexity.cpp's Perplexity.BatchGivesTheSameFigures.)
TEST_F(ShippedModel, HeldOutPerplexityMatchesPyTorch) {
  const json& want = reference()["perplexity"];
  const std::string text = read_file(kSrc / "data/tinyshakespeare/input.txt");
  const size_t start = reference()["heldout_starts_at_byte"].get<size_t>();
  ASSERT_EQ(text.size() - start, reference()["heldout_bytes"].get<size_t>());
  TempDir d;
  std::ofstream(d / "heldout.txt", std::ios::binary) << text.substr(start);
  const std::string base = "perplexity " + kModel.string() + " --file " + (d / "heldout.txt") +
                           " --ctx " + std::to_string(want["ctx"].get<int>()) + " --json";
  const double ppl = want["ppl"].get<double>();
  for (const char* args : {" --kv-cache-dtype f32 --batch 4", " --batch 4"}) {
    const Result r = run_moeserve(base + args);
    ASSERT_EQ(r.status, 0) << r.err;
    const json j = json::parse(r.out);
    EXPECT_EQ(j["chunks"], want["chunks"]) << args;
    EXPECT_EQ(j["scored_tokens"], want["scored_tokens"]) << args;
    const double got = j["ppl"].get<double>();
    const bool f32 = std::string(args).find("f32") != std::string::npos;
    EXPECT_NEAR(got / ppl, 1.0, f32 ? 1e-3 : 1e-2)
        << args << ": moeserve " << got << ", PyTorch " << ppl;
    std::printf("[%s ] held-out perplexity: moeserve %.6f, PyTorch %.6f (relative %.2e)\n", args,
                got, ppl, got / ppl - 1);
  }
}
