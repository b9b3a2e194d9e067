#include "kernels/kernels.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/isa.h"

namespace moeserve::kernels {

Weight Weight::rows_view(int64_t r0, int64_t n) const {
  MS_ASSERT(r0 >= 0 && n >= 0 && r0 + n <= rows);
  Weight v = *this;
  v.data = static_cast<const uint8_t*>(data) + r0 * row_bytes(dtype, cols);
  v.rows = n;
  v.scale_row0 = scale_row0 + r0;
  if (group_scale)
    v.group_scale = static_cast<const uint8_t*>(group_scale) +
                    r0 * group_cols * static_cast<int64_t>(dtype_size(group_scale_dtype));
  return v;
}

float Weight::at(int64_t r, int64_t c) const {
  const int64_t i = r * cols + c;
  switch (dtype) {
    case DType::F32:
      return static_cast<const float*>(data)[i];
    case DType::F16:
      return f16_to_f32(static_cast<const uint16_t*>(data)[i]);
    case DType::BF16:
      return bf16_to_f32(static_cast<const uint16_t*>(data)[i]);
    case DType::F8_E4M3:
      return fp8e4m3_to_f32(static_cast<const uint8_t*>(data)[i]) *
             scale_inv[((scale_row0 + r) / kFp8Block) * scale_cols + c / kFp8Block];
    case DType::Q8:
    case DType::Q4: {
      const auto* row = static_cast<const uint8_t*>(data) + r * row_bytes(dtype, cols);
      const int q =
          dtype == DType::Q8 ? int{row[c]} - 128 : int{(row[c / 2] >> (c % 2 * 4)) & 15} - 8;
      const int64_t g = r * group_cols + c / group_size;
      float s = 0;
      switch (group_scale_dtype) {
        case DType::BF16:
          s = bf16_to_f32(static_cast<const uint16_t*>(group_scale)[g]);
          break;
        case DType::F16:
          s = f16_to_f32(static_cast<const uint16_t*>(group_scale)[g]);
          break;
        default:
          s = static_cast<const float*>(group_scale)[g];
      }
      return static_cast<float>(q) * s;
    }
    default:
      fail("Weight::at: unsupported dtype ", dtype_name(dtype));
  }
}

size_t Weight::bytes() const {
  size_t n = static_cast<size_t>(rows * row_bytes(dtype, cols));
  if (group_scale) n += static_cast<size_t>(rows * group_cols) * dtype_size(group_scale_dtype);
  if (dtype == DType::F8_E4M3 && rows > 0) {
    const int64_t b0 = scale_row0 / kFp8Block, b1 = (scale_row0 + rows - 1) / kFp8Block;
    n += static_cast<size_t>((b1 - b0 + 1) * scale_cols) * sizeof(float);
  }
  return n;
}

bool fp8_plain(const uint8_t* data, size_t n) {
  // Eight bytes at a time: per byte, a flag in bit 7 (added up by one multiply).
  constexpr uint64_t k01 = 0x0101010101010101ull, k80 = k01 * 0x80, k7f = k01 * 0x7f,
                     k78 = k01 * 0x78, k07 = k01 * 0x07;
  auto count = [](uint64_t flags) { return static_cast<size_t>(((flags >> 7) * k01) >> 56); };
  size_t nan = 0, subnormal = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, data + i, 8);
    nan += count(((w & k7f) + k01) & k80);               // b & 0x7f == 0x7f
    const uint64_t exp_zero = ~((w & k78) + k78) & k80;  // exponent bits all 0
    const uint64_t mant_nz = ((w & k07) + k7f) & k80;    // mantissa bits not all 0
    subnormal += count(exp_zero & mant_nz);
  }
  for (; i < n; ++i) {
    const uint32_t m = data[i] & 0x7fu;
    nan += m == 0x7fu;
    subnormal += m - 1u < 7u;
  }
  return nan == 0 && subnormal <= n / 1024;
}

bool isa_available(Isa isa) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  switch (isa) {
    case Isa::Scalar:
      return true;
    case Isa::Avx2:
      return avx2;
    case Isa::Avx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Isa::Avx512Bf16: {
      static const bool ok = isa_available(Isa::Avx512) && __builtin_cpu_supports("avx512bf16") &&
                             avx512::bf16_unit_ok();
      return ok;
    }
  }
  return false;
}

const KernelTable& kernel_table(Isa isa) {
  MS_ASSERT(isa_available(isa));
  switch (isa) {
    case Isa::Avx512Bf16:
      return avx512::bf16_table();
    case Isa::Avx512:
      return avx512::table();
    case Isa::Avx2:
      return avx2::table();
    default:
      return scalar::table();
  }
}

