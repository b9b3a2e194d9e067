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
  std::string ep_transport = "auto";  // auto (shared memory on one node) or messages
};

void add_parallel_flags(CLI::App* cmd, ParallelArgs& a);

class ParallelModel {
 public:
  // Joins the process group and loads the model: (the group, then) load(model_dir).
  ParallelModel(const std::string& model_dir, const ParallelArgs& a);
  // Joins the process group only; call load() later.
  explicit ParallelModel(const ParallelArgs& a);
  ~ParallelModel();

  void load(const std::string& model_dir);

  comm::Communicator& comm() { return *comm_; }
  bool is_root() const { return comm_->rank() == 0; }
  model::Model& model() { return *model_; }
  const ThreadPool& pool() const { return *pool_; }
  // Runs fn on every rank; an error on any rank becomes the same error on all of them.
  void check_all(const std::function<void()>& fn) { comm::check_all(*comm_, fn); }
  // Writes the per-expert routed token counts of all ranks (rank 0) when asked to.
  void write_expert_load();

 private:
  ParallelArgs args_;
  std::unique_ptr<comm::Communicator> comm_;
  std::unique_ptr<ThreadPool> pool_;
  std::optional<model::ExpertParallel> ep_;
  std::unique_ptr<model::Model> model_;
};

}  // namespace moeserve::cli
