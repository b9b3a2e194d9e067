// Expert-parallel MoE exchange, plan then run (DeepEP's handle, CANN's MoeDistributeDispatch /
// MoeDistributeCombine):
//
//   plan      every rank: router output -> (token, expert) pairs, each to one copy of its expert
//             (Placement::choose), sorted by (destination rank, local slot, token); per-slot
//             counts exchanged with one all-to-all of fixed size.
//   dispatch  one all-to-all: hidden rows to the ranks that hold their experts. The result on
//             each rank is grouped by LOCAL slot: slot j's rows come from rank 0, 1, ... and,
//             within a rank, in its token order.
//   (caller)  runs each local expert on its rows.
//   combine   one all-to-all back: the output row of every (token, expert) pair to the token's
//             rank (pairs a rank sends itself are read in place), then out[t] = sum over k in
//             ascending expert id of y[t,k] * w[t,k], as acc = acc + y * w from 0.0f. That is the
//             order of the single-process MoE layer, so the result is bit-identical to it for any
//             number of ranks, any placement, with or without redundant copies, whatever else is in
//             the batch (the expert kernels must compute a row the same whatever the other rows
//             are).
//
// Every rank enters plan, dispatch and combine of every MoE layer, also with zero tokens.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "core/aligned.h"
#include "moe/placement.h"

namespace moeserve::moe {

// How hidden rows travel in dispatch (combine always returns one row per (token, expert)).
enum class DispatchMode : int32_t {
  // A token goes once to each rank that holds any of its experts, with a bitmask of its other
  // slots there; the row lands in its first slot and the others point to it.
  // Fewer bytes: top-8 of 256 experts on 8 ranks sends ~5.3 rows per token instead of 8. The
  // default.
  PerRank = 0,
  // A token goes once per (token, expert) pair; MPI writes each row straight into its slot's
  // place, no copy on the receiver, more bytes.
  PerExpert = 1,
};

// How the rows move between ranks.
enum class Transport : int32_t {
  // Through shared memory when every rank maps the others' memory (all ranks on one node):
  // each rank publishes its hidden rows once in its segment and the experts read them there,
  // combine reads the expert outputs where the expert ranks wrote them while it sums.
  // Otherwise, as Messages. The default.
  Auto = 0,
  // MPI all-to-alls (Communicator::all_to_all_matched: one contiguous block per peer, or cells
  // sent from and into place), on one node or across nodes.
  Messages = 1,
};

// The handle of one exchange: made by Dispatcher::plan, read by dispatch and combine.
//
// Travel order of the pairs a rank sends to rank d (also the order combine brings the outputs
// back in): by d's local slot; within a slot, the leaders first (ascending token), then the
// other pairs by (their leader's slot, token). The leader of a (token, rank) is its pair of
// lowest k on that rank, and only leaders' rows travel: they land in place, at the start of
// their cell, and the token's other slots there point to that row (PerRank). In PerExpert
// every pair leads.
struct DispatchPlan {
  DispatchMode mode = DispatchMode::PerRank;
  int32_t rank = 0, n_ranks = 0;
  int64_t n_tokens = 0, top_k = 0, hidden = 0;
  std::vector<float> weight;  // [n_tokens, top_k] the router weights, copied

  // Send side: this rank's pairs and rows.
  std::vector<int64_t> pair_offset;  // [n_ranks + 1] pairs to each rank
  std::vector<int32_t> pair_token;   // [n_tokens * top_k] token of each pair in travel order
  std::vector<int64_t> pair_pos;     // [n_tokens, top_k] travel position of pair (t, k); combine
                                     // finds its output row there
  std::vector<int64_t> row_offset;   // [n_ranks + 1] rows (leaders) to each rank
  std::vector<int32_t> row_token;    // [rows] token of each row, in travel order
  int32_t mask_words = 0;            // PerRank: 64-bit words per row mask (0 in PerExpert)
  std::vector<uint64_t> row_mask;    // [rows, mask_words] bit j: the row also feeds the
                                     // destination's local slot j

  // Receive side: this rank's local slots. Row layout: slot, then source rank (a cell), then
  // the source's travel order.
  int32_t n_slots = 0;                   // local slots of this rank
  std::vector<int32_t> slot_expert;      // [n_slots] logical expert of each local slot
  std::vector<int64_t> recv_count;       // [n_ranks, n_slots] rows of cell (s, j)
  std::vector<int64_t> lead_count;       // [n_ranks, n_slots] of them, rows that travel
  std::vector<int64_t> cell_offset;      // [n_ranks, n_slots] first row of cell (s, j)
  std::vector<int64_t> slot_offset;      // [n_slots + 1] slot j: rows [slot_offset[j], [j+1])
  std::vector<int64_t> recv_row_offset;  // [n_ranks + 1] travelling rows from each rank
  std::vector<int64_t> self_row;         // [pairs to this rank] their rows in this rank's cells:
                                         // combine reads them in place

