// bench_kernels: the CPU kernels against this machine's roofline.
//   decode:  matmul at m = 1, 4, 8 streams the weights once: GB/s vs measured read bandwidth
//            (bf16, fp8, Q4); also (m = 1, 4) over many small matrices with short rows, as a
//            model's experts (fp8, Q8, Q4), and matmul_t over one head's W_UK (decode_t).
//   prefill: matmul at m = 512 is compute bound: GFLOP/s vs measured peak FMA rate (bf16, fp8,
//            Q8, Q4), and under --precision bf16 vs the peak of the unit it runs on (vdpbf16ps
//            where the CPU has it), with the bf16 / exact speed ratio timed in alternation.
//   int:     every format (bf16, fp8, Q8 and Q4 with groups of 32 and 128, bf16 scales) on the
//            same shapes: decode of 7168 x 2048 and 2048 x 7168, of the experts' 1024 x 2048
//            and 2048 x 1024, and prefill of 2048 x 7168; calls/s compares their speed.
//   bf16:    only the --precision bf16 part of prefill.
//   gemv:    the m = 1 GEMV of every format (bf16, fp8, Q4 with groups of 32, 64 and 128) from
//            DRAM (as decode) and from L2 (cached: the rate its instructions allow).
//   mapped DIR: (only when asked) the m = 1 GEMV over a checkpoint's LM head read four ways:
//            from the mapped file (how `--mmap` reads it), from an anonymous copy, and from an
//            anonymous copy on huge pages (how `serve` and `bench` hold the weights).
// All figures are best-of-several, denominators re-measured next to each kernel, each timed two
// ways: wall clock, and CPU time per thread (what the threads would take on an unshared machine;
// the honest figure when other work shares the cores, as on a shared build machine).
// Threads: MOESERVE_THREADS (default: all hardware threads). ISA: MOESERVE_ISA caps it.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "core/cpu_features.h"
#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "kernels/roofline.h"
#include "model/safetensors.h"

using namespace moeserve;
using namespace moeserve::kernels;

namespace {

// A weight with random contents: values in about [-1, 1] (fp8: no NaN, scales ~1e-3).
// Bytes on huge pages where the kernel grants them, as `serve` and `bench` hold the weights.
class HugeBytes {
 public:
  void resize(size_t n) {
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t total = std::max(kHuge, (n + kHuge - 1) / kHuge * kHuge);
    p_.reset(static_cast<uint8_t*>(std::aligned_alloc(kHuge, total)));
    if (!p_) throw std::bad_alloc();
    ::madvise(p_.get(), total, MADV_HUGEPAGE);  // advice: works without it
    n_ = n;
  }
  uint8_t* data() const { return p_.get(); }
  size_t size() const { return n_; }
  uint8_t& operator[](size_t i) { return p_.get()[i]; }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> p_;
  size_t n_ = 0;
};

// Q8 / Q4: groups of `group` columns with bf16 scales (as published: compressed-tensors
// pack-quantized), every stored value equally likely.
struct BenchWeight {
  HugeBytes data;
  std::vector<float> scales;
  std::vector<uint16_t> group_scales;
  Weight w;
  BenchWeight(DType dt, int64_t rows, int64_t cols, int64_t group = 0) {
    data.resize(rows * row_bytes(dt, cols));
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < data.size(); i += 8) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      uint64_t v = s >> 8;
      if (dt == DType::BF16) v = (v & 0x807f807f807f807full) | 0x3f003f003f003f00ull;
      // fp8: never 0x7f / 0xff (NaN), never subnormal (as in real checkpoints, ~1 in 10^4)
      if (dt == DType::F8_E4M3) v = (v & 0xf7f7f7f7f7f7f7f7ull) | 0x4040404040404040ull;
      std::memcpy(&data[i], &v, std::min<size_t>(8, data.size() - i));
    }
    w = Weight{dt, data.data(), rows, cols};
    if (dt == DType::F8_E4M3) {
      w.scale_cols = (cols + 127) / 128;
      scales.assign(((rows + 127) / 128) * w.scale_cols, 1e-3f);
      w.scale_inv = scales.data();
      w.fp8_plain = fp8_plain(data.data(), data.size());
    }
    if (dt == DType::Q8 || dt == DType::Q4) {
      w.group_size = group;
      w.group_cols = (cols + group - 1) / group;
      group_scales.resize(rows * w.group_cols);
      for (size_t i = 0; i < group_scales.size(); ++i)
        group_scales[i] = f32_to_bf16(1e-3f * (1.0f + static_cast<float>(i % 7) / 8));
      w.group_scale = group_scales.data();
      w.group_scale_dtype = DType::BF16;
    }
  }
};

