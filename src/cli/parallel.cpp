#include "cli/parallel.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "cli/common.h"
#include "core/error.h"

namespace moeserve::cli {

void add_parallel_flags(CLI::App* cmd, ParallelArgs& a) {
  cmd->add_option("--threads", a.threads, "Worker threads per rank (0 = cores / ranks)")
      ->capture_default_str();
  cmd->add_option("--redundant-experts", a.redundant_experts,
                  "Extra replicas of routed experts, spread over the ranks (under mpirun)")
      ->capture_default_str();
  cmd->add_option("--placement", a.placement_file,
                  "Expert placement (JSON, from plan-placement) to use under mpirun");
  cmd->add_option(
      "--expert-load-out", a.expert_load_out,
      "Write per-expert routed token counts (JSON, for plan-placement) here at the end");
  cmd->add_option("--ep-transport", a.ep_transport,
                  "How MoE rows move between ranks: auto (shared memory when all ranks share "
                  "a node, else MPI all-to-alls) or messages (always MPI all-to-alls)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "messages"}));
  cmd->add_option("--ep-overlap", a.ep_overlap,
                  "Prefill through MPI all-to-alls (not shared memory): run each MoE layer as "
                  "two micro-batches, one's exchange in flight while the other's experts "
                  "compute (on|off; the same output either way)")
      ->capture_default_str()
      ->check(CLI::IsMember({"on", "off"}));
  cmd->add_option("--ep-dispatch-dtype", a.ep_dispatch_dtype,
                  "How hidden rows travel to the experts through MPI all-to-alls: f32, or fp8 "
                  "(e4m3 with a scale per token: a quarter of the bytes, changes the output)")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "fp8"}));
  cmd->add_flag("--mmap", a.mmap,
                "Keep reading the weights from the mapped checkpoint; by default serve and bench "
                "copy them into memory first, which reads faster and uses no more memory");
  add_precision_option(cmd, &a.precision);
}

ParallelModel::ParallelModel(const std::string& dir, const ParallelArgs& a) : ParallelModel(a) {
  load(dir);
}

ParallelModel::ParallelModel(const ParallelArgs& a) : args_(a) {
  world_ = comm::world();
  comm_ = world_.get();
  int threads = a.threads;
  if (threads <= 0 && world_->size() > 1)  // ranks on one machine share its cores
    threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / world_->size());
  pool_ = std::make_unique<ThreadPool>(threads);
}

void ParallelModel::split_group(int color) {
  group_ = world_->split(color, world_->rank());
  comm_ = group_.get();
}

void ParallelModel::load(const std::string& dir) {
  const ParallelArgs& a = args_;
  check_all([&] {
    const kernels::Precision precision = parse_precision(a.precision);
    MS_CHECK(a.redundant_experts >= 0, "--redundant-experts must be >= 0");
    if (comm_->size() == 1) {
      MS_CHECK(a.redundant_experts == 0 && a.placement_file.empty(),
               "--redundant-experts and --placement need several ranks in the expert-parallel "
               "group (mpirun -np N)");
      model_ = std::make_unique<model::Model>(dir, *pool_);
      model_->set_precision(precision);
      return;
    }
    const model::ModelConfig cfg = model::ModelConfig::load(dir);
    model::ExpertParallel ep;
    ep.comm = comm_;
    ep.transport = a.ep_transport == "messages" ? moe::Transport::Messages : moe::Transport::Auto;
    ep.overlap = a.ep_overlap == "on";
    ep.fp8_dispatch = a.ep_dispatch_dtype == "fp8";
    const auto E = static_cast<int32_t>(cfg.n_routed_experts);
    if (!a.placement_file.empty()) {
      ep.placement = moe::PlacementTable::load(a.placement_file);
    } else if (E > 0 && a.redundant_experts > 0) {
      const std::vector<double> uniform(E, 1.0);
      ep.placement.set_default(
          moe::Placement::balanced(uniform, comm_->size(), a.redundant_experts));
    }
    ep_ = std::move(ep);
    model_ = std::make_unique<model::Model>(dir, *pool_, &*ep_);
    model_->set_precision(precision);
  });
}

ParallelModel::~ParallelModel() = default;

void ParallelModel::write_expert_load() {
  if (args_.expert_load_out.empty()) return;
  const model::ModelConfig& c = model_->config();
  const std::vector<int64_t> counts = model_->expert_token_counts();  // [layers, experts]
  moe::ExpertCounts ec(c.num_hidden_layers, static_cast<int32_t>(c.n_routed_experts));
  // Record each count as that many one-expert entries, in chunks.
  std::vector<int32_t> ids;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      ids.assign(static_cast<size_t>(counts[l * c.n_routed_experts + e]), static_cast<int32_t>(e));
      if (!ids.empty()) ec.record(l, ids.data(), static_cast<int64_t>(ids.size()));
    }
  }
  ec.reduce(*world_);  // every rank of the launch: under serve --prefill-ranks, both groups
  if (is_root()) ec.save(args_.expert_load_out);
}

}  // namespace moeserve::cli
