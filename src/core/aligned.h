// An allocator of 64-byte aligned storage: vectors whose rows the matmul kernels read in place
// (kernels.h takes its direct path for aligned rows whose length is a multiple of 16).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace moeserve {

template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new (n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, size_t) { ::operator delete (p, std::align_val_t{64}); }
  bool operator==(const Aligned64&) const { return true; }
};

using AlignedFloats = std::vector<float, Aligned64<float>>;

}  // namespace moeserve
