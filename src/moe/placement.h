// Expert placement: which rank holds which routed experts, as a logical-to-physical map.
//
// A layer has n_experts logical experts and n_experts + n_redundant physical slots, spread over
// the ranks as evenly as possible (the first (total % ranks) ranks hold one slot more). A rank
// holds at most one copy of an expert. Slots are numbered per rank: local slot j of rank r holds
// experts_on(r)[j]. Any copy of an expert computes the same rows bit for bit, so which copy a
// token uses (choose) never changes a result, only the load.
//
// balanced() is EPLB-style: from recorded per-expert token counts it gives the extra copies to
// the experts with the highest load per copy, then packs the copies onto ranks largest first,
// each into the least-loaded rank that has a free slot and no copy of that expert yet.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "comm/communicator.h"

namespace moeserve::moe {

// One physical copy of an expert.
struct Replica {
  int32_t rank = 0;  // rank that holds it
  int32_t slot = 0;  // local slot on that rank
  bool operator==(const Replica&) const = default;
};

class Placement {
 public:
  Placement() = default;
  // rank_experts[r][j]: the logical expert in local slot j of rank r. Throws moeserve::Error
  // unless every expert of [0, n_experts) is held somewhere and no rank holds one twice.
  Placement(int32_t n_experts, std::vector<std::vector<int32_t>> rank_experts);

  // Experts in ascending blocks: rank r holds a contiguous range, sizes differ by at most one.
  static Placement contiguous(int32_t n_experts, int32_t n_ranks);
  // EPLB from load [n_experts] (token counts, >= 0): n_redundant extra copies, balanced ranks.
  // Deterministic: ties go to the lower expert id and the lower rank.
  static Placement balanced(std::span<const double> load, int32_t n_ranks, int32_t n_redundant);

  int32_t n_experts() const { return n_experts_; }
  int32_t n_ranks() const { return static_cast<int32_t>(ranks_.size()); }
  int32_t n_physical() const { return static_cast<int32_t>(n_physical_); }
  int32_t n_redundant() const { return n_physical() - n_experts_; }
  int32_t max_slots() const { return max_slots_; }  // most slots on one rank

  // [slots of rank] the logical expert in each local slot.
  std::span<const int32_t> experts_on(int32_t rank) const { return ranks_[rank]; }
  // The copies of an expert, ascending rank.
  std::span<const Replica> replicas(int32_t expert) const {
    return {replicas_.data() + replica_begin_[expert],
            static_cast<size_t>(replica_begin_[expert + 1] - replica_begin_[expert])};
  }
  // The copy that token `token` (its index on own_rank) of own_rank uses: the one on own_rank
  // if there is one, else copy (token + own_rank) mod copies. A pure function of its arguments.
  Replica choose(int32_t expert, int32_t own_rank, int64_t token) const;

  // A hash of the map, equal on ranks that hold equal placements.
  uint64_t fingerprint() const;
  // Sum of the expert loads per rank ([n_ranks]), each copy taking load / copies.
  std::vector<double> rank_loads(std::span<const double> load) const;

  // {"n_experts": E, "ranks": [[experts of rank 0], ...]}
  nlohmann::json to_json() const;
  static Placement from_json(const nlohmann::json& j);

  bool operator==(const Placement& o) const {
    return n_experts_ == o.n_experts_ && ranks_ == o.ranks_;
  }

 private:
  int32_t n_experts_ = 0, max_slots_ = 0;
  int64_t n_physical_ = 0;
  std::vector<std::vector<int32_t>> ranks_;  // [n_ranks][slots] logical expert per local slot
  std::vector<int64_t> replica_begin_;       // [n_experts + 1] into replicas_
  std::vector<Replica> replicas_;            // [n_physical] grouped by expert, ascending rank
};

// The placements of all MoE layers of a model: what a placement file holds. A layer without its
// own placement uses the default one.
class PlacementTable {
 public:
  void set(int64_t layer, Placement p);
  void set_default(Placement p);
  // Throws moeserve::Error when the layer has no placement and there is no default.
  const Placement& at(int64_t layer) const;
  const std::map<int64_t, Placement>& layers() const { return layers_; }
  const std::optional<Placement>& fallback() const { return default_; }

  // Boundary check against the model and the instance, with a message naming the file's values.
  void validate(int32_t n_experts, int32_t n_ranks) const;

  // {"format": "moeserve-placement", "version": 1, "n_experts": E, "n_ranks": R,
  //  "default": [[...], ...], "layers": {"3": [[...], ...], ...}}
  nlohmann::json to_json() const;
  static PlacementTable from_json(const nlohmann::json& j);
  void save(const std::string& path) const;
  static PlacementTable load(const std::string& path);

 private:
  void check_shape(const Placement& p) const;
  std::optional<Placement> default_;
  std::map<int64_t, Placement> layers_;
};

// Per-layer, per-expert token counts recorded from the router: the input of rebalancing.
class ExpertCounts {
 public:
  ExpertCounts() = default;
  ExpertCounts(int64_t n_layers, int32_t n_experts);

  // experts: [n] logical expert ids (a router's [tokens, top_k] output, flattened).
  void record(int64_t layer, const int32_t* experts, int64_t n);
  // Collective: every rank ends with the sum over ranks.
  void reduce(comm::Communicator& comm);
  std::span<const int64_t> layer(int64_t l) const {
    return {counts_.data() + l * n_experts_, static_cast<size_t>(n_experts_)};
  }
  int64_t n_layers() const { return n_layers_; }
  int32_t n_experts() const { return n_experts_; }

  // balanced() for every layer with counts; n_redundant extra copies each.
  PlacementTable rebalance(int32_t n_ranks, int32_t n_redundant) const;

  // {"format": "moeserve-expert-counts", "version": 1, "n_experts": E, "n_layers": L,
  //  "layers": {"3": [E counts], ...}} (layers without any count are left out)
  nlohmann::json to_json() const;
  static ExpertCounts from_json(const nlohmann::json& j);
  void save(const std::string& path) const;
  static ExpertCounts load(const std::string& path);

 private:
  int64_t n_layers_ = 0;
  int32_t n_experts_ = 0;
  std::vector<int64_t> counts_;  // [n_layers, n_experts]
};

}  // namespace moeserve::moe
