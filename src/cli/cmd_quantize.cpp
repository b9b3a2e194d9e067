// quantize: a bf16 or fp8 checkpoint with its routed experts rewritten as compressed-tensors
// pack-quantized int4 or int8 (model/quantize.h says what is written and how).
#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "model/quantize.h"

namespace moeserve::cli {

namespace {
struct QuantizeArgs {
  std::string model, out, experts;
  int64_t group_size = 32;
  double shard_gb = 5.0;
  std::string dense_dtype = "fp8";
};

void run_quantize(const QuantizeArgs& a) {
  model::QuantizeOptions o;
  o.model = a.model;
  o.out = a.out;
  MS_CHECK(a.experts == "int4" || a.experts == "int8", "--experts \"", a.experts,
           "\" is not known (int4, int8)");
  o.bits = a.experts == "int4" ? 4 : 8;
  o.group_size = a.group_size;
  MS_CHECK(a.dense_dtype == "fp8" || a.dense_dtype == "bf16", "--dense-dtype \"", a.dense_dtype,
           "\" is not known (fp8, bf16)");
  o.keep_fp8 = a.dense_dtype == "fp8";
  MS_CHECK(a.shard_gb > 0 && a.shard_gb < 1e6, "--shard-size must be positive (GB)");
  o.shard_bytes = static_cast<uint64_t>(a.shard_gb * 1e9);
  if (o.shard_bytes == 0) o.shard_bytes = 1;
  ThreadPool pool;
  const model::QuantizeResult r = model::quantize_checkpoint(
      o, pool, [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); });
  std::printf(
      "quantized %lld expert matrices to %s group %lld, kept %lld fp8 matrices fp8, converted "
      "%lld fp8 matrices to bf16, copied %lld tensors and %zu other files: %.2f GB in, %.2f GB "
      "out in %lld shard(s) in %s\n",
      static_cast<long long>(r.quantized), a.experts.c_str(), static_cast<long long>(o.group_size),
      static_cast<long long>(r.kept_fp8), static_cast<long long>(r.converted),
      static_cast<long long>(r.copied), r.files_copied.size(),
      static_cast<double>(r.bytes_in) / 1e9, static_cast<double>(r.bytes_out) / 1e9,
      static_cast<long long>(r.shards), o.out.c_str());
}
}  // namespace

void register_quantize_command(CLI::App& app) {
  auto a = std::make_shared<QuantizeArgs>();
  CLI::App* c = app.add_subcommand(
      "quantize",
      "Write a bf16 or fp8 checkpoint with its routed experts as compressed-tensors "
      "pack-quantized int4 or int8 (symmetric, bf16 group scales), the layout Kimi-K2-Thinking "
      "is published in. An fp8 input's other fp8 matrices stay fp8 (compressed-tensors "
      "float-quantized, in the same checkpoint: mixed-precision); everything else is copied as "
      "it was, tokenizer files included");
  c->add_option("--model", a->model, "Input model folder (bf16 or fp8)")->required();
  c->add_option("--out", a->out, "Output folder (must not exist, or be empty)")
      ->required()
      ->type_name("DIR");
  c->add_option("--experts", a->experts, "Routed experts' format: int4 or int8")
      ->required()
      ->type_name("int4|int8");
  c->add_option("--group-size", a->group_size,
                "Weights per scale along a row (a multiple of 32 for int4, 16 for int8)")
      ->capture_default_str();
  c->add_option("--dense-dtype", a->dense_dtype,
                "fp8 input: what its fp8 matrices outside the routed experts become: fp8 (kept "
                "as they are) or bf16")
      ->capture_default_str()
      ->type_name("fp8|bf16");
  c->add_option("--shard-size", a->shard_gb, "Output shard size in GB (about)")
      ->capture_default_str()
      ->type_name("GB");
  c->callback([a] { run_quantize(*a); });
}

}  // namespace moeserve::cli
