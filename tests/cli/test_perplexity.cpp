// `moeserve perplexity` through the binary: the perplexity of the transformers reference's
// log-probs, the chunking rule (BOS first, second half scored), KL divergence against saved
// logits (zero against itself, and the value computed here from the two models' own forwards
// against another model), and the errors for a base saved from another input.
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
#include "engine/sampler.h"
#include "model/model.h"

using moeserve::testing::TempDir;
using moeserve::testing::write_file;
using nlohmann::json;
namespace fs = std::filesystem;
using namespace moeserve;

namespace {

struct Result {
  int status = -1;
  std::string out, err;
};

// A shell command line, its stdout and stderr apart.
Result run_shell(const std::string& command) {
  TempDir d;
  const std::string cmd = command + " >" + (d / "out") + " 2>" + (d / "err");
  const int rc = std::system(cmd.c_str());
  Result r;
  r.status = WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
  std::ifstream o(d / "out"), e(d / "err");
  r.out.assign(std::istreambuf_iterator<char>(o), {});
  r.err.assign(std::istreambuf_iterator<char>(e), {});
  return r;
}

Result run_ppl(const std::string& args) {
  return run_shell(std::string(MOESERVE_BINARY) + " " + args);
}

json run_json(const std::string& args) {
  const Result r = run_ppl("perplexity " + args + " --json");
  EXPECT_EQ(r.status, 0) << args << "\n" << r.err;
  if (r.status != 0) return json::object();
  return json::parse(r.out);
}

const std::string kSrc = MOESERVE_SOURCE_DIR;
const std::string kFixtures = kSrc + "/tests/fixtures/models/";
const std::string kText = kSrc + "/tests/fixtures/text/tinyshakespeare_head.txt";

json reference_case(const std::string& fixture, size_t len) {
  std::ifstream in(kFixtures + fixture + "/reference.json");
  const json ref = json::parse(in);
  for (const json& c : ref["cases"])
    if (c["ids"].size() == len) return c;
  ADD_FAILURE() << fixture << " has no " << len << "-token case";
  return json::object();
}

// The tokens each chunk scores: log-probs of positions first+1 .. ctx-1 of the chunk.
double mean_nll(const std::vector<double>& lp, int64_t ctx) {
  const int64_t first = ctx / 2;
  double s = 0;
  for (int64_t i = first + 1; i < ctx; ++i) s -= lp[i];
  return s / static_cast<double>(ctx - 1 - first);
}

}  // namespace

// One chunk covering a reference case: the perplexity is that of the transformers log-probs
// of its second half (even and odd --ctx), within the reference's tolerance of 1e-3 nats.
TEST(Perplexity, MatchesTheTransformersReference) {
  for (const char* fixture : {"v3_tiny", "v3_fp8_tiny", "v2_lite_tiny"}) {
    const json c = reference_case(fixture, 100);
    TempDir d;
    write_file(d / "ids.json", c["ids"].dump());
    std::vector<double> lp(100, 0.0);
    for (size_t i = 1; i < 100; ++i) lp[i] = c["logprobs"][i].get<double>();
    for (const int64_t ctx : {100, 99, 60}) {
      const json j = run_json(kFixtures + fixture + " --tokens-file " + (d / "ids.json") +
                              " --ctx " + std::to_string(ctx) + " --chunks 1 --kv-cache-dtype f32");
      const double want = mean_nll(lp, ctx);
      EXPECT_EQ(j["chunks"], 1);
      EXPECT_EQ(j["scored_tokens"], ctx - 1 - ctx / 2) << fixture << " ctx " << ctx;
      EXPECT_NEAR(j["mean_nll"].get<double>(), want, 1e-3) << fixture << " ctx " << ctx;
      EXPECT_NEAR(std::log(j["ppl"].get<double>()), want, 1e-3) << fixture << " ctx " << ctx;
      EXPECT_GT(j["ppl_stderr"].get<double>(), 0.0);
    }
  }
}

