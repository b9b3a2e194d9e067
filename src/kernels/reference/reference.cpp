#include "kernels/reference/reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "kernels/bf16_math.h"
#include "kernels/exp_poly.h"

namespace moeserve::kernels::reference {

float block_scale(const Weight& w, int64_t r, int64_t c) {
  return w.scale_inv[((w.scale_row0 + r) / 128) * w.scale_cols + c / 128];
}

float group_scale(const Weight& w, int64_t r, int64_t c) {
  const int64_t i = r * w.group_cols + c / w.group_size;
  switch (w.group_scale_dtype) {
    case DType::BF16:
      return bf16_to_f32(static_cast<const uint16_t*>(w.group_scale)[i]);
    case DType::F16:
      return f16_to_f32(static_cast<const uint16_t*>(w.group_scale)[i]);
    case DType::F32:
      return static_cast<const float*>(w.group_scale)[i];
    default:
      fail("reference: unsupported group scale dtype ", dtype_name(w.group_scale_dtype));
  }
}

int int_value(const Weight& w, int64_t r, int64_t c) {
  // compressed-tensors' packing: element c of a row in bits [bits * (c % per), + bits) of the
  // row's little-endian int32 word c / per (per = 32 / bits), stored as q + 2^(bits - 1). Rows
  // are row_bytes apart; the byte of the word that holds those bits is read alone (the last
  // word of a Q8 row of cols % 4 != 0 columns may be cut short).
  const int bits = w.dtype == DType::Q4 ? 4 : 8, per = 32 / bits, bit = bits * (c % per);
  const auto* p =
      static_cast<const uint8_t*>(w.data) + r * row_bytes(w.dtype, w.cols) + c / per * 4 + bit / 8;
  const uint32_t u = (uint32_t{*p} >> (bit % 8)) & ((1u << bits) - 1);
  return static_cast<int>(u) - (1 << (bits - 1));
}

int64_t stored_position(const Weight& w, int64_t c) {
  if (w.dtype != DType::Q4) return c;
  return c / 32 * 32 + (c % 2) * 16 + c % 32 / 2;
}

float weight_value(const Weight& w, int64_t r, int64_t c) {
  const int64_t i = r * w.cols + c;
  switch (w.dtype) {
    case DType::Q8:
    case DType::Q4:
      return static_cast<float>(int_value(w, r, c)) * group_scale(w, r, c);
    case DType::F32:
      return static_cast<const float*>(w.data)[i];
    case DType::F16:
      return f16_to_f32(static_cast<const uint16_t*>(w.data)[i]);
    case DType::BF16:
      return bf16_to_f32(static_cast<const uint16_t*>(w.data)[i]);
    case DType::F8_E4M3:
      return fp8e4m3_to_f32(static_cast<const uint8_t*>(w.data)[i]) * block_scale(w, r, c);
    default:
      fail("reference: unsupported dtype ", dtype_name(w.dtype));
  }
}

void dequant(const Weight& w, float* out) {
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t c = 0; c < w.cols; ++c) out[r * w.cols + c] = weight_value(w, r, c);
}

void matmul(const float* x, int64_t m, int64_t ldx, const Weight& w, float* y, int64_t ldy) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t n = 0; n < w.rows; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < w.cols; ++k) {
        const float p = x[i * ldx + k] * weight_value(w, n, k);
        acc = acc + p;
      }
      y[i * ldy + n] = acc;
    }
  }
}

void matmul_abs(const float* x, int64_t m, int64_t ldx, const Weight& w, double* y, int64_t ldy) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t n = 0; n < w.rows; ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < w.cols; ++k)
        acc += std::fabs(static_cast<double>(x[i * ldx + k]) * weight_value(w, n, k));
      y[i * ldy + n] = acc;
    }
  }
}

