#include "kernels/roofline.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>

#include "core/cpu_features.h"
#include "core/error.h"

namespace moeserve::kernels {
namespace {

constexpr int kRuns = 7;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;

Buffer alloc(size_t bytes) {
  auto* p = static_cast<uint8_t*>(
      std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) & ~size_t{63})));
  MS_CHECK(p != nullptr, "out of memory allocating ", bytes, " bytes");
  return Buffer(p);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Sums of the floats of [p, p + n), n a multiple of 64: four independent add chains per ISA.
__attribute__((target("avx512f"))) float read_avx512(const float* p, size_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
  }
  alignas(64) float t[16];
  _mm512_store_ps(t, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  return t[0] + t[15];  // the value only keeps the loads alive
}

__attribute__((target("avx2"))) float read_avx2(const float* p, size_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < n; i += 64) {
    a0 = _mm256_add_ps(a0, _mm256_add_ps(_mm256_load_ps(p + i), _mm256_load_ps(p + i + 8)));
    a1 = _mm256_add_ps(a1, _mm256_add_ps(_mm256_load_ps(p + i + 16), _mm256_load_ps(p + i + 24)));
    a2 = _mm256_add_ps(a2, _mm256_add_ps(_mm256_load_ps(p + i + 32), _mm256_load_ps(p + i + 40)));
    a3 = _mm256_add_ps(a3, _mm256_add_ps(_mm256_load_ps(p + i + 48), _mm256_load_ps(p + i + 56)));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  return t[0] + t[7];
}

float read_scalar(const float* p, size_t n) {
  __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  // SSE2 is baseline x86-64
  for (size_t i = 0; i < n; i += 16) {
    a0 = _mm_add_ps(a0, _mm_load_ps(p + i));
    a1 = _mm_add_ps(a1, _mm_load_ps(p + i + 4));
    a2 = _mm_add_ps(a2, _mm_load_ps(p + i + 8));
    a3 = _mm_add_ps(a3, _mm_load_ps(p + i + 12));
  }
  alignas(16) float t[4];
  _mm_store_ps(t, _mm_add_ps(_mm_add_ps(a0, a1), _mm_add_ps(a2, a3)));
  return t[0] + t[3];
}

// `iters` rounds of 16 independent FMA chains; returns FMAs x lanes done.
__attribute__((target("avx512f"))) double fma_avx512(int64_t iters, float* sink) {
  __m512 a[16];
  const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (int j = 0; j < 16; ++j) a[j] = _mm512_set1_ps(static_cast<float>(j));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) a[j] = _mm512_fmadd_ps(a[j], b, c);
  }
  __m512 s = a[0];
  for (int j = 1; j < 16; ++j) s = _mm512_add_ps(s, a[j]);
  alignas(64) float t[16];
  _mm512_store_ps(t, s);
  *sink = t[0];
  return static_cast<double>(iters) * 16 * 16;
}

// `iters` rounds of 16 independent vdpbf16ps chains; returns multiply-adds x lanes done (two
// per lane per instruction).
__attribute__((target("avx512f,avx512bf16"))) double dpbf16_avx512(int64_t iters, float* sink) {
  __m512 a[16];
  const __m512i b = _mm512_set1_epi32(0x3f803f80), c = _mm512_set1_epi32(0x33d633d6);
  for (int j = 0; j < 16; ++j) a[j] = _mm512_set1_ps(static_cast<float>(j));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j)
      a[j] = _mm512_dpbf16_ps(a[j], reinterpret_cast<__m512bh>(b), reinterpret_cast<__m512bh>(c));
  }
  __m512 s = a[0];
  for (int j = 1; j < 16; ++j) s = _mm512_add_ps(s, a[j]);
  alignas(64) float t[16];
  _mm512_store_ps(t, s);
  *sink = t[0];
  return static_cast<double>(iters) * 16 * 16 * 2;
}

__attribute__((target("avx2,fma"))) double fma_avx2(int64_t iters, float* sink) {
  __m256 a[12];
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int j = 0; j < 12; ++j) a[j] = _mm256_set1_ps(static_cast<float>(j));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) a[j] = _mm256_fmadd_ps(a[j], b, c);
  }
  __m256 s = a[0];
  for (int j = 1; j < 12; ++j) s = _mm256_add_ps(s, a[j]);
  alignas(32) float t[8];
  _mm256_store_ps(t, s);
  *sink = t[0];
  return static_cast<double>(iters) * 12 * 8;
}

// Without an FMA unit: a multiply and an add, counted as the 2 flops they are.
double fma_scalar(int64_t iters, float* sink) {
  __m128 a[8];
  const __m128 b = _mm_set1_ps(0.999999f), c = _mm_set1_ps(1e-7f);
  for (int j = 0; j < 8; ++j) a[j] = _mm_set1_ps(static_cast<float>(j));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) a[j] = _mm_add_ps(_mm_mul_ps(a[j], b), c);
  }
  __m128 s = a[0];
  for (int j = 1; j < 8; ++j) s = _mm_add_ps(s, a[j]);
  *sink = _mm_cvtss_f32(s);
  return static_cast<double>(iters) * 8 * 4;
}

}  // namespace