// Two chunks of 50: the second is a fresh sequence of ids 50..99, whose log-probs `score`
// gives; the first is the reference's. Chunks beyond what the input holds are not made up.
TEST(Perplexity, ChunksAreFreshSequences) {
  const json c = reference_case("v3_tiny", 100);
  TempDir d;
  write_file(d / "ids.json", c["ids"].dump());
  std::vector<double> lp0(50, 0.0);
  for (size_t i = 1; i < 50; ++i) lp0[i] = c["logprobs"][i].get<double>();
  std::string second;
  for (size_t i = 50; i < 100; ++i) second += (i > 50 ? "," : "") + c["ids"][i].dump();
  const Result s = run_ppl("score " + kFixtures + "v3_tiny --ids " + second);
  ASSERT_EQ(s.status, 0) << s.err;
  const json sj = json::parse(s.out);
  std::vector<double> lp1(50, 0.0);
  for (size_t i = 1; i < 50; ++i) lp1[i] = sj["logprobs"][i].get<double>();
  const double want = (mean_nll(lp0, 50) + mean_nll(lp1, 50)) / 2;
  const Result r = run_ppl("perplexity " + kFixtures + "v3_tiny --tokens-file " + (d / "ids.json") +
                           " --ctx 50 --chunks 5 --json");
  ASSERT_EQ(r.status, 0) << r.err;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["chunks"], 2);
  EXPECT_EQ(j["scored_tokens"], 48);
  EXPECT_NEAR(j["mean_nll"].get<double>(), want, 1e-3);
  EXPECT_NE(r.err.find("holds only 2 chunks"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("chunk 2/2"), std::string::npos) << r.err;  // progress per chunk
}

// A model against its own saved logits: KL exactly 0, the same top token everywhere, the same
// perplexity; with top-k rows and with whole rows.
TEST(Perplexity, AgainstItselfKlIsZero) {
  TempDir d;
  ASSERT_EQ(run_ppl("init-model --preset tiny --out " + (d / "m") + " --seed 5").status, 0);
  for (const char* k : {"8", "0"}) {
    const std::string base = d / (std::string("base") + k);
    const json s = run_json(d / "m" + " --file " + kText + " --byte-tokens --ctx 64 --chunks 3" +
                            " --save-logits " + base + " --save-top-k " + k);
    ASSERT_TRUE(fs::exists(base));
    EXPECT_FALSE(fs::exists(base + ".partial"));
    const json j =
        run_json(d / "m" + " --file " + kText + " --byte-tokens --chunks 0 --kl-base " + base);
    EXPECT_EQ(j["ctx"], 64);  // from the base file
    EXPECT_EQ(j["chunks"], 3);
    EXPECT_EQ(j["scored_tokens"], 3 * 31);
    EXPECT_EQ(j["kl_mean"].get<double>(), 0.0) << k;
    EXPECT_EQ(j["kl_max"].get<double>(), 0.0) << k;
    EXPECT_EQ(j["same_top1"].get<double>(), 1.0) << k;
    EXPECT_EQ(j["rms_dp"].get<double>(), 0.0) << k;
    EXPECT_EQ(j["ppl"].get<double>(), s["ppl"].get<double>());
    EXPECT_EQ(j["ppl_base"].get<double>(), s["ppl"].get<double>());
    EXPECT_EQ(j["ln_ppl_ratio"].get<double>(), 0.0);
  }
  // The text report says the same.
  const Result r = run_ppl("perplexity " + d / "m" + " --file " + kText +
                           " --byte-tokens --kl-base " + d / "base8");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("mean KL divergence:  0 ± 0\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("same top token:      100.000"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("top 8 tokens, on average"), std::string::npos) << r.out;
}

namespace {

// What the comparison of `q` against base `p` should report, computed from the two models'
// forwards directly: each chunk one sequence, log-softmax in double.
struct Expected {
  double kl_full = 0, kl_topk = 0, topk_mass = 0, same = 0, rms_dp = 0, nll_p = 0, nll_q = 0;
  int64_t n = 0;
};

std::vector<std::vector<double>> chunk_logprobs(model::Model& m, const std::vector<int32_t>& ids,
                                                int64_t ctx) {
  const model::ModelConfig& c = m.config();
  // An f32 cache, as the runs compared with are given.
  kv::KvPool pool((ctx + 15) / 16, 16, c.num_hidden_layers, c.kv_cache_dim(), kv::KvDtype::F32);
  std::vector<int32_t> blocks;
  EXPECT_TRUE(pool.allocate(pool.n_blocks(), &blocks));
  model::Batch b;
  b.tokens = ids;
  b.seqs = {{0, ctx, 0, blocks.data()}};
  for (int64_t i = ctx / 2; i < ctx - 1; ++i) b.logit_rows.push_back(i);
  std::vector<float> logits(b.logit_rows.size() * c.vocab_size);
  m.forward(b, pool, logits.data());
  std::vector<std::vector<double>> rows(b.logit_rows.size());
  for (size_t r = 0; r < rows.size(); ++r)
    engine::log_softmax(logits.data() + r * c.vocab_size, c.vocab_size, &rows[r]);
  return rows;
}

Expected expected_comparison(const std::string& pdir, const std::string& qdir,
                             const std::vector<int32_t>& ids, int64_t ctx, int64_t chunks,
                             int64_t k) {
  ThreadPool tp(2);
  model::Model p(pdir, tp), q(qdir, tp);
  Expected e;
  double dp2 = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const std::vector<int32_t> chunk(ids.begin() + c * ctx, ids.begin() + (c + 1) * ctx);
    const auto rp = chunk_logprobs(p, chunk, ctx), rq = chunk_logprobs(q, chunk, ctx);
    for (size_t r = 0; r < rp.size(); ++r) {
      const std::vector<double>&lp = rp[r], &lq = rq[r];
      const size_t V = lp.size();
      const int32_t target = chunk[ctx / 2 + r + 1];
      double full = 0;
      for (size_t v = 0; v < V; ++v) full += std::exp(lp[v]) * (lp[v] - lq[v]);
      // The base's k most likely tokens, then the rest as one outcome.
      std::vector<size_t> order(V);
      for (size_t v = 0; v < V; ++v) order[v] = v;
      std::stable_sort(order.begin(), order.end(),
                       [&](size_t x, size_t y) { return lp[x] > lp[y]; });
      double topk = 0, rest_p = 0, rest_q = 0;
      for (size_t i = 0; i < V; ++i) {
        const size_t v = order[i];
        if (static_cast<int64_t>(i) < k) {
          topk += std::exp(lp[v]) * (lp[v] - lq[v]);
        } else {
          rest_p += std::exp(lp[v]);
          rest_q += std::exp(lq[v]);
        }
      }
      topk += rest_p * (std::log(rest_p) - std::log(rest_q));
      e.kl_full += full;
      e.kl_topk += topk;
      e.topk_mass += 1 - rest_p;
      const auto am = [](const std::vector<double>& x) {
        return std::max_element(x.begin(), x.end()) - x.begin();
      };
      e.same += am(lp) == am(lq) ? 1 : 0;
      const double d = std::exp(lq[target]) - std::exp(lp[target]);
      dp2 += d * d;
      e.nll_p -= lp[target];
      e.nll_q -= lq[target];
      ++e.n;
    }
  }
  e.kl_full /= e.n;
  e.kl_topk /= e.n;
  e.topk_mass /= e.n;
  e.same /= e.n;
  e.rms_dp = std::sqrt(dp2 / e.n);
  e.nll_p /= e.n;
  e.nll_q /= e.n;
  return e;
}

}  // namespace