Isa active_isa() {
  static const Isa isa = [] {
    const Isa d = detected_isa();
    // A CPU whose vdpbf16ps fails bf16_unit_ok runs the AVX-512 kernels.
    return d == Isa::Avx512Bf16 && !isa_available(d) ? Isa::Avx512 : d;
  }();
  return isa;
}

namespace {
const KernelTable& active() {
  static const KernelTable& t = kernel_table(active_isa());
  return t;
}
}  // namespace

const char* precision_name(Precision p) {
  return p == Precision::Bf16 ? "bf16" : "exact";
}

bool takes_bf16(const Weight& w, Precision p) {
  return p == Precision::Bf16 && w.dtype != DType::Q8 && w.dtype != DType::Q4;
}

const char* matmul_unit(Precision p) {
  const Isa isa = active_isa();
  if (p == Precision::Exact && isa == Isa::Avx512Bf16) return isa_name(Isa::Avx512);
  return isa_name(isa);
}

void matmul(const ThreadPool& pool, const float* x, int64_t m, int64_t ldx, const Weight& w,
            float* y, int64_t ldy, Precision p) {
  if (takes_bf16(w, p)) {
    MatmulJob j{x, m, ldx, &w, y, ldy, nullptr, p};
    return active().matmul_bf16(pool, &j, 1);
  }
  active().matmul(pool, x, m, ldx, w, y, ldy);
}

void matmul_batch(const ThreadPool& pool, const MatmulJob* jobs, int64_t n) {
  bool any_bf16 = false, all_bf16 = true;
  for (int64_t i = 0; i < n; ++i) {
    const bool b = takes_bf16(*jobs[i].w, jobs[i].precision);
    any_bf16 |= b;
    all_bf16 &= b;
  }
  if (!any_bf16) return active().matmul_batch(pool, jobs, n);
  if (all_bf16) return active().matmul_bf16(pool, jobs, n);
  std::vector<MatmulJob> exact, bf16;
  for (int64_t i = 0; i < n; ++i)
    (takes_bf16(*jobs[i].w, jobs[i].precision) ? bf16 : exact).push_back(jobs[i]);
  active().matmul_batch(pool, exact.data(), static_cast<int64_t>(exact.size()));
  active().matmul_bf16(pool, bf16.data(), static_cast<int64_t>(bf16.size()));
}

void matmul_rows(const ThreadPool& pool, const float* const* x, int64_t m, const Weight& w,
                 float* y, int64_t ldy, Precision p) {
  MatmulJob j;
  j.xrows = x, j.m = m, j.w = &w, j.y = y, j.ldy = ldy, j.precision = p;
  matmul_batch(pool, &j, 1);
}

void matmul_t(const ThreadPool& pool, const float* x, int64_t m, int64_t ldx, const Weight& w,
              float* y, int64_t ldy) {
  active().matmul_t(pool, x, m, ldx, w, y, ldy);
}

void dequant_row(const Weight& w, int64_t r, float* out) {
  active().dequant_row(w, r, out);
}

float dot(const float* a, const float* b, int64_t n) {
  return active().dot(a, b, n);
}

void axpy(float a, const float* x, float* y, int64_t n) {
  active().axpy(a, x, y, n);
}

void dots(const float* a, int64_t na, int64_t lda, const float* const* b, int64_t nb, int64_t boff,
          int64_t n, float* out, int64_t ldo) {
  active().dots(a, na, lda, b, nb, boff, n, out, ldo);
}

void weighted_rows(const float* c, int64_t nc, int64_t ldc, const float* const* rows, int64_t nrows,
                   int64_t roff, int64_t n, float* y, int64_t ldy) {
  active().weighted_rows(c, nc, ldc, rows, nrows, roff, n, y, ldy);
}

void weighted_sum(const float* const* rows, const float* w, int64_t n, int64_t cols, float* y) {
  active().weighted_sum(rows, w, n, cols, y);
}

void softmax(float* x, int64_t n, float scale) {
  active().softmax(x, n, scale);
}

void dots_cached(const float* a, int64_t na, int64_t lda, const CachedRows& b, int64_t nb,
                 float* out, int64_t ldo) {
  active().dots_cached(a, na, lda, b, nb, out, ldo);
}

void weighted_cached(const float* c, int64_t nc, int64_t ldc, const CachedRows& rows, int64_t nrows,
                     int64_t roff, int64_t n, float* y, int64_t ldy) {
  active().weighted_cached(c, nc, ldc, rows, nrows, roff, n, y, ldy);
}

}  // namespace moeserve::kernels
