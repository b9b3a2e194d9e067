// What this machine can do at best, measured: the denominators of `moeserve bench` ratios.
#pragma once

#include <cstddef>

#include "core/thread_pool.h"
#include "kernels/kernels.h"

namespace moeserve::kernels {

// How a measurement is timed. kWall: elapsed time. kCpu: CPU time of the process divided by
// the pool's thread count, i.e. the time the threads would take had they had their cores to
// themselves (on a machine shared with other work; pool threads sleep while they wait).
enum class Clock { kWall, kCpu };

// A reading of `clock` in seconds (kCpu: already divided by the pool's thread count).
double now_seconds(Clock clock, const ThreadPool& pool);

// Streaming read of a `bytes` buffer split over all threads of `pool` (widest vector loads the
// CPU has), best of a few runs, in GB/s (1e9 bytes per second).
double measure_read_bandwidth_gbs(const ThreadPool& pool, size_t bytes = size_t{1} << 30);

// Seconds of one streaming read of [data, data + bytes) split over all threads of `pool`: the
// kernel measure_read_bandwidth_gbs times, for timing the bytes a kernel reads, in place.
double time_stream_read(const ThreadPool& pool, const void* data, size_t bytes,
                        Clock clock = Clock::kWall);

// Peak fp32 fused multiply-add rate with all threads of `pool`, in GFLOP/s: many independent
// FMA chains on the widest ISA detected (detected_isa()), 2 flops per lane per FMA.
double measure_peak_gflops(const ThreadPool& pool, Clock clock = Clock::kWall);
// The peak of the unit that products of `precision` run on (kernels::matmul_unit): for Bf16 on
// vdpbf16ps, many independent chains of it, 4 flops per lane per instruction; otherwise the
// FMA peak above (the emulation runs on FMA).
double measure_peak_gflops(const ThreadPool& pool, Precision precision, Clock clock = Clock::kWall);

// memcpy of `bytes` from one buffer to another, split over all threads: bytes copied per
// second (each byte counted once, not read + write), best of a few runs, in GB/s.
double measure_memcpy_gbs(const ThreadPool& pool, size_t bytes);

}  // namespace moeserve::kernels
