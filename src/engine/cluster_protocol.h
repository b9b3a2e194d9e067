// The messages between the cluster's front end (world rank 0) and its workers (every rank), as
// the files of the cluster (cluster_*.cpp) write and read them. Internal to the engine.
//
// Tags: workers read kToWorker (Assign, Cancel, Handoff, Ack, Stop, Exit), the front end reads
// kToFrontEnd (Events, Stats, Alive, Bye). Every message starts with its Msg kind and an id
// (0 where it names no request).
//
// Shutdown, so that every message posted is also taken (a rank that stopped reading would leave
// a large send of another rank waiting forever): the front end sends Stop; each worker finishes
// what it runs as cancelled, posts its last events, stops its heartbeat and posts Bye with the
// number of worker messages it posted to each rank. With every Bye in, the front end sends each
// rank Exit carrying how many worker messages were posted to it in all (the Exit included); a
// worker keeps reading (and dropping) its messages until it has taken that many.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/request.h"
#include "engine/wire.h"

namespace moeserve::engine::cluster {

using Clock = std::chrono::steady_clock;

constexpr int kToWorker = 1, kToFrontEnd = 2;

enum class Msg : uint8_t {
  Assign = 1,  // front end -> prefill (or colocated) rank: id, decode rank (-1), request
  Cancel,      // front end -> rank: id
  Handoff,     // prefill rank -> decode rank: id, request, tokens, blocks, sampler state, bytes
  Ack,         // decode rank -> prefill rank: id (its blocks may be freed)
  Stop,        // front end -> rank
  Events,      // rank -> front end: count, then token and finish events
  Stats,       // rank -> front end: gauges and counters
  Bye,         // rank -> front end: worker messages posted to each rank
  Alive,       // rank -> front end: the heartbeat
  Exit,        // front end -> rank: worker messages posted to it in all
};
enum class Ev : uint8_t { Token = 0, Finish = 1 };

inline double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

inline Clock::duration seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

void put_request(wire::Writer& w, const Request& r);
// The fields put_request wrote, into `r` (whose callbacks stay as they are). A constraint is
// compiled with `compile` (EngineConfig::compile_constraint).
void read_request(wire::Reader& rd, Request& r, const ConstraintCompiler& compile);

// Seconds as milliseconds with at most one decimal ("100", "2.5").
std::string ms(double s);

// A message of its kind and id only.
std::vector<std::byte> simple(Msg m, uint64_t id = 0);

}  // namespace moeserve::engine::cluster
