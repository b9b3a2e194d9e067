#include "moe/dispatch.h"

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/kernels.h"
#include "moe/fp8_rows.h"

namespace moeserve::moe {

// The build's -O2 vectorizes only loops without a remainder; these two are the quantized
// dispatch's cost per value, so they ask for the full vectorizer.
__attribute__((optimize("O3"))) float fp8_quantize_row(const float* x, int64_t n, uint8_t* q) {
  // amax as the largest |x| bit pattern (the same order for non-NaN floats; an integer max
  // vectorizes).
  uint32_t top = 0;
  for (int64_t k = 0; k < n; ++k) {
    uint32_t u;
    std::memcpy(&u, x + k, 4);
    u &= 0x7fffffffu;
    top = u > top ? u : top;
  }
  if (top >= 0x7f800000u) {  // NaN or infinity somewhere: the row comes back as NaN
    std::memset(q, 0x7f, n);
    return 1.0f;
  }
  float amax;
  std::memcpy(&amax, &top, 4);
  float scale = amax > 0 ? amax / 448.0f : 1.0f;
  if (scale < 0x1p-126f) scale = 0x1p-126f;  // x * (1 / scale) must not overflow
  // In blocks, each step a loop of one width that the compiler vectorizes: scale, encode to
  // 32-bit codes, narrow.
  const float inv = 1.0f / scale;
  constexpr int64_t kBlock = 256;
  alignas(64) float y[kBlock];
  alignas(64) uint32_t c[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    for (int64_t k = 0; k < m; ++k) y[k] = x[b + k] * inv;
    for (int64_t k = 0; k < m; ++k) c[k] = fp8_encode_bits(y[k]);
    for (int64_t k = 0; k < m; ++k) q[b + k] = static_cast<uint8_t>(c[k]);
  }
  return scale;
}

__attribute__((optimize("O3"))) void fp8_dequantize_row(const uint8_t* q, float scale, int64_t n,
                                                        float* out) {
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = fp8e4m3_to_f32(static_cast<uint8_t>(b));
    return t;
  }();
  for (int64_t k = 0; k < n; ++k) out[k] = table[q[k]] * scale;
}

