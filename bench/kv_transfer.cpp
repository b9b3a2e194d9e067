// bench_kv_transfer: moving a prompt's latent KV cache from a prefill rank to a decode rank, the
// way `moeserve serve --prefill-ranks P --decode-ranks D` does it.
//   mpirun -np 2 --oversubscribe bench_kv_transfer [--layers 8] [--tokens 1024,8192,32768]
//
// Rank 0 holds the prompt's blocks (scattered over its pool, as after hours of serving), rank 1
// takes them into free blocks of its own pool (also scattered). Latent cache bytes = tokens x
// layers x (kv_lora_rank 512 + qk_rope_head_dim 64) x 4 (f32), in blocks of 16 tokens.
//   one-sided  rank 1 reads rank 0's exposed pool with passive-target gets (runs of adjacent
//              blocks as one get), then flushes; rank 0 does nothing (its compute loop would
//              run on): its busy time is 0
//   two-sided  rank 0 packs the blocks into a staging buffer and sends it; rank 1 receives it
//              into a staging buffer and unpacks; rank 0's busy time is pack + send
// Each is timed from a barrier to the data being in rank 1's blocks, best of --iters. The bound
// is measured in turn with the transfers (a shared machine's memcpy rate moves from minute to
// minute): rank 1 copying the same number of blocks between scattered places of its own pool on
// one thread; %memcpy is the median over iterations of copy time / transfer time. On one node
// the one-sided reads are process_vm_readv calls on up to 4 threads (MOESERVE_WINDOW_MPI_GET=1:
// MPI_Get instead). Memory traffic
// per byte moved, by construction: one-sided 1 copy (read + write once); two-sided 3 copies
// (pack, MPI's single-copy or shared-memory transfer, unpack).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/roofline.h"
#include "kv/kv_pool.h"

using namespace moeserve;
using Clock = std::chrono::steady_clock;

