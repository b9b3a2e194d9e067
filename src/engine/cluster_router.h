// How the cluster's front end chooses a rank for a request: least-loaded or round-robin, and,
// with prefix caching on (least-loaded only), the rank that most likely holds the start of the
// prompt in its prefix cache, while its load stays close to the least-loaded one's.
//
// The front end cannot see the ranks' caches; it remembers which prompt blocks (their prefix
// keys, kv::prefix_block_key) it sent to each rank, at most as many per rank as the rank's pool
// has blocks, forgetting the least recently sent first. That follows the ranks' own
// least-recently-used eviction closely enough to route by; a wrong guess costs only the
// recomputation, never a wrong output (the rank's own cache decides what is reused).
#pragma once

#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

#include "engine/cluster_config.h"

namespace moeserve::engine {

struct RankLoad {
  int64_t assigned = 0;  // unfinished requests routed to the rank
  int64_t kv_used = 0, kv_total = 0;
};

class Router {
 public:
  // A prefix rank is taken while its load score (unfinished requests over max_num_seqs, plus
  // the used fraction of its KV pool) is at most this much above the least-loaded rank's.
  static constexpr double kPrefixLoadSlack = 0.5;

  Router(const ClusterConfig& cfg, int n_ranks);

  // The keys of the prompt's full blocks a rank may reuse (all but a last token's block).
  std::vector<uint64_t> keys_of(const std::vector<int32_t>& prompt) const;
  // A rank of [first, first + count) for a request whose prompt blocks have `keys`; remembers
  // that the chosen rank holds them.
  int pick(int first, int count, const std::vector<RankLoad>& loads,
           const std::vector<uint64_t>& keys);
  // Leading keys remembered for `rank`.
  int64_t depth(int rank, const std::vector<uint64_t>& keys) const;
  // Requests sent to a rank for its prefix rather than to the least-loaded rank.
  int64_t prefix_routed() const { return prefix_routed_; }

 private:
  struct Seen {
    std::list<uint64_t> order;  // most recently sent first
    std::unordered_map<uint64_t, std::list<uint64_t>::iterator> at;
  };
  void remember(int rank, const std::vector<uint64_t>& keys, int64_t capacity);

  RoutePolicy policy_;
  int64_t max_num_seqs_, block_size_;
  bool by_prefix_;
  std::vector<Seen> seen_;
  int rr_[2] = {0, 0};
  int64_t prefix_routed_ = 0;
};

}  // namespace moeserve::engine
