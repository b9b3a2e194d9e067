// The per-instruction-set implementations of kernels.h, for dispatch and for tests that hold
// them to each other bit for bit. Each lives in kernels_<isa>.cpp, compiled for that set only.
#pragma once

#include "core/cpu_features.h"
#include "kernels/kernels.h"

namespace moeserve::kernels {

// The public kernels of kernels.h as one instruction set implements them.
struct KernelTable {
  void (*matmul)(const ThreadPool& pool, const float* x, int64_t m, int64_t ldx, const Weight& w,
                 float* y, int64_t ldy);
  void (*matmul_t)(const ThreadPool& pool, const float* x, int64_t m, int64_t ldx, const Weight& w,
                   float* y, int64_t ldy);
  void (*dequant_row)(const Weight& w, int64_t r, float* out);
  float (*dot)(const float* a, const float* b, int64_t n);
  void (*axpy)(float a, const float* x, float* y, int64_t n);
  void (*dots)(const float* a, int64_t na, int64_t lda, const float* const* b, int64_t nb,
               int64_t boff, int64_t n, float* out, int64_t ldo);
  void (*weighted_rows)(const float* c, int64_t nc, int64_t ldc, const float* const* rows,
                        int64_t nrows, int64_t roff, int64_t n, float* y, int64_t ldy);
  void (*matmul_batch)(const ThreadPool& pool, const MatmulJob* jobs, int64_t n);
  void (*weighted_sum)(const float* const* rows, const float* w, int64_t n, int64_t cols, float* y);
  void (*softmax)(float* x, int64_t n, float scale);
  void (*dots_cached)(const float* a, int64_t na, int64_t lda, const CachedRows& b, int64_t nb,
                      float* out, int64_t ldo);
  void (*weighted_cached)(const float* c, int64_t nc, int64_t ldc, const CachedRows& rows,
                          int64_t nrows, int64_t roff, int64_t n, float* y, int64_t ldy);
  // Every job by the bf16 contract (kernels.h, Precision::Bf16; weights F32, F16, BF16, F8_E4M3).
  void (*matmul_bf16)(const ThreadPool& pool, const MatmulJob* jobs, int64_t n);
};

namespace scalar {
const KernelTable& table();
}
namespace avx2 {
const KernelTable& table();  // call only where isa_available(Isa::Avx2)
}
namespace avx512 {
const KernelTable& table();  // call only where isa_available(Isa::Avx512)
// The AVX-512 kernels with bf16 products on vdpbf16ps; call only where
// isa_available(Isa::Avx512Bf16).
const KernelTable& bf16_table();
// Whether vdpbf16ps computes the bf16 contract on this CPU (call only where it has the
// instruction): a fixed set of edge cases and pseudo-random ones against bf16_math.h.
bool bf16_unit_ok();
}  // namespace avx512

// Whether this CPU can run `isa` (MOESERVE_ISA is not consulted). Avx512Bf16 also needs
// vdpbf16ps to pass bf16_unit_ok.
bool isa_available(Isa isa);
// The table of `isa`, which must be available.
const KernelTable& kernel_table(Isa isa);

}  // namespace moeserve::kernels