double now_seconds(Clock clock, const ThreadPool& pool) {
  if (clock == Clock::kWall)
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (ts.tv_sec + 1e-9 * ts.tv_nsec) / pool.size();
}

double time_stream_read(const ThreadPool& pool, const void* data, size_t bytes, Clock clock) {
  // Each thread reads a 64-byte aligned range whose length is a multiple of 256 bytes; the
  // ragged ends (< 320 bytes) are left out.
  const uintptr_t p0 = (reinterpret_cast<uintptr_t>(data) + 63) & ~uintptr_t{63};
  const uintptr_t p1 = reinterpret_cast<uintptr_t>(data) + bytes;
  if (p1 <= p0 + 256) return 0;
  const int64_t n_threads = pool.size();
  const size_t per = (p1 - p0) / n_threads / 256 * 256;
  const Isa isa = detected_isa();
  float sink[64] = {};
  const double t0 = now_seconds(clock, pool);
  pool.parallel_for(n_threads, [&](int64_t b, int64_t e, int) {
    for (int64_t t = b; t < e; ++t) {
      const float* p = reinterpret_cast<const float*>(p0 + t * per);
      const size_t n = per / sizeof(float);
      sink[t % 64] += isa >= Isa::Avx512 ? read_avx512(p, n)
                      : isa == Isa::Avx2 ? read_avx2(p, n)
                                         : read_scalar(p, n);
    }
  });
  const double s = now_seconds(clock, pool) - t0;
  asm volatile("" : : "r"(sink) : "memory");
  return s;
}

double measure_read_bandwidth_gbs(const ThreadPool& pool, size_t bytes) {
  const int64_t n_threads = pool.size();
  const size_t per = std::max<size_t>(256, bytes / n_threads / 256 * 256);
  const size_t total = per * n_threads;
  Buffer buf = alloc(total);
  // First touch by the thread that reads it later.
  pool.parallel_for(n_threads, [&](int64_t b, int64_t e, int) {
    for (int64_t t = b; t < e; ++t) std::memset(buf.get() + t * per, 1, per);
  });
  double best = 0;
  for (int run = 0; run < kRuns; ++run)
    best = std::max(best, total / time_stream_read(pool, buf.get(), total) / 1e9);
  return best;
}

double measure_peak_gflops(const ThreadPool& pool, Clock clock) {
  return measure_peak_gflops(pool, Precision::Exact, clock);
}

double measure_peak_gflops(const ThreadPool& pool, Precision precision, Clock clock) {
  const Isa isa = active_isa();
  const bool dp = precision == Precision::Bf16 && isa == Isa::Avx512Bf16;
  const int64_t iters = 4'000'000;  // ~10 ms a run: short runs find the machine's quiet moments
  double best = 0;
  for (int run = 0; run < kRuns; ++run) {
    double lanes_done[256] = {};
    float sink[256] = {};
    const double t0 = now_seconds(clock, pool);
    pool.parallel_for(pool.size(), [&](int64_t b, int64_t e, int) {
      for (int64_t t = b; t < e; ++t) {
        const int s = static_cast<int>(t % 256);
        lanes_done[s] += dp                   ? dpbf16_avx512(iters, &sink[s])
                         : isa >= Isa::Avx512 ? fma_avx512(iters, &sink[s])
                         : isa == Isa::Avx2   ? fma_avx2(iters, &sink[s])
                                              : fma_scalar(iters, &sink[s]);
      }
    });
    const double secs = now_seconds(clock, pool) - t0;
    double lanes = 0;
    for (double l : lanes_done) lanes += l;
    best = std::max(best, 2.0 * lanes / secs / 1e9);
    asm volatile("" : : "r"(sink) : "memory");
  }
  return best;
}

double measure_memcpy_gbs(const ThreadPool& pool, size_t bytes) {
  const int64_t n_threads = pool.size();
  const size_t per = std::max<size_t>(64, bytes / n_threads / 64 * 64);
  const size_t total = per * n_threads;
  Buffer src = alloc(total), dst = alloc(total);
  pool.parallel_for(n_threads, [&](int64_t b, int64_t e, int) {
    for (int64_t t = b; t < e; ++t) {
      std::memset(src.get() + t * per, 1, per);
      std::memset(dst.get() + t * per, 0, per);
    }
  });
  double best = 0;
  for (int run = 0; run < kRuns; ++run) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(n_threads, [&](int64_t b, int64_t e, int) {
      for (int64_t t = b; t < e; ++t) std::memcpy(dst.get() + t * per, src.get() + t * per, per);
    });
    best = std::max(best, static_cast<double>(total) / seconds_since(t0) / 1e9);
  }
  return best;
}

}  // namespace moeserve::kernels
