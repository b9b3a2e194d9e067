// bench_alltoall: the MoE dispatch and combine against a raw MPI_Alltoallv of the same bytes.
//   mpirun -np {2,4,8} --oversubscribe --allow-run-as-root bench_alltoall
//       [--mode both|rank|expert] [--transport auto|messages] [--pieces datatypes|staging]
//       [--hidden 2048|7168|both] [--tokens 1,16,128,4096] [--direct-kib N] [--fp8]
//       [--overlap-ms C]
// Per rank: tokens in {1, 16, 128, 4096} (or the list given), hidden in {2048, 7168}, top-8 of 256
// experts, uniform random routing, contiguous placement. Timed per iteration from a barrier to the
// last rank's end (max over ranks); the best iteration counts (other load only ever adds time: the
// numbers are meant to be comparable on a shared, oversubscribed machine):
//   plan, dispatch, combine  each phase (max over ranks of the rank's own time)
//   total                    plan + dispatch + combine of one rank (max over ranks). No expert
//                            compute: between dispatch and combine, untimed, the dispatched rows
//                            are copied to Dispatcher::expert_out as the expert outputs, then a
//                            barrier (as if the experts took the same time everywhere)
//   raw                      MPI_Alltoallv with dispatch's byte counts, then with combine's
//                            (alternating with the above, iteration by iteration)
//   ratio                    total / raw
//   a2a                      of total, the time exchanging (Dispatcher::exchange_seconds:
//                            messages: inside the all-to-alls, the rest is local work (planning,
//                            the per-rank copy to slots, the weighted sum); shared memory: plan's
//                            all-to-all, all of dispatch and combine)
// --fp8: dispatch sends e4m3 rows with a scale per row (Dispatcher::set_fp8_dispatch, messages
// only), and raw moves the same (fewer) bytes; the dispatch column then includes the
// quantization on the sender and the dequantization on the receiver.
// --overlap-ms C: instead, the exchange against computation, per configuration, alternating:
//   sequential  plan + dispatch + combine of all tokens, then 4 x C ms of computation (a spin
//               loop) outside it
//   overlapped  the model's schedule (Model::moe_overlapped): two micro-batches of n / 2
//               tokens on two Dispatchers, 4 phases of C ms computation, each with one exchange
//               in flight, progressed (Dispatcher::progress) every C / 16 ms
//   hidden      (sequential - overlapped) / the sequential exchange: the share of the exchange
//               time the computation hid (best iteration of each)
// GB/s: the bytes a rank sends (dispatch, plan included) or receives back (combine; its own
// pairs are read in place and not counted), averaged over ranks, per second of that phase.
// Configurations whose buffers on all ranks together would exceed MOESERVE_BENCH_MEM_GB (default
// 16) are skipped and listed.
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "moe/dispatch.h"

using namespace moeserve;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int32_t kExperts = 256;
constexpr int64_t kTopK = 8;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double best(const std::vector<double>& v) {
  return *std::min_element(v.begin(), v.end());
}

// Uniform top-8 of 256, ascending ids, weights 1/8.
void routing(uint64_t seed, int64_t n, std::vector<int32_t>& ex, std::vector<float>& wt) {
  ex.resize(n * kTopK);
  wt.assign(n * kTopK, 1.0f / kTopK);
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (int64_t t = 0; t < n; ++t) {
    int32_t* e = &ex[t * kTopK];
    for (int64_t k = 0; k < kTopK;) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      const auto c = static_cast<int32_t>((s >> 33) % kExperts);
      if (std::find(e, e + k, c) == e + k) e[k++] = c;
    }
    std::sort(e, e + kTopK);
  }
}

// Byte counts of the two exchanges of a plan, as MPI_Alltoallv wants them.
struct Counts {
  std::vector<int> ds, dsd, dr, drd, cs, csd, cr, crd;  // dispatch / combine send / recv
  size_t d_send = 0, d_recv = 0, c_send = 0, c_recv = 0;
};