float dot_lanes(const float* a, const float* b, int64_t n) {
  float lane[16] = {};
  const int64_t padded = (n + 15) / 16 * 16;
  for (int64_t k = 0; k < padded; ++k) {
    const float ak = k < n ? a[k] : 0.0f, bk = k < n ? b[k] : 0.0f;
    lane[k % 16] = std::fma(ak, bk, lane[k % 16]);
  }
  for (int s = 8; s >= 1; s /= 2)
    for (int l = 0; l < s; ++l) lane[l] = lane[l] + lane[l + s];
  return lane[0];
}

void matmul_lanes(const float* x, int64_t m, int64_t ldx, const Weight& w, float* y, int64_t ldy) {
  const bool fp8 = w.dtype == DType::F8_E4M3;
  std::vector<float> row(w.cols), xs(w.cols);
  for (int64_t n = 0; n < w.rows; ++n) {
    // Element k goes to position stored_position(k): Q4's order, the plain one otherwise.
    for (int64_t k = 0; k < w.cols; ++k)
      row[stored_position(w, k)] =
          fp8 ? fp8e4m3_to_f32(static_cast<const uint8_t*>(w.data)[n * w.cols + k])
              : weight_value(w, n, k);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t k = 0; k < w.cols; ++k)
        xs[stored_position(w, k)] = fp8 ? x[i * ldx + k] * block_scale(w, n, k) : x[i * ldx + k];
      y[i * ldy + n] = dot_lanes(xs.data(), row.data(), w.cols);
    }
  }
}

void matmul_bf16(const float* x, int64_t m, int64_t ldx, const Weight& w, float* y, int64_t ldy) {
  if (w.dtype == DType::Q8 || w.dtype == DType::Q4) return matmul_lanes(x, m, ldx, w, y, ldy);
  const bool fp8 = w.dtype == DType::F8_E4M3;
  const int64_t K = w.cols, Kp = (K + 31) / 32 * 32;
  std::vector<float> wr(Kp), xr(Kp);
  for (int64_t n = 0; n < w.rows; ++n) {
    for (int64_t k = 0; k < Kp; ++k) {
      float v = 0.0f;
      if (k < K) {
        if (fp8)
          v = fp8e4m3_to_f32(static_cast<const uint8_t*>(w.data)[n * K + k]);  // a normal bf16
        else if (w.dtype == DType::BF16)
          v = bf16_value(static_cast<const uint16_t*>(w.data)[n * K + k]);
        else
          v = bf16_value(bf16_round(weight_value(w, n, k)));
      }
      wr[k] = v;
    }
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t k = 0; k < Kp; ++k) {
        const float a = k < K ? x[i * ldx + k] : 0.0f;
        xr[k] = k < K ? bf16_value(bf16_round(fp8 ? a * block_scale(w, n, k) : a)) : 0.0f;
      }
      float lane[16] = {};
      for (int64_t c = 0; c < Kp / 32; ++c)
        for (int l = 0; l < 16; ++l) {
          const int64_t k = 32 * c + 2 * l;
          lane[l] = bf16_step(lane[l], xr[k + 1], wr[k + 1]);
          lane[l] = bf16_step(lane[l], xr[k], wr[k]);
        }
      for (int s = 8; s >= 1; s /= 2)
        for (int l = 0; l < s; ++l) lane[l] = lane[l] + lane[l + s];
      y[i * ldy + n] = lane[0];
    }
  }
}

void matmul_t(const float* x, int64_t m, int64_t ldx, const Weight& w, float* y, int64_t ldy) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = 0; c < w.cols; ++c) {
      float acc = 0.0f;
      for (int64_t r = 0; r < w.rows; ++r)
        acc = std::fma(x[i * ldx + r], weight_value(w, r, c), acc);
      y[i * ldy + c] = acc;
    }
  }
}

float exp_lanes(float t) {
  using namespace exp_poly;
  t = kMin > t ? kMin : t;
  const float prod = t * kLog2e;
  const float z = kMagic + prod;
  const float n = z + kMagic * -1.0f;
  float r = std::fma(n, kLn2Hi, t);
  r = std::fma(n, kLn2Lo, r);
  float p = kC[7];
  for (int i = 6; i >= 0; --i) p = std::fma(p, r, kC[i]);
  return p * std::ldexp(1.0f, static_cast<int>(n));
}