// An fp8 copy of a bf16 model against the bf16 model's saved logits: what the command reports
// is what the two models' forwards give, computed here; the top-k KL is at most the full one.
TEST(Perplexity, KlAgainstAnotherModelMatchesItsForwards) {
  TempDir d;
  ASSERT_EQ(run_ppl("init-model --preset tiny --out " + (d / "bf16") + " --seed 7").status, 0);
  ASSERT_EQ(
      run_ppl("init-model --preset tiny --out " + (d / "fp8") + " --seed 7 --dtype fp8").status, 0);
  std::ifstream in(kText, std::ios::binary);
  const std::string text(std::istreambuf_iterator<char>(in), {});
  std::vector<int32_t> ids(text.begin(), text.end());
  for (auto& v : ids) v &= 0xff;
  const int64_t ctx = 64, chunks = 4, k = 16;
  const std::string flags =
      " --file " + kText + " --byte-tokens --ctx 64 --chunks 4 --kv-cache-dtype f32";
  run_json(d / "bf16" + flags + " --save-logits " + (d / "full") + " --save-top-k 0");
  run_json(d / "bf16" + flags + " --save-logits " + (d / "top16") + " --save-top-k 16");
  const json full = run_json(d / "fp8" + flags + " --kl-base " + (d / "full"));
  const json top = run_json(d / "fp8" + flags + " --kl-base " + (d / "top16"));
  const Expected e = expected_comparison(d / "bf16", d / "fp8", ids, ctx, chunks, k);
  ASSERT_EQ(full["scored_tokens"], e.n);
  EXPECT_GT(e.kl_full, 1e-6);  // the models differ
  // The command rounds log-probs to f32: a relative 1e-6 of each term.
  EXPECT_NEAR(full["kl_mean"].get<double>(), e.kl_full, 1e-5 * e.kl_full + 1e-9);
  EXPECT_NEAR(top["kl_mean"].get<double>(), e.kl_topk, 1e-5 * e.kl_topk + 1e-9);
  EXPECT_LE(e.kl_topk, e.kl_full);
  EXPECT_EQ(full["base_top_k_mass"].get<double>(), 1.0);
  EXPECT_NEAR(top["base_top_k_mass"].get<double>(), e.topk_mass, 1e-6);
  EXPECT_LT(e.kl_topk, e.kl_full);  // 16 of 512 tokens do not hold all of it
  for (const json* j : {&full, &top}) {
    EXPECT_NEAR((*j)["same_top1"].get<double>(), e.same, 1e-12);
    EXPECT_NEAR((*j)["rms_dp"].get<double>(), e.rms_dp, 1e-9);
    EXPECT_NEAR(std::log((*j)["ppl_base"].get<double>()), e.nll_p, 1e-9);
    EXPECT_NEAR(std::log((*j)["ppl"].get<double>()), e.nll_q, 1e-9);
    EXPECT_NEAR((*j)["ln_ppl_ratio"].get<double>(), e.nll_q - e.nll_p, 1e-9);
    EXPECT_GT((*j)["kl_p99"].get<double>(), 0.0);
    EXPECT_LE((*j)["kl_p99"].get<double>(), (*j)["kl_max"].get<double>());
    EXPECT_GT((*j)["kl_stderr"].get<double>(), 0.0);
  }
  std::printf("fp8 vs bf16 tiny: KL %.3g (top-16 %.3g), same top %.1f%%\n", e.kl_full, e.kl_topk,
              100 * e.same);
}