// "BF16", "F8_E4M3", "Q4/g32", ...
std::string weight_name(DType dt, int64_t group) {
  std::string s = dtype_name(dt);
  if (dt == DType::Q8 || dt == DType::Q4) s += "/g" + std::to_string(group);
  return s;
}

// Best (lowest) wall and CPU-clock seconds of fn over `iters` calls. The machine may be shared:
// the best run is the least disturbed, and the CPU clock (see Clock::kCpu) leaves out the time
// the threads were not running.
struct Best {
  double wall = 1e30, cpu = 1e30;
};
template <class F>
void time_into(const ThreadPool& pool, Best& best, F&& fn) {
  const double w0 = now_seconds(Clock::kWall, pool), c0 = now_seconds(Clock::kCpu, pool);
  fn();
  best.cpu = std::min(best.cpu, now_seconds(Clock::kCpu, pool) - c0);
  best.wall = std::min(best.wall, now_seconds(Clock::kWall, pool) - w0);
}

// Decode: weights cycled through copies totalling > 1 GB, so every call streams from DRAM (no
// help from a large L3). The denominator is a plain streaming read of copies of the same
// weight bytes, timed alternately with the kernel.
void decode(const ThreadPool& pool, DType dt, int64_t rows, int64_t cols, int64_t group = 0,
            std::initializer_list<int64_t> ms = {1, 4, 8}) {
  std::vector<std::unique_ptr<BenchWeight>> copies;
  size_t total = 0;
  while (total < (size_t{1} << 30)) {
    copies.push_back(std::make_unique<BenchWeight>(dt, rows, cols, group));
    total += copies.back()->w.bytes();
  }
  const double bytes = copies[0]->w.bytes();
  for (int64_t m : ms) {
    std::vector<float> x(m * cols, 0.01f), y(m * rows);
    matmul(pool, x.data(), m, cols, copies[0]->w, y.data(), rows);  // warm-up
    Best read, mm;
    for (int round = 0; round < 4; ++round) {
      // The kernel reads the copy half the ring away from the one just read, so that a matrix
      // smaller than the last-level cache is not found there.
      const size_t n = copies.size();
      for (size_t i = 0; i < n; ++i) {
        const BenchWeight& r = *copies[i];
        const BenchWeight& c = *copies[(i + n / 2) % n];
        time_into(pool, read, [&] { time_stream_read(pool, r.data.data(), r.data.size()); });
        time_into(pool, mm, [&] { matmul(pool, x.data(), m, cols, c.w, y.data(), rows); });
      }
    }
    const double raw = copies[0]->data.size();
    std::printf(
        "decode  %-7s m=%lld N=%lld K=%lld %5.1f MB | wall %6.1f GB/s, read %5.1f, %5.1f%% | cpu "
        "%6.1f GB/s, read %5.1f, %5.1f%% | %7.0f calls/s\n",
        weight_name(dt, group).c_str(), (long long)m, (long long)rows, (long long)cols, bytes / 1e6,
        bytes / mm.wall / 1e9, raw / read.wall / 1e9, 100 * bytes / mm.wall / (raw / read.wall),
        bytes / mm.cpu / 1e9, raw / read.cpu / 1e9, 100 * bytes / mm.cpu / (raw / read.cpu),
        1 / mm.wall);
  }
}

// The m = 1 GEMV over a matrix that stays in the threads' L2 caches (512 KB), called many
// times: the rate the kernel's instructions allow, without DRAM. Where it is not well above
// the read bandwidth, decode is compute bound.
void cached(const ThreadPool& pool, DType dt, int64_t rows, int64_t cols, int64_t group = 0) {
  const BenchWeight bw(dt, rows, cols, group);
  std::vector<float> x(cols, 0.01f), y(rows);
  const double bytes = bw.w.bytes();
  constexpr int kCalls = 200;
  Best mm;
  for (int round = 0; round < 8; ++round)
    time_into(pool, mm, [&] {
      for (int i = 0; i < kCalls; ++i) matmul(pool, x.data(), 1, cols, bw.w, y.data(), rows);
    });
  std::printf("cached  %-7s m=1 N=%lld K=%lld %5.2f MB | wall %6.1f GB/s | cpu %6.1f GB/s\n",
              weight_name(dt, group).c_str(), (long long)rows, (long long)cols, bytes / 1e6,
              kCalls * bytes / mm.wall / 1e9, kCalls * bytes / mm.cpu / 1e9);
}