void add(std::vector<int>& c, std::vector<int>& d, size_t& total, size_t bytes) {
  d.push_back(static_cast<int>(total));
  c.push_back(static_cast<int>(bytes));
  total += bytes;
}

Counts counts_of(const moe::DispatchPlan& p, bool fp8) {
  Counts c;
  const size_t row = p.hidden * sizeof(float), mask = p.mask_words * sizeof(uint64_t);
  const size_t drow = fp8 ? p.hidden + sizeof(float) : row;  // a dispatched row
  const int64_t J = p.n_slots;
  for (int r = 0; r < p.n_ranks; ++r) {
    int64_t from_r = 0;  // pairs rank r sends here
    for (int64_t j = 0; j < J; ++j) from_r += p.recv_count[r * J + j];
    const size_t pairs_to_r = p.pair_offset[r + 1] - p.pair_offset[r];
    if (p.mode == moe::DispatchMode::PerRank) {
      const size_t rows_to = p.row_offset[r + 1] - p.row_offset[r];
      const size_t rows_from = p.recv_row_offset[r + 1] - p.recv_row_offset[r];
      add(c.ds, c.dsd, c.d_send, rows_to * (drow + mask));
      add(c.dr, c.drd, c.d_recv, rows_from * (drow + mask));
    } else {
      add(c.ds, c.dsd, c.d_send, pairs_to_r * drow);
      add(c.dr, c.drd, c.d_recv, from_r * drow);
    }
    const bool self = r == p.rank;  // combine reads a rank's own pairs in place
    add(c.cs, c.csd, c.c_send, self ? 0 : from_r * row);
    add(c.cr, c.crd, c.c_recv, self ? 0 : pairs_to_r * row);
  }
  return c;
}

double memcpy_gbs() {
  const size_t n = size_t(256) << 20;
  std::vector<char> a(n, 1), b(n, 2);
  std::vector<double> t;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), n);
    t.push_back(seconds_since(t0));
  }
  return n / best(t) / 1e9;
}

struct Row {
  std::string mode;
  int64_t tokens = 0, hidden = 0;
  double plan = 0, dispatch = 0, combine = 0, total = 0, raw = 0, a2a = 0, d_gbs = 0, c_gbs = 0;
  double rows_per_token = 0;
};

class Bench {
 public:
  Bench(comm::Communicator& c, bool fp8) : c_(c), fp8_(fp8) {}

  double max_over_ranks(double v) {
    c_.all_reduce(&v, 1, comm::ReduceOp::Max);
    return v;
  }
  double mean_over_ranks(double v) {
    c_.all_reduce(&v, 1, comm::ReduceOp::Sum);
    return v / c_.size();
  }

  // Bytes all ranks together need for this configuration.
  double need_bytes(int64_t n, int64_t H) {
    const double hn = static_cast<double>(n) * H * sizeof(float) * c_.size();
    return hn * (2 + 4 * kTopK);  // hidden, out; x, back, raw send and receive (~K rows each)
  }