// Text through a tokenizer that adds BOS: every chunk starts with BOS, the rest of it is the
// text's ids in order (the base file's header records the ids run).
TEST(Perplexity, TokenizedChunksStartWithBos) {
  TempDir d;
  json cfg = json::parse(std::ifstream(kFixtures + "v3_tiny/config.json"));
  cfg["vocab_size"] = 1024;  // the synthetic tokenizer's ids reach past 600
  write_file(d / "config.json", cfg.dump());
  fs::create_directories(d / "tok");
  fs::copy_file(kSrc + "/tests/fixtures/tokenizer/synthetic/tokenizer.json",
                d / "tok/tokenizer.json");
  write_file(d / "tok/tokenizer_config.json",
             R"({"bos_token": "[CLS]", "eos_token": "<eot>", "add_bos_token": true})");
  ASSERT_EQ(run_ppl("init-model --config " + (d / "config.json") + " --out " + (d / "m") +
                    " --tokenizer " + (d / "tok"))
                .status,
            0);
  const Result t = run_ppl("tokenize " + d / "m" + " --file " + kText);
  ASSERT_EQ(t.status, 0) << t.err;
  const std::vector<int32_t> text_ids = json::parse(t.out);
  ASSERT_EQ(text_ids[0], 600);  // BOS
  const int64_t ctx = 40;
  run_json(d / "m" + " --file " + kText + " --ctx 40 --chunks 3 --save-logits " + (d / "b"));
  std::ifstream in(d / "b", std::ios::binary);
  char magic[8];
  uint64_t hlen = 0;
  in.read(magic, 8);
  in.read(reinterpret_cast<char*>(&hlen), 8);
  std::string h(hlen, '\0');
  in.read(h.data(), static_cast<std::streamsize>(hlen));
  const json header = json::parse(h);
  const std::vector<int32_t> run = header["tokens"];
  ASSERT_EQ(run.size(), 3u * ctx);
  for (int64_t i = 0; i < 3 * ctx; ++i) EXPECT_EQ(run[i], i % ctx == 0 ? 600 : text_ids[i]) << i;
  EXPECT_EQ(header["first"], 20);
  EXPECT_EQ(header["scored_per_chunk"], 19);
  EXPECT_EQ(header["vocab_size"], 1024);
}

