// How the ranks of an mpirun launch serve: layout, routing, KV transfer and fault limits.
#pragma once

#include <string>

#include "engine/request.h"

namespace moeserve::engine {

enum class RoutePolicy { LeastLoaded, RoundRobin };
enum class KvTransferMode { OneSided, TwoSided };

struct ClusterConfig {
  EngineConfig engine;    // per rank
  int prefill_ranks = 0;  // 0 and 0: colocated
  int decode_ranks = 0;
  RoutePolicy route = RoutePolicy::LeastLoaded;
  KvTransferMode transfer = KvTransferMode::OneSided;
  double transfer_timeout_s = 10;  // a KV read that takes longer fails its request
  double lease_s = 60;             // a prefill rank keeps handed-off blocks at most this long
  double idle_sleep_s = 0.0005;    // a group with nothing to run checks again after this
  // A rank the front end hears nothing from (not even its heartbeat) for this long is reported
  // by health_problem(), and the requests that need its expert-parallel group fail; it is
  // also how long shutdown waits for a silent rank before ending the job.
  double peer_timeout_s = 5;

  bool disaggregated() const { return prefill_ranks > 0; }
  // The group (0: prefill or colocated, 1: decode) of a world rank.
  int group_of(int world_rank) const {
    return disaggregated() && world_rank >= prefill_ranks ? 1 : 0;
  }
  // "colocated", "prefill" or "decode".
  std::string role_of(int world_rank) const;
  // How often every rank tells the front end it is alive.
  double heartbeat_s() const;
  // Throws moeserve::Error unless the layout fits a world of `world_size` ranks.
  void validate(int world_size) const;
};

}  // namespace moeserve::engine
