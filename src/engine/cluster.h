// Serving across the ranks of an mpirun launch.
//
// Every rank runs a ClusterWorker (cluster_worker.h): a Scheduler over its own KV pool,
// stepping in lockstep with the other ranks of its expert-parallel group (each step every rank
// of the group runs one forward, an empty one when it has nothing to do, because the MoE
// exchanges need all of them). World rank 0 also runs the ClusterFrontEnd
// (cluster_front_end.h), the engine::Service the HTTP server talks to: it routes each request to
// a rank, forwards cancellations, and puts the ranks' token events back in order. Control
// traffic goes through a comm::Mailbox (messages: cluster_protocol.h); nothing waits for another
// rank's compute loop.
//
// Colocated (default): one group of all ranks; each request runs on one rank (attention is
// data-parallel), chosen least-loaded (KV blocks in use and unfinished requests) or round-robin.
//
// Disaggregated (prefill_ranks + decode_ranks = world size): ranks [0, P) form the prefill
// group, [P, P + D) the decode group, each its own expert-parallel group. A request is prefilled
// on a prefill rank, which samples and streams the first token, then hands it to a decode rank:
// request, block list, token count, first token and sampler state. With one-sided transfer
// (default) the KV pools are exposed as a window once at start-up; the decode rank allocates
// blocks, reads the prefill rank's blocks with passive-target gets and acknowledges, and the
// prefill rank frees its blocks on the acknowledgement (or when their lease runs out). With
// two-sided transfer the prefill rank copies the blocks into the handoff message and frees them
// at once. A read that does not finish within the transfer timeout fails its request.
//
// Faults: every rank sends the front end a heartbeat from a thread of its own. A rank heard
// from for none of the peer timeout is reported by health_problem() (so /health answers 503),
// and the requests that need its group (which waits for it in every step) fail with an error
// naming it, the open ones at once and new ones on arrival, until it answers again.
#pragma once

#include "engine/cluster_config.h"
#include "engine/cluster_front_end.h"
#include "engine/cluster_worker.h"