namespace {

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::vector<int32_t> scattered(int64_t n_pool, int64_t n, uint64_t seed) {
  std::vector<int32_t> all(n_pool);
  std::iota(all.begin(), all.end(), 0);
  std::mt19937_64 g(seed);
  std::shuffle(all.begin(), all.end(), g);
  all.resize(n);
  return all;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t layers = 8;
  int iters = 5;
  std::vector<int64_t> token_counts = {1024, 8192, 32768};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--layers" && i + 1 < argc) {
      layers = std::atoll(argv[++i]);
    } else if (a == "--iters" && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else if (a == "--tokens" && i + 1 < argc) {
      token_counts.clear();
      for (std::string s = argv[++i]; !s.empty();) {
        const size_t c = s.find(',');
        token_counts.push_back(std::atoll(s.substr(0, c).c_str()));
        s = c == std::string::npos ? "" : s.substr(c + 1);
      }
    } else {
      std::fprintf(stderr,
                   "usage: mpirun -np 2 bench_kv_transfer [--layers N] [--iters N] "
                   "[--tokens 1024,8192,32768]\n");
      return 2;
    }
  }
  auto world = comm::world();
  if (world->size() != 2) {
    if (world->rank() == 0) std::fprintf(stderr, "bench_kv_transfer needs exactly 2 ranks\n");
    return 2;
  }
  const int me = world->rank();
  const int64_t kv_dim = 576, block = 16;
  const int64_t max_tokens = *std::max_element(token_counts.begin(), token_counts.end());
  const int64_t pool_blocks = (max_tokens / block) * 5 / 4 + 8;  // room to scatter
  kv::KvPool pool(pool_blocks, block, layers, kv_dim);
  const size_t bb = pool.block_bytes();
  auto floats = [&](int32_t b) { return reinterpret_cast<float*>(pool.block_data(b)); };
  for (int64_t b = 0; b < pool_blocks; ++b)  // distinct contents, and every page touched
    std::fill_n(floats(static_cast<int32_t>(b)), bb / 4, static_cast<float>(b + me));
  auto win = world->expose(pool.block_data(0), bb * pool_blocks);
  std::vector<std::byte> stage(bb * (max_tokens / block));
  ThreadPool one(1);
  const double memcpy_gbs = kernels::measure_memcpy_gbs(one, size_t{256} << 20);
  if (me == 0)
    std::printf(
        "KV transfer, %lld layers x 576 f32 per token (%.1f KB/token), blocks of 16; "
        "single-thread memcpy %.2f GB/s at start\n"
        "%%memcpy: the median over iterations of (the same blocks copied locally) / (transfer)\n"
        "%7s %9s | %9s | %11s %8s %7s | %11s %8s %7s %12s | %6s\n",
        static_cast<long long>(layers), layers * kv_dim * 4 / 1024.0, memcpy_gbs, "tokens", "MB",
        "copy ms", "1-sided ms", "GB/s", "%memcpy", "2-sided ms", "GB/s", "%memcpy", "prefill busy",
        "2s/1s");
  for (int64_t tokens : token_counts) {
    const int64_t nb = tokens / block;
    const std::vector<int32_t> src = scattered(pool_blocks, nb, 1);
    const std::vector<int32_t> dst = scattered(pool_blocks, nb, 2);
    const double bytes = static_cast<double>(bb) * nb;
    double one_best = 1e30, two_best = 1e30, busy_best = 1e30, copy_best = 1e30;
    std::vector<double> one_ratio, two_ratio;  // per iteration: time / the local copy's
    for (int it = 0; it < iters; ++it) {
      // The bound, measured in turn with the transfers: rank 1 copies the same number of blocks
      // between scattered places of its own pool (src -> dst positions), one thread.
      world->barrier();
      double copy_s = 0;
      if (me == 1) {
        const auto tc = Clock::now();
        for (int64_t i = 0; i < nb; ++i)
          std::memcpy(pool.block_data(dst[i]), pool.block_data(src[i]), bb);
        copy_s = since(tc);
        for (int64_t i = 0; i < nb; ++i)
          std::fill_n(floats(dst[i]), bb / 4, static_cast<float>(dst[i] + 1));
      }
      world->all_reduce(&copy_s, 1, comm::ReduceOp::Max);
      copy_best = std::min(copy_best, copy_s);
      // One-sided.
      world->barrier();
      auto t0 = Clock::now();
      if (me == 1) {
        for (int64_t i = 0; i < nb;) {
          int64_t j = i + 1;
          while (j < nb && src[j] == src[j - 1] + 1 && dst[j] == dst[j - 1] + 1) ++j;
          win->get(0, bb * src[i], pool.block_data(dst[i]), bb * (j - i));
          i = j;
        }
        win->flush(0);
      }
      double t = me == 1 ? since(t0) : 0.0;
      world->all_reduce(&t, 1, comm::ReduceOp::Max);
      one_best = std::min(one_best, t);
      one_ratio.push_back(t / copy_s);
      // Check what arrived (rank 0 filled block b with b).
      if (me == 1)
        for (int64_t i = 0; i < nb; i += std::max<int64_t>(1, nb / 7))
          MS_CHECK(floats(dst[i])[0] == static_cast<float>(src[i]) &&
                       floats(dst[i])[bb / 4 - 1] == static_cast<float>(src[i]),
                   "one-sided transfer delivered wrong data");
      // Two-sided.
      world->barrier();
      t0 = Clock::now();
      double busy = 0;
      if (me == 0) {
        for (int64_t i = 0; i < nb; ++i)
          std::memcpy(stage.data() + i * bb, pool.block_data(src[i]), bb);
        world->send(stage.data(), bb * nb, 1, 7);
        busy = since(t0);
      } else {
        world->recv(stage.data(), bb * nb, 0, 7);
        for (int64_t i = 0; i < nb; ++i)
          std::memcpy(pool.block_data(dst[i]), stage.data() + i * bb, bb);
      }
      double t2[2] = {me == 1 ? since(t0) : 0.0, busy};
      world->all_reduce(t2, 2, comm::ReduceOp::Max);
      two_best = std::min(two_best, t2[0]);
      two_ratio.push_back(t2[0] / copy_s);
      busy_best = std::min(busy_best, t2[1]);
      // Restore rank 1's blocks to its own pattern for the next one-sided check.
      if (me == 1)
        for (int64_t i = 0; i < nb; ++i)
          std::fill_n(floats(dst[i]), bb / 4, static_cast<float>(dst[i] + 1));
    }
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    if (me == 0)
      std::printf(
          "%7lld %9.1f | %9.2f | %11.2f %8.2f %6.0f%% | %11.2f %8.2f %6.0f%% %9.2f ms | %6.2f\n",
          static_cast<long long>(tokens), bytes / 1e6, copy_best * 1e3, one_best * 1e3,
          bytes / one_best / 1e9, 100 / median(one_ratio), two_best * 1e3, bytes / two_best / 1e9,
          100 / median(two_ratio), busy_best * 1e3, two_best / one_best);
  }
  win.reset();
  world->barrier();
  return 0;
}