namespace {

// The fixed block every rank sends every rank in plan: [S] pair counts and [S] leader-row counts
// of the receiver's slots, then a header (status to kMode: what all ranks compare, so that a bad
// input or a disagreement ends the layer on every rank at once; kTokens: the sender's tokens),
// then [R] the sender's pair count to each rank (the shared-memory transport sizes every rank's
// segment from them).
enum Header : int64_t { kStatus, kFingerprint, kHidden, kTopK, kMode, kTokens, kHeaderWords };

// Checks one rank's router output; returns an empty string when it is fine.
std::string check_input(const Placement& pl, int n_ranks, int64_t n, int64_t K, int64_t H,
                        const int32_t* experts, const float* weights) {
  using detail::concat;
  if (pl.n_ranks() != n_ranks)
    return concat("placement is for ", pl.n_ranks(), " ranks, the communicator has ", n_ranks);
  if (n < 0 || K < 1 || K > pl.n_experts() || H < 1)
    return concat("bad shape: n_tokens ", n, ", top_k ", K, " of ", pl.n_experts(),
                  " experts, hidden ", H);
  if (n > 0 && (!experts || !weights)) return "null experts or weights";
  for (int64_t t = 0; t < n; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = experts[t * K + k];
      if (e < 0 || e >= pl.n_experts())
        return concat("token ", t, " routes to expert ", e, ", out of range [0, ", pl.n_experts(),
                      ")");
      if (k > 0 && e <= experts[t * K + k - 1])
        return concat("token ", t, "'s experts are not strictly ascending");
    }
  return {};
}

size_t align64(size_t bytes) {
  return (bytes + 63) / 64 * 64;
}

// Runs fn, returns its wall time in seconds.
template <class F>
double timed(F&& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The send side of a plan: pairs to copies, travel order, rows and masks; adds the per-slot
// counts to block [R, W].
void plan_send(DispatchPlan& p, const Placement& pl, const int32_t* experts, const float* weights,
               int64_t S, int64_t W, std::vector<int64_t>& block) {
  const int R = p.n_ranks, me = p.rank;
  const int64_t n = p.n_tokens, K = p.top_k;
  const bool per_rank = p.mode == DispatchMode::PerRank;
  // Each pair to one copy of its expert. The leader of a (token, rank) is its pair of lowest k
  // there: the one whose row travels (every pair leads in PerExpert).
  std::vector<int64_t> slot_base(R + 1, 0);
  for (int r = 0; r < R; ++r) slot_base[r + 1] = slot_base[r] + pl.experts_on(r).size();
  const int64_t P = n * K;
  std::vector<int32_t> dest(P), slot(P);
  std::vector<int64_t> key(P), lead(P), count(slot_base[R] * (S + 1) + 1, 0);
  std::vector<int64_t> last(R, -1), lead_pair(R, -1);
  for (int64_t i = 0; i < P; ++i) {
    const int64_t t = i / K;
    const Replica c = pl.choose(experts[i], me, t);
    dest[i] = c.rank, slot[i] = c.slot;
    if (!per_rank || last[c.rank] != t) last[c.rank] = t, lead_pair[c.rank] = i;
    lead[i] = lead_pair[c.rank];
    // Travel order: destination slot; in it leaders first, then the others by their leader's
    // slot; then token (the sort below is stable).
    key[i] = (slot_base[c.rank] + c.slot) * (S + 1) + (lead[i] == i ? 0 : 1 + slot[lead[i]]);
    ++count[key[i] + 1];
    block[c.rank * W + c.slot] += 1;
    if (lead[i] == i) block[c.rank * W + S + c.slot] += 1;
  }
  for (size_t g = 1; g < count.size(); ++g) count[g] += count[g - 1];
  p.pair_offset.resize(R + 1);
  for (int r = 0; r <= R; ++r) p.pair_offset[r] = count[slot_base[r] * (S + 1)];
  // Pairs to (rank, slot) are contiguous in travel order.
  p.seg_slots = S;
  p.send_cell_start.resize(R * S);
  for (int r = 0; r < R; ++r) {
    int64_t o = p.pair_offset[r];
    for (int64_t j = 0; j < S; ++j) p.send_cell_start[r * S + j] = o, o += block[r * W + j];
  }
  p.pair_token.resize(P);
  p.pair_pos.resize(P);
  std::vector<int64_t> by_pos(P);  // pair index at each travel position
  for (int64_t i = 0; i < P; ++i) {
    const int64_t pos = count[key[i]]++;
    p.pair_pos[i] = pos;
    p.pair_token[pos] = static_cast<int32_t>(i / K);
    by_pos[pos] = i;
  }
  p.weight.assign(weights, weights + P);

  // Rows: the leaders in travel order, which is (leader slot, token) per rank.
  std::vector<int64_t> row_of(per_rank ? P : 0);
  p.row_offset.assign(R + 1, 0);
  for (int64_t i = 0; i < P; ++i)
    if (lead[i] == i) ++p.row_offset[dest[i] + 1];
  for (int r = 0; r < R; ++r) p.row_offset[r + 1] += p.row_offset[r];
  p.row_token.resize(p.row_offset[R]);
  std::vector<int64_t> at(p.row_offset.begin(), p.row_offset.end() - 1);  // next row per rank
  for (int64_t pos = 0; pos < P; ++pos) {
    const int64_t i = by_pos[pos];
    if (lead[i] != i) continue;
    const int64_t row = at[dest[i]]++;
    p.row_token[row] = static_cast<int32_t>(i / K);
    if (per_rank) row_of[i] = row;
  }
  if (per_rank) {  // each row's other slots at its destination
    const int64_t MW = p.mask_words;
    p.row_mask.assign(p.row_offset[R] * MW, 0);
    for (int64_t i = 0; i < P; ++i)
      if (lead[i] != i)
        p.row_mask[row_of[lead[i]] * MW + slot[i] / 64] |= uint64_t{1} << (slot[i] % 64);
  }
}

// The receive side of a plan, from the blocks got [R, W] all ranks sent this one. Cell (s, j)
// holds rank s's rows for local slot j, its leaders first.
void plan_receive(DispatchPlan& p, const Placement& pl, const std::vector<int64_t>& got, int64_t S,
                  int64_t W) {
  const int R = p.n_ranks, me = p.rank;
  const auto local = pl.experts_on(me);
  const int64_t J = static_cast<int64_t>(local.size());
  p.n_slots = static_cast<int32_t>(J);
  p.slot_expert.assign(local.begin(), local.end());
  p.recv_count.resize(R * J);
  p.lead_count.resize(R * J);
  p.cell_offset.resize(R * J);
  p.slot_offset.assign(J + 1, 0);
  p.recv_row_offset.assign(R + 1, 0);
  for (int s = 0; s < R; ++s) {
    p.recv_row_offset[s + 1] = p.recv_row_offset[s];
    for (int64_t j = 0; j < J; ++j) {
      p.recv_count[s * J + j] = got[s * W + j];
      p.lead_count[s * J + j] = got[s * W + S + j];
      p.slot_offset[j + 1] += got[s * W + j];
      p.recv_row_offset[s + 1] += got[s * W + S + j];
    }
  }
  for (int64_t j = 0; j < J; ++j) {
    p.slot_offset[j + 1] += p.slot_offset[j];
    int64_t o = p.slot_offset[j];
    for (int s = 0; s < R; ++s) p.cell_offset[s * J + j] = o, o += p.recv_count[s * J + j];
  }
  // The pairs this rank sends itself are its own cells, in the same order.
  p.self_row.resize(p.pair_offset.empty() ? 0 : p.pair_offset[me + 1] - p.pair_offset[me]);
  int64_t q = 0;
  for (int64_t j = 0; j < J; ++j)
    for (int64_t c = 0; c < p.recv_count[me * J + j]; ++c)
      p.self_row[q++] = p.cell_offset[me * J + j] + c;
  MS_ASSERT(q == static_cast<int64_t>(p.self_row.size()));
}

}  // namespace

Dispatcher::Dispatcher(comm::Communicator& comm, DispatchMode mode, Transport transport)
    : comm_(comm), mode_(mode), transport_(transport) {}

DispatchPlan Dispatcher::plan(const Placement& pl, int64_t n, int64_t K, int64_t H,
                              const int32_t* experts, const float* weights) {
  const int R = comm_.size(), me = comm_.rank();
  const bool per_rank = mode_ == DispatchMode::PerRank;
  const int64_t S = pl.max_slots(), W = 2 * S + kHeaderWords + R;
  DispatchPlan p;
  p.id = ++plans_;
  p.mode = mode_, p.rank = me, p.n_ranks = R;
  p.n_tokens = n, p.top_k = K, p.hidden = H;
  p.mask_words = per_rank ? static_cast<int32_t>(std::max<int64_t>(1, (S + 63) / 64)) : 0;

  const std::string bad = check_input(pl, R, n, K, H, experts, weights);
  std::vector<int64_t> block(R * W, 0), got(R * W, 0);  // [R, W] to / from each rank
  if (bad.empty()) plan_send(p, pl, experts, weights, S, W, block);
  for (int r = 0; r < R; ++r) {
    int64_t* h = &block[r * W + 2 * S];
    h[kStatus] = bad.empty() ? 0 : 1;
    h[kFingerprint] = static_cast<int64_t>(pl.fingerprint());
    h[kHidden] = H, h[kTopK] = K, h[kMode] = static_cast<int64_t>(mode_) + (fp8_ ? 2 : 0);
    h[kTokens] = bad.empty() ? n : 0;
    for (int d = 0; d < R && bad.empty(); ++d)
      h[kHeaderWords + d] = p.pair_offset[d + 1] - p.pair_offset[d];
  }
  timing_.plan = timed([&] { comm_.all_to_all(block.data(), W * sizeof(int64_t), got.data()); });
  synced_ = true;  // every rank has entered this plan: done reading the previous exchange

  // Every rank sees every rank's header: the same verdict everywhere.
  std::string failed;
  for (int r = 0; r < R; ++r)
    if (got[r * W + 2 * S + kStatus]) failed += (failed.empty() ? "" : ", ") + std::to_string(r);
  if (!failed.empty())
    fail("MoE dispatch: invalid routing input on rank(s) ", failed,
         bad.empty() ? std::string() : " (here: " + bad + ")");
  const char* what[kHeaderWords] = {};
  what[kFingerprint] = "placement", what[kHidden] = "hidden size", what[kTopK] = "top_k";
  what[kMode] = "dispatch mode (or --ep-dispatch-dtype)";
  for (int f = kFingerprint; f <= kMode; ++f)
    for (int r = 1; r < R; ++r)
      MS_CHECK(got[r * W + 2 * S + f] == got[2 * S + f], "MoE dispatch: ranks 0 and ", r,
               " disagree on the ", what[f]);

  plan_receive(p, pl, got, S, W);
  if (transport_ == Transport::Auto) timing_.plan += timed([&] { share_layout(p, got, W, S); });
  return p;
}

void Dispatcher::resolve_transport() {
  if (transport_ != Transport::Auto || shm_asked_) return;
  shm_bytes_ = size_t(1) << 20;    // grown by the plans that need more (share_layout)
  shm_ = comm_.share(shm_bytes_);  // collective
  shm_asked_ = true;
}

void Dispatcher::share_layout(DispatchPlan& p, const std::vector<int64_t>& got, int64_t W,
                              int64_t S) {
  // Every rank computes the same sizes from the blocks (the largest rank's tokens, pairs
  // received), so all agree on the layout and on when to grow, with no extra message.
  const int R = p.n_ranks;
  int64_t max_n = 0, max_recv = 0;
  for (int s = 0; s < R; ++s) max_n = std::max(max_n, got[s * W + 2 * S + kTokens]);
  for (int d = 0; d < R; ++d) {
    int64_t recv = 0;  // pairs rank d receives: what every s sends it
    for (int s = 0; s < R; ++s) recv += got[s * W + 2 * S + kHeaderWords + d];
    max_recv = std::max(max_recv, recv);
  }
  auto align = [](size_t b) { return (b + 63) / 64 * 64; };
  const size_t row = p.hidden * sizeof(float);
  p.off_cells = align((R + 1) * sizeof(int64_t));
  p.off_tokens = p.off_cells + align(R * S * sizeof(int64_t));
  p.off_input = p.off_tokens + align(max_n * p.top_k * sizeof(int32_t));
  p.off_output = p.off_input + align(max_n * row);
  const size_t need = p.off_output + max_recv * row;
  if (!shm_asked_ || (shm_ && need > shm_bytes_)) {
    shm_.reset();  // collective, like share()
    shm_bytes_ = std::max(need, shm_bytes_ + shm_bytes_ / 2);
    shm_ = comm_.share(shm_bytes_);
    shm_asked_ = true;
  }
  p.shared = shm_ != nullptr;
}

const float* const* Dispatcher::dispatch(const DispatchPlan& p, const float* hidden) {
  dispatch_start(p, hidden);
  return dispatch_finish(p);
}

bool Dispatcher::progress() {
  if (!pending_) return true;
  bool done = false;
  const double t = timed([&] { done = pending_->test(); });
  (phase_ == Phase::Combining ? timing_.combine : timing_.dispatch) += t;
  return done;
}

void Dispatcher::dispatch_start(const DispatchPlan& p, const float* hidden) {
  MS_ASSERT(p.mode == mode_ && p.n_ranks == comm_.size());
  MS_CHECK(phase_ == Phase::Idle, "MoE dispatch: an exchange of this Dispatcher is in flight");
  dispatched_ = p.id;
  hidden_ = hidden;
  rows_.resize(p.n_recv());
  for (auto* v : {&send_counts_, &send_displs_, &recv_counts_, &recv_displs_})
    v->assign(p.n_ranks, 0);
  phase_ = Phase::Dispatching;
  if (p.shared) {
    timing_.dispatch = timed([&] { dispatch_shared(p, hidden); });
    return;
  }
  const int R = p.n_ranks, me = p.rank;
  const int64_t H = p.hidden, row = H * sizeof(float);
  const int64_t MW = p.mask_words, mrow = MW * sizeof(uint64_t);
  // One contiguous block per peer and direction, each 64-byte aligned: the rows' masks
  // (PerRank), padded, then the rows (fp8: their scales, padded, then their codes). This rank's
  // own rows do not travel: they are read where they are, in `hidden` (fp8: round-tripped
  // through fp8 in dispatch_finish, as the others' are).
  auto block_bytes = [&](int64_t rows) -> size_t {
    if (!rows) return 0;
    return align64(rows * mrow) + (fp8_ ? align64(rows * sizeof(float)) + rows * H : rows * row);
  };
  size_t so = 0, ro = 0;
  for (int q = 0; q < R; ++q) {
    const int64_t out = q == me ? 0 : p.row_offset[q + 1] - p.row_offset[q];
    const int64_t in = q == me ? 0 : p.recv_row_offset[q + 1] - p.recv_row_offset[q];
    send_displs_[q] = so, send_counts_[q] = block_bytes(out), so += align64(send_counts_[q]);
    recv_displs_[q] = ro, recv_counts_[q] = block_bytes(in), ro += align64(recv_counts_[q]);
  }
  std::byte* sb = send_buf_.get(so);
  std::byte* rb = recv_buf_.get(ro);
  for (int d = 0; d < R; ++d) {
    const int64_t b = p.row_offset[d], e = p.row_offset[d + 1];
    if (d == me || b == e) continue;
    std::byte* dst = sb + send_displs_[d];
    std::memcpy(dst, p.row_mask.data() + b * MW, (e - b) * mrow);
    dst += align64((e - b) * mrow);
    if (fp8_) {
      auto* scales = reinterpret_cast<float*>(dst);
      auto* codes = reinterpret_cast<uint8_t*>(dst + align64((e - b) * sizeof(float)));
      for (int64_t r = b; r < e; ++r)
        scales[r - b] = fp8_quantize_row(hidden + p.row_token[r] * H, H, codes + (r - b) * H);
      continue;
    }
    for (int64_t r = b; r < e; ++r, dst += row) std::memcpy(dst, hidden + p.row_token[r] * H, row);
  }
  send_.reset();
  recv_.reset();
  for (int q = 0; q < R; ++q) {
    send_.add_piece(sb + send_displs_[q], send_counts_[q]);
    send_.next_peer();
    recv_.add_piece(rb + recv_displs_[q], recv_counts_[q]);
    recv_.next_peer();
  }
  timing_.dispatch = timed([&] { pending_ = comm_.start_all_to_all_matched(send_, recv_); });
}

const float* const* Dispatcher::dispatch_finish(const DispatchPlan& p) {
  MS_CHECK(phase_ == Phase::Dispatching && dispatched_ == p.id,
           "MoE dispatch: dispatch_finish without its dispatch_start");
  phase_ = Phase::Idle;
  if (p.shared) return rows_.data();
  timing_.dispatch += timed([&] { pending_->wait(); });
  pending_.reset();
  const int R = p.n_ranks, me = p.rank;
  const int64_t H = p.hidden, J = p.n_slots, MW = p.mask_words;
  const int64_t mrow = MW * sizeof(uint64_t);
  const float* hidden = hidden_;
  std::byte* rb = recv_buf_.p.get();
  // fp8: every row that feeds an expert here, this rank's own too, dequantized into deq
  // (travelling row i of source s at recv_row_offset[s] + i).
  float* deq = fp8_ ? deq_.get(p.recv_row_offset[R] * H) : nullptr;
  std::vector<uint8_t> own_codes(fp8_ ? H : 0);
  // Every row where it landed (or, from this rank, where it is); the other slots of a leader's
  // token (PerRank) point to it, in arrival order (leader slot, token): the order plan gave the
  // non-leaders of each cell.
  std::vector<int64_t> lead(R * J), other(R * J);  // [R, J] next leader / other row of a cell
  for (int64_t c = 0; c < R * J; ++c)
    lead[c] = p.cell_offset[c], other[c] = p.cell_offset[c] + p.lead_count[c];
  for (int s = 0; s < R; ++s) {
    const int64_t n_rows = p.recv_row_offset[s + 1] - p.recv_row_offset[s];
    const uint64_t* masks = nullptr;
    const float* in = nullptr;
    const int32_t* tokens = nullptr;
    if (s == me) {
      masks = p.row_mask.data() + p.row_offset[me] * MW;
      tokens = p.row_token.data() + p.row_offset[me];
    } else if (n_rows) {
      masks = reinterpret_cast<const uint64_t*>(rb + recv_displs_[s]);
      in = reinterpret_cast<const float*>(rb + recv_displs_[s] + align64(n_rows * mrow));
    }
    const float* scales = in;  // fp8: the block's scales, then its codes
    const auto* codes = fp8_ && in
                            ? reinterpret_cast<const uint8_t*>(in) + align64(n_rows * sizeof(float))
                            : nullptr;
    int64_t r = 0;
    for (int64_t j0 = 0; j0 < J; ++j0)
      for (int64_t q = 0; q < p.lead_count[s * J + j0]; ++q, ++r) {
        const float* src = tokens ? hidden + tokens[r] * H : in + r * H;
        if (fp8_) {
          float* d = deq + (p.recv_row_offset[s] + r) * H;
          if (tokens)
            fp8_dequantize_row(own_codes.data(), fp8_quantize_row(src, H, own_codes.data()), H, d);
          else
            fp8_dequantize_row(codes + r * H, scales[r], H, d);
          src = d;
        }
        rows_[lead[s * J + j0]++] = src;
        for (int64_t w = 0; w < MW; ++w)
          for (uint64_t m = masks[r * MW + w]; m; m &= m - 1) {
            const int64_t j = w * 64 + std::countr_zero(m);
            MS_ASSERT(j < J && j != j0);
            rows_[other[s * J + j]++] = src;
          }
      }
    MS_ASSERT(r == n_rows);
  }
  return rows_.data();
}

float* Dispatcher::expert_out(const DispatchPlan& p) {
  if (p.shared) {
    MS_CHECK(p.id == plans_, "MoE dispatch: expert_out for a plan that is not the latest");
    return reinterpret_cast<float*>(shm_->base(p.rank) + p.off_output);
  }
  return y_.get(p.n_recv() * p.hidden);
}

void Dispatcher::dispatch_shared(const DispatchPlan& p, const float* hidden) {
  MS_CHECK(p.id == plans_, "MoE dispatch: dispatch of a plan that is not the latest");
  const int R = p.n_ranks, me = p.rank;
  const int64_t H = p.hidden, J = p.n_slots, S = p.seg_slots, row = H * sizeof(float);
  // Another dispatch since the last collective: others may still read this rank's segment.
  if (!synced_) shm_->sync();
  // Publish: where this rank's pairs start per destination, their tokens, its hidden rows, and
  // (for combine) the first row of each of its cells. The hidden rows stay there, read by the
  // experts of every rank, until the next plan.
  std::byte* mine = shm_->base(me);
  std::memcpy(mine, p.pair_offset.data(), (R + 1) * sizeof(int64_t));
  auto* cells = reinterpret_cast<int64_t*>(mine + p.off_cells);
  for (int s = 0; s < R; ++s)
    for (int64_t j = 0; j < J; ++j) cells[s * S + j] = p.cell_offset[s * J + j];
  if (p.n_pairs_sent())
    std::memcpy(mine + p.off_tokens, p.pair_token.data(), p.n_pairs_sent() * sizeof(int32_t));
  if (p.n_tokens) std::memcpy(mine + p.off_input, hidden, p.n_tokens * row);
  shm_->sync();
  synced_ = false;
  // Cell (s, j) is rank s's pairs for local slot j, in s's travel order, which lists this
  // rank's slots in ascending order: each row is rank s's hidden row of the pair's token.
  for (int s = 0; s < R; ++s) {
    const std::byte* theirs = shm_->base(s);
    int64_t pos = reinterpret_cast<const int64_t*>(theirs)[me];
    const auto* tokens = reinterpret_cast<const int32_t*>(theirs + p.off_tokens);
    const auto* rows = reinterpret_cast<const float*>(theirs + p.off_input);
    for (int64_t j = 0; j < J; ++j) {
      const float** dst = rows_.data() + p.cell_offset[s * J + j];
      for (int64_t c = 0; c < p.recv_count[s * J + j]; ++c, ++pos) dst[c] = rows + tokens[pos] * H;
    }
  }
}

void Dispatcher::combine_shared(const DispatchPlan& p, const float* expert_out, float* out) {
  const int R = p.n_ranks, me = p.rank;
  const int64_t H = p.hidden, K = p.top_k, S = p.seg_slots;
  float* mine = reinterpret_cast<float*>(shm_->base(me) + p.off_output);
  if (expert_out != mine && p.n_recv())
    std::memcpy(mine, expert_out, p.n_recv() * H * sizeof(float));
  shm_->sync();
  synced_ = false;
  // Where each travel position's output row lies: on rank d, in the cell (this rank, j).
  src_.resize(p.n_pairs_sent());
  for (int d = 0; d < R; ++d) {
    const std::byte* theirs = shm_->base(d);
    const auto* cells = reinterpret_cast<const int64_t*>(theirs + p.off_cells);
    const auto* rows = reinterpret_cast<const float*>(theirs + p.off_output);
    for (int64_t j = 0; j < S; ++j) {
      const int64_t b = p.send_cell_start[d * S + j];
      const int64_t e = j + 1 < S ? p.send_cell_start[d * S + j + 1] : p.pair_offset[d + 1];
      if (b == e) continue;
      const float* first = rows + cells[me * S + j] * H;
      for (int64_t q = b; q < e; ++q) src_[q] = first + (q - b) * H;
    }
  }
  // The single-process order: experts ascending (k), acc = acc + y * w from 0.0f.
  std::vector<const float*> ys(K);
  for (int64_t t = 0; t < p.n_tokens; ++t) {
    for (int64_t k = 0; k < K; ++k) ys[k] = src_[p.pair_pos[t * K + k]];
    kernels::weighted_sum(ys.data(), p.weight.data() + t * K, K, H, out + t * H);
  }
}

void Dispatcher::combine(const DispatchPlan& p, const float* expert_out, float* out) {
  combine_start(p, expert_out);
  combine_finish(p, out);
}

void Dispatcher::combine_start(const DispatchPlan& p, const float* expert_out) {
  MS_ASSERT(p.mode == mode_ && p.n_ranks == comm_.size());
  MS_CHECK(phase_ == Phase::Idle, "MoE combine: an exchange of this Dispatcher is in flight");
  MS_CHECK(dispatched_ == p.id, "MoE combine: the plan was not the last one dispatched");
  expert_out_ = expert_out;
  phase_ = Phase::Combining;
  timing_.combine = 0;
  if (p.shared) return;
  const int R = p.n_ranks, me = p.rank;
  const int64_t H = p.hidden, J = p.n_slots, row = H * sizeof(float);
  const int64_t S = p.seg_slots;
  float* back = back_.get(p.n_pairs_sent() * H);
  // Each cell's rows back to its source, except this rank's own (read in place): one piece per
  // cell, received into place in travel order, where the pairs to (rank, slot) are contiguous.
  // The cuts match: cell (s, j) here is what rank s counts as its pairs to (this rank, j).
  send_.reset();
  recv_.reset();
  for (int q = 0; q < R; ++q) {
    for (int64_t j = 0; j < J && q != me; ++j)
      send_.add_piece(expert_out + p.cell_offset[q * J + j] * H, p.recv_count[q * J + j] * row);
    send_.next_peer();
    for (int64_t j = 0; j < S && q != me; ++j) {
      const int64_t b = p.send_cell_start[q * S + j];
      const int64_t e = j + 1 < S ? p.send_cell_start[q * S + j + 1] : p.pair_offset[q + 1];
      recv_.add_piece(back + b * H, (e - b) * row);
    }
    recv_.next_peer();
  }
  timing_.combine = timed([&] { pending_ = comm_.start_all_to_all_matched(send_, recv_); });
}

void Dispatcher::combine_finish(const DispatchPlan& p, float* out) {
  MS_CHECK(phase_ == Phase::Combining && dispatched_ == p.id,
           "MoE combine: combine_finish without its combine_start");
  phase_ = Phase::Idle;
  const float* expert_out = expert_out_;
  if (p.shared) {
    dispatched_ = 0;
    timing_.combine = timed([&] { combine_shared(p, expert_out, out); });
    return;
  }
  timing_.combine += timed([&] { pending_->wait(); });
  pending_.reset();
  const int64_t H = p.hidden, K = p.top_k;
  const int me = p.rank;
  const float* back = back_.p.get();
  // The single-process order: experts ascending (k), acc = acc + y * w from 0.0f.
  const int64_t self_begin = p.pair_offset[me], self_end = p.pair_offset[me + 1];
  std::vector<const float*> ys(K);
  for (int64_t t = 0; t < p.n_tokens; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t pos = p.pair_pos[t * K + k];
      ys[k] = pos >= self_begin && pos < self_end ? expert_out + p.self_row[pos - self_begin] * H
                                                  : back + pos * H;
    }
    kernels::weighted_sum(ys.data(), p.weight.data() + t * K, K, H, out + t * H);
  }
}

}  // namespace moeserve::moe