// Decode on small matrices (a few MB, short rows), as a model's experts: views of one > 1 GB
// matrix, one call each, the whole pass timed at once against a plain read of the same bytes (a
// single call is too short to time, and a best-of over calls would pick cache-warm ones). With
// `transposed`, matmul_t instead (y = x W, the MLA absorption through one head's W_UK), the
// views shared out among the threads and each computed on one, as the model's attention does.
void decode_small(const ThreadPool& pool, DType dt, int64_t rows, int64_t cols,
                  bool transposed = false, int64_t group = 0) {
  const int64_t n = std::max<int64_t>(1, (int64_t{1} << 30) / (rows * row_bytes(dt, cols)));
  const BenchWeight all(dt, n * rows, cols, group);
  std::vector<Weight> views(n);
  for (int64_t i = 0; i < n; ++i) views[i] = all.w.rows_view(i * rows, rows);
  const double bytes = all.w.bytes(), raw = all.data.size();
  for (int64_t m : {1, 4}) {
    const int64_t in = transposed ? rows : cols, out = transposed ? cols : rows;
    std::vector<float> x(m * in, 0.01f), y(pool.size() * m * out);
    Best read, mm;
    for (int round = 0; round < 4; ++round) {
      time_into(pool, read, [&] { time_stream_read(pool, all.data.data(), all.data.size()); });
      time_into(pool, mm, [&] {
        if (transposed) {
          pool.parallel_for(n, [&](int64_t b, int64_t e, int t) {
            for (int64_t i = b; i < e; ++i)
              matmul_t(pool, x.data(), m, in, views[i], y.data() + t * m * out, out);
          });
        } else {
          for (const Weight& v : views) matmul(pool, x.data(), m, in, v, y.data(), out);
        }
      });
    }
    std::printf(
        "%s %-7s m=%lld N=%lld K=%lld x %lld | wall %6.1f GB/s, read %5.1f, %5.1f%% | cpu %6.1f "
        "GB/s, read %5.1f, %5.1f%% | %7.0f matrices/s\n",
        transposed ? "decode_t" : "decode  ", weight_name(dt, group).c_str(), (long long)m,
        (long long)out, (long long)in, (long long)n, bytes / mm.wall / 1e9, raw / read.wall / 1e9,
        100 * bytes / mm.wall / (raw / read.wall), bytes / mm.cpu / 1e9, raw / read.cpu / 1e9,
        100 * bytes / mm.cpu / (raw / read.cpu), n / mm.wall);
  }
}

void prefill(const ThreadPool& pool, DType dt, int64_t m, int64_t rows, int64_t cols,
             int64_t group = 0, Precision precision = Precision::Exact) {
  BenchWeight bwt(dt, rows, cols, group);
  std::vector<float> x(m * cols, 0.01f), y(m * rows);
  matmul(pool, x.data(), m, cols, bwt.w, y.data(), rows, precision);  // warm-up
  double peak_wall = 0, peak_cpu = 0;
  Best mm;
  for (int round = 0; round < 4; ++round) {
    peak_wall = std::max(peak_wall, measure_peak_gflops(pool, precision, Clock::kWall));
    peak_cpu = std::max(peak_cpu, measure_peak_gflops(pool, precision, Clock::kCpu));
    time_into(pool, mm, [&] { matmul(pool, x.data(), m, cols, bwt.w, y.data(), rows, precision); });
  }
  const double flop = 2.0 * m * rows * cols;
  std::printf(
      "prefill %-7s m=%lld N=%lld K=%lld %s on %-10s | wall %6.1f GFLOP/s, peak %5.1f, %5.1f%% | "
      "cpu %6.1f GFLOP/s, peak %5.1f, %5.1f%%\n",
      weight_name(dt, group).c_str(), (long long)m, (long long)rows, (long long)cols,
      precision_name(precision),
      takes_bf16(bwt.w, precision) ? matmul_unit(precision) : matmul_unit(Precision::Exact),
      flop / mm.wall / 1e9, peak_wall, 100 * flop / mm.wall / 1e9 / peak_wall, flop / mm.cpu / 1e9,
      peak_cpu, 100 * flop / mm.cpu / 1e9 / peak_cpu);
}

