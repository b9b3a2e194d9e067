#include "kv/kv_pool.h"

#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "core/error.h"

namespace moeserve::kv {
namespace {

size_t checked_bytes(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t row_bytes) {
  MS_CHECK(n_blocks > 0 && block_size > 0, "KV cache needs at least one block of one token");
  return static_cast<size_t>(n_blocks * n_layers * block_size * row_bytes);
}

}  // namespace

const char* kv_dtype_name(KvDtype d) {
  switch (d) {
    case KvDtype::F32:
      return "f32";
    case KvDtype::BF16:
      return "bf16";
    case KvDtype::FP8:
      return "fp8";
  }
  return "?";
}

bool parse_kv_dtype(const std::string& s, KvDtype* out) {
  for (KvDtype d : kKvDtypes)
    if (s == kv_dtype_name(d)) return *out = d, true;
  return false;
}

int64_t kv_row_bytes(KvDtype d, int64_t dim) {
  switch (d) {
    case KvDtype::F32:
      return dim * 4;
    case KvDtype::BF16:
      return dim * 2;
    case KvDtype::FP8:
      return dim + (dim + kKvFp8Block - 1) / kKvFp8Block * 4;
  }
  return 0;
}

void encode_row(KvDtype d, const float* x, int64_t dim, uint8_t* out) {
  switch (d) {
    case KvDtype::F32:
      std::memcpy(out, x, dim * sizeof(float));
      return;
    case KvDtype::BF16:
      for (int64_t k = 0; k < dim; ++k) {
        const uint16_t h = f32_to_bf16(x[k]);
        std::memcpy(out + 2 * k, &h, 2);
      }
      return;
    case KvDtype::FP8:
      for (int64_t b = 0; b * kKvFp8Block < dim; ++b) {
        const int64_t k0 = b * kKvFp8Block, k1 = std::min(dim, k0 + kKvFp8Block);
        float amax = 0;
        bool finite = true;
        for (int64_t k = k0; k < k1; ++k) {
          finite &= std::isfinite(x[k]);
          amax = std::max(amax, std::fabs(x[k]));
        }
        float scale = !finite ? NAN : amax > 0 ? amax / 448.0f : 1.0f;
        // A subnormal amax / 448 would make x / scale overflow to infinity: saturate instead.
        if (finite && scale < 0x1p-126f) scale = 0x1p-126f;
        for (int64_t k = k0; k < k1; ++k) out[k] = finite ? f32_to_fp8e4m3(x[k] / scale) : 0;
        std::memcpy(out + dim + 4 * b, &scale, 4);
      }
      return;
  }
}

void decode_row(KvDtype d, const uint8_t* row, int64_t dim, float* out) {
  switch (d) {
    case KvDtype::F32:
      std::memcpy(out, row, dim * sizeof(float));
      return;
    case KvDtype::BF16:
      for (int64_t k = 0; k < dim; ++k) {
        uint16_t h;
        std::memcpy(&h, row + 2 * k, 2);
        out[k] = bf16_to_f32(h);
      }
      return;
    case KvDtype::FP8:
      for (int64_t k = 0; k < dim; ++k) {
        float s;
        std::memcpy(&s, row + dim + 4 * (k / kKvFp8Block), 4);
        out[k] = fp8e4m3_to_f32(row[k]) * s;
      }
      return;
  }
}

KvPool::KvPool(int64_t n_blocks, int64_t block_size, int64_t n_layers, int64_t kv_dim,
               KvDtype dtype)
    : n_blocks_(n_blocks),
      block_size_(block_size),
      n_layers_(n_layers),
      kv_dim_(kv_dim),
      dtype_(dtype),
      row_bytes_(kv_row_bytes(dtype, kv_dim)),
      mem_(checked_bytes(n_blocks, block_size, n_layers, row_bytes_), "the KV cache") {
  std::memset(mem_.data(), 0, n_blocks * block_bytes());
  free_.reserve(n_blocks);
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
  in_use_.assign(n_blocks, 0);
}

bool KvPool::allocate(int64_t n, std::vector<int32_t>* out) {
  if (n > n_free()) return false;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t b = free_.back();
    free_.pop_back();
    in_use_[b] = 1;
    out->push_back(b);
  }
  return true;
}

void KvPool::release(const std::vector<int32_t>& blocks) {
  for (int32_t b : blocks) {
    MS_ASSERT(b >= 0 && b < n_blocks_ && in_use_[b]);
    in_use_[b] = 0;
    free_.push_back(b);
  }
}

}  // namespace moeserve::kv
