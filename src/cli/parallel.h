// The process group a command runs in and the model loaded under it. Without mpirun: one
// process, no expert parallelism. Under `mpirun -np N`: N ranks share the routed experts
// (placement: contiguous ranges, an EPLB-style balance with --redundant-experts, or a
// --placement file), and every failure while loading ends all ranks with one clear message.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>

#include "comm/communicator.h"
#include "core/thread_pool.h"
#include "model/model.h"

namespace moeserve::cli {

struct ParallelArgs {
  int redundant_experts = 0;
  std::string placement_file;   // JSON placement table to use
  std::string expert_load_out;  // where to write per-expert routed token counts at the end
  int threads = 0;
  std::string ep_transport = "auto";      // auto (shared memory on one node) or messages
  std::string ep_overlap = "on";          // two overlapped micro-batches per MoE layer in prefill
  std::string ep_dispatch_dtype = "f32";  // f32, or fp8 rows with a per-token scale
  bool mmap = false;      // serve / bench: read the weights from the mapped checkpoint, no copy
  std::string precision;  // add_precision_option; the loaded model takes it
};

void add_parallel_flags(CLI::App* cmd, ParallelArgs& a);

class ParallelModel {
 public:
  // Joins the process group and loads the model: (the group, then) load(model_dir).
  ParallelModel(const std::string& model_dir, const ParallelArgs& a);
  // Joins the process group only; call load() later.
  explicit ParallelModel(const ParallelArgs& a);
  ~ParallelModel();

  // Collective over the world, before load(): the model's expert-parallel group becomes the
  // ranks with the same color (default: all ranks).
  void split_group(int color);
  void load(const std::string& model_dir);

  // The model's group (the world unless split_group was called), and all ranks of the launch.
  comm::Communicator& comm() { return *comm_; }
  comm::Communicator& world() { return *world_; }
  bool is_root() const { return world_->rank() == 0; }
  model::Model& model() { return *model_; }
  const ThreadPool& pool() const { return *pool_; }
  // Runs fn on every rank of the launch; an error on any rank becomes the same error on all.
  void check_all(const std::function<void()>& fn) { comm::check_all(*world_, fn); }
  // Writes the per-expert routed token counts of all ranks (rank 0) when asked to.
  void write_expert_load();

 private:
  ParallelArgs args_;
  std::unique_ptr<comm::Communicator> world_, group_;
  comm::Communicator* comm_ = nullptr;
  std::unique_ptr<ThreadPool> pool_;
  std::optional<model::ExpertParallel> ep_;
  std::unique_ptr<model::Model> model_;
};

}  // namespace moeserve::cli