  Row run(moe::DispatchMode mode, moe::Transport transport, int64_t n, int64_t H) {
    const int iters = n * H >= 128 * 2048 ? (n * H >= 1024 * 2048 ? 5 : 30) : 100;
    std::vector<int32_t> ex;
    std::vector<float> wt, hidden(n * H, 0.5f), out(n * H);
    routing(1234 + c_.rank() * 7919 + n, n, ex, wt);
    const moe::Placement pl = moe::Placement::contiguous(kExperts, c_.size());
    Row row;
    row.mode = mode == moe::DispatchMode::PerRank ? "per-rank" : "per-expert";
    row.tokens = n, row.hidden = H;
    moe::Dispatcher d(c_, mode, transport);
    d.set_fp8_dispatch(fp8_);
    Counts cnt;
    std::vector<char> sbuf, rbuf;
    std::vector<double> tp, td, tc, tt, tx, tr;
    // Ours and raw alternate, so that both see the same load on a shared machine.
    for (int it = -1; it < iters; ++it) {  // iteration -1 sizes and warms the buffers up
      c_.barrier();
      const auto t0 = Clock::now();
      const moe::DispatchPlan p = d.plan(pl, n, kTopK, H, ex.data(), wt.data());
      const double a = seconds_since(t0);
      const float* const* x = d.dispatch(p, hidden.data());
      const double b = seconds_since(t0);
      float* y = d.expert_out(p);  // the experts' outputs: here their inputs
      for (int64_t i = 0; i < p.n_recv(); ++i) std::memcpy(y + i * H, x[i], H * sizeof(float));
      c_.barrier();
      const auto t2 = Clock::now();
      d.combine(p, y, out.data());
      const double e = b + seconds_since(t2);
      if (it < 0) {
        cnt = counts_of(p, fp8_ && !d.shared());
        row.rows_per_token = mean_over_ranks(n ? double(p.n_rows_sent()) / n : 0.0);
        sbuf.assign(std::max(cnt.d_send, cnt.c_send) + 1, 1);
        rbuf.assign(std::max(cnt.d_recv, cnt.c_recv) + 1, 1);
      } else {
        tp.push_back(max_over_ranks(a));
        td.push_back(max_over_ranks(b - a));
        tc.push_back(max_over_ranks(e - b));
        tt.push_back(max_over_ranks(e));
        const auto& x2 = d.exchange_seconds();
        tx.push_back(max_over_ranks(x2.plan + x2.dispatch + x2.combine));
      }
      // The same bytes through MPI_Alltoallv, nothing else.
      c_.barrier();
      const auto t1 = Clock::now();
      MPI_Alltoallv(sbuf.data(), cnt.ds.data(), cnt.dsd.data(), MPI_BYTE, rbuf.data(),
                    cnt.dr.data(), cnt.drd.data(), MPI_BYTE, MPI_COMM_WORLD);
      MPI_Alltoallv(sbuf.data(), cnt.cs.data(), cnt.csd.data(), MPI_BYTE, rbuf.data(),
                    cnt.cr.data(), cnt.crd.data(), MPI_BYTE, MPI_COMM_WORLD);
      const double r = max_over_ranks(seconds_since(t1));
      if (it >= 0) tr.push_back(r);
    }
    row.plan = best(tp), row.dispatch = best(td), row.combine = best(tc);
    row.total = best(tt), row.a2a = best(tx), row.raw = best(tr);
    const double d_bytes = mean_over_ranks(static_cast<double>(cnt.d_send));
    const double c_bytes = mean_over_ranks(static_cast<double>(cnt.c_recv));
    row.d_gbs = d_bytes / (row.plan + row.dispatch) / 1e9;
    row.c_gbs = c_bytes / row.combine / 1e9;
    return row;
  }