// A comparison with a base saved from another input fails with one line saying so, before
// any forward; so do inputs the model cannot run.
TEST(Perplexity, MismatchedInputsAreErrors) {
  TempDir d;
  ASSERT_EQ(run_ppl("init-model --preset tiny --out " + (d / "m") + " --seed 5").status, 0);
  const std::string m = d / "m";
  const std::string flags = " --file " + kText + " --byte-tokens";
  ASSERT_EQ(
      run_ppl("perplexity " + m + flags + " --ctx 64 --chunks 2 --save-logits " + (d / "base"))
          .status,
      0);
  write_file(d / "other.txt",
             "A different text altogether, long enough for two chunks of "
             "sixty-four bytes each, and then some more words to be sure.\n");
  const auto expect_error = [&](const std::string& args, const std::string& fragment) {
    const Result r = run_ppl("perplexity " + args);
    EXPECT_EQ(r.status, 1) << args;
    EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(fragment), std::string::npos) << args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  };
  const std::string base = " --kl-base " + (d / "base");
  expect_error(m + flags + " --ctx 32" + base, "was saved with --ctx 64; this run uses --ctx 32");
  expect_error(m + " --file " + (d / "other.txt") + " --byte-tokens" + base,
               "differs from the one");
  expect_error(m + flags + " --chunks 3" + base, "holds 2 chunks; --chunks asks for 3");
  expect_error(m + " --file " + kText + base, "has no tokenizer.json");
  write_file(d / "junk", "not a logits file at all");
  expect_error(m + flags + " --kl-base " + (d / "junk"), "is not a logits file");
  fs::resize_file(d / "base", fs::file_size(d / "base") - 10);
  expect_error(m + flags + base, "is truncated or damaged");
  write_file(d / "ids.json", "[1, 2, 3, 4, 5, 6, 7, 8, 9, 600]");
  expect_error(m + " --tokens-file " + (d / "ids.json") + " --ctx 8",
               "token 9 of the input is id 600, outside the model's vocabulary of 512");
  expect_error(m + flags + " --ctx 1000", "longer than the model's 256 positions");
  write_file(d / "short.txt", "too short");
  expect_error(m + " --file " + (d / "short.txt") + " --byte-tokens --ctx 64",
               "fewer than one chunk of --ctx 64");
  expect_error(m + flags + " --save-logits x --kl-base y", "at most one of");
  expect_error(m + flags + " --save-top-k 4", "--save-top-k goes with --save-logits");
  // A header that does not add up, and a record whose token id is out of range.
  {
    std::string bytes(16, '\0');
    std::memcpy(bytes.data(), "MSLOGITS", 8);
    const std::string h = R"({"version": 1, "top_k": 4, "vocab_size": 512, "ctx": 64,)"
                          R"( "n_chunks": 2, "scored_per_chunk": 31, "tokens": [1, 2],)"
                          R"( "model": "m"})";
    const uint64_t n = h.size();
    std::memcpy(bytes.data() + 8, &n, 8);
    write_file(d / "bad_header", bytes + h);
    expect_error(m + flags + " --kl-base " + (d / "bad_header"), "the header is damaged");
  }
  ASSERT_EQ(run_ppl("perplexity " + m + flags + " --ctx 64 --chunks 2 --save-top-k 4 " +
                    "--save-logits " + (d / "base4"))
                .status,
            0);
  {
    std::fstream f(d / "base4", std::ios::in | std::ios::out | std::ios::binary);
    uint64_t hlen = 0;
    f.seekg(8);
    f.read(reinterpret_cast<char*>(&hlen), 8);
    const int32_t bad = 9999;
    f.seekp(static_cast<std::streamoff>(16 + hlen + 16));  // the first record's first id
    f.write(reinterpret_cast<const char*>(&bad), 4);
  }
  // Found while reading, after the model has loaded: the last line says it.
  const Result r = run_ppl("perplexity " + m + flags + " --kl-base " + (d / "base4"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("\nerror: --kl-base: the file is damaged (a token id out of range)\n"),
            std::string::npos)
      << r.err;
  expect_error(m + flags + " --tokens-file " + (d / "ids.json"), "exactly one of --file");
}

