// bench_kernels: the CPU kernels against this machine's roofline.
//   decode:  matmul at m = 1..8 streams the weights once: GB/s vs measured read bandwidth.
//   prefill: matmul at m = 512 is compute bound: GFLOP/s vs measured peak FMA rate.
// Threads: MOESERVE_THREADS (default: all hardware threads). ISA: MOESERVE_ISA caps it.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/cpu_features.h"
#include "core/thread_pool.h"
#include "kernels/kernels.h"
#include "kernels/roofline.h"

using namespace moeserve;
using namespace moeserve::kernels;

namespace {

// A weight with random contents: values in about [-1, 1] (fp8: no NaN, scales ~1e-3).
struct BenchWeight {
  std::vector<uint8_t> data;
  std::vector<float> scales;
  Weight w;
  BenchWeight(DType dt, int64_t rows, int64_t cols) {
    data.resize(rows * cols * dtype_size(dt));
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < data.size(); i += 8) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      uint64_t v = s >> 8;
      if (dt == DType::BF16) v = (v & 0x807f807f807f807full) | 0x3f003f003f003f00ull;
      if (dt == DType::F8_E4M3) v &= 0xf7f7f7f7f7f7f7f7ull;  // never 0x7f / 0xff
      std::memcpy(&data[i], &v, std::min<size_t>(8, data.size() - i));
    }
    w = Weight{dt, data.data(), rows, cols};
    if (dt == DType::F8_E4M3) {
      w.scale_cols = (cols + 127) / 128;
      scales.assign(((rows + 127) / 128) * w.scale_cols, 1e-3f);
      w.scale_inv = scales.data();
    }
  }
};

// Median seconds of `iters` calls of fn (after one warm-up call).
template <class F>
double time_median(int iters, F&& fn) {
  fn();
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void decode(const ThreadPool& pool, DType dt, int64_t rows, int64_t cols, double bw) {
  BenchWeight bwt(dt, rows, cols);
  for (int64_t m : {1, 4, 8}) {
    std::vector<float> x(m * cols, 0.01f), y(m * rows);
    const double s = time_median(10, [&] { matmul(pool, x.data(), m, cols, bwt.w, y.data(), rows); });
    const double gbs = bwt.w.bytes() / s / 1e9;
    std::printf("decode  %-7s m=%-3lld N=%-6lld K=%-5lld %7.1f MB  %7.2f ms  %6.1f GB/s  %5.1f%% of bw\n",
                dtype_name(dt), (long long)m, (long long)rows, (long long)cols, bwt.w.bytes() / 1e6,
                s * 1e3, gbs, 100 * gbs / bw);
  }
}

void prefill(const ThreadPool& pool, DType dt, int64_t m, int64_t rows, int64_t cols, double peak) {
  BenchWeight bwt(dt, rows, cols);
  std::vector<float> x(m * cols, 0.01f), y(m * rows);
  const double s = time_median(5, [&] { matmul(pool, x.data(), m, cols, bwt.w, y.data(), rows); });
  const double gf = 2.0 * m * rows * cols / s / 1e9;
  std::printf("prefill %-7s m=%-3lld N=%-6lld K=%-5lld %7.2f ms  %6.1f GFLOP/s  %5.1f%% of peak\n",
              dtype_name(dt), (long long)m, (long long)rows, (long long)cols, s * 1e3, gf,
              100 * gf / peak);
}

}  // namespace

int main() {
  ThreadPool pool;
  std::printf("threads %d, isa %s\n", pool.size(), isa_name(detected_isa()));
  const double bw = measure_read_bandwidth_gbs(pool);
  const double peak = measure_peak_gflops(pool);
  const double cp = measure_memcpy_gbs(pool, size_t{256} << 20);
  std::printf("read bandwidth %.1f GB/s, memcpy %.1f GB/s, peak fp32 FMA %.1f GFLOP/s\n", bw, cp,
              peak);
  decode(pool, DType::BF16, 18432, 7168, bw);    // 264 MB
  decode(pool, DType::F8_E4M3, 36864, 7168, bw);  // 264 MB + scales
  for (DType dt : {DType::BF16, DType::F8_E4M3}) {
    prefill(pool, dt, 512, 7168, 2048, peak);
    prefill(pool, dt, 512, 2048, 7168, peak);
  }
  return 0;
}