  // Shared-memory transport: where the exchange's data lie in every rank's segment (one layout
  // for all ranks: pair_offset [R + 1] i64 at 0, then the cell table [R, seg_slots] i64, the
  // pair tokens [pairs] i32, the hidden rows [tokens, H] f32, the expert outputs [n_recv, H] f32,
  // each sized for the largest rank).
  bool shared = false;
  uint64_t id = 0;  // plans of one Dispatcher are numbered; shared: only the latest one runs
  int64_t seg_slots = 0;
  size_t off_cells = 0, off_tokens = 0, off_input = 0, off_output = 0;
  std::vector<int64_t> send_cell_start;  // [n_ranks, seg_slots] travel position of the first
                                         // pair to (rank, slot)

  int64_t n_recv() const { return slot_offset.empty() ? 0 : slot_offset.back(); }
  int64_t slot_count(int32_t j) const { return slot_offset[j + 1] - slot_offset[j]; }
  int64_t n_pairs_sent() const { return pair_offset.empty() ? 0 : pair_offset.back(); }
  int64_t n_rows_sent() const { return row_offset.empty() ? 0 : row_offset.back(); }
};

// Runs plan / dispatch / combine on one communicator and keeps their buffers between layers.
// Not thread-safe; one per communicator.
class Dispatcher {
 public:
  explicit Dispatcher(comm::Communicator& comm, DispatchMode mode = DispatchMode::PerRank,
                      Transport transport = Transport::Auto);

  // Collective. experts: [n_tokens, top_k] logical ids, strictly ascending per token (the
  // router's output); weights: [n_tokens, top_k] f32. When any rank's input is invalid, or the
  // ranks disagree on the placement, hidden size, top_k or mode, every rank throws
  // moeserve::Error (no hang).
  DispatchPlan plan(const Placement& placement, int64_t n_tokens, int64_t top_k, int64_t hidden,
                    const int32_t* experts, const float* weights);

  // Collective. hidden: [n_tokens, hidden] f32. Returns plan.n_recv() row pointers, grouped
  // by local slot (plan.slot_offset), each to hidden f32 values, 64-byte aligned when `hidden`
  // is and hidden % 16 == 0 (what the expert kernels read in place, kernels::MatmulJob::xrows). A
  // token with several experts here is one row, pointed to by each of its slots: nothing is copied
  // per (token, expert) pair. With shared memory the rows are the source ranks' own, in their
  // segments: nothing is copied at all. With messages, this rank's own tokens' rows point into
  // `hidden` (not copied): keep it unchanged until combine. Valid until the next plan on this
  // Dispatcher.
  // The plan must be this Dispatcher's latest (checked with the shared-memory transport).
  const float* const* dispatch(const DispatchPlan& plan, const float* hidden);

  // dispatch in two halves, so that the exchange is in flight while the caller computes
  // something else (Model's two micro-batches): dispatch_start packs and posts the exchange and
  // returns at once; dispatch_finish waits for it and returns what dispatch returns. Between
  // them, call progress() now and then. `hidden` stays unchanged until combine. With shared
  // memory, dispatch_start does all of it. One exchange per Dispatcher at a time: use one
  // Dispatcher per micro-batch.
  void dispatch_start(const DispatchPlan& plan, const float* hidden);
  const float* const* dispatch_finish(const DispatchPlan& plan);

  // A buffer [plan.n_recv(), hidden] f32 for the expert outputs, valid until the next plan.
  // With the shared-memory transport it lies in the shared segment, where combine's readers
  // find it without a copy; write it only between dispatch and combine.
  float* expert_out(const DispatchPlan& plan);

