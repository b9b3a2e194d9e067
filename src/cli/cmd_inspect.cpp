// inspect: what a model folder holds and how much memory each rank needs to serve it, from
// config.json, the index and the safetensors headers only (the shards need not be downloaded).
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "cli/commands.h"
#include "core/error.h"
#include "model/inspect.h"

namespace moeserve::cli {

namespace {
struct InspectArgs {
  std::string model, kv_dtype;
  model::PlanOptions plan;
  bool json = false;
};

void run_inspect(const InspectArgs& a) {
  const std::string& dir = a.model;
  std::optional<model::KvDtype> kv;
  if (!a.kv_dtype.empty()) {
    model::KvDtype d;
    MS_CHECK(model::parse_kv_dtype(a.kv_dtype, &d), "--kv-cache-dtype \"", a.kv_dtype,
             "\" is not known (f32, bf16, fp8)");
    kv = d;
  }
  const model::Inventory inv = model::inspect_model(dir);
  if (a.json) {
    std::printf("%s\n", model::inspect_json(inv, a.plan, kv).dump(2).c_str());
  } else {
    std::fputs(model::inspect_text(inv, a.plan, kv).c_str(), stdout);
  }
}
}  // namespace

void register_inspect_command(CLI::App& app) {
  auto a = std::make_shared<InspectArgs>();
  CLI::App* c = app.add_subcommand(
      "inspect",
      "Parameters, bytes and per-rank memory of a model folder, from config.json and the "
      "safetensors headers (the shards need not be downloaded)");
  c->add_option("--model", a->model, "Model folder")->required();
  c->add_option("--ep", a->plan.ep, "Expert-parallel ranks")->capture_default_str();
  c->add_option("--context", a->plan.context, "Tokens per sequence")->capture_default_str();
  c->add_option("--seqs", a->plan.seqs, "Sequences held at once")->capture_default_str();
  c->add_option("--batch-tokens", a->plan.batch_tokens,
                "Tokens per forward, for the workspace estimate (serve --max-batch-tokens)")
      ->capture_default_str();
  c->add_option("--kv-cache-dtype", a->kv_dtype, "f32, bf16 or fp8 (default: show all three)");
  c->add_flag("--json", a->json, "Print the figures as JSON");
  c->callback([a] { run_inspect(*a); });
}

}  // namespace moeserve::cli