// Under mpirun the ranks share the routed experts and follow rank 0's forwards: the same
// figures, bit for bit, as one process (the numerical contract), against a base saved by one
// process; an input error ends every rank with one message.
TEST(Perplexity, ExpertParallelGivesTheSameFigures) {
  TempDir d;
  ASSERT_EQ(run_ppl("init-model --preset tiny --out " + (d / "m") + " --seed 9").status, 0);
  const std::string args = "perplexity " + (d / "m") + " --file " + kText +
                           " --byte-tokens --ctx 48 --chunks 3 --json --threads 1";
  const json one =
      run_json((d / "m") + " --file " + kText +
               " --byte-tokens --ctx 48 --chunks 3 --threads 1 --save-logits " + (d / "base"));
  const std::string mpi =
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
      // Under the sanitizers: Open MPI's components are unloaded at exit, so what they keep
      // shows as allocations of unknown modules, which the suppressions cannot name.
      "ASAN_OPTIONS=\"$ASAN_OPTIONS:detect_leaks=0\" mpirun --oversubscribe -np ";
  for (const std::string np : {"2", "3"}) {
    const Result r = run_shell(mpi + np + " " + MOESERVE_BINARY + " " + args + " --kl-base " +
                               (d / "base") + " --redundant-experts 1");
    ASSERT_EQ(r.status, 0) << r.err;
    const json j = json::parse(r.out);
    EXPECT_EQ(j["ppl"].get<double>(), one["ppl"].get<double>()) << np;
    EXPECT_EQ(j["kl_mean"].get<double>(), 0.0) << np;
    EXPECT_EQ(j["same_top1"].get<double>(), 1.0) << np;
  }
  const Result bad =
      run_shell(mpi + "2 " + MOESERVE_BINARY + " perplexity " + (d / "m") + " --file " + kText +
                " --byte-tokens --ctx 32 --kl-base " + (d / "base"));
  EXPECT_NE(bad.status, 0);
  size_t errors = 0;
  for (size_t at = bad.err.find("error: "); at != std::string::npos;
       at = bad.err.find("error: ", at + 1))
    ++errors;
  EXPECT_EQ(errors, 1u) << bad.err;
  EXPECT_NE(bad.err.find("was saved with --ctx 48"), std::string::npos) << bad.err;
}

// --batch runs chunks together as one batch of sequences: the same figures and the same saved
// logits, bit for bit, whatever the batch (one, a divisor of the chunk count, a remainder, more
// than the chunks), with a piece boundary inside a chunk (--ctx over 512).
TEST(Perplexity, BatchGivesTheSameFigures) {
  TempDir d;
  // v3_tiny's configuration with room for 600 positions.
  std::ifstream cin(kFixtures + "v3_tiny/config.json");
  json cfg = json::parse(cin);
  cfg["max_position_embeddings"] = 1024;
  write_file(d / "config.json", cfg.dump());
  ASSERT_EQ(
      run_ppl("init-model --config " + (d / "config.json") + " --out " + (d / "m") + " --seed 11")
          .status,
      0);
  const auto read = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  for (const std::string ctx : {"40", "600"}) {
    const std::string args = (d / "m") + " --file " + kText + " --byte-tokens --ctx " + ctx +
                             " --chunks " + (ctx == "40" ? "6" : "2") + " --save-top-k 4";
    const json one = run_json(args + " --batch 1 --save-logits " + (d / "b1"));
    ASSERT_TRUE(one.contains("ppl"));
    EXPECT_GT(one["ppl"].get<double>(), 1.0);
    for (const std::string n : {"2", "4", "9"}) {
      const std::string saved = d / ("b" + n);
      const json j = run_json(args + " --batch " + n + " --save-logits " + saved);
      EXPECT_EQ(j["chunks"], one["chunks"]) << "ctx " << ctx << " batch " << n;
      EXPECT_EQ(j["scored_tokens"], one["scored_tokens"]) << "ctx " << ctx << " batch " << n;
      EXPECT_EQ(j["ppl"].get<double>(), one["ppl"].get<double>())
          << "ctx " << ctx << " batch " << n;
      EXPECT_EQ(j["ppl_stderr"].get<double>(), one["ppl_stderr"].get<double>()) << n;
      EXPECT_TRUE(read(saved) == read(d / "b1")) << "ctx " << ctx << " batch " << n;
    }
  }
  const Result bad =
      run_ppl("perplexity " + (d / "m") + " --file " + kText + " --byte-tokens --ctx 40 --batch 0");
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("--batch must be at least 1"), std::string::npos) << bad.err;
}
