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

#include <cstdint>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "moe/placement.h"

namespace moeserve::moe {

// How hidden rows travel in dispatch (combine always returns one row per (token, expert)).
enum class DispatchMode : int32_t {
  // A token goes once to each rank that holds any of its experts, with a bitmask of its other
  // slots there; the row lands in its first slot and the receiver copies it to the others.
  // Fewer bytes: top-8 of 256 experts on 8 ranks sends ~5.3 rows per token instead of 8. The
  // default.
  PerRank = 0,
  // A token goes once per (token, expert) pair; MPI writes each row straight into its slot's
  // place, no copy on the receiver, more bytes.
  PerExpert = 1,
};

// The handle of one exchange: made by Dispatcher::plan, read by dispatch and combine.
//
// Travel order of the pairs a rank sends to rank d (also the order combine brings the outputs
// back in): by d's local slot; within a slot, the leaders first (ascending token), then the
// other pairs by (their leader's slot, token). The leader of a (token, rank) is its pair of
// lowest k on that rank, and only leaders' rows travel: they land in place, at the start of
// their cell, and the receiver copies each to the token's other slots there (PerRank). In
// PerExpert every pair leads.
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

  int64_t n_recv() const { return slot_offset.empty() ? 0 : slot_offset.back(); }
  int64_t slot_count(int32_t j) const { return slot_offset[j + 1] - slot_offset[j]; }
  int64_t n_pairs_sent() const { return pair_offset.empty() ? 0 : pair_offset.back(); }
  int64_t n_rows_sent() const { return row_offset.empty() ? 0 : row_offset.back(); }
};

// Runs plan / dispatch / combine on one communicator and keeps their buffers between layers.
// Not thread-safe; one per communicator.
class Dispatcher {
 public:
  explicit Dispatcher(comm::Communicator& comm, DispatchMode mode = DispatchMode::PerRank);

  // Collective. experts: [n_tokens, top_k] logical ids, strictly ascending per token (the
  // router's output); weights: [n_tokens, top_k] f32. When any rank's input is invalid, or the
  // ranks disagree on the placement, hidden size, top_k or mode, every rank throws
  // moeserve::Error (no hang).
  DispatchPlan plan(const Placement& placement, int64_t n_tokens, int64_t top_k, int64_t hidden,
                    const int32_t* experts, const float* weights);

  // Collective. hidden: [n_tokens, hidden] f32. Returns [plan.n_recv(), hidden] f32, grouped
  // by local slot (plan.slot_offset), valid until the next dispatch on this Dispatcher.
  const float* dispatch(const DispatchPlan& plan, const float* hidden);

  // A buffer [plan.n_recv(), hidden] f32 for the expert outputs, valid until the next call.
  float* expert_out(const DispatchPlan& plan);

  // Collective. expert_out: [plan.n_recv(), hidden] f32, row i the expert's output for row i of
  // dispatch's result. out: [n_tokens, hidden] f32, the weighted sum per token.
  void combine(const DispatchPlan& plan, const float* expert_out, float* out);

  comm::Communicator& comm() { return comm_; }
  DispatchMode mode() const { return mode_; }

  // Seconds the last plan / dispatch / combine spent inside their all-to-all; the rest of each
  // call is local work (planning, the PerRank copy to slots, the weighted sum).
  struct Timing {
    double plan = 0, dispatch = 0, combine = 0;
  };
  const Timing& exchange_seconds() const { return timing_; }

 private:
  template <class T>
  struct Buffer {  // grows, never shrinks, never initialized
    std::unique_ptr<T[]> p;
    size_t n = 0;
    T* get(size_t want) {
      if (want > n) p.reset(new T[want]), n = want;
      return p.get();
    }
  };

  comm::Communicator& comm_;
  DispatchMode mode_;
  Buffer<float> x_;         // [n_recv, H] dispatch result
  Buffer<uint64_t> masks_;  // [recv rows, mask_words] PerRank
  Buffer<float> y_;         // [n_recv, H] expert_out()
  Buffer<float> back_;      // [n_pairs_sent, H] combine: outputs back, in travel order
  comm::Segments send_, recv_;
  Timing timing_;
};

}  // namespace moeserve::moe