// The same product under both precisions, timed in alternation: the bf16 / exact speed ratio.
void prefill_ratio(const ThreadPool& pool, DType dt, int64_t m, int64_t rows, int64_t cols) {
  BenchWeight bwt(dt, rows, cols, 0);
  std::vector<float> x(m * cols, 0.01f), y(m * rows);
  Best t[2];
  const Precision ps[2] = {Precision::Exact, Precision::Bf16};
  for (int round = 0; round < 6; ++round)
    for (int i = 0; i < 2; ++i)
      time_into(pool, t[i], [&] { matmul(pool, x.data(), m, cols, bwt.w, y.data(), rows, ps[i]); });
  std::printf("ratio   %-7s m=%lld N=%lld K=%lld | bf16 (%s) / exact (%s): wall %.2fx, cpu %.2fx\n",
              weight_name(dt, 0).c_str(), (long long)m, (long long)rows, (long long)cols,
              matmul_unit(Precision::Bf16), matmul_unit(Precision::Exact), t[0].wall / t[1].wall,
              t[0].cpu / t[1].cpu);
}

// The LM head of a checkpoint (model_dir) read by the m = 1 GEMV from: the mapped file
// (prefaulted, as `--mmap` reads it), an anonymous copy, an anonymous copy advised as huge
// pages (as `serve` and `bench` hold it), and the same at the checkpoint's misalignment.
// Interleaved; 600 MB are written between calls so that each reads from DRAM.
void mapped(const ThreadPool& pool, const std::string& model_dir) {
  const model::WeightStore store(model_dir);
  const model::TensorView& t = store.get("lm_head.weight");
  if (t.shape.size() != 2 ||
      (t.dtype != DType::BF16 && t.dtype != DType::F16 && t.dtype != DType::F32)) {
    std::fprintf(stderr, "mapped: %s's lm_head.weight is not a 2-D bf16/f16/f32 matrix\n",
                 model_dir.c_str());
    return;
  }
  const int64_t rows = t.shape[0], cols = t.shape[1];
  const size_t n = t.nbytes, huge = size_t{2} << 20, total = (n + huge - 1) / huge * huge;
  volatile uint8_t sink = 0;
  for (size_t off = 0; off < n; off += 4096) sink = sink + static_cast<const uint8_t*>(t.data)[off];
  auto* anon = static_cast<uint8_t*>(std::aligned_alloc(64, total));
  auto* hp = static_cast<uint8_t*>(std::aligned_alloc(huge, 2 * total + huge));
  ::madvise(hp, 2 * total + huge, MADV_HUGEPAGE);
  // A control: the copy on huge pages at the checkpoint's offset from a 64-byte boundary.
  const size_t mis = reinterpret_cast<uintptr_t>(t.data) % 64;
  uint8_t* hp_mis = hp + total + (mis ? mis : 8);
  std::memcpy(anon, t.data, n);
  std::memcpy(hp, t.data, n);
  std::memcpy(hp_mis, t.data, n);
  std::printf("the checkpoint's lm_head starts %zu bytes past a 64-byte boundary\n", mis);
  const void* bases[4] = {t.data, anon, hp, hp_mis};
  const char* names[4] = {"the mapped checkpoint", "an anonymous copy", "a copy on huge pages",
                          "huge pages, misaligned"};
  std::vector<float> x(cols, 0.01f), y(rows);
  std::vector<char> evict(size_t{600} << 20, 1);
  Best best[4];
  for (int round = 0; round < 6; ++round)
    for (int k = 0; k < 4; ++k) {
      std::memset(evict.data(), round + k, evict.size());
      const Weight w{t.dtype, bases[k], rows, cols};
      time_into(pool, best[k], [&] { matmul(pool, x.data(), 1, cols, w, y.data(), rows); });
    }
  for (int k = 0; k < 4; ++k)
    std::printf("mapped  %-7s m=1 N=%lld K=%lld from %-21s | wall %6.1f GB/s | cpu %6.1f GB/s\n",
                dtype_name(t.dtype), (long long)rows, (long long)cols, names[k],
                n / best[k].wall / 1e9, n / best[k].cpu / 1e9);
  std::free(anon);
  std::free(hp);
}

}  // namespace