void softmax(float* x, int64_t n, float scale) {
  if (n <= 0) return;
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = x[j] * scale;
    m = std::max(m, x[j]);
  }
  float lane[16] = {};
  for (int64_t j = 0; j < n; ++j) {
    x[j] = exp_lanes(x[j] - m);
    lane[j % 16] = lane[j % 16] + x[j];
  }
  for (int s = 8; s >= 1; s /= 2)
    for (int l = 0; l < s; ++l) lane[l] = lane[l] + lane[l + s];
  const float inv = 1.0f / lane[0];
  for (int64_t j = 0; j < n; ++j) x[j] = x[j] * inv;
}

float cached_value(const CachedRows& r, int64_t j, int64_t k) {
  const uint8_t* row = r.rows[j];
  switch (r.dtype) {
    case DType::F32: {
      float f;
      std::memcpy(&f, row + 4 * k, 4);
      return f;
    }
    case DType::BF16: {
      uint16_t h;
      std::memcpy(&h, row + 2 * k, 2);
      return bf16_to_f32(h);
    }
    case DType::F8_E4M3:
      return fp8e4m3_to_f32(row[k]);
    default:
      fail("cached_value: unsupported dtype");
  }
}

float cached_scale(const CachedRows& r, int64_t j, int64_t k) {
  if (r.dtype != DType::F8_E4M3) return 1.0f;
  float s;
  std::memcpy(&s, r.rows[j] + r.width + 4 * (k / 128), 4);
  return s;
}

void dots_cached(const float* a, int64_t na, int64_t lda, const CachedRows& b, int64_t nb,
                 float* out, int64_t ldo) {
  const int64_t w = b.width;
  for (int64_t i = 0; i < na; ++i)
    for (int64_t j = 0; j < nb; ++j) {
      float total[16] = {};
      // One block of lane sums over the whole row, unless fp8 (blocks of 128).
      const int64_t block = b.dtype == DType::F8_E4M3 ? 128 : (w + 15) / 16 * 16;
      for (int64_t b0 = 0; b0 < w; b0 += block) {
        float lane[16] = {};
        const int64_t b1 = std::min(b0 + block, (w + 15) / 16 * 16);
        for (int64_t k = b0; k < b1; ++k) {
          const float ak = k < w ? a[i * lda + k] : 0.0f;
          const float bk = k < w ? cached_value(b, j, k) : 0.0f;
          lane[k % 16] = std::fma(ak, bk, lane[k % 16]);
        }
        if (b.dtype == DType::F8_E4M3) {
          const float s = cached_scale(b, j, b0);
          for (int l = 0; l < 16; ++l) total[l] = std::fma(s, lane[l], total[l]);
        } else {
          std::copy(lane, lane + 16, total);
        }
      }
      for (int s = 8; s >= 1; s /= 2)
        for (int l = 0; l < s; ++l) total[l] = total[l] + total[l + s];
      out[i * ldo + j] = total[0];
    }
}

void weighted_cached(const float* c, int64_t nc, int64_t ldc, const CachedRows& rows, int64_t nrows,
                     int64_t roff, int64_t n, float* y, int64_t ldy) {
  for (int64_t i = 0; i < nc; ++i)
    for (int64_t k = roff; k < roff + n; ++k) {
      float acc = 0.0f;
      for (int64_t j = 0; j < nrows; ++j) {
        const float w = rows.dtype == DType::F8_E4M3 ? c[i * ldc + j] * cached_scale(rows, j, k)
                                                     : c[i * ldc + j];
        acc = std::fma(w, cached_value(rows, j, k), acc);
      }
      y[i * ldy + (k - roff)] = acc;
    }
}

}  // namespace moeserve::kernels::reference
