// Shared pieces of the kernels in cpu/impl.h: scratch buffers and weight access, generic over
// an instruction set's vector ops `O` (see impl.h). Internal linkage: included once per ISA.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "kernels/kernels.h"

namespace moeserve::kernels {
namespace {

// A 64-byte aligned float buffer that only grows; kept per thread and reused across calls.
class Scratch {
 public:
  ~Scratch() { std::free(data_); }
  float* get(size_t n) {
    if (n > cap_) {
      std::free(data_);
      cap_ = (n + 15) & ~size_t{15};
      data_ = static_cast<float*>(std::aligned_alloc(64, cap_ * sizeof(float)));
      MS_ASSERT(data_ != nullptr);
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  size_t cap_ = 0;
};

// fn(b, e) over [0, n) in pieces of `piece`, which the pool's threads take in turn as they come
// free, instead of one fixed range each: on a shared machine one thread is often slowed, and the
// others then take over its share. Only for work whose results do not depend on who computes
// which piece (the GEMV's rows: kernels.h).
template <class F>
void parallel_pieces(const ThreadPool& pool, int64_t n, int64_t piece, F&& fn) {
  piece = std::max<int64_t>(1, piece);
  const int64_t np = (n + piece - 1) / piece;
  if (np <= 1 || pool.size() == 1) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  std::atomic<int64_t> next{0};
  pool.parallel_for(std::min<int64_t>(pool.size(), np), [&](int64_t, int64_t, int) {
    for (int64_t p = next.fetch_add(1, std::memory_order_relaxed); p < np;
         p = next.fetch_add(1, std::memory_order_relaxed))
      fn(p * piece, std::min(n, (p + 1) * piece));
  });
}

constexpr int64_t round16(int64_t n) {
  return (n + 15) & ~int64_t{15};
}

template <DType DT>
constexpr bool is_int() {  // Q8 or Q4
  return DT == DType::Q8 || DT == DType::Q4;
}

// Bytes per element (Q4: 0, half a byte; see row_bytes).
template <DType DT>
constexpr int64_t elem_bytes() {
  return DT == DType::F32                          ? 4
         : DT == DType::Q4                         ? 0
         : DT == DType::F8_E4M3 || DT == DType::Q8 ? 1
                                                   : 2;
}

// Row r of a weight view: its bytes and (fp8) its row of block scales.
inline const uint8_t* w_row(const Weight& w, int64_t r) {
  return static_cast<const uint8_t*>(w.data) + r * row_bytes(w.dtype, w.cols);
}
inline const float* w_scales(const Weight& w, int64_t r) {
  return w.scale_inv + ((w.scale_row0 + r) / kFp8Block) * w.scale_cols;
}

// The end of the block row of scales (128 rows of the full matrix) that row r of a view is in.
inline int64_t block_row_end(const Weight& w, int64_t r) {
  return r + kFp8Block - (w.scale_row0 + r) % kFp8Block;
}

// Q8, Q4: the scale of group g of row r, as a float (exact: bf16 and f16 widen exactly).
template <class O>
inline float group_scale(const Weight& w, int64_t r, int64_t g) {
  const int64_t i = r * w.group_cols + g;
  switch (w.group_scale_dtype) {
    case DType::BF16:
      return bf16_to_f32(static_cast<const uint16_t*>(w.group_scale)[i]);
    case DType::F16:
      return O::f16(static_cast<const uint16_t*>(w.group_scale)[i]);
    default:
      return static_cast<const float*>(w.group_scale)[i];
  }
}

// What load_w takes as `s` for a Q8 / Q4 group of scale `scale` (O::q8_prep / O::q4_prep).
template <class O, DType DT>
inline typename O::V int_prep(float scale) {
  if constexpr (DT == DType::Q4)
    return O::q4_prep(scale);
  else
    return O::q8_prep(scale);
}

// Row r's group scales.
inline const uint8_t* w_group_scales(const Weight& w, int64_t r) {
  return static_cast<const uint8_t*>(w.group_scale) +
         r * w.group_cols * static_cast<int64_t>(dtype_size(w.group_scale_dtype));
}

// int_prep of group g of a row whose scales are at srow. `first`: the scale is the view's
// first, with nothing readable before it (O::q4_prep_bf16 / q8_prep_bf16 read the two bytes
// before).
template <class O, DType DT>
inline typename O::V int_prep_at(const Weight& w, const uint8_t* srow, int64_t g, bool first) {
  switch (w.group_scale_dtype) {
    case DType::BF16: {
      const auto* p = reinterpret_cast<const uint16_t*>(srow) + g;
      if constexpr (O::kPrepBf16) {
        if (!first) {
          if constexpr (DT == DType::Q4)
            return O::q4_prep_bf16(p);
          else
            return O::q8_prep_bf16(p);
        }
      }
      return int_prep<O, DT>(bf16_to_f32(*p));
    }
    case DType::F16:
      return int_prep<O, DT>(O::f16(reinterpret_cast<const uint16_t*>(srow)[g]));
    default:
      return int_prep<O, DT>(reinterpret_cast<const float*>(srow)[g]);
  }
}

template <class O, DType DT>
inline typename O::V fp8_scale(const float* scales, int64_t k) {
  if constexpr (DT == DType::F8_E4M3)
    return O::set1(scales[k / kFp8Block] * 256.0f);
  else
    return O::zero();
}

// Elements [k, k + 16) of a row as floats; `s` = block scale * 256 (fp8), or int_prep of the
// group's scale (Q8, Q4). Q4 takes its elements in stored order (kernels.h): [k, k + 16) are
// the positions, k a multiple of 16, position 32c + j (j < 16) element 32c + 2j and 32c + 16 + j
// element 32c + 2j + 1.
template <class O, DType DT>
inline typename O::V load_w(const uint8_t* row, int64_t k, typename O::V s) {
  if constexpr (DT == DType::Q4)
    return O::cvt_q4(row + k / 32 * 16, static_cast<int>(k / 16 % 2), s);
  else if constexpr (DT == DType::Q8)
    return O::cvt_q8(row + k, s);
  else if constexpr (DT == DType::F32)
    return O::load(reinterpret_cast<const float*>(row) + k);
  else if constexpr (DT == DType::BF16)
    return O::cvt_bf16(reinterpret_cast<const uint16_t*>(row) + k);
  else if constexpr (DT == DType::F16)
    return O::cvt_f16(reinterpret_cast<const uint16_t*>(row) + k);
  else
    return O::cvt_fp8(row + k, s);
}

// Elements [k, k + n), n < 16, then lanes that are exactly +0.0 (the contract's padding).
template <class O, DType DT>
inline typename O::V load_w_tail(const uint8_t* row, int64_t k, int64_t n, typename O::V s) {
  constexpr int64_t es = elem_bytes<DT>();
  alignas(64) uint8_t raw[64] = {};
  std::memcpy(raw, row + k * es, static_cast<size_t>(n * es));
  alignas(64) float f[16];
  O::store(f, load_w<O, DT>(raw, 0, s));
  for (int64_t l = n; l < 16; ++l) f[l] = 0.0f;
  return O::load(f);
}

// The x side of the fp8 contract (kernels.h) for weight rows of block row `sc` (w_scales):
// xs[i][k] = x[i][k] * sc[k / 128] for k in [k0, k1), +0.0 on to round16(k1) where k1 = K.
// x: m row pointers, zero up to round16(K); xs: [m, ldxs], column k0 at xs[i][0]. With
// `raw_ok`, when every |xs| < 2^8 it stores xs * 2^120 instead (exact), for weights taken by
// O::cvt_fp8_raw (float(fp8) * 2^-120): the same products. Returns whether it did.
template <class O>
bool fp8_scale_x(const float* const* x, int64_t m, int64_t K, int64_t k0, int64_t k1,
                 const float* sc, bool raw_ok, float* xs, int64_t ldxs) {
  using V = typename O::V;
  const int64_t kp = k1 == K ? round16(K) : k1;
  const V up = O::set1(0x1p120f);
  bool small = true;
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x[i];
    float* o = xs + i * ldxs - k0;
    for (int64_t b = k0; b < k1; b += kFp8Block) {
      const V f = O::set1(sc[b / kFp8Block]);
      const int64_t e = std::min(k1, b + kFp8Block);
      for (int64_t k = b; k < e; k += 16) {
        const V v = O::mul(O::load(xi + k), f);
        if (raw_ok) {
          small &= O::below_2p8(v);
          O::store(o + k, O::mul(v, up));
        } else {
          O::store(o + k, v);
        }
      }
    }
    for (int64_t k = k1; k < kp; ++k) o[k] = 0.0f;  // 0 * 0, not 0 * scale
  }
  if (raw_ok && !small) return fp8_scale_x<O>(x, m, K, k0, k1, sc, false, xs, ldxs);
  return raw_ok;
}

// Whether an fp8 block scale allows O::cvt_fp8_direct: scale * 2^120 must be exact (|scale| <
// 2^8, not NaN). Sets *factor to it.
inline bool fp8_direct_scale(float scale, float* factor) {
  if (!(std::fabs(scale) < 0x1p8f)) return false;
  *factor = scale * 0x1p120f;
  return true;
}

// Elements [k, k + 16) of a row (k a multiple of 16), zero past cols; sc: the row's fp8 block
// scales. NaN-free fp8 (w.fp8_plain) goes through the direct conversion where its scale allows,
// everything else through load_w / load_w_tail: the same values either way.
template <class O, DType DT>
inline typename O::V load_chunk(const Weight& w, const uint8_t* row, const float* sc, int64_t k) {
  if (k + 16 > w.cols) return load_w_tail<O, DT>(row, k, w.cols - k, fp8_scale<O, DT>(sc, k));
  if constexpr (DT == DType::F8_E4M3 && O::kFp8Direct) {
    float f;
    if (w.fp8_plain && fp8_direct_scale(sc[k / kFp8Block], &f))
      return O::cvt_fp8_direct(row + k, O::set1(f));
  }
  return load_w<O, DT>(row, k, fp8_scale<O, DT>(sc, k));
}

// A scope with the MXCSR's flush-to-zero and denormals-are-zero bits set (restored at its end):
// under it an FMA flushes tiny inputs and results as vdpbf16ps does (matmul_bf16.h's Ftz).
struct FtzDazScope {
  unsigned csr, on;
  FtzDazScope() {
    asm volatile("stmxcsr %0" : "=m"(csr)::"memory");
    on = csr | 0x8040u;
    asm volatile("ldmxcsr %0" ::"m"(on) : "memory");
  }
  ~FtzDazScope() { asm volatile("ldmxcsr %0" ::"m"(csr) : "memory"); }
};

}  // namespace
}  // namespace moeserve::kernels