// The weight formats compared: bf16, fp8, Q8 and Q4 (groups of 32 and 128, bf16 scales).
struct Format {
  DType dt;
  int64_t group;
};
constexpr Format kFormats[] = {
    {DType::BF16, 0}, {DType::F8_E4M3, 0}, {DType::Q8, 128}, {DType::Q4, 32}, {DType::Q4, 128}};

int main(int argc, char** argv) {
  // "decode", "prefill", "int" (decode and prefill of the model's expert and wide shapes, every
  // format) or "mapped": that only
  const std::string only = argc > 1 ? argv[1] : "";
  if ((!only.empty() && only != "decode" && only != "prefill" && only != "int" && only != "bf16" &&
       only != "gemv" && only != "mapped") ||
      (only == "mapped") != (argc == 3)) {
    std::fprintf(
        stderr, "usage: bench_kernels [decode | prefill | int | bf16 | gemv | mapped MODEL_DIR]\n");
    return 2;
  }
  ThreadPool pool;
  std::printf("threads %d, isa %s; products: exact on %s, bf16 on %s\n", pool.size(),
              isa_name(active_isa()), matmul_unit(Precision::Exact), matmul_unit(Precision::Bf16));
  std::printf(
      "read bandwidth %.1f GB/s, memcpy %.1f GB/s, peak fp32 FMA %.1f GFLOP/s (%.1f by cpu "
      "clock), peak of bf16's unit %.1f GFLOP/s (%.1f by cpu clock)\n",
      measure_read_bandwidth_gbs(pool), measure_memcpy_gbs(pool, size_t{256} << 20),
      measure_peak_gflops(pool), measure_peak_gflops(pool, Clock::kCpu),
      measure_peak_gflops(pool, Precision::Bf16),
      measure_peak_gflops(pool, Precision::Bf16, Clock::kCpu));
  if (only == "mapped") {
    mapped(pool, argv[2]);
    return 0;
  }
  if (only == "gemv") {
    const Format formats[] = {
        {DType::BF16, 0}, {DType::F8_E4M3, 0}, {DType::Q4, 32}, {DType::Q4, 64}, {DType::Q4, 128}};
    for (const Format& f : formats)  // 512 KB of weights each
      cached(pool, f.dt, f.dt == DType::BF16 ? 128 : f.dt == DType::Q4 ? 512 : 256, 2048, f.group);
    for (const Format& f : formats)
      decode(pool, f.dt, f.dt == DType::BF16 ? 18432 : 36864, 7168, f.group, {1});
    return 0;
  }
  if (only == "int") {
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{7168, 2048}, {2048, 7168}})
      for (const Format& f : kFormats) decode(pool, f.dt, rows, cols, f.group);
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1024, 2048}, {2048, 1024}})
      for (const Format& f : kFormats) decode_small(pool, f.dt, rows, cols, false, f.group);
    for (const Format& f : kFormats) prefill(pool, f.dt, 512, 2048, 7168, f.group);
    return 0;
  }
  if (only != "prefill" && only != "bf16") {
    decode(pool, DType::BF16, 18432, 7168);     // 264 MB
    decode(pool, DType::F8_E4M3, 36864, 7168);  // 264 MB + scales
    decode(pool, DType::Q4, 36864, 7168, 32);   // 132 MB + scales
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1024, 2048}, {2048, 1024}})
      for (const Format& f : kFormats)  // the bench preset's expert matrices
        if (f.dt != DType::BF16) decode_small(pool, f.dt, rows, cols, false, f.group);
    decode_small(pool, DType::F8_E4M3, 128, 512, true);  // W_UK of one head (matmul_t)
  }
  if (only == "decode") return 0;
  for (const Format& f : kFormats) {
    if (only == "bf16") break;
    prefill(pool, f.dt, 512, 7168, 2048, f.group);
    prefill(pool, f.dt, 512, 2048, 7168, f.group);
  }
  for (DType dt : {DType::BF16, DType::F8_E4M3}) {  // --precision bf16
    prefill(pool, dt, 512, 7168, 2048, 0, Precision::Bf16);
    prefill(pool, dt, 512, 2048, 7168, 0, Precision::Bf16);
    prefill_ratio(pool, dt, 512, 2048, 7168);
  }
  return 0;
}
