// The cluster's settings and the helpers of its message format (cluster_protocol.h; requests
// are written and read in request_wire.cpp). The worker is in cluster_worker.cpp (its KV handoffs
// in cluster_transfer.cpp), the front end in cluster_front_end.cpp.
#include "engine/cluster.h"

#include <algorithm>
#include <cstdio>

#include "core/error.h"
#include "engine/cluster_protocol.h"

namespace moeserve::engine {

void ClusterConfig::validate(int world_size) const {
  MS_CHECK(prefill_ranks >= 0 && decode_ranks >= 0,
           "--prefill-ranks and --decode-ranks must be >= 0");
  MS_CHECK((prefill_ranks == 0) == (decode_ranks == 0),
           "give both --prefill-ranks and --decode-ranks (or neither, to run prefill and decode "
           "on every rank)");
  MS_CHECK(!disaggregated() || prefill_ranks + decode_ranks == world_size, "--prefill-ranks ",
           prefill_ranks, " + --decode-ranks ", decode_ranks, " must equal the ", world_size,
           " ranks of the launch (mpirun -np ", prefill_ranks + decode_ranks, ")");
  MS_CHECK(transfer_timeout_s > 0, "--kv-transfer-timeout-ms must be > 0");
  MS_CHECK(lease_s > 2 * transfer_timeout_s,
           "--kv-lease-ms must be more than twice --kv-transfer-timeout-ms");
  MS_CHECK(peer_timeout_s >= 0.05, "--peer-timeout-ms must be >= 50");
}

double ClusterConfig::heartbeat_s() const {
  return std::min(0.25, peer_timeout_s / 5);
}

std::string ClusterConfig::role_of(int world_rank) const {
  if (!disaggregated()) return "colocated";
  return group_of(world_rank) == 0 ? "prefill" : "decode";
}

namespace cluster {

std::string ms(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", s * 1e3);
  std::string r = b;
  if (r.size() > 2 && r.compare(r.size() - 2, 2, ".0") == 0) r.resize(r.size() - 2);
  return r;
}

std::vector<std::byte> simple(Msg m, uint64_t id) {
  wire::Writer w;
  w.put(m).put(id);
  return w.take();
}

}  // namespace cluster
}  // namespace moeserve::engine
