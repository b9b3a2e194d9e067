// plan-placement: an EPLB-style expert placement from recorded per-expert loads.
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "moe/placement.h"

namespace moeserve::cli {

namespace {
struct PlanArgs {
  std::string load, out;
  int ranks = 0, redundant = 0;
};

void run_plan(const PlanArgs& a) {
  MS_CHECK(a.ranks >= 1, "--ranks must be >= 1");
  MS_CHECK(a.redundant >= 0, "--redundant-experts must be >= 0");
  const moe::ExpertCounts counts = moe::ExpertCounts::load(a.load);
  const moe::PlacementTable table = counts.rebalance(a.ranks, a.redundant);
  table.save(a.out);
  std::fprintf(stderr, "wrote a placement of %d experts (+%d replicas) over %d ranks to %s\n",
               counts.n_experts(), a.redundant, a.ranks, a.out.c_str());
}
}  // namespace

void register_placement_command(CLI::App& app) {
  auto a = std::make_shared<PlanArgs>();
  CLI::App* c = app.add_subcommand(
      "plan-placement",
      "Balance routed experts over ranks from a recorded load (--expert-load-out)");
  c->add_option("--load", a->load, "Per-expert routed token counts (JSON, from --expert-load-out)")
      ->required();
  c->add_option("--ranks", a->ranks, "Expert-parallel ranks")->required();
  c->add_option("--redundant-experts", a->redundant,
                "Extra replicas of routed experts, given to the most loaded ones")
      ->capture_default_str();
  c->add_option("--out", a->out, "Placement file to write (for --placement)")
      ->required()
      ->type_name("FILE");
  c->callback([a] { run_plan(*a); });
}

}  // namespace moeserve::cli