  struct Overlap {
    double exchange = 0, sequential = 0, overlapped = 0;
  };
  // Spins for `seconds`, calling d->progress() 16 times on the way (none without d).
  static void compute(double seconds, moe::Dispatcher* d) {
    for (int i = 0; i < 16; ++i) {
      const auto t0 = Clock::now();
      volatile double x = 1.0;
      while (seconds_since(t0) < seconds / 16) x = x * 1.0000001 + 1e-9;
      if (d) d->progress();
    }
  }
  Overlap overlap(moe::DispatchMode mode, moe::Transport transport, int64_t n, int64_t H,
                  double c) {
    const int iters = n * H >= 1024 * 2048 ? 5 : 15;
    std::vector<int32_t> ex;
    std::vector<float> wt, hidden(n * H, 0.5f), out(n * H);
    routing(4321 + c_.rank() * 7919 + n, n, ex, wt);
    const moe::Placement pl = moe::Placement::contiguous(kExperts, c_.size());
    moe::Dispatcher d0(c_, mode, transport), d1(c_, mode, transport);
    d0.set_fp8_dispatch(fp8_);
    d1.set_fp8_dispatch(fp8_);
    auto outputs = [&](const moe::DispatchPlan& p, const float* const* x, float* y) {
      for (int64_t i = 0; i < p.n_recv(); ++i) std::memcpy(y + i * H, x[i], H * sizeof(float));
    };
    std::vector<double> tx, ts, to;
    for (int it = -1; it < iters; ++it) {
      c_.barrier();
      auto t0 = Clock::now();
      {
        const moe::DispatchPlan p = d0.plan(pl, n, kTopK, H, ex.data(), wt.data());
        const float* const* x = d0.dispatch(p, hidden.data());
        float* y = d0.expert_out(p);
        outputs(p, x, y);
        d0.combine(p, y, out.data());
      }
      const double x_s = seconds_since(t0);
      compute(4 * c, nullptr);
      const double seq = max_over_ranks(seconds_since(t0));
      const double xch = max_over_ranks(x_s);
      c_.barrier();
      t0 = Clock::now();
      const int64_t h0 = n / 2, h1 = n - h0;
      const moe::DispatchPlan p0 = d0.plan(pl, h0, kTopK, H, ex.data(), wt.data());
      const moe::DispatchPlan p1 =
          d1.plan(pl, h1, kTopK, H, ex.data() + h0 * kTopK, wt.data() + h0 * kTopK);
      d0.dispatch_start(p0, hidden.data());
      compute(c, &d0);
      const float* const* x0 = d0.dispatch_finish(p0);
      d1.dispatch_start(p1, hidden.data() + h0 * H);
      float* y0 = d0.expert_out(p0);
      outputs(p0, x0, y0);
      compute(c, &d1);
      const float* const* x1 = d1.dispatch_finish(p1);
      d0.combine_start(p0, y0);
      float* y1 = d1.expert_out(p1);
      outputs(p1, x1, y1);
      compute(c, &d0);
      d0.combine_finish(p0, out.data());
      d1.combine_start(p1, y1);
      compute(c, &d1);
      d1.combine_finish(p1, out.data() + h0 * H);
      const double ov = max_over_ranks(seconds_since(t0));
      if (it >= 0) tx.push_back(xch), ts.push_back(seq), to.push_back(ov);
    }
    return {best(tx), best(ts), best(to)};
  }

 private:
  comm::Communicator& c_;
  bool fp8_;
};

}  // namespace

