#include "engine/cluster_router.h"

#include "kv/kv_pool.h"

namespace moeserve::engine {

Router::Router(const ClusterConfig& cfg, int n_ranks)
    : policy_(cfg.route),
      max_num_seqs_(cfg.engine.max_num_seqs),
      block_size_(cfg.engine.block_size),
      by_prefix_(cfg.engine.prefix_caching && cfg.route == RoutePolicy::LeastLoaded),
      seen_(n_ranks) {}

std::vector<uint64_t> Router::keys_of(const std::vector<int32_t>& prompt) const {
  std::vector<uint64_t> keys;
  if (!by_prefix_ || prompt.empty()) return keys;
  const int64_t n = (static_cast<int64_t>(prompt.size()) - 1) / block_size_;
  uint64_t key = 0;
  for (int64_t i = 0; i < n; ++i) {
    key = kv::prefix_block_key(key, prompt.data() + i * block_size_, block_size_);
    keys.push_back(key);
  }
  return keys;
}

int64_t Router::depth(int rank, const std::vector<uint64_t>& keys) const {
  const Seen& s = seen_[rank];
  int64_t d = 0;
  while (d < static_cast<int64_t>(keys.size()) && s.at.count(keys[d])) ++d;
  return d;
}

void Router::remember(int rank, const std::vector<uint64_t>& keys, int64_t capacity) {
  Seen& s = seen_[rank];
  for (uint64_t k : keys) {
    auto it = s.at.find(k);
    if (it != s.at.end()) s.order.erase(it->second);
    s.order.push_front(k);
    s.at[k] = s.order.begin();
  }
  while (static_cast<int64_t>(s.order.size()) > capacity) {
    s.at.erase(s.order.back());
    s.order.pop_back();
  }
}

// Least-loaded: the fewest unfinished requests for its size, then the emptiest KV pool, then
// the lowest rank; a rank holding more of the prompt wins while it is within the slack.
int Router::pick(int first, int count, const std::vector<RankLoad>& loads,
                 const std::vector<uint64_t>& keys) {
  const int g = first == 0 ? 0 : 1;
  if (policy_ == RoutePolicy::RoundRobin) return first + (rr_[g]++ % count);
  auto score = [&](int r) {
    const RankLoad& s = loads[r];
    const double kv = s.kv_total > 0 ? static_cast<double>(s.kv_used) / s.kv_total : 0.0;
    return static_cast<double>(s.assigned) / max_num_seqs_ + kv;
  };
  int best = first;
  for (int r = first + 1; r < first + count; ++r)
    if (score(r) < score(best)) best = r;
  if (keys.empty()) return best;
  int chosen = best;
  int64_t chosen_depth = depth(best, keys);
  for (int r = first; r < first + count; ++r) {
    const int64_t d = depth(r, keys);
    if (d > chosen_depth && score(r) <= score(best) + kPrefixLoadSlack)
      chosen = r, chosen_depth = d;
  }
  if (chosen != best) ++prefix_routed_;
  const int64_t capacity = loads[chosen].kv_total > 0 ? loads[chosen].kv_total : 4096;
  remember(chosen, keys, capacity);
  return chosen;
}

}  // namespace moeserve::engine