  // Collective, once after each dispatch, with the same plan. expert_out: [plan.n_recv(),
  // hidden] f32, row i the expert's output for row i of dispatch's result (best: the buffer
  // expert_out() returned; any other is copied there first with shared memory). out:
  // [n_tokens, hidden] f32, the weighted sum per token.
  void combine(const DispatchPlan& plan, const float* expert_out, float* out);
  // combine in two halves, as dispatch_start / dispatch_finish: expert_out stays unchanged
  // until combine_finish, which waits for the rows and writes out. With shared memory,
  // combine_finish does all of it.
  void combine_start(const DispatchPlan& plan, const float* expert_out);
  void combine_finish(const DispatchPlan& plan, float* out);
  // Lets the exchange in flight (between a *_start and its *_finish) move data; never blocks.
  // True when it is complete or none is in flight.
  bool progress();

  // Messages transport: hidden rows travel as fp8 e4m3 with one f32 scale per row (moe/
  // fp8_rows.h), a quarter of the bytes; every row that feeds an expert, a rank's own too, is
  // the fp8 round trip of the token's row, so the result is the same for any number of ranks
  // but not the f32 one. Combine is unchanged. No effect with shared memory (no row travels).
  // Set alike on every rank (plan checks it), before a plan.
  void set_fp8_dispatch(bool on) { fp8_ = on; }
  bool fp8_dispatch() const { return fp8_; }

  comm::Communicator& comm() { return comm_; }
  DispatchMode mode() const { return mode_; }
  // Whether the exchanges go through shared memory (known after the first plan, or after
  // resolve_transport).
  bool shared() const { return shm_ != nullptr; }
  // Collective: with Transport::Auto, asks now (as the first plan would) whether the ranks
  // share memory; nothing when that is known already.
  void resolve_transport();

  // Seconds the last plan / dispatch / combine spent exchanging. Messages: inside their
  // all-to-all (posting it, progress() calls while it was in flight, waiting for it); the rest
  // of each call is local work (planning, the PerRank row pointers, the weighted sum). Shared
  // memory: plan's all-to-all, all of dispatch (publishing the rows), all of combine (the sum reads
  // the other ranks' rows: transfer and sum at once).
  struct Timing {
    double plan = 0, dispatch = 0, combine = 0;
  };
  const Timing& exchange_seconds() const { return timing_; }

 private:
  // Grows, never shrinks, never initialized; 64-byte aligned, so the expert kernels read the
  // received rows in place.
  template <class T>
  struct Buffer {
    struct Free {
      void operator()(T* q) const { Aligned64<T>().deallocate(q, 0); }
    };
    std::unique_ptr<T, Free> p;
    size_t n = 0;
    T* get(size_t want) {
      if (want > n) p.reset(Aligned64<T>().allocate(std::max<size_t>(want, 1))), n = want;
      return p.get();
    }
  };

  // Shared memory: lays out and (collectively) grows the segments for plan p.
  void share_layout(DispatchPlan& p, const std::vector<int64_t>& got, int64_t W, int64_t S);
  void dispatch_shared(const DispatchPlan& p, const float* hidden);
  void combine_shared(const DispatchPlan& p, const float* expert_out, float* out);

  comm::Communicator& comm_;
  DispatchMode mode_;
  Transport transport_;
  bool shm_asked_ = false;                   // share() tried (the answer is shm_ or none)
  std::unique_ptr<comm::SharedMemory> shm_;  // every rank's segment
  size_t shm_bytes_ = 0;                     // each segment's size
  uint64_t plans_ = 0, dispatched_ = 0;      // latest plan id; id of the plan dispatched last
  bool synced_ = true;                       // no shared read since the last collective
  std::vector<const float*> src_;            // combine: output row of each travel position
  std::vector<const float*> rows_;           // [n_recv] dispatch result
  Buffer<float> y_;                          // [n_recv, H] expert_out()
  bool fp8_ = false;                         // set_fp8_dispatch
  Buffer<float> deq_;                        // fp8: [rows, H] the dequantized rows
  Buffer<float> back_;  // [n_pairs_sent, H] combine: outputs back, in travel order
  // Messages: one contiguous block per peer in each direction (dispatch: masks, then rows).
  Buffer<std::byte> send_buf_, recv_buf_;
  std::vector<size_t> send_counts_, send_displs_, recv_counts_, recv_displs_;  // [R] bytes
  comm::Segments send_, recv_;  // the pieces all_to_all_matched moves
  Timing timing_;
  // The exchange in flight (messages) and what its *_finish needs.
  enum class Phase { Idle, Dispatching, Combining };
  Phase phase_ = Phase::Idle;
  std::unique_ptr<comm::PendingExchange> pending_;
  const float* hidden_ = nullptr;      // dispatch_start's rows: this rank's own are read there
  const float* expert_out_ = nullptr;  // combine_start's
};

}  // namespace moeserve::moe