int main(int argc, char** argv) {
  std::string mode = "both", pieces = "datatypes", hidden = "both", transport = "auto";
  long direct_kib = -1;
  bool fp8 = false;
  double overlap_ms = -1;
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--fp8") fp8 = true;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--overlap-ms") overlap_ms = std::atof(argv[i + 1]);
  std::vector<int64_t> token_counts = {1, 16, 128, 4096};
  for (int i = 1; i + 1 < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--mode") mode = argv[i + 1];
    if (a == "--pieces") pieces = argv[i + 1];
    if (a == "--hidden") hidden = argv[i + 1];
    if (a == "--transport") transport = argv[i + 1];
    if (a == "--direct-kib") direct_kib = std::atol(argv[i + 1]);
    if (a == "--tokens") {
      token_counts.clear();
      for (const char* p = argv[i + 1]; *p;) {
        char* end = nullptr;
        const long long v = std::strtoll(p, &end, 10);
        if (end == p || v < 0) {
          std::fprintf(stderr, "bench_alltoall: --tokens wants a list like 128,4096\n");
          return 2;
        }
        token_counts.push_back(v);
        p = *end == ',' ? end + 1 : end;
      }
    }
  }
  comm::MpiOptions opt;
  if (pieces == "staging") opt.pieces = comm::PiecesVia::Staging;
  if (direct_kib >= 0) opt.direct_bytes = static_cast<size_t>(direct_kib) << 10;
  auto comm = comm::mpi_world(opt);
  const bool root = comm->rank() == 0;
  const char* mem_env = std::getenv("MOESERVE_BENCH_MEM_GB");
  const double budget = (mem_env ? std::atof(mem_env) : 16.0) * 1e9;

  double copy = 0.0;
  if (root) copy = memcpy_gbs();
  comm->barrier();
  if (root) {
    std::printf(
        "bench_alltoall: %d ranks, top-%lld of %d experts, uniform routing, "
        "transport %s, pieces via %s, dispatch rows %s\n",
        comm->size(), static_cast<long long>(kTopK), kExperts, transport.c_str(), pieces.c_str(),
        fp8 ? "fp8 + scale (messages)" : "f32");
    std::printf("memcpy (one rank alone): %.2f GB/s; memory budget %.0f GB for all ranks\n\n", copy,
                budget / 1e9);
    if (overlap_ms < 0)
      std::printf("%-10s %6s %6s %9s %9s %9s %9s %9s %6s %9s %6s %8s %8s %6s\n", "mode", "tokens",
                  "hidden", "plan us", "disp us", "comb us", "total us", "raw us", "ratio",
                  "a2a us", "a2a/r", "dispGB/s", "combGB/s", "rows/t");
  }
  std::vector<moe::DispatchMode> modes;
  if (mode != "expert") modes.push_back(moe::DispatchMode::PerRank);
  if (mode != "rank") modes.push_back(moe::DispatchMode::PerExpert);
  const moe::Transport tr =
      transport == "messages" ? moe::Transport::Messages : moe::Transport::Auto;
  Bench b(*comm, fp8);
  std::vector<std::string> skipped;
  for (int64_t H : {2048, 7168})
    for (int64_t n : token_counts) {
      if (hidden != "both" && std::to_string(H) != hidden) continue;
      if (b.need_bytes(n, H) > budget) {
        skipped.push_back(
            std::to_string(n) + " tokens x hidden " + std::to_string(H) + " (needs ~" +
            std::to_string(static_cast<int>(b.need_bytes(n, H) / 1e9 + 0.5)) + " GB)");
        continue;
      }
      for (auto m : modes) {
        if (overlap_ms >= 0) {
          const Bench::Overlap o = b.overlap(m, tr, n, H, overlap_ms / 1e3);
          if (root)
            std::printf(
                "%-10s %6lld %6lld  exchange %9.1f us  compute 4 x %.1f ms  sequential "
                "%9.1f us  overlapped %9.1f us  hidden %5.1f%%\n",
                m == moe::DispatchMode::PerRank ? "per-rank" : "per-expert",
                static_cast<long long>(n), static_cast<long long>(H), o.exchange * 1e6, overlap_ms,
                o.sequential * 1e6, o.overlapped * 1e6,
                100.0 * (o.sequential - o.overlapped) / o.exchange);
          std::fflush(stdout);
          continue;
        }
        const Row r = b.run(m, tr, n, H);
        if (root)
          std::printf(
              "%-10s %6lld %6lld %9.1f %9.1f %9.1f %9.1f %9.1f %6.2f %9.1f %6.2f %8.2f %8.2f "
              "%6.2f\n",
              r.mode.c_str(), static_cast<long long>(r.tokens), static_cast<long long>(r.hidden),
              r.plan * 1e6, r.dispatch * 1e6, r.combine * 1e6, r.total * 1e6, r.raw * 1e6,
              r.total / r.raw, r.a2a * 1e6, r.a2a / r.raw, r.d_gbs, r.c_gbs, r.rows_per_token);
        std::fflush(stdout);
      }
    }
  if (root)
    for (const auto& s : skipped) std::printf("skipped (memory): %s\n", s.c_str());
  return 0;
}
